package pandastack

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pandastack/pandastack/wire"
)

const testKey = "test-key"

// fakeServer follows docs/API.md just far enough to check the client's
// encoding, decoding and error handling; it runs no sandboxes. Exec answers
// come from the exec field.
type fakeServer struct {
	t *testing.T

	mu sync.Mutex
	// last holds the method, path, headers and body of the latest request.
	last struct {
		method, path, accept, auth string
		body                       []byte
	}
	sandboxes map[string]wire.Sandbox
	snapshots map[string]wire.Snapshot
	// made counts the sandboxes created, for their ids.
	made int
	// exec answers an exec request whose body has been decoded.
	exec func(w http.ResponseWriter, r *http.Request, req wire.ExecRequest)
}

func newFakeServer(t *testing.T) (*fakeServer, *httptest.Server) {
	f := &fakeServer{t: t, sandboxes: map[string]wire.Sandbox{}, snapshots: map[string]wire.Snapshot{}}
	srv := httptest.NewServer(f.handler())
	t.Cleanup(srv.Close)
	return f, srv
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, wire.ErrorResponse{Error: wire.Error{Code: code, Message: msg}})
}

// decode reads a request body strictly, as the server does.
func decode(w http.ResponseWriter, body []byte, v any) bool {
	dec := json.NewDecoder(strings.NewReader(string(body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeError(w, http.StatusBadRequest, wire.CodeInvalid, err.Error())
		return false
	}
	return true
}

func (f *fakeServer) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/health", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, wire.Health{Status: "ok", Version: "test", Runtime: "gvisor"})
	})
	mux.HandleFunc("GET /v1/templates", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, wire.TemplateList{Templates: []wire.Template{{Name: "base", Ready: true, Packages: []string{"busybox"}}}})
	})
	mux.HandleFunc("POST /v1/sandboxes", func(w http.ResponseWriter, r *http.Request) {
		var req wire.CreateSandboxRequest
		if !decode(w, f.last.body, &req) {
			return
		}
		if req.SnapshotID != "" {
			snap, ok := f.snapshots[req.SnapshotID]
			if !ok {
				writeError(w, http.StatusNotFound, wire.CodeNotFound, fmt.Sprintf("snapshot %q not found", req.SnapshotID))
				return
			}
			if req.Template == "" {
				req.Template = snap.Template
			}
		}
		if req.Template == "" {
			req.Template = "base"
		}
		if req.OnTimeout == "" {
			req.OnTimeout = wire.OnTimeoutKill
		}
		sb := f.newSandbox(req.Template, req.TTLSeconds, req.OnTimeout)
		sb.Metadata, sb.CPU, sb.MemoryMB = req.Metadata, req.CPU, req.MemoryMB
		f.sandboxes[sb.ID] = sb
		writeJSON(w, http.StatusCreated, sb)
	})
	mux.HandleFunc("POST /v1/sandboxes/{id}/snapshot", func(w http.ResponseWriter, r *http.Request) {
		sb, ok := f.lookup(w, r)
		if !ok {
			return
		}
		snap := wire.Snapshot{
			ID: fmt.Sprintf("snap-%d", len(f.snapshots)+1), SourceSandbox: sb.ID, Template: sb.Template,
			SizeBytes: 4096, CreatedAt: sb.CreatedAt,
		}
		f.snapshots[snap.ID] = snap
		writeJSON(w, http.StatusCreated, snap)
	})
	mux.HandleFunc("POST /v1/sandboxes/{id}/fork", func(w http.ResponseWriter, r *http.Request) {
		parent, ok := f.lookup(w, r)
		if !ok {
			return
		}
		var req wire.ForkRequest
		if !decode(w, f.last.body, &req) {
			return
		}
		if req.Count == 0 {
			req.Count = 1
		}
		if req.Count < 1 || req.Count > 16 {
			writeError(w, http.StatusBadRequest, wire.CodeInvalid, "count must be 1 to 16")
			return
		}
		if req.TTLSeconds == 0 {
			req.TTLSeconds = int(parent.ExpiresAt.Sub(parent.CreatedAt).Seconds())
		}
		resp := wire.ForkResponse{Sandboxes: []wire.Sandbox{}}
		for range req.Count {
			sb := f.newSandbox(parent.Template, req.TTLSeconds, parent.OnTimeout)
			f.sandboxes[sb.ID] = sb
			resp.Sandboxes = append(resp.Sandboxes, sb)
		}
		writeJSON(w, http.StatusCreated, resp)
	})
	for _, action := range []string{"pause", "resume"} {
		mux.HandleFunc("POST /v1/sandboxes/{id}/"+action, func(w http.ResponseWriter, r *http.Request) {
			sb, ok := f.lookup(w, r)
			if !ok {
				return
			}
			if len(f.last.body) != 0 {
				writeError(w, http.StatusBadRequest, wire.CodeInvalid, "no body expected")
				return
			}
			sb.State, sb.PausedBytes = wire.StateRunning, 0
			if action == "pause" {
				sb.State, sb.PausedBytes = wire.StatePaused, 1<<20
			}
			f.sandboxes[sb.ID] = sb
			writeJSON(w, http.StatusOK, sb)
		})
	}
	mux.HandleFunc("GET /v1/snapshots", func(w http.ResponseWriter, r *http.Request) {
		l := wire.SnapshotList{Snapshots: []wire.Snapshot{}}
		for _, snap := range f.snapshots {
			l.Snapshots = append(l.Snapshots, snap)
		}
		writeJSON(w, http.StatusOK, l)
	})
	mux.HandleFunc("GET /v1/snapshots/{id}", func(w http.ResponseWriter, r *http.Request) {
		if snap, ok := f.lookupSnapshot(w, r); ok {
			writeJSON(w, http.StatusOK, snap)
		}
	})
	mux.HandleFunc("DELETE /v1/snapshots/{id}", func(w http.ResponseWriter, r *http.Request) {
		if snap, ok := f.lookupSnapshot(w, r); ok {
			delete(f.snapshots, snap.ID)
			w.WriteHeader(http.StatusNoContent)
		}
	})
	mux.HandleFunc("GET /v1/sandboxes", func(w http.ResponseWriter, r *http.Request) {
		var l wire.SandboxList
		for _, sb := range f.sandboxes {
			l.Sandboxes = append(l.Sandboxes, sb)
		}
		writeJSON(w, http.StatusOK, l)
	})
	mux.HandleFunc("GET /v1/sandboxes/{id}", func(w http.ResponseWriter, r *http.Request) {
		if sb, ok := f.lookup(w, r); ok {
			writeJSON(w, http.StatusOK, sb)
		}
	})
	mux.HandleFunc("DELETE /v1/sandboxes/{id}", func(w http.ResponseWriter, r *http.Request) {
		if sb, ok := f.lookup(w, r); ok {
			delete(f.sandboxes, sb.ID)
			w.WriteHeader(http.StatusNoContent)
		}
	})
	mux.HandleFunc("POST /v1/sandboxes/{id}/timeout", func(w http.ResponseWriter, r *http.Request) {
		sb, ok := f.lookup(w, r)
		if !ok {
			return
		}
		var req wire.SetTimeoutRequest
		if !decode(w, f.last.body, &req) {
			return
		}
		if req.TTLSeconds < 1 {
			writeError(w, http.StatusBadRequest, wire.CodeInvalid, "ttl_seconds must be at least 1")
			return
		}
		sb.ExpiresAt = sb.CreatedAt.Add(time.Duration(req.TTLSeconds) * time.Second)
		f.sandboxes[sb.ID] = sb
		writeJSON(w, http.StatusOK, sb)
	})
	mux.HandleFunc("POST /v1/sandboxes/{id}/exec", func(w http.ResponseWriter, r *http.Request) {
		if _, ok := f.lookup(w, r); !ok {
			return
		}
		var req wire.ExecRequest
		if !decode(w, f.last.body, &req) {
			return
		}
		if (req.Cmd == "") == (len(req.Argv) == 0) {
			writeError(w, http.StatusBadRequest, wire.CodeInvalid, "exactly one of cmd and argv is needed")
			return
		}
		f.exec(w, r, req)
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		f.mu.Lock()
		defer f.mu.Unlock()
		f.last.method, f.last.path = r.Method, r.URL.Path
		f.last.accept, f.last.auth = r.Header.Get("Accept"), r.Header.Get("Authorization")
		f.last.body = body
		if r.URL.Path != "/v1/health" && r.Header.Get("Authorization") != "Bearer "+testKey {
			writeError(w, http.StatusUnauthorized, wire.CodeUnauthenticated, "missing or wrong API key")
			return
		}
		mux.ServeHTTP(w, r)
	})
}

func (f *fakeServer) lookup(w http.ResponseWriter, r *http.Request) (wire.Sandbox, bool) {
	sb, ok := f.sandboxes[r.PathValue("id")]
	if !ok {
		writeError(w, http.StatusNotFound, wire.CodeNotFound, fmt.Sprintf("sandbox %q not found", r.PathValue("id")))
	}
	return sb, ok
}

func (f *fakeServer) lookupSnapshot(w http.ResponseWriter, r *http.Request) (wire.Snapshot, bool) {
	snap, ok := f.snapshots[r.PathValue("id")]
	if !ok {
		writeError(w, http.StatusNotFound, wire.CodeNotFound, fmt.Sprintf("snapshot %q not found", r.PathValue("id")))
	}
	return snap, ok
}

// newSandbox returns a running sandbox with the next id; the caller stores
// it. Ids count every sandbox made, so killed ones are not reused.
func (f *fakeServer) newSandbox(template string, ttlSeconds int, onTimeout string) wire.Sandbox {
	if ttlSeconds == 0 {
		ttlSeconds = 300
	}
	f.made++
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	return wire.Sandbox{
		ID: fmt.Sprintf("sb-%d", f.made), Template: template, State: wire.StateRunning,
		CreatedAt: now, ExpiresAt: now.Add(time.Duration(ttlSeconds) * time.Second),
		OnTimeout: onTimeout,
	}
}

// newTestClient returns a client of srv that finds no key on its own.
func newTestClient(t *testing.T, srv *httptest.Server, opts ...Option) *Client {
	t.Helper()
	t.Setenv("PANDASTACK_URL", "")
	t.Setenv("PANDASTACK_API_KEY", "")
	t.Setenv("PANDASTACK_DATA_DIR", t.TempDir())
	c, err := NewClient(append([]Option{WithURL(srv.URL)}, opts...)...)
	if err != nil {
		t.Fatalf("NewClient: %v", err)
	}
	return c
}

func TestNewClientResolution(t *testing.T) {
	tests := []struct {
		name     string
		opts     []Option
		env      map[string]string
		keyFile  string // contents of $PANDASTACK_DATA_DIR/api-key; none when empty
		wantURL  string
		wantKey  string
		wantHint bool
		wantErr  bool
	}{
		{name: "defaults, no key file", wantURL: DefaultURL, wantHint: true},
		{name: "key file trimmed", keyFile: "  filekey\n", wantURL: DefaultURL, wantKey: "filekey"},
		{name: "blank key file", keyFile: " \n", wantURL: DefaultURL, wantHint: true},
		{
			name:    "env beats key file",
			env:     map[string]string{"PANDASTACK_URL": "http://env:1", "PANDASTACK_API_KEY": "envkey"},
			keyFile: "filekey", wantURL: "http://env:1", wantKey: "envkey",
		},
		{
			name:    "options beat env",
			opts:    []Option{WithURL("https://opt:2/"), WithAPIKey("optkey")},
			env:     map[string]string{"PANDASTACK_URL": "http://env:1", "PANDASTACK_API_KEY": "envkey"},
			wantURL: "https://opt:2", wantKey: "optkey",
		},
		{
			name:    "empty options are ignored",
			opts:    []Option{WithURL(""), WithAPIKey(""), WithHTTPClient(nil)},
			env:     map[string]string{"PANDASTACK_URL": "http://env:1", "PANDASTACK_API_KEY": "envkey"},
			wantURL: "http://env:1", wantKey: "envkey",
		},
		{name: "URL without scheme", opts: []Option{WithURL("localhost:7423")}, wantErr: true},
		{name: "URL with other scheme", opts: []Option{WithURL("ftp://host")}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			t.Setenv("PANDASTACK_URL", "")
			t.Setenv("PANDASTACK_API_KEY", "")
			t.Setenv("PANDASTACK_DATA_DIR", dir)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			if tt.keyFile != "" {
				if err := os.WriteFile(filepath.Join(dir, "api-key"), []byte(tt.keyFile), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			c, err := NewClient(tt.opts...)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("NewClient: got no error, want one")
				}
				return
			}
			if err != nil {
				t.Fatalf("NewClient: %v", err)
			}
			if c.baseURL != tt.wantURL {
				t.Errorf("URL: got %q, want %q", c.baseURL, tt.wantURL)
			}
			if c.apiKey != tt.wantKey {
				t.Errorf("key: got %q, want %q", c.apiKey, tt.wantKey)
			}
			if got := c.keyHint != ""; got != tt.wantHint {
				t.Errorf("key hint %q: got set %v, want %v", c.keyHint, got, tt.wantHint)
			}
		})
	}
}

func TestWithHTTPClient(t *testing.T) {
	_, srv := newFakeServer(t)
	var used bool
	hc := &http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		used = true
		return http.DefaultTransport.RoundTrip(r)
	})}
	c := newTestClient(t, srv, WithHTTPClient(hc))
	if _, err := c.Health(context.Background()); err != nil {
		t.Fatalf("Health: %v", err)
	}
	if !used {
		t.Errorf("the given HTTP client was not used")
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// TestRequests checks each call's method, path, auth header and body.
func TestRequests(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name       string
		call       func(c *Client, sb *Sandbox) error
		wantMethod string
		wantPath   string
		wantBody   string // JSON, compared semantically; "" for none
		wantAuth   string
	}{
		{
			name:       "health",
			call:       func(c *Client, _ *Sandbox) error { _, err := c.Health(ctx); return err },
			wantMethod: "GET", wantPath: "/v1/health", wantAuth: "Bearer " + testKey,
		},
		{
			name:       "templates",
			call:       func(c *Client, _ *Sandbox) error { _, err := c.Templates(ctx); return err },
			wantMethod: "GET", wantPath: "/v1/templates", wantAuth: "Bearer " + testKey,
		},
		{
			name: "create with every option",
			call: func(c *Client, _ *Sandbox) error {
				_, err := c.Create(ctx, CreateOptions{
					Template: "python", TTL: 1500 * time.Millisecond, Env: map[string]string{"A": "1"},
					Metadata: map[string]string{"k": "v"}, CPU: 0.5, MemoryMB: 256,
				})
				return err
			},
			wantMethod: "POST", wantPath: "/v1/sandboxes", wantAuth: "Bearer " + testKey,
			wantBody: `{"template":"python","ttl_seconds":2,"env":{"A":"1"},"metadata":{"k":"v"},"cpu":0.5,"memory_mb":256}`,
		},
		{
			name:       "create with defaults",
			call:       func(c *Client, _ *Sandbox) error { _, err := c.Create(ctx, CreateOptions{}); return err },
			wantMethod: "POST", wantPath: "/v1/sandboxes", wantAuth: "Bearer " + testKey, wantBody: `{}`,
		},
		{
			name:       "list",
			call:       func(c *Client, _ *Sandbox) error { _, err := c.List(ctx); return err },
			wantMethod: "GET", wantPath: "/v1/sandboxes", wantAuth: "Bearer " + testKey,
		},
		{
			name:       "connect",
			call:       func(c *Client, sb *Sandbox) error { _, err := c.Connect(ctx, sb.ID()); return err },
			wantMethod: "GET", wantPath: "/v1/sandboxes/sb-1", wantAuth: "Bearer " + testKey,
		},
		{
			name:       "set timeout",
			call:       func(_ *Client, sb *Sandbox) error { return sb.SetTimeout(ctx, time.Minute) },
			wantMethod: "POST", wantPath: "/v1/sandboxes/sb-1/timeout", wantAuth: "Bearer " + testKey,
			wantBody: `{"ttl_seconds":60}`,
		},
		{
			name:       "kill",
			call:       func(_ *Client, sb *Sandbox) error { return sb.Kill(ctx) },
			wantMethod: "DELETE", wantPath: "/v1/sandboxes/sb-1", wantAuth: "Bearer " + testKey,
		},
		{
			name:       "snapshot",
			call:       func(_ *Client, sb *Sandbox) error { _, err := sb.Snapshot(ctx); return err },
			wantMethod: "POST", wantPath: "/v1/sandboxes/sb-1/snapshot", wantAuth: "Bearer " + testKey,
		},
		{
			name: "create from a snapshot, pausing at the TTL",
			call: func(c *Client, sb *Sandbox) error {
				snap, err := sb.Snapshot(ctx)
				if err != nil {
					return err
				}
				_, err = c.Create(ctx, CreateOptions{SnapshotID: snap.ID, OnTimeout: wire.OnTimeoutPause})
				return err
			},
			wantMethod: "POST", wantPath: "/v1/sandboxes", wantAuth: "Bearer " + testKey,
			wantBody: `{"snapshot_id":"snap-1","on_timeout":"pause"}`,
		},
		{
			name: "fork with every option",
			call: func(_ *Client, sb *Sandbox) error {
				_, err := sb.Fork(ctx, ForkOptions{Count: 3, TTL: 1500 * time.Millisecond})
				return err
			},
			wantMethod: "POST", wantPath: "/v1/sandboxes/sb-1/fork", wantAuth: "Bearer " + testKey,
			wantBody: `{"count":3,"ttl_seconds":2}`,
		},
		{
			name:       "fork with defaults",
			call:       func(_ *Client, sb *Sandbox) error { _, err := sb.Fork(ctx, ForkOptions{}); return err },
			wantMethod: "POST", wantPath: "/v1/sandboxes/sb-1/fork", wantAuth: "Bearer " + testKey, wantBody: `{}`,
		},
		{
			name:       "pause",
			call:       func(_ *Client, sb *Sandbox) error { return sb.Pause(ctx) },
			wantMethod: "POST", wantPath: "/v1/sandboxes/sb-1/pause", wantAuth: "Bearer " + testKey,
		},
		{
			name:       "resume",
			call:       func(_ *Client, sb *Sandbox) error { return sb.Resume(ctx) },
			wantMethod: "POST", wantPath: "/v1/sandboxes/sb-1/resume", wantAuth: "Bearer " + testKey,
		},
		{
			name: "connect resumes a paused sandbox",
			call: func(c *Client, sb *Sandbox) error {
				if err := sb.Pause(ctx); err != nil {
					return err
				}
				_, err := c.Connect(ctx, sb.ID())
				return err
			},
			wantMethod: "POST", wantPath: "/v1/sandboxes/sb-1/resume", wantAuth: "Bearer " + testKey,
		},
		{
			name: "get leaves a paused sandbox paused",
			call: func(c *Client, sb *Sandbox) error {
				if err := sb.Pause(ctx); err != nil {
					return err
				}
				_, err := c.Get(ctx, sb.ID())
				return err
			},
			wantMethod: "GET", wantPath: "/v1/sandboxes/sb-1", wantAuth: "Bearer " + testKey,
		},
		{
			name:       "list snapshots",
			call:       func(c *Client, _ *Sandbox) error { _, err := c.Snapshots(ctx); return err },
			wantMethod: "GET", wantPath: "/v1/snapshots", wantAuth: "Bearer " + testKey,
		},
		{
			name: "get a snapshot",
			call: func(c *Client, sb *Sandbox) error {
				if _, err := sb.Snapshot(ctx); err != nil {
					return err
				}
				_, err := c.Snapshot(ctx, "snap-1")
				return err
			},
			wantMethod: "GET", wantPath: "/v1/snapshots/snap-1", wantAuth: "Bearer " + testKey,
		},
		{
			name: "delete a snapshot",
			call: func(c *Client, sb *Sandbox) error {
				if _, err := sb.Snapshot(ctx); err != nil {
					return err
				}
				return c.DeleteSnapshot(ctx, "snap-1")
			},
			wantMethod: "DELETE", wantPath: "/v1/snapshots/snap-1", wantAuth: "Bearer " + testKey,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, srv := newFakeServer(t)
			c := newTestClient(t, srv, WithAPIKey(testKey))
			sb, err := c.Create(ctx, CreateOptions{})
			if err != nil {
				t.Fatalf("Create: %v", err)
			}
			if err := tt.call(c, sb); err != nil {
				t.Fatalf("call: %v", err)
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			if f.last.method != tt.wantMethod || f.last.path != tt.wantPath {
				t.Errorf("request: got %s %s, want %s %s", f.last.method, f.last.path, tt.wantMethod, tt.wantPath)
			}
			if f.last.auth != tt.wantAuth {
				t.Errorf("Authorization: got %q, want %q", f.last.auth, tt.wantAuth)
			}
			if !jsonEqual(t, string(f.last.body), tt.wantBody) {
				t.Errorf("body: got %s, want %s", f.last.body, tt.wantBody)
			}
		})
	}
}

func jsonEqual(t *testing.T, a, b string) bool {
	t.Helper()
	if a == "" || b == "" {
		return a == b
	}
	var va, vb any
	if err := json.Unmarshal([]byte(a), &va); err != nil {
		t.Fatalf("decoding %s: %v", a, err)
	}
	if err := json.Unmarshal([]byte(b), &vb); err != nil {
		t.Fatalf("decoding %s: %v", b, err)
	}
	return reflect.DeepEqual(va, vb)
}

// TestSandboxLifecycle checks that answers are decoded into the handle.
func TestSandboxLifecycle(t *testing.T) {
	ctx := context.Background()
	_, srv := newFakeServer(t)
	c := newTestClient(t, srv, WithAPIKey(testKey))

	sb, err := c.Create(ctx, CreateOptions{Template: "base", TTL: 10 * time.Second, Metadata: map[string]string{"owner": "me"}})
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	info := sb.Info()
	if sb.ID() != "sb-1" || info.ID != "sb-1" || info.State != wire.StateRunning || info.Metadata["owner"] != "me" {
		t.Errorf("Create: got id %q info %+v", sb.ID(), info)
	}
	if got, want := info.ExpiresAt.Sub(info.CreatedAt), 10*time.Second; got != want {
		t.Errorf("TTL: got %v, want %v", got, want)
	}
	info.Metadata["owner"] = "changed"
	if sb.Info().Metadata["owner"] != "me" {
		t.Errorf("Info shares its metadata map with the handle")
	}

	if err := sb.SetTimeout(ctx, time.Hour); err != nil {
		t.Fatalf("SetTimeout: %v", err)
	}
	if got, want := sb.Info().ExpiresAt.Sub(info.CreatedAt), time.Hour; got != want {
		t.Errorf("after SetTimeout: got TTL %v, want %v", got, want)
	}

	list, err := c.List(ctx)
	if err != nil || len(list) != 1 || list[0].ID != "sb-1" {
		t.Errorf("List: got %+v, %v; want sb-1 only", list, err)
	}
	other, err := c.Connect(ctx, "sb-1")
	if err != nil || other.Info().Template != "base" {
		t.Errorf("Connect: got %+v, %v", other, err)
	}
	if err := sb.Kill(ctx); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	if err := sb.Kill(ctx); !errors.Is(err, ErrNotFound) {
		t.Errorf("second Kill: got %v, want ErrNotFound", err)
	}
	if err := sb.Close(); err != nil {
		t.Errorf("Close after Kill: got %v, want nil", err)
	}
	if err := sb.Refresh(ctx); !errors.Is(err, ErrNotFound) {
		t.Errorf("Refresh after Kill: got %v, want ErrNotFound", err)
	}
	if _, err := c.Connect(ctx, "sb-nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Connect to unknown: got %v, want ErrNotFound", err)
	}
	h, err := c.Health(ctx)
	if err != nil || h != (wire.Health{Status: "ok", Version: "test", Runtime: "gvisor"}) {
		t.Errorf("Health: got %+v, %v", h, err)
	}
	tpls, err := c.Templates(ctx)
	if err != nil || len(tpls) != 1 || tpls[0].Name != "base" || !tpls[0].Ready {
		t.Errorf("Templates: got %+v, %v", tpls, err)
	}
}

// TestSnapshotForkPause checks that the answers of the snapshot, fork, pause
// and resume calls are decoded into handles and values.
func TestSnapshotForkPause(t *testing.T) {
	ctx := context.Background()
	f, srv := newFakeServer(t)
	c := newTestClient(t, srv, WithAPIKey(testKey))

	sb, err := c.Create(ctx, CreateOptions{Template: "python", TTL: time.Minute, OnTimeout: wire.OnTimeoutPause})
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	if got := sb.Info().OnTimeout; got != wire.OnTimeoutPause {
		t.Errorf("OnTimeout: got %q, want %q", got, wire.OnTimeoutPause)
	}

	snap, err := sb.Snapshot(ctx)
	if err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	want := wire.Snapshot{ID: "snap-1", SourceSandbox: "sb-1", Template: "python", SizeBytes: 4096, CreatedAt: sb.Info().CreatedAt}
	if snap != want {
		t.Errorf("Snapshot: got %+v, want %+v", snap, want)
	}
	if got, err := c.Snapshot(ctx, snap.ID); err != nil || got != want {
		t.Errorf("Client.Snapshot: got %+v, %v; want %+v", got, err, want)
	}
	if l, err := c.Snapshots(ctx); err != nil || len(l) != 1 || l[0] != want {
		t.Errorf("Snapshots: got %+v, %v; want [%+v]", l, err, want)
	}
	restored, err := c.Create(ctx, CreateOptions{SnapshotID: snap.ID})
	if err != nil {
		t.Fatalf("Create from snapshot: %v", err)
	}
	if info := restored.Info(); restored.ID() != "sb-2" || info.Template != "python" || info.State != wire.StateRunning {
		t.Errorf("Create from snapshot: got id %q info %+v", restored.ID(), info)
	}

	forks, err := sb.Fork(ctx, ForkOptions{Count: 2, TTL: 30 * time.Second})
	if err != nil {
		t.Fatalf("Fork: %v", err)
	}
	var ids []string
	for _, fk := range forks {
		ids = append(ids, fk.ID())
		info := fk.Info()
		if info.ID != fk.ID() || info.State != wire.StateRunning || info.ExpiresAt.Sub(info.CreatedAt) != 30*time.Second {
			t.Errorf("fork %s: info %+v", fk.ID(), info)
		}
	}
	if want := []string{"sb-3", "sb-4"}; !reflect.DeepEqual(ids, want) {
		t.Errorf("fork ids: got %q, want %q", ids, want)
	}
	if err := forks[1].Kill(ctx); err != nil {
		t.Errorf("killing a fork: %v", err)
	}
	if _, err := sb.Fork(ctx, ForkOptions{Count: 17}); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("Fork of 17: got %v, want ErrInvalidArgument", err)
	}

	if err := sb.Pause(ctx); err != nil {
		t.Fatalf("Pause: %v", err)
	}
	if info := sb.Info(); info.State != wire.StatePaused || info.PausedBytes != 1<<20 {
		t.Errorf("after Pause: state %q, paused bytes %d", info.State, info.PausedBytes)
	}
	got, err := c.Get(ctx, sb.ID())
	if err != nil || got.Info().State != wire.StatePaused {
		t.Errorf("Get of a paused sandbox: got %+v, %v; want it paused", got, err)
	}
	again, err := c.Connect(ctx, sb.ID())
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	if info := again.Info(); info.State != wire.StateRunning || info.PausedBytes != 0 {
		t.Errorf("Connect to a paused sandbox: state %q, paused bytes %d; want running, 0", info.State, info.PausedBytes)
	}
	f.mu.Lock()
	state := f.sandboxes[sb.ID()].State
	f.mu.Unlock()
	if state != wire.StateRunning {
		t.Errorf("server state after Connect: got %q, want running", state)
	}
	if err := sb.Resume(ctx); err != nil || sb.Info().State != wire.StateRunning {
		t.Errorf("Resume: got state %q, %v", sb.Info().State, err)
	}

	if err := c.DeleteSnapshot(ctx, snap.ID); err != nil {
		t.Fatalf("DeleteSnapshot: %v", err)
	}
	if err := c.DeleteSnapshot(ctx, snap.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("second DeleteSnapshot: got %v, want ErrNotFound", err)
	}
	if _, err := c.Snapshot(ctx, snap.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("Snapshot after delete: got %v, want ErrNotFound", err)
	}
	if _, err := c.Create(ctx, CreateOptions{SnapshotID: snap.ID}); !errors.Is(err, ErrNotFound) {
		t.Errorf("Create from a deleted snapshot: got %v, want ErrNotFound", err)
	}
	if l, err := c.Snapshots(ctx); err != nil || len(l) != 0 {
		t.Errorf("Snapshots after delete: got %+v, %v; want none", l, err)
	}
	if _, err := c.Snapshot(ctx, "../sandboxes"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Snapshot with a path in its id: got %v, want ErrNotFound", err)
	}
	if err := sb.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	for name, call := range map[string]func() error{
		"Pause":    func() error { return sb.Pause(ctx) },
		"Resume":   func() error { return sb.Resume(ctx) },
		"Snapshot": func() error { _, err := sb.Snapshot(ctx); return err },
		"Fork":     func() error { _, err := sb.Fork(ctx, ForkOptions{}); return err },
	} {
		if err := call(); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), `"sb-1"`) {
			t.Errorf("%s after Kill: got %v, want ErrNotFound naming sb-1", name, err)
		}
	}
}

func TestMissingKey(t *testing.T) {
	ctx := context.Background()
	_, srv := newFakeServer(t)
	c := newTestClient(t, srv)
	if _, err := c.Health(ctx); err != nil {
		t.Errorf("Health without a key: %v", err)
	}
	_, err := c.List(ctx)
	var apiErr *APIError
	if !errors.Is(err, ErrUnauthenticated) || !errors.As(err, &apiErr) || apiErr.Status != http.StatusUnauthorized {
		t.Fatalf("List without a key: got %v, want a 401 ErrUnauthenticated", err)
	}
	if !strings.Contains(err.Error(), "PANDASTACK_API_KEY") {
		t.Errorf("error %q does not say how to give a key", err)
	}
}

func TestErrorMapping(t *testing.T) {
	tests := []struct {
		name        string
		status      int
		contentType string
		body        string
		wantKind    error
		wantCode    string
		wantInMsg   string
	}{
		{
			name: "JSON not found", status: 404, contentType: "application/json",
			body:     `{"error":{"code":"not_found","message":"sandbox \"sb-x\" not found"}}`,
			wantKind: ErrNotFound, wantCode: "not_found", wantInMsg: `sandbox "sb-x" not found`,
		},
		{
			name: "JSON conflict", status: 409, contentType: "application/json",
			body:     `{"error":{"code":"conflict","message":"sandbox is stopped"}}`,
			wantKind: ErrConflict, wantCode: "conflict", wantInMsg: "sandbox is stopped",
		},
		{
			name: "JSON quota", status: 429, contentType: "application/json",
			body:     `{"error":{"code":"quota_exceeded","message":"too many sandboxes"}}`,
			wantKind: ErrQuotaExceeded, wantCode: "quota_exceeded", wantInMsg: "too many",
		},
		{
			name: "JSON code wins over status", status: 400, contentType: "application/json",
			body:     `{"error":{"code":"too_large","message":"body over 1 MiB"}}`,
			wantKind: ErrTooLarge, wantCode: "too_large", wantInMsg: "1 MiB",
		},
		{
			name: "proxy HTML page", status: 502, contentType: "text/html",
			body:     "<html>\n<body>\n<h1>502 Bad Gateway</h1>\n</body></html>",
			wantKind: ErrUnavailable, wantCode: "unavailable", wantInMsg: "<h1>502 Bad Gateway</h1>",
		},
		{
			name: "plain text 404", status: 404, contentType: "text/plain",
			body:     "404 page not found\n",
			wantKind: ErrNotFound, wantCode: "not_found", wantInMsg: "404 page not found",
		},
		{
			name: "empty 500", status: 500,
			wantKind: ErrInternal, wantCode: "internal", wantInMsg: "500 Internal Server Error",
		},
		{
			name: "JSON insufficient storage", status: 507, contentType: "application/json",
			body:     `{"error":{"code":"insufficient_storage","message":"no disk space left for the snapshot","request_id":"0123456789abcdef"}}`,
			wantKind: ErrInsufficientStorage, wantCode: "insufficient_storage", wantInMsg: "no disk space left",
		},
		{
			name: "JSON timeout", status: 504, contentType: "application/json",
			body:     `{"error":{"code":"timeout","message":"the sandbox did not answer in time","request_id":"0123456789abcdef"}}`,
			wantKind: ErrTimeout, wantCode: "timeout", wantInMsg: "did not answer in time",
		},
		{
			name: "proxy 504 page", status: 504, contentType: "text/html",
			body:     "<html><h1>504 Gateway Time-out</h1></html>",
			wantKind: ErrTimeout, wantCode: "timeout", wantInMsg: "504 Gateway Time-out",
		},
		{
			name: "empty 507", status: 507,
			wantKind: ErrInsufficientStorage, wantCode: "insufficient_storage", wantInMsg: "507 Insufficient Storage",
		},
		{
			name: "JSON without the error envelope", status: 418, contentType: "application/json",
			body:      `{"message":"teapot"}`,
			wantInMsg: "teapot",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if tt.contentType != "" {
					w.Header().Set("Content-Type", tt.contentType)
				}
				w.WriteHeader(tt.status)
				io.WriteString(w, tt.body)
			}))
			defer srv.Close()
			c := newTestClient(t, srv, WithAPIKey(testKey))
			_, err := c.List(context.Background())
			var apiErr *APIError
			if !errors.As(err, &apiErr) {
				t.Fatalf("got %v (%T), want an *APIError", err, err)
			}
			if apiErr.Status != tt.status || apiErr.Code != tt.wantCode {
				t.Errorf("got status %d code %q, want %d %q", apiErr.Status, apiErr.Code, tt.status, tt.wantCode)
			}
			if tt.wantKind != nil && !errors.Is(err, tt.wantKind) {
				t.Errorf("errors.Is(%v, %v) = false, want true", err, tt.wantKind)
			}
			for _, other := range []error{ErrNotFound, ErrConflict, ErrUnavailable, ErrInsufficientStorage, ErrTimeout, ErrInternal} {
				if other != tt.wantKind && errors.Is(err, other) {
					t.Errorf("errors.Is(%v, %v) = true, want false", err, other)
				}
			}
			if !strings.Contains(err.Error(), tt.wantInMsg) {
				t.Errorf("error %q does not contain %q", err, tt.wantInMsg)
			}
			if !strings.HasPrefix(err.Error(), "listing sandboxes: ") {
				t.Errorf("error %q lacks its context", err)
			}
		})
	}
}

func TestAPIErrorText(t *testing.T) {
	tests := []struct {
		err  APIError
		want string
	}{
		{APIError{Status: 404, Code: "not_found", Message: "gone"}, "gone (not_found, HTTP 404)"},
		{APIError{Status: 504, Code: "timeout", Message: "too slow", RequestID: "0123456789abcdef"}, "too slow (timeout, HTTP 504, request 0123456789abcdef)"},
		{APIError{Code: "unavailable", Message: "agent died", RequestID: "fedcba9876543210"}, "agent died (unavailable, request fedcba9876543210)"},
		{APIError{Status: 507}, "Insufficient Storage (error, HTTP 507)"},
	}
	for _, tt := range tests {
		if got := tt.err.Error(); got != tt.want {
			t.Errorf("got %q, want %q", got, tt.want)
		}
	}
}

// ndjson writes events one per line, flushing after each.
func ndjson(w http.ResponseWriter, events ...wire.ExecEvent) {
	for _, ev := range events {
		json.NewEncoder(w).Encode(ev)
		w.(http.Flusher).Flush()
	}
}

func TestExec(t *testing.T) {
	result := wire.ExecResult{Stdout: "out", Stderr: "err", ExitCode: 3, DurationMS: 1.5}
	blocking := func(w http.ResponseWriter, r *http.Request, req wire.ExecRequest) {
		writeJSON(w, http.StatusOK, result)
	}
	tests := []struct {
		name       string
		run        func(sb *Sandbox, opts ExecOptions) (*wire.ExecResult, error)
		opts       ExecOptions
		stream     bool // set OnStdout and OnStderr
		server     func(w http.ResponseWriter, r *http.Request, req wire.ExecRequest)
		wantBody   string
		wantAccept string
		wantChunks []string // "stdout:…"/"stderr:…" in callback order
		wantResult *wire.ExecResult
		wantKind   error  // for errors.Is; nil when no error is expected...
		wantErr    string // ...unless this is set
	}{
		{
			name: "blocking shell command with options",
			run: func(sb *Sandbox, o ExecOptions) (*wire.ExecResult, error) {
				return sb.Exec(context.Background(), "echo hi", o)
			},
			opts: ExecOptions{
				Timeout: 2500 * time.Millisecond, Env: map[string]string{"X": "y"}, Cwd: "/tmp", Stdin: "in",
			},
			server:     blocking,
			wantBody:   `{"cmd":"echo hi","env":{"X":"y"},"cwd":"/tmp","stdin":"in","timeout_seconds":2.5}`,
			wantAccept: "application/json",
			wantResult: &result,
		},
		{
			name: "blocking argv",
			run: func(sb *Sandbox, o ExecOptions) (*wire.ExecResult, error) {
				return sb.ExecArgv(context.Background(), []string{"ls", "-l", "a b"}, o)
			},
			server:     blocking,
			wantBody:   `{"argv":["ls","-l","a b"]}`,
			wantAccept: "application/json",
			wantResult: &result,
		},
		{
			name: "empty command is the server's invalid_argument",
			run: func(sb *Sandbox, o ExecOptions) (*wire.ExecResult, error) {
				return sb.Exec(context.Background(), "", o)
			},
			server:   blocking,
			wantBody: `{}`, wantAccept: "application/json",
			wantKind: ErrInvalidArgument,
		},
		{
			name: "streamed output is passed on and accumulated",
			run: func(sb *Sandbox, o ExecOptions) (*wire.ExecResult, error) {
				return sb.Exec(context.Background(), "make", o)
			},
			stream: true,
			server: func(w http.ResponseWriter, r *http.Request, req wire.ExecRequest) {
				w.Header().Set("Content-Type", "application/x-ndjson")
				ndjson(w,
					wire.ExecEvent{Type: wire.EventStdout, Data: "a"},
					wire.ExecEvent{Type: wire.EventStderr, Data: "warn\n"},
					wire.ExecEvent{Type: "progress", Data: "ignored"},
					wire.ExecEvent{Type: wire.EventStdout, Data: "b\n"},
					wire.ExecEvent{Type: wire.EventExit, Result: &wire.ExecResult{ExitCode: 124, TimedOut: true, DurationMS: 9}},
				)
			},
			wantBody:   `{"cmd":"make"}`,
			wantAccept: "application/x-ndjson",
			wantChunks: []string{"stdout:a", "stderr:warn\n", "stdout:b\n"},
			wantResult: &wire.ExecResult{Stdout: "ab\n", Stderr: "warn\n", ExitCode: 124, TimedOut: true, DurationMS: 9},
		},
		{
			name: "streamed error event",
			run: func(sb *Sandbox, o ExecOptions) (*wire.ExecResult, error) {
				return sb.Exec(context.Background(), "sleep 9", o)
			},
			stream: true,
			server: func(w http.ResponseWriter, r *http.Request, req wire.ExecRequest) {
				w.Header().Set("Content-Type", "application/x-ndjson")
				ndjson(w,
					wire.ExecEvent{Type: wire.EventStdout, Data: "partial"},
					wire.ExecEvent{Type: wire.EventError, Error: &wire.Error{Code: wire.CodeUnavailable, Message: "agent went away"}},
				)
			},
			wantBody: `{"cmd":"sleep 9"}`, wantAccept: "application/x-ndjson",
			wantChunks: []string{"stdout:partial"},
			wantKind:   ErrUnavailable, wantErr: "agent went away",
		},
		{
			name: "stream cut before the exit event",
			run: func(sb *Sandbox, o ExecOptions) (*wire.ExecResult, error) {
				return sb.Exec(context.Background(), "x", o)
			},
			stream: true,
			server: func(w http.ResponseWriter, r *http.Request, req wire.ExecRequest) {
				w.Header().Set("Content-Type", "application/x-ndjson")
				ndjson(w, wire.ExecEvent{Type: wire.EventStdout, Data: "x"})
			},
			wantBody: `{"cmd":"x"}`, wantAccept: "application/x-ndjson",
			wantChunks: []string{"stdout:x"},
			wantErr:    "unexpected EOF",
		},
		{
			name: "streamed request answered with an HTTP error",
			run: func(sb *Sandbox, o ExecOptions) (*wire.ExecResult, error) {
				return sb.Exec(context.Background(), "x", o)
			},
			stream: true,
			server: func(w http.ResponseWriter, r *http.Request, req wire.ExecRequest) {
				writeError(w, http.StatusConflict, wire.CodeConflict, "sandbox is not running")
			},
			wantBody: `{"cmd":"x"}`, wantAccept: "application/x-ndjson",
			wantKind: ErrConflict, wantErr: "sandbox is not running",
		},
		{
			name: "streamed request answered in the blocking form",
			run: func(sb *Sandbox, o ExecOptions) (*wire.ExecResult, error) {
				return sb.Exec(context.Background(), "x", o)
			},
			stream:     true,
			server:     blocking,
			wantBody:   `{"cmd":"x"}`,
			wantAccept: "application/x-ndjson",
			wantChunks: []string{"stdout:out", "stderr:err"},
			wantResult: &result,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, srv := newFakeServer(t)
			f.exec = tt.server
			c := newTestClient(t, srv, WithAPIKey(testKey))
			sb, err := c.Create(context.Background(), CreateOptions{})
			if err != nil {
				t.Fatalf("Create: %v", err)
			}
			var chunks []string
			opts := tt.opts
			if tt.stream {
				opts.OnStdout = func(s string) { chunks = append(chunks, "stdout:"+s) }
				opts.OnStderr = func(s string) { chunks = append(chunks, "stderr:"+s) }
			}
			res, err := tt.run(sb, opts)

			f.mu.Lock()
			body, accept := string(f.last.body), f.last.accept
			f.mu.Unlock()
			if !jsonEqual(t, body, tt.wantBody) {
				t.Errorf("body: got %s, want %s", body, tt.wantBody)
			}
			if accept != tt.wantAccept {
				t.Errorf("Accept: got %q, want %q", accept, tt.wantAccept)
			}
			if !reflect.DeepEqual(chunks, tt.wantChunks) {
				t.Errorf("chunks: got %q, want %q", chunks, tt.wantChunks)
			}
			if tt.wantKind != nil || tt.wantErr != "" {
				if err == nil {
					t.Fatalf("got result %+v, want an error", res)
				}
				if tt.wantKind != nil && !errors.Is(err, tt.wantKind) {
					t.Errorf("errors.Is(%v, %v) = false, want true", err, tt.wantKind)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("error %q does not contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("exec: %v", err)
			}
			if !reflect.DeepEqual(res, tt.wantResult) {
				t.Errorf("result: got %+v, want %+v", res, tt.wantResult)
			}
		})
	}
}

// TestExecStreamsLive checks that a chunk reaches its callback while the
// command is still running, not when the response ends.
func TestExecStreamsLive(t *testing.T) {
	f, srv := newFakeServer(t)
	seen := make(chan struct{})
	f.exec = func(w http.ResponseWriter, r *http.Request, req wire.ExecRequest) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		ndjson(w, wire.ExecEvent{Type: wire.EventStdout, Data: "first"})
		select {
		case <-seen:
		case <-time.After(time.Minute):
			t.Errorf("the client did not see the first chunk before the command ended")
		}
		ndjson(w, wire.ExecEvent{Type: wire.EventExit, Result: &wire.ExecResult{}})
	}
	// The handler holds f.mu while it blocks; the client does not need it.
	c := newTestClient(t, srv, WithAPIKey(testKey))
	sb, err := c.Create(context.Background(), CreateOptions{})
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	var once sync.Once
	res, err := sb.Exec(context.Background(), "x", ExecOptions{
		OnStdout: func(string) { once.Do(func() { close(seen) }) },
	})
	if err != nil {
		t.Fatalf("Exec: %v", err)
	}
	if res.Stdout != "first" {
		t.Errorf("Stdout: got %q, want %q", res.Stdout, "first")
	}
}

func TestExecContextCancel(t *testing.T) {
	f, srv := newFakeServer(t)
	f.exec = func(w http.ResponseWriter, r *http.Request, req wire.ExecRequest) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		ndjson(w, wire.ExecEvent{Type: wire.EventStdout, Data: "running"})
		<-r.Context().Done()
	}
	c := newTestClient(t, srv, WithAPIKey(testKey))
	sb, err := c.Create(context.Background(), CreateOptions{})
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	_, err = sb.Exec(ctx, "sleep 100", ExecOptions{OnStdout: func(string) { cancel() }})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("got %v, want context.Canceled", err)
	}
}
