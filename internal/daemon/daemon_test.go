package daemon_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/api"
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
		{"utf8", wire.ExecRequest{Cmd: "printf 'h\\303\\251llo \\377'"}, "héllo \uFFFD", "", 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := s.Exec(t, sb.ID, tt.req)
			if res.Stdout != tt.wantOut || res.Stderr != tt.wantErr || res.ExitCode != tt.wantCode || res.TimedOut != tt.wantTimout {
				t.Errorf("got stdout %q stderr %q exit %d timed_out %v, want %q %q %d %v",
					res.Stdout, res.Stderr, res.ExitCode, res.TimedOut, tt.wantOut, tt.wantErr, tt.wantCode, tt.wantTimout)
			}
		})
	}
	t.Run("timeout kills the group", func(t *testing.T) {
		// The background child runs (it said so) when the timeout fires;
		// neither it nor the shell ever finishes its sleep.
		start := time.Now()
		res := timedOutAfterSetUp(t, s, sb.ID, "(echo child started; sleep 1000; echo child) & sleep 1000", "child started\n", 0.5)
		if res.Stdout != "child started\n" || res.Stderr != "" {
			t.Errorf("got stdout %q stderr %q, want %q and nothing", res.Stdout, res.Stderr, "child started\n")
		}
		if took := time.Since(start); took > patience {
			t.Errorf("timed-out exec took %v: the timeout did not end it", took)
		}
	})
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
	s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "mkdir -p /opt/bin && printf '#!/bin/sh\necho tool $1\n' > /opt/bin/tool && chmod +x /opt/bin/tool", User: wire.UserRoot})
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
	waitNoProcs(t, s, sb.ID, "sleep 1000")
}

func TestExecStreaming(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{})
	for i, accept := range []string{"application/x-ndjson", "text/event-stream"} {
		t.Run(accept, func(t *testing.T) {
			// The command prints "one", then waits until the test, having
			// received "one", creates a file; only then does it print
			// "two". Without streaming the test sees "one" only at the
			// end, too late: the command gives up (after 60 s) without
			// "two".
			goFile := fmt.Sprintf("/tmp/go-%d", i)
			cmd := fmt.Sprintf("echo one; i=0; until [ -e %[1]s ] || [ $i -ge 1200 ]; do sleep 0.05; i=$((i+1)); done; [ -e %[1]s ] && echo two >&2; exit 5", goFile)
			body, _ := json.Marshal(wire.ExecRequest{Cmd: cmd, TimeoutSeconds: patience.Seconds()})
			req, _ := http.NewRequest("POST", s.URL+"/v1/sandboxes/"+sb.ID+"/exec", bytes.NewReader(body))
			req.Header.Set("Authorization", "Bearer "+s.Key)
			req.Header.Set("Accept", accept)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if ct := resp.Header.Get("Content-Type"); ct != accept {
				t.Errorf("content type %q, want %q", ct, accept)
			}
			var events []wire.ExecEvent
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
				events = append(events, ev)
				if len(events) == 1 {
					s.Exec(t, sb.ID, wire.ExecRequest{Argv: []string{"touch", goFile}})
				}
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
	// The new expiry is 600 s from the request, whenever it is handled.
	before := time.Now()
	resp, b = s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/timeout", wire.SetTimeoutRequest{TTLSeconds: 600})
	after := time.Now()
	var ext wire.Sandbox
	if err := json.Unmarshal(b, &ext); err != nil || resp.StatusCode != 200 {
		t.Fatalf("extend: %d %s (%v)", resp.StatusCode, b, err)
	}
	if lo, hi := before.Add(600*time.Second-time.Second), after.Add(600*time.Second+time.Second); ext.ExpiresAt.Before(lo) || ext.ExpiresAt.After(hi) {
		t.Fatalf("extend: expires at %v, want 600 s after the request, between %v and %v", ext.ExpiresAt, lo, hi)
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
	waitUntil(t, "sandbox gone from the API after its 1 s TTL", func() (bool, string) {
		resp, b := s.Do(t, "GET", "/v1/sandboxes/"+sb.ID, nil)
		return resp.StatusCode == 404, fmt.Sprintf("%d %s", resp.StatusCode, b)
	})
	// The teardown finishes just after the sandbox leaves the API.
	dir := filepath.Join(s.DataDir, "runtime", "sandboxes", sb.ID)
	waitUntil(t, "sandbox directory removed after expiry", func() (bool, string) {
		_, err := os.Stat(dir)
		return os.IsNotExist(err), fmt.Sprint(err)
	})
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

// TestTenantsAreIsolated sends another tenant's key to every route of the
// API that takes a sandbox or snapshot id (the list comes from the server's
// own routes, so a new route cannot be forgotten), with the owner's ids, a
// valid body, and for sandboxes both a running and a paused one; and
// creates a sandbox from the owner's snapshot. Each must answer 404, and
// the owner's sandboxes and snapshot must be left exactly as they were.
func TestTenantsAreIsolated(t *testing.T) {
	s := daemontest.Start(t, nil)
	running := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 600, Metadata: map[string]string{"owner": "a"}})
	s.Exec(t, running.ID, wire.ExecRequest{Cmd: "echo mine > $HOME/f"})
	paused := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 600})
	s.Exec(t, paused.ID, wire.ExecRequest{Cmd: "echo mine > $HOME/f"})
	// A background process in each, for the routes with a {pid}.
	pids := map[string]int{}
	for _, id := range []string{running.ID, paused.ID} {
		pids[id] = post[wire.Process](t, s, "/v1/sandboxes/"+id+"/processes", wire.StartProcessRequest{Cmd: "sleep 1000", Stdin: true, PTY: &wire.PTYSize{Cols: 80, Rows: 24}}, http.StatusCreated).PID
	}
	post[wire.Sandbox](t, s, "/v1/sandboxes/"+paused.ID+"/pause", nil, http.StatusOK)
	snap := post[wire.Snapshot](t, s, "/v1/sandboxes/"+running.ID+"/snapshot", nil, http.StatusCreated)
	get := func(path string, v any) {
		t.Helper()
		resp, b := s.Do(t, "GET", path, nil)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("owner GET %s: %d %s", path, resp.StatusCode, b)
		}
		if err := json.Unmarshal(b, v); err != nil {
			t.Fatalf("owner GET %s: %v: %s", path, err, b)
		}
	}
	var runningBefore, pausedBefore wire.Sandbox
	var snapBefore wire.Snapshot
	get("/v1/sandboxes/"+running.ID, &runningBefore)
	get("/v1/sandboxes/"+paused.ID, &pausedBefore)
	get("/v1/snapshots/"+snap.ID, &snapBefore)
	if runningBefore.State != wire.StateRunning || pausedBefore.State != wire.StatePaused {
		t.Fatalf("before: states %q and %q, want running and paused", runningBefore.State, pausedBefore.State)
	}

	// A valid body for each route that takes an id: what the owner would
	// send to change or destroy the object.
	bodies := map[string]any{
		"GET /v1/sandboxes/{id}":           nil,
		"DELETE /v1/sandboxes/{id}":        nil,
		"POST /v1/sandboxes/{id}/timeout":  wire.SetTimeoutRequest{TTLSeconds: 1},
		"POST /v1/sandboxes/{id}/exec":     wire.ExecRequest{Cmd: "echo theirs > $HOME/f"},
		"POST /v1/sandboxes/{id}/snapshot": wire.SnapshotRequest{},
		"POST /v1/sandboxes/{id}/fork":     wire.ForkRequest{Count: 1},
		"POST /v1/sandboxes/{id}/pause":    nil,
		"POST /v1/sandboxes/{id}/resume":   nil,
		"GET /v1/sandboxes/{id}/metrics":   nil,
		"PUT /v1/sandboxes/{id}/network":   wire.Network{Internet: true},
		// Exposed ports: every method passes through.
		"GET /v1/sandboxes/{id}/ports/{port}/{path...}":     nil,
		"HEAD /v1/sandboxes/{id}/ports/{port}/{path...}":    nil,
		"POST /v1/sandboxes/{id}/ports/{port}/{path...}":    "x",
		"PUT /v1/sandboxes/{id}/ports/{port}/{path...}":     "x",
		"PATCH /v1/sandboxes/{id}/ports/{port}/{path...}":   "x",
		"DELETE /v1/sandboxes/{id}/ports/{port}/{path...}":  nil,
		"OPTIONS /v1/sandboxes/{id}/ports/{port}/{path...}": nil,
		"GET /v1/snapshots/{id}":                            nil,
		"DELETE /v1/snapshots/{id}":                         nil,
		// Background processes and terminals.
		"POST /v1/sandboxes/{id}/processes":               wire.StartProcessRequest{Cmd: "echo theirs > $HOME/f"},
		"GET /v1/sandboxes/{id}/processes":                nil,
		"GET /v1/sandboxes/{id}/processes/{pid}":          nil,
		"GET /v1/sandboxes/{id}/processes/{pid}/output":   nil,
		"POST /v1/sandboxes/{id}/processes/{pid}/stdin":   wire.ProcessStdinRequest{Data: "x", EOF: true},
		"POST /v1/sandboxes/{id}/processes/{pid}/signal":  wire.SignalRequest{Signal: "KILL"},
		"POST /v1/sandboxes/{id}/processes/{pid}/resize":  wire.PTYSize{Cols: 10, Rows: 10},
		"POST /v1/sandboxes/{id}/processes/{pid}/wait":    nil,
		"GET /v1/sandboxes/{id}/processes/{pid}/terminal": nil,
		"GET /v1/sandboxes/{id}/terminal":                 nil,
		// Code contexts.
		"POST /v1/sandboxes/{id}/code":                            wire.RunCodeRequest{Code: "open('/home/user/f', 'w').write('theirs')"},
		"POST /v1/sandboxes/{id}/code/contexts":                   wire.CreateCodeContextRequest{},
		"GET /v1/sandboxes/{id}/code/contexts":                    nil,
		"POST /v1/sandboxes/{id}/code/contexts/{context}/restart": nil,
		"DELETE /v1/sandboxes/{id}/code/contexts/{context}":       nil,
	}
	// The terminal routes are WebSockets: they answer only upgrade requests.
	upgrade := []string{"Connection", "Upgrade", "Upgrade", "websocket", "Sec-WebSocket-Version", "13", "Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="}
	fileBodies, fileQueries := fileIsolationRequests(t)
	maps.Copy(bodies, fileBodies)
	other := s.WithTenant(t, "tenant-b")
	attempt := func(method, path string, body any, hdr ...string) {
		t.Helper()
		resp, b := other.Do(t, method, path, body, hdr...)
		var e wire.ErrorResponse
		if resp.StatusCode != http.StatusNotFound || (method != "HEAD" && (json.Unmarshal(b, &e) != nil || e.Error.Code != "not_found")) {
			t.Errorf("other tenant %s %s %v: %d %s, want 404 not_found", method, path, hdr, resp.StatusCode, b)
		}
	}
	// DELETEs last: a kill that got through would hide what the others do.
	routes := api.New(api.Config{}).Routes()
	sort.SliceStable(routes, func(i, j int) bool {
		return !strings.HasPrefix(routes[i], "DELETE ") && strings.HasPrefix(routes[j], "DELETE ")
	})
	withID := 0
	for _, route := range routes {
		method, pattern, _ := strings.Cut(route, " ")
		if !strings.Contains(pattern, "{id}") {
			continue
		}
		withID++
		body, ok := bodies[route]
		if !ok {
			t.Errorf("route %s takes an id, and this test does not cover it: add a body for it", route)
			continue
		}
		ids := []string{running.ID, paused.ID}
		if strings.HasPrefix(pattern, "/v1/snapshots/") {
			ids = []string{snap.ID}
		}
		for _, id := range ids {
			path := strings.Replace(pattern, "{id}", id, 1) + fileQueries[route]
			path = strings.Replace(path, "{pid}", strconv.Itoa(pids[id]), 1)
			path = strings.Replace(path, "{context}", wire.LanguagePython, 1)
			path = strings.Replace(path, "{port}/{path...}", "8000/index.html", 1)
			if strings.HasSuffix(pattern, "/terminal") {
				attempt(method, path, body, upgrade...)
				attempt(method, path+"?access_token="+other.Key, body, upgrade...)
				continue
			}
			attempt(method, path, body)
			if route == "POST /v1/sandboxes/{id}/exec" || route == "POST /v1/sandboxes/{id}/code" {
				for _, accept := range []string{"application/x-ndjson", "text/event-stream"} {
					attempt(method, path, body, "Accept", accept)
				}
			}
		}
	}
	if withID < len(bodies) {
		t.Errorf("the server has %d routes with an id, this test knows %d: a route is gone or renamed", withID, len(bodies))
	}
	// Creating a sandbox from another tenant's snapshot.
	attempt("POST", "/v1/sandboxes", wire.CreateSandboxRequest{SnapshotID: snap.ID})

	// The other tenant sees nothing and made nothing.
	// Its audit log holds only its own refused attempts, none of the
	// owner's actions.
	for _, path := range []string{"/v1/audit?limit=1000", "/v1/audit?limit=1000&sandbox=" + running.ID} {
		resp, b := other.Do(t, "GET", path, nil)
		var l wire.AuditList
		if resp.StatusCode != 200 || json.Unmarshal(b, &l) != nil {
			t.Fatalf("other tenant GET %s: %d %s", path, resp.StatusCode, b)
		}
		for _, e := range l.Entries {
			if e.KeyID != api.KeyID(api.HashKey(other.Key)) || e.Outcome != "not_found" {
				t.Errorf("other tenant's audit shows %+v", e)
			}
		}
	}
	for _, path := range []string{"/v1/sandboxes", "/v1/snapshots"} {
		resp, b := other.Do(t, "GET", path, nil)
		if resp.StatusCode != 200 || (!strings.Contains(string(b), `"sandboxes":[]`) && !strings.Contains(string(b), `"snapshots":[]`)) {
			t.Errorf("other tenant GET %s: %d %s, want an empty list", path, resp.StatusCode, b)
		}
	}
	// The owner's objects are as they were: same records (state, expiry,
	// metadata), files unchanged, nothing added.
	var runningAfter, pausedAfter wire.Sandbox
	var snapAfter wire.Snapshot
	get("/v1/sandboxes/"+paused.ID, &pausedAfter)
	get("/v1/sandboxes/"+running.ID, &runningAfter)
	get("/v1/snapshots/"+snap.ID, &snapAfter)
	if !reflect.DeepEqual(runningAfter, runningBefore) {
		t.Errorf("running sandbox changed:\nbefore %+v\nafter  %+v", runningBefore, runningAfter)
	}
	if !reflect.DeepEqual(pausedAfter, pausedBefore) {
		t.Errorf("paused sandbox changed:\nbefore %+v\nafter  %+v", pausedBefore, pausedAfter)
	}
	if !reflect.DeepEqual(snapAfter, snapBefore) {
		t.Errorf("snapshot changed:\nbefore %+v\nafter  %+v", snapBefore, snapAfter)
	}
	var sandboxes wire.SandboxList
	get("/v1/sandboxes", &sandboxes)
	var ids []string
	for _, sb := range sandboxes.Sandboxes {
		ids = append(ids, sb.ID)
	}
	sort.Strings(ids)
	want := []string{running.ID, paused.ID}
	sort.Strings(want)
	if !slices.Equal(ids, want) {
		t.Errorf("owner's sandboxes: got %v, want %v", ids, want)
	}
	var snapshots wire.SnapshotList
	get("/v1/snapshots", &snapshots)
	if len(snapshots.Snapshots) != 1 || snapshots.Snapshots[0].ID != snap.ID {
		t.Errorf("owner's snapshots: got %+v, want only %s", snapshots.Snapshots, snap.ID)
	}
	if p := getJSON[wire.Process](t, s, fmt.Sprintf("/v1/sandboxes/%s/processes/%d", running.ID, pids[running.ID])); p.State != wire.ProcessRunning || !p.Stdin {
		t.Errorf("owner's process after the other tenant's attempts: %+v, want it running with its stdin open", p)
	}
	for _, id := range []string{running.ID, paused.ID} {
		if res := s.Exec(t, id, wire.ExecRequest{Cmd: "cat $HOME/f"}); res.Stdout != "mine\n" || res.ExitCode != 0 {
			t.Errorf("owner's file in %s after the other tenant's attempts: %+v", id, res)
		}
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
	res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "dd if=/dev/zero of=/big bs=1M count=300 2>&1 | grep -o 'No space left on device'; df -m / | tail -1 | awk '{print $2}'", User: wire.UserRoot})
	if !strings.Contains(res.Stdout, "No space left on device") {
		t.Errorf("disk fill past 100 MiB: %q", res.Stdout)
	}
	if fields := strings.Fields(res.Stdout); len(fields) == 0 || fields[len(fields)-1] != "100" {
		t.Errorf("df size: %q, want 100", res.Stdout)
	}
	// The sleeps outlast the loop however slowly it forks; they are
	// killed afterwards.
	res = s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "for i in $(seq 100); do sleep 1000 >/dev/null 2>&1 & done 2>&1 | grep -c 'fork\\|Resource'; pkill -x sleep; true", TimeoutSeconds: patience.Seconds()})
	if strings.TrimSpace(res.Stdout) == "0" || res.Stdout == "" {
		t.Errorf("100 background processes under pids 64 all started: %+v", res)
	}
	waitNoProcs(t, s, sb.ID, "sleep 1000")
	if res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "ulimit -n"}); res.Stdout != "65536\n" {
		t.Errorf("open-file limit: %q, want 65536", res.Stdout)
	}
	for _, body := range []string{`{"disk_mb":10}`, `{"disk_mb":100000000}`, `{"pids":1}`, `{"pids":1000000}`} {
		if resp, b := s.Do(t, "POST", "/v1/sandboxes", body); resp.StatusCode != 400 {
			t.Errorf("create %s: %d %s, want 400", body, resp.StatusCode, b)
		}
	}
}
