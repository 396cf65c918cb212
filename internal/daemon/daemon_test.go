package daemon_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/wire"
)

func TestExec(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{Env: map[string]string{"FROM_CREATE": "c"}, Metadata: map[string]string{"owner": "test"}})
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
			res := s.Exec(t, sb.ID, tt.req)
			if res.Stdout != tt.wantOut || res.Stderr != tt.wantErr || res.ExitCode != tt.wantCode || res.TimedOut != tt.wantTimout {
				t.Errorf("got stdout %q stderr %q exit %d timed_out %v, want %q %q %d %v",
					res.Stdout, res.Stderr, res.ExitCode, res.TimedOut, tt.wantOut, tt.wantErr, tt.wantCode, tt.wantTimout)
			}
			if tt.wantTimout && time.Since(start) > 10*time.Second {
				t.Errorf("timed-out exec took %v", time.Since(start))
			}
		})
	}
	// Stdin that looks like the agent's resync marker is just data (JSON
	// turns its invalid bytes into U+FFFD; sendStdin guards raw bytes).
	marker := strings.ToValidUTF8("before\xfePANDASTACK-RESYNC-1\xfd0123456789abcdefafter", "\uFFFD")
	if res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "wc -c", Stdin: marker}); strings.TrimSpace(res.Stdout) != strconv.Itoa(len(marker)) {
		t.Errorf("stdin with a resync marker: %+v", res)
	}
	if res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "echo still here"}); res.Stdout != "still here\n" {
		t.Errorf("after a resync marker in stdin: %+v", res)
	}
	// argv is looked up as a shell would: relative to cwd, in the
	// command's own PATH.
	s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "mkdir -p /opt/bin && printf '#!/bin/sh\necho tool $1\n' > /opt/bin/tool && chmod +x /opt/bin/tool"})
	for _, req := range []wire.ExecRequest{
		{Argv: []string{"./tool", "rel"}, Cwd: "/opt/bin"},
		{Argv: []string{"tool", "path"}, Env: map[string]string{"PATH": "/opt/bin:/usr/bin:/bin"}},
	} {
		want := "tool " + req.Argv[1] + "\n"
		if res := s.Exec(t, sb.ID, req); res.Stdout != want || res.ExitCode != 0 {
			t.Errorf("%v: got %+v, want %q", req.Argv, res, want)
		}
	}
	if res := s.Exec(t, sb.ID, wire.ExecRequest{Argv: []string{"/etc/passwd"}}); res.ExitCode != 126 {
		t.Errorf("non-executable: got exit %d, want 126", res.ExitCode)
	}
	// The timed-out command's background child was killed with its group.
	if res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "ps -eo args | grep -c '^sleep 30' || true"}); res.Stdout != "0\n" {
		t.Errorf("sleep processes left after timeout: %q", res.Stdout)
	}
}

func TestExecStreaming(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{})
	for _, accept := range []string{"application/x-ndjson", "text/event-stream"} {
		t.Run(accept, func(t *testing.T) {
			body, _ := json.Marshal(wire.ExecRequest{Cmd: "echo one; sleep 1; echo two >&2; exit 5"})
			req, _ := http.NewRequest("POST", s.URL+"/v1/sandboxes/"+sb.ID+"/exec", bytes.NewReader(body))
			req.Header.Set("Authorization", "Bearer "+s.Key)
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
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 60})
	resp, b := s.Do(t, "GET", "/v1/sandboxes/"+sb.ID, nil)
	if resp.StatusCode != 200 {
		t.Fatalf("get: %d %s", resp.StatusCode, b)
	}
	resp, b = s.Do(t, "GET", "/v1/sandboxes", nil)
	var list wire.SandboxList
	if err := json.Unmarshal(b, &list); err != nil || len(list.Sandboxes) != 1 || list.Sandboxes[0].ID != sb.ID {
		t.Fatalf("list: %d %s", resp.StatusCode, b)
	}
	resp, b = s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/timeout", wire.SetTimeoutRequest{TTLSeconds: 600})
	var ext wire.Sandbox
	_ = json.Unmarshal(b, &ext)
	if resp.StatusCode != 200 || time.Until(ext.ExpiresAt) < 590*time.Second {
		t.Fatalf("extend: %d %s", resp.StatusCode, b)
	}
	if resp, b := s.Do(t, "DELETE", "/v1/sandboxes/"+sb.ID, nil); resp.StatusCode != http.StatusNoContent {
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
		if resp, b := s.Do(t, c.method, c.path, body); resp.StatusCode != 404 {
			t.Errorf("%s %s after kill: %d %s, want 404", c.method, c.path, resp.StatusCode, b)
		}
	}
	// Nothing of the sandbox is left on the host.
	if _, err := os.Stat(filepath.Join(s.DataDir, "runtime", "sandboxes", sb.ID)); !os.IsNotExist(err) {
		t.Errorf("sandbox directory left after kill: %v", err)
	}
}

func TestTTLExpiry(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 1})
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, _ := s.Do(t, "GET", "/v1/sandboxes/"+sb.ID, nil)
		if resp.StatusCode == 404 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("sandbox still there 10s after its 1s TTL")
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The teardown finishes just after the sandbox leaves the API.
	dir := filepath.Join(s.DataDir, "runtime", "sandboxes", sb.ID)
	for i := 0; ; i++ {
		_, err := os.Stat(dir)
		if os.IsNotExist(err) {
			break
		}
		if i == 30 {
			t.Errorf("sandbox directory left 3s after expiry: %v", err)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestBadInput(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{})
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
			key := s.Key
			if tt.noAuth {
				s.Key = ""
			}
			resp, b := s.Do(t, tt.method, tt.path, tt.body, hdr...)
			s.Key = key
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
	if res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "echo ok"}); res.Stdout != "ok\n" {
		t.Errorf("after bad input: %+v", res)
	}
}

func TestTenantsAreIsolated(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{})
	// A second tenant's key, added straight to the store.
	other := s.WithTenant(t, "tenant-b")
	for _, c := range []struct{ method, path string }{
		{"GET", "/v1/sandboxes/" + sb.ID},
		{"DELETE", "/v1/sandboxes/" + sb.ID},
	} {
		resp, b := other.Do(t, c.method, c.path, nil)
		if resp.StatusCode != 404 {
			t.Errorf("other tenant %s %s: %d %s, want 404", c.method, c.path, resp.StatusCode, b)
		}
	}
	resp, b := other.Do(t, "GET", "/v1/sandboxes", nil)
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"sandboxes":[]`) {
		t.Errorf("other tenant list: %d %s", resp.StatusCode, b)
	}
	if res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "true"}); res.ExitCode != 0 {
		t.Errorf("owner exec after other tenant's kill attempt: %+v", res)
	}
}

func TestOutputCap(t *testing.T) {
	s := daemontest.Start(t, func(c *daemon.Config) { c.MaxOutputBytes = 1000 })
	sb := s.Create(t, wire.CreateSandboxRequest{})
	flood := wire.ExecRequest{Cmd: "head -c 5000000 /dev/zero | tr '\\0' x; echo done >&2"}
	res := s.Exec(t, sb.ID, flood)
	if len(res.Stdout) != 1000 || !res.Truncated || res.Stderr != "done\n" || res.ExitCode != 0 {
		t.Errorf("blocking: got %d bytes, truncated %v, stderr %q, exit %d; want 1000, true, %q, 0",
			len(res.Stdout), res.Truncated, res.Stderr, res.ExitCode, "done\n")
	}
	resp, body := s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/exec", flood, "Accept", "application/x-ndjson")
	if resp.StatusCode != 200 {
		t.Fatalf("stream: %d %s", resp.StatusCode, body)
	}
	var n int
	var last wire.ExecEvent
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		if err := json.Unmarshal(sc.Bytes(), &last); err != nil {
			t.Fatal(err)
		}
		if last.Type == wire.EventStdout {
			n += len(last.Data)
		}
	}
	if n != 1000 || last.Type != wire.EventExit || !last.Result.Truncated {
		t.Errorf("stream: got %d bytes, last %+v; want 1000 and a truncated exit", n, last)
	}
}

// TestLimitsAtCreate: disk and process limits asked for at create hold
// inside the sandbox, within the server's maxima.
func TestLimitsAtCreate(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{DiskMB: 100, Pids: 64})
	if sb.DiskMB != 100 || sb.Pids != 64 {
		t.Fatalf("created %+v", sb)
	}
	res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "dd if=/dev/zero of=/big bs=1M count=300 2>&1 | grep -o 'No space left on device'; df -m / | tail -1 | awk '{print $2}'"})
	if !strings.Contains(res.Stdout, "No space left on device") {
		t.Errorf("disk fill past 100 MiB: %q", res.Stdout)
	}
	if fields := strings.Fields(res.Stdout); len(fields) == 0 || fields[len(fields)-1] != "100" {
		t.Errorf("df size: %q, want 100", res.Stdout)
	}
	res = s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "for i in $(seq 100); do sleep 5 & done 2>&1 | grep -c 'fork\\|Resource' ; true", TimeoutSeconds: 20})
	if strings.TrimSpace(res.Stdout) == "0" || res.Stdout == "" {
		t.Errorf("100 background processes under pids 64 all started: %+v", res)
	}
	if res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "ulimit -n"}); res.Stdout != "65536\n" {
		t.Errorf("open-file limit: %q, want 65536", res.Stdout)
	}
	for _, body := range []string{`{"disk_mb":10}`, `{"disk_mb":100000000}`, `{"pids":1}`, `{"pids":1000000}`} {
		if resp, b := s.Do(t, "POST", "/v1/sandboxes", body); resp.StatusCode != 400 {
			t.Errorf("create %s: %d %s, want 400", body, resp.StatusCode, b)
		}
	}
}
