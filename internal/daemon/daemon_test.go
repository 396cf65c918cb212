package daemon

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/sandbox"
	"github.com/pandastack/pandastack/internal/testenv"
	"github.com/pandastack/pandastack/wire"
)

// server is a real daemon on a loopback port with a fresh data directory.
type server struct {
	url, key string
	dataDir  string
}

func startServer(t *testing.T, mut func(*Config)) *server {
	t.Helper()
	runsc := testenv.Runsc(t)
	testenv.Template(t, "base")
	dataDir := t.TempDir()
	addrc := make(chan string, 1)
	var logs bytes.Buffer
	logw := &syncWriter{w: &logs}
	cfg := Config{
		DataDir: dataDir, Listen: "127.0.0.1:0", Runsc: runsc, AgentBinary: testenv.Agent(t),
		TemplateDir: testenv.TemplateDir(), Version: "test",
		Sandbox: sandbox.Config{ReapInterval: 200 * time.Millisecond},
		Log:     slog.New(slog.NewTextHandler(logw, nil)),
		Ready:   func(a string) { addrc <- a },
	}
	if mut != nil {
		mut(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- Run(ctx, cfg) }()
	var addr string
	select {
	case addr = <-addrc:
	case err := <-errc:
		cancel()
		t.Fatalf("server exited: %v", err)
	case <-time.After(30 * time.Second):
		cancel()
		t.Fatal("server did not start")
	}
	t.Cleanup(func() {
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("server: %v", err)
		}
		if t.Failed() {
			logw.mu.Lock()
			t.Logf("server log:\n%s", logs.String())
			logw.mu.Unlock()
		}
	})
	key, err := os.ReadFile(KeyFile(dataDir))
	if err != nil {
		t.Fatal(err)
	}
	return &server{url: "http://" + addr, key: strings.TrimSpace(string(key)), dataDir: dataDir}
}

// syncWriter serialises writes from the server's goroutines.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

func (s *server) do(t *testing.T, method, path string, body any, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		j, _ := json.Marshal(b)
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, s.url+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+s.key)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

func (s *server) create(t *testing.T, req wire.CreateSandboxRequest) wire.Sandbox {
	t.Helper()
	resp, b := s.do(t, "POST", "/v1/sandboxes", req)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("create: status %d: %s", resp.StatusCode, b)
	}
	var sb wire.Sandbox
	if err := json.Unmarshal(b, &sb); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.do(t, "DELETE", "/v1/sandboxes/"+sb.ID, nil) })
	return sb
}

func (s *server) exec(t *testing.T, id string, req wire.ExecRequest) wire.ExecResult {
	t.Helper()
	resp, b := s.do(t, "POST", "/v1/sandboxes/"+id+"/exec", req)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("exec: status %d: %s", resp.StatusCode, b)
	}
	var res wire.ExecResult
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatal(err)
	}
	return res
}

func TestExec(t *testing.T) {
	s := startServer(t, nil)
	sb := s.create(t, wire.CreateSandboxRequest{Env: map[string]string{"FROM_CREATE": "c"}, Metadata: map[string]string{"owner": "test"}})
	if sb.State != wire.StateRunning || sb.Template != "base" || sb.Metadata["owner"] != "test" {
		t.Fatalf("created %+v", sb)
	}
	tests := []struct {
		name       string
		req        wire.ExecRequest
		wantOut    string
		wantErr    string
		wantCode   int
		wantTimout bool
	}{
		{"shell", wire.ExecRequest{Cmd: "echo hello; echo oops >&2; exit 3"}, "hello\n", "oops\n", 3, false},
		{"argv", wire.ExecRequest{Argv: []string{"printf", "%s|", "a b", "c"}}, "a b|c|", "", 0, false},
		{"env", wire.ExecRequest{Cmd: "echo $FROM_CREATE $FROM_EXEC", Env: map[string]string{"FROM_EXEC": "e"}}, "c e\n", "", 0, false},
		{"cwd", wire.ExecRequest{Cmd: "pwd", Cwd: "/tmp"}, "/tmp\n", "", 0, false},
		{"stdin", wire.ExecRequest{Cmd: "tr a-z A-Z", Stdin: "shout"}, "SHOUT", "", 0, false},
		{"not found", wire.ExecRequest{Argv: []string{"no-such-command"}}, "", "no-such-command: command not found\n", 127, false},
		{"signal", wire.ExecRequest{Cmd: "kill -9 $$"}, "", "", 137, false},
		{"timeout kills the group", wire.ExecRequest{Cmd: "(sleep 30; echo child) & sleep 30", TimeoutSeconds: 0.5}, "", "", 124, true},
		{"utf8", wire.ExecRequest{Cmd: "printf 'h\\303\\251llo \\377'"}, "héllo \uFFFD", "", 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			res := s.exec(t, sb.ID, tt.req)
			if res.Stdout != tt.wantOut || res.Stderr != tt.wantErr || res.ExitCode != tt.wantCode || res.TimedOut != tt.wantTimout {
				t.Errorf("got stdout %q stderr %q exit %d timed_out %v, want %q %q %d %v",
					res.Stdout, res.Stderr, res.ExitCode, res.TimedOut, tt.wantOut, tt.wantErr, tt.wantCode, tt.wantTimout)
			}
			if tt.wantTimout && time.Since(start) > 10*time.Second {
				t.Errorf("timed-out exec took %v", time.Since(start))
			}
		})
	}
	// The timed-out command's background child was killed with its group.
	if res := s.exec(t, sb.ID, wire.ExecRequest{Cmd: "ps -eo args | grep -c '^sleep 30' || true"}); res.Stdout != "0\n" {
		t.Errorf("sleep processes left after timeout: %q", res.Stdout)
	}
}

func TestExecStreaming(t *testing.T) {
	s := startServer(t, nil)
	sb := s.create(t, wire.CreateSandboxRequest{})
	for _, accept := range []string{"application/x-ndjson", "text/event-stream"} {
		t.Run(accept, func(t *testing.T) {
			body, _ := json.Marshal(wire.ExecRequest{Cmd: "echo one; sleep 1; echo two >&2; exit 5"})
			req, _ := http.NewRequest("POST", s.url+"/v1/sandboxes/"+sb.ID+"/exec", bytes.NewReader(body))
			req.Header.Set("Authorization", "Bearer "+s.key)
			req.Header.Set("Accept", accept)
			start := time.Now()
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if ct := resp.Header.Get("Content-Type"); ct != accept {
				t.Errorf("content type %q, want %q", ct, accept)
			}
			var events []wire.ExecEvent
			var firstAt time.Duration
			sc := bufio.NewScanner(resp.Body)
			for sc.Scan() {
				line := sc.Text()
				if accept == "text/event-stream" {
					var ok bool
					if line, ok = strings.CutPrefix(line, "data: "); !ok {
						continue
					}
				}
				var ev wire.ExecEvent
				if err := json.Unmarshal([]byte(line), &ev); err != nil {
					t.Fatalf("bad event %q: %v", line, err)
				}
				if len(events) == 0 {
					firstAt = time.Since(start)
				}
				events = append(events, ev)
			}
			if len(events) != 3 {
				t.Fatalf("got %d events %+v, want 3", len(events), events)
			}
			if events[0].Type != "stdout" || events[0].Data != "one\n" || events[1].Type != "stderr" || events[1].Data != "two\n" {
				t.Errorf("got events %+v", events)
			}
			if last := events[2]; last.Type != "exit" || last.Result == nil || last.Result.ExitCode != 5 {
				t.Errorf("last event %+v, want exit 5", last)
			}
			if total := time.Since(start); total-firstAt < 500*time.Millisecond {
				t.Errorf("first output came at %v of %v: not streamed", firstAt, total)
			}
		})
	}
}

func TestLifecycle(t *testing.T) {
	s := startServer(t, nil)
	sb := s.create(t, wire.CreateSandboxRequest{TTLSeconds: 60})
	resp, b := s.do(t, "GET", "/v1/sandboxes/"+sb.ID, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("get: %d %s", resp.StatusCode, b)
	}
	resp, b = s.do(t, "GET", "/v1/sandboxes", nil)
	var list wire.SandboxList
	if err := json.Unmarshal(b, &list); err != nil || len(list.Sandboxes) != 1 || list.Sandboxes[0].ID != sb.ID {
		t.Fatalf("list: %d %s", resp.StatusCode, b)
	}
	resp, b = s.do(t, "POST", "/v1/sandboxes/"+sb.ID+"/timeout", wire.SetTimeoutRequest{TTLSeconds: 600})
	var ext wire.Sandbox
	_ = json.Unmarshal(b, &ext)
	if resp.StatusCode != 200 || time.Until(ext.ExpiresAt) < 590*time.Second {
		t.Fatalf("extend: %d %s", resp.StatusCode, b)
	}
	if resp, b := s.do(t, "DELETE", "/v1/sandboxes/"+sb.ID, nil); resp.StatusCode != http.StatusNoContent {
		t.Fatalf("kill: %d %s", resp.StatusCode, b)
	}
	for _, c := range []struct{ method, path string }{
		{"DELETE", "/v1/sandboxes/" + sb.ID},
		{"GET", "/v1/sandboxes/" + sb.ID},
		{"POST", "/v1/sandboxes/" + sb.ID + "/exec"},
	} {
		var body any
		if c.method == "POST" {
			body = wire.ExecRequest{Cmd: "true"}
		}
		if resp, b := s.do(t, c.method, c.path, body); resp.StatusCode != 404 {
			t.Errorf("%s %s after kill: %d %s, want 404", c.method, c.path, resp.StatusCode, b)
		}
	}
	// Nothing of the sandbox is left on the host.
	if _, err := os.Stat(filepath.Join(s.dataDir, "runtime", "sandboxes", sb.ID)); !os.IsNotExist(err) {
		t.Errorf("sandbox directory left after kill: %v", err)
	}
}

func TestTTLExpiry(t *testing.T) {
	s := startServer(t, nil)
	sb := s.create(t, wire.CreateSandboxRequest{TTLSeconds: 1})
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, _ := s.do(t, "GET", "/v1/sandboxes/"+sb.ID, nil)
		if resp.StatusCode == 404 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("sandbox still there 10s after its 1s TTL")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := os.Stat(filepath.Join(s.dataDir, "runtime", "sandboxes", sb.ID)); !os.IsNotExist(err) {
		t.Errorf("sandbox directory left after expiry: %v", err)
	}
}

func TestBadInput(t *testing.T) {
	s := startServer(t, nil)
	sb := s.create(t, wire.CreateSandboxRequest{})
	big := `{"cmd": "` + strings.Repeat("x", 2<<20) + `"}`
	tests := []struct {
		name, method, path string
		body               any
		noAuth             bool
		want               int
		wantCode           string
	}{
		{"unknown template", "POST", "/v1/sandboxes", `{"template":"nope"}`, false, 404, "not_found"},
		{"negative ttl", "POST", "/v1/sandboxes", `{"ttl_seconds":-1}`, false, 400, "invalid_argument"},
		{"huge ttl", "POST", "/v1/sandboxes", `{"ttl_seconds":100000000}`, false, 400, "invalid_argument"},
		{"bad memory", "POST", "/v1/sandboxes", `{"memory_mb":1}`, false, 400, "invalid_argument"},
		{"bad cpu", "POST", "/v1/sandboxes", `{"cpu":64}`, false, 400, "invalid_argument"},
		{"bad env", "POST", "/v1/sandboxes", `{"env":{"A=B":"c"}}`, false, 400, "invalid_argument"},
		{"unknown field", "POST", "/v1/sandboxes", `{"templat":"base"}`, false, 400, "invalid_argument"},
		{"not json", "POST", "/v1/sandboxes", `{"template":`, false, 400, "invalid_argument"},
		{"trailing data", "POST", "/v1/sandboxes", `{} {}`, false, 400, "invalid_argument"},
		{"wrong type", "POST", "/v1/sandboxes", `{"ttl_seconds":"10"}`, false, 400, "invalid_argument"},
		{"no auth", "GET", "/v1/sandboxes", nil, true, 401, "unauthenticated"},
		{"missing sandbox", "GET", "/v1/sandboxes/sb-0000000000000000", nil, false, 404, "not_found"},
		{"empty exec", "POST", "/v1/sandboxes/" + sb.ID + "/exec", `{}`, false, 400, "invalid_argument"},
		{"cmd and argv", "POST", "/v1/sandboxes/" + sb.ID + "/exec", `{"cmd":"a","argv":["b"]}`, false, 400, "invalid_argument"},
		{"relative cwd", "POST", "/v1/sandboxes/" + sb.ID + "/exec", `{"cmd":"a","cwd":"tmp"}`, false, 400, "invalid_argument"},
		{"negative timeout", "POST", "/v1/sandboxes/" + sb.ID + "/exec", `{"cmd":"a","timeout_seconds":-1}`, false, 400, "invalid_argument"},
		{"oversize body", "POST", "/v1/sandboxes/" + sb.ID + "/exec", big, false, 413, "too_large"},
		{"empty timeout body", "POST", "/v1/sandboxes/" + sb.ID + "/timeout", ``, false, 400, "invalid_argument"},
		{"zero ttl", "POST", "/v1/sandboxes/" + sb.ID + "/timeout", `{"ttl_seconds":0}`, false, 400, "invalid_argument"},
		{"unknown route", "GET", "/v1/nope", nil, false, 404, "not_found"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var hdr []string
			key := s.key
			if tt.noAuth {
				s.key = ""
			}
			resp, b := s.do(t, tt.method, tt.path, tt.body, hdr...)
			s.key = key
			var e wire.ErrorResponse
			if err := json.Unmarshal(b, &e); err != nil {
				t.Fatalf("body %q is not a JSON error: %v", b, err)
			}
			if resp.StatusCode != tt.want || e.Error.Code != tt.wantCode || e.Error.Message == "" {
				t.Errorf("got %d %s, want %d %s", resp.StatusCode, b, tt.want, tt.wantCode)
			}
		})
	}
	// The server and the sandbox are still fine.
	if res := s.exec(t, sb.ID, wire.ExecRequest{Cmd: "echo ok"}); res.Stdout != "ok\n" {
		t.Errorf("after bad input: %+v", res)
	}
}

func TestTenantsAreIsolated(t *testing.T) {
	s := startServer(t, nil)
	sb := s.create(t, wire.CreateSandboxRequest{})
	// A second tenant's key, added straight to the store.
	other := startServerKey(t, s, "tenant-b")
	for _, c := range []struct{ method, path string }{
		{"GET", "/v1/sandboxes/" + sb.ID},
		{"DELETE", "/v1/sandboxes/" + sb.ID},
	} {
		resp, b := other.do(t, c.method, c.path, nil)
		if resp.StatusCode != 404 {
			t.Errorf("other tenant %s %s: %d %s, want 404", c.method, c.path, resp.StatusCode, b)
		}
	}
	resp, b := other.do(t, "GET", "/v1/sandboxes", nil)
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"sandboxes":[]`) {
		t.Errorf("other tenant list: %d %s", resp.StatusCode, b)
	}
	if res := s.exec(t, sb.ID, wire.ExecRequest{Cmd: "true"}); res.ExitCode != 0 {
		t.Errorf("owner exec after other tenant's kill attempt: %+v", res)
	}
}

func startServerKey(t *testing.T, s *server, tenant string) *server {
	t.Helper()
	key := fmt.Sprintf("ps_test_%s_%d", tenant, time.Now().UnixNano())
	if err := addKey(s.dataDir, key, tenant); err != nil {
		t.Fatal(err)
	}
	return &server{url: s.url, key: key, dataDir: s.dataDir}
}
