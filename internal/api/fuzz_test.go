package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/sandbox"
	"github.com/pandastack/pandastack/wire"
)

// The fakes below stand in for the sandbox manager, the template store and
// the key store: these tests are about the HTTP edge (routing, auth, body
// decoding, error bodies), not about sandboxes.

const (
	testKey    = "ps-test-key"
	testTenant = "tenant-1"
	// downKey makes the key store fail as if its database were down.
	downKey = "ps-key-store-down"
	// knownID is the one sandbox the fake knows.
	knownID = "sb-0123456789abcdef"
)

type fakeKeys struct{}

func (fakeKeys) TenantForKey(_ context.Context, hash string) (string, error) {
	switch hash {
	case HashKey(testKey):
		return testTenant, nil
	case HashKey(downKey):
		return "", errdefs.Unavailable("key store is down")
	}
	return "", errdefs.NotFound("no such key")
}

type fakeTemplates struct{}

func (fakeTemplates) List(ctx context.Context, tenant string) ([]wire.Template, error) {
	return []wire.Template{{Name: "base", Ref: "base", Description: "test", Packages: []string{"curl"}, Ready: true, Builtin: true}}, nil
}

func (f fakeTemplates) Get(ctx context.Context, tenant, ref string) (wire.Template, error) {
	if ref != "base" {
		return wire.Template{}, errdefs.NotFound("template %q not found", ref)
	}
	l, _ := f.List(ctx, tenant)
	return l[0], nil
}

func (fakeTemplates) Delete(ctx context.Context, tenant, ref string) error {
	return errdefs.Conflict("%q is a built-in template", ref)
}

// Build reads the context and refuses it: the real builder is tested with
// a real server (internal/daemon).
func (fakeTemplates) Build(ctx context.Context, tenant string, req TemplateBuild, body io.Reader, emit func(wire.TemplateBuildEvent)) (wire.Template, error) {
	if _, err := io.Copy(io.Discard, body); err != nil {
		return wire.Template{}, err
	}
	return wire.Template{}, errdefs.Invalid("this test server builds nothing")
}

// fakeSandboxes knows one sandbox, knownID, of testTenant. Exec echoes the
// request's cmd to stdout and its stdin to stderr, so output of any bytes
// passes through the API's UTF-8 and capping code.
type fakeSandboxes struct {
	mu      sync.Mutex
	created int
}

var _ Sandboxes = (*fakeSandboxes)(nil)

func (f *fakeSandboxes) sandbox(tenant, id string) (wire.Sandbox, error) {
	if tenant != testTenant || id != knownID {
		return wire.Sandbox{}, errdefs.NotFound("sandbox %q not found", id)
	}
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	return wire.Sandbox{ID: id, Template: "base", State: wire.StateRunning, CreatedAt: now, ExpiresAt: now.Add(time.Minute), Metadata: map[string]string{}, CPU: 1, MemoryMB: 512}, nil
}

func (f *fakeSandboxes) Create(_ context.Context, tenant string, req wire.CreateSandboxRequest) (wire.Sandbox, error) {
	f.mu.Lock()
	f.created++
	f.mu.Unlock()
	sb, _ := f.sandbox(testTenant, knownID)
	sb.Template = req.Template
	sb.Metadata = req.Metadata
	return sb, nil
}

func (f *fakeSandboxes) Get(_ context.Context, tenant, id string) (wire.Sandbox, error) {
	return f.sandbox(tenant, id)
}

func (f *fakeSandboxes) List(_ context.Context, tenant string) ([]wire.Sandbox, error) {
	sb, err := f.sandbox(tenant, knownID)
	if err != nil {
		return nil, nil
	}
	return []wire.Sandbox{sb}, nil
}

func (f *fakeSandboxes) Kill(_ context.Context, tenant, id string) error {
	_, err := f.sandbox(tenant, id)
	return err
}

func (f *fakeSandboxes) SetTimeout(_ context.Context, tenant, id string, ttlSeconds int) (wire.Sandbox, error) {
	sb, err := f.sandbox(tenant, id)
	if err != nil {
		return sb, err
	}
	if ttlSeconds < 1 {
		return wire.Sandbox{}, errdefs.Invalid("ttl_seconds must be positive, got %d", ttlSeconds)
	}
	return sb, nil
}

func (f *fakeSandboxes) Exec(_ context.Context, tenant, id string, req wire.ExecRequest, out sandbox.Output) (wire.ExecResult, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return wire.ExecResult{}, err
	}
	if req.Cmd == "" && len(req.Argv) == 0 {
		return wire.ExecResult{}, errdefs.Invalid("cmd or argv is required")
	}
	// Output in small pieces, cut inside multi-byte characters.
	for stream, data := range map[string]string{wire.EventStdout: req.Cmd, wire.EventStderr: req.Stdin} {
		for b := []byte(data); len(b) > 0; {
			n := min(len(b), 3)
			if err := out(stream, b[:n]); err != nil {
				return wire.ExecResult{}, err
			}
			b = b[n:]
		}
	}
	return wire.ExecResult{ExitCode: len(req.Argv) % 256}, nil
}

// newTestServer returns the real API handler on the fakes, with small
// limits so that fuzzed bodies reach them.
func newTestServer() *Server { return newTestServerWith(nil) }

// newTestServerWith is newTestServer with its Config changed by mod.
func newTestServerWith(mod func(*Config)) *Server {
	cfg := Config{
		Sandboxes:      &fakeSandboxes{},
		Templates:      fakeTemplates{},
		Keys:           fakeKeys{},
		Version:        "test",
		Runtime:        "fake",
		MaxBodyBytes:   4 << 10,
		MaxOutputBytes: 64,
	}
	if mod != nil {
		mod(&cfg)
	}
	return New(cfg)
}

// checkErrorBody fails unless body is a wire error body with a code and a
// message.
func checkErrorBody(t *testing.T, status int, body []byte) wire.Error {
	t.Helper()
	var e wire.ErrorResponse
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&e); err != nil {
		t.Fatalf("status %d: body %q is not a JSON error: %v", status, body, err)
	}
	if e.Error.Code == "" || e.Error.Message == "" {
		t.Fatalf("status %d: error body %q lacks a code or a message", status, body)
	}
	return e.Error
}

func TestAuth(t *testing.T) {
	s := newTestServer()
	tests := []struct {
		name       string
		method     string
		path       string
		auth       []string // Authorization header values
		wantStatus int
		wantCode   string // for error responses
	}{
		{name: "missing header", method: "GET", path: "/v1/sandboxes", wantStatus: 401, wantCode: wire.CodeUnauthenticated},
		{name: "empty header", method: "GET", path: "/v1/sandboxes", auth: []string{""}, wantStatus: 401, wantCode: wire.CodeUnauthenticated},
		{name: "basic scheme", method: "GET", path: "/v1/sandboxes", auth: []string{"Basic dXNlcjpwYXNz"}, wantStatus: 401, wantCode: wire.CodeUnauthenticated},
		{name: "key without scheme", method: "GET", path: "/v1/sandboxes", auth: []string{testKey}, wantStatus: 401, wantCode: wire.CodeUnauthenticated},
		{name: "scheme without key", method: "GET", path: "/v1/sandboxes", auth: []string{"Bearer "}, wantStatus: 401, wantCode: wire.CodeUnauthenticated},
		{name: "scheme without space", method: "GET", path: "/v1/sandboxes", auth: []string{"Bearer"}, wantStatus: 401, wantCode: wire.CodeUnauthenticated},
		{name: "unknown key", method: "GET", path: "/v1/sandboxes", auth: []string{"Bearer ps-wrong"}, wantStatus: 401, wantCode: wire.CodeUnauthenticated},
		{name: "key with a suffix", method: "GET", path: "/v1/sandboxes", auth: []string{"Bearer " + testKey + "x"}, wantStatus: 401, wantCode: wire.CodeUnauthenticated},
		{name: "unknown key on a write", method: "POST", path: "/v1/sandboxes", auth: []string{"Bearer ps-wrong"}, wantStatus: 401, wantCode: wire.CodeUnauthenticated},
		{name: "unknown key on exec", method: "POST", path: "/v1/sandboxes/" + knownID + "/exec", auth: []string{"Bearer ps-wrong"}, wantStatus: 401, wantCode: wire.CodeUnauthenticated},
		{name: "key store down is not a 401", method: "GET", path: "/v1/sandboxes", auth: []string{"Bearer " + downKey}, wantStatus: 503, wantCode: wire.CodeUnavailable},
		{name: "valid key", method: "GET", path: "/v1/sandboxes", auth: []string{"Bearer " + testKey}, wantStatus: 200},
		{name: "valid key with spaces", method: "GET", path: "/v1/sandboxes", auth: []string{"Bearer  " + testKey + " "}, wantStatus: 200},
		{name: "first of two headers counts", method: "GET", path: "/v1/sandboxes", auth: []string{"Bearer " + testKey, "Bearer ps-wrong"}, wantStatus: 200},
		{name: "public route needs no key", method: "GET", path: "/v1/health", wantStatus: 200},
		{name: "unknown route", method: "GET", path: "/v1/nope", wantStatus: 404, wantCode: wire.CodeNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest(tt.method, tt.path, strings.NewReader(`{}`))
			for _, a := range tt.auth {
				r.Header.Add("Authorization", a)
			}
			w := httptest.NewRecorder()
			s.ServeHTTP(w, r)
			if w.Code != tt.wantStatus {
				t.Fatalf("status: got %d, want %d (body %q)", w.Code, tt.wantStatus, w.Body)
			}
			if ct := w.Header().Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type: got %q, want %q", ct, "application/json")
			}
			if tt.wantCode != "" {
				if e := checkErrorBody(t, w.Code, w.Body.Bytes()); e.Code != tt.wantCode {
					t.Errorf("code: got %q, want %q", e.Code, tt.wantCode)
				}
			}
		})
	}
}

func FuzzDecodeRequests(f *testing.F) {
	// The fuzzer picks one of these routes for each body.
	routes := []struct {
		path   string
		accept string
	}{
		{"/v1/sandboxes", ""},
		{"/v1/sandboxes/" + knownID + "/exec", ""},
		{"/v1/sandboxes/" + knownID + "/exec", "application/x-ndjson"},
		{"/v1/sandboxes/" + knownID + "/exec", "text/event-stream"},
		{"/v1/sandboxes/" + knownID + "/timeout", ""},
		{"/v1/sandboxes/sb-unknown/exec", ""},
		{"/v1/sandboxes/sb-unknown/timeout", ""},
	}
	seeds := []string{
		``,
		`{}`,
		`{"template":"base","ttl_seconds":60,"env":{"A":"1"},"metadata":{"k":"v"},"cpu":0.5,"memory_mb":256}`,
		`{"cmd":"echo hi"}`,
		`{"argv":["ls","-l"],"env":{"X":"y"},"cwd":"/tmp","stdin":"h\u00e9llo","timeout_seconds":1.5}`,
		`{"cmd":"\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac\u20ac"}`,
		`{"cmd":"\ud800 lone surrogate","stdin":"\udfff"}`,
		`{"ttl_seconds":30}`,
		`{"ttl_seconds":-1}`,
		`{"ttl_seconds":1e400}`,
		`{"ttl_seconds":"30"}`,
		`{"unknown":1}`,
		`{"cmd":"a"} {"cmd":"b"}`,
		`{"cmd":"a"}]`,
		`[1,2,3]`,
		`null`,
		`"string"`,
		`{"cmd":`,
		"\xff\xfe\x00",
		`{"env":{"A":null},"metadata":null}`,
		strings.Repeat(`{"a":`, 10000),
		`{"cmd":"` + strings.Repeat("x", 5000) + `"}`,
	}
	for _, s := range seeds {
		for i := range routes {
			f.Add(uint8(i), []byte(s))
		}
	}
	s := newTestServer()
	f.Fuzz(func(t *testing.T, route uint8, body []byte) {
		rt := routes[int(route)%len(routes)]
		r := httptest.NewRequest(http.MethodPost, rt.path, bytes.NewReader(body))
		r.Header.Set("Authorization", "Bearer "+testKey)
		r.Header.Set("Content-Type", "application/json")
		if rt.accept != "" {
			r.Header.Set("Accept", rt.accept)
		}
		w := httptest.NewRecorder()
		s.ServeHTTP(w, r)
		got := w.Body.Bytes()
		switch {
		case w.Code >= 200 && w.Code < 300:
			checkSuccessBody(t, w, rt.accept)
		case w.Code >= 400 && w.Code < 500:
			checkErrorBody(t, w.Code, got)
		default:
			t.Fatalf("POST %s with %q: status %d, want 2xx or 4xx (body %q)", rt.path, body, w.Code, got)
		}
	})
}

// checkSuccessBody checks that a 2xx body is valid JSON, or, for a streamed
// exec, NDJSON or SSE events that end with the exit event.
func checkSuccessBody(t *testing.T, w *httptest.ResponseRecorder, accept string) {
	t.Helper()
	body := w.Body.Bytes()
	var lines [][]byte
	switch accept {
	case "":
		lines = [][]byte{body}
	case "application/x-ndjson":
		lines = bytes.Split(bytes.TrimSuffix(body, []byte("\n")), []byte("\n"))
	case "text/event-stream":
		sc := bufio.NewScanner(bytes.NewReader(body))
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			if d, ok := bytes.CutPrefix(sc.Bytes(), []byte("data: ")); ok {
				lines = append(lines, bytes.Clone(d))
			}
		}
	}
	var last wire.ExecEvent
	for _, l := range lines {
		if !json.Valid(l) {
			t.Fatalf("status %d: body part %q is not JSON", w.Code, l)
		}
		if accept != "" {
			if err := json.Unmarshal(l, &last); err != nil {
				t.Fatalf("event %q: %v", l, err)
			}
		}
	}
	if accept != "" && (last.Type != wire.EventExit || last.Result == nil) {
		t.Fatalf("stream %q does not end with an exit event", body)
	}
}

func TestDecodeBodies(t *testing.T) {
	s := newTestServer()
	tests := []struct {
		name       string
		path       string
		body       string
		wantStatus int
	}{
		{name: "valid", path: "timeout", body: `{"ttl_seconds":5}`, wantStatus: 200},
		{name: "trailing whitespace", path: "timeout", body: "{\"ttl_seconds\":5} \n\t", wantStatus: 200},
		{name: "empty body", path: "timeout", body: ``, wantStatus: 400},
		{name: "empty body on create is allowed", path: "", body: ``, wantStatus: 201},
		{name: "unknown field", path: "timeout", body: `{"ttl_seconds":5,"ttl":5}`, wantStatus: 400},
		{name: "wrong type", path: "timeout", body: `{"ttl_seconds":"5"}`, wantStatus: 400},
		{name: "not an object", path: "timeout", body: `[5]`, wantStatus: 400},
		{name: "null", path: "timeout", body: `null`, wantStatus: 400},
		{name: "null on create", path: "", body: `null`, wantStatus: 400},
		{name: "null on exec", path: "exec", body: ` null `, wantStatus: 400},
		{name: "null on fork", path: "fork", body: "null\n", wantStatus: 400},
		{name: "string on create", path: "", body: `"base"`, wantStatus: 400},
		{name: "number on create", path: "", body: `5`, wantStatus: 400},
		{name: "boolean on create", path: "", body: `true`, wantStatus: 400},
		{name: "white space only on create is empty", path: "", body: " \n", wantStatus: 201},
		{name: "white space only on timeout is empty", path: "timeout", body: " \n", wantStatus: 400},
		{name: "truncated", path: "timeout", body: `{"ttl_seconds":`, wantStatus: 400},
		{name: "second object", path: "timeout", body: `{"ttl_seconds":5}{}`, wantStatus: 400},
		{name: "trailing text", path: "timeout", body: `{"ttl_seconds":5} x`, wantStatus: 400},
		{name: "over the body limit", path: "exec", body: `{"cmd":"` + strings.Repeat("x", 5000) + `"}`, wantStatus: 413},
		{name: "over the limit after the object", path: "timeout", body: `{"ttl_seconds":5}` + strings.Repeat(" ", 5000), wantStatus: 413},
		{
			name: "trailing bracket", path: "timeout", body: `{"ttl_seconds":5}]`, wantStatus: 400,
		},
		{
			name: "trailing brace", path: "timeout", body: `{"ttl_seconds":5}}`, wantStatus: 400,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := "/v1/sandboxes"
			if tt.path != "" {
				path += "/" + knownID + "/" + tt.path
			}
			r := httptest.NewRequest(http.MethodPost, path, strings.NewReader(tt.body))
			r.Header.Set("Authorization", "Bearer "+testKey)
			w := httptest.NewRecorder()
			s.ServeHTTP(w, r)
			if w.Code != tt.wantStatus {
				t.Fatalf("status: got %d, want %d (body %q)", w.Code, tt.wantStatus, w.Body)
			}
			if w.Code >= 400 {
				checkErrorBody(t, w.Code, w.Body.Bytes())
			}
		})
	}
}

func (f *fakeSandboxes) Snapshot(_ context.Context, tenant, id string, _ wire.SnapshotRequest) (wire.Snapshot, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return wire.Snapshot{}, err
	}
	return wire.Snapshot{ID: "snap-1", SourceSandbox: id, Template: "base"}, nil
}

func (f *fakeSandboxes) GetSnapshot(_ context.Context, tenant, id string) (wire.Snapshot, error) {
	return wire.Snapshot{}, errdefs.NotFound("snapshot %q not found", id)
}

func (f *fakeSandboxes) ListSnapshots(context.Context, string) ([]wire.Snapshot, error) {
	return []wire.Snapshot{}, nil
}

func (f *fakeSandboxes) DeleteSnapshot(_ context.Context, tenant, id string) error {
	return errdefs.NotFound("snapshot %q not found", id)
}

func (f *fakeSandboxes) Fork(_ context.Context, tenant, id string, req wire.ForkRequest) ([]wire.Sandbox, error) {
	sb, err := f.sandbox(tenant, id)
	if err != nil {
		return nil, err
	}
	if req.Count < 0 || req.Count > 16 {
		return nil, errdefs.Invalid("count must be between 1 and 16, got %d", req.Count)
	}
	return []wire.Sandbox{sb}, nil
}

func (f *fakeSandboxes) Pause(_ context.Context, tenant, id string) (wire.Sandbox, error) {
	return f.sandbox(tenant, id)
}

func (f *fakeSandboxes) Resume(_ context.Context, tenant, id string) (wire.Sandbox, error) {
	return f.sandbox(tenant, id)
}
func (f *fakeSandboxes) Metrics(_ context.Context, tenant, id string) (wire.SandboxMetrics, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return wire.SandboxMetrics{}, err
	}
	return wire.SandboxMetrics{SandboxID: id, Samples: []wire.MetricsSample{}}, nil
}
func (f *fakeSandboxes) SetNetwork(_ context.Context, tenant, id string, _ wire.Network) (wire.Sandbox, error) {
	return f.sandbox(tenant, id)
}
