package cli

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pandastack/pandastack/wire"
)

const testKey = "cli-test-key"

// fakeAPI follows docs/API.md just far enough to test the commands' use of
// the SDK and their output; it runs no sandboxes. It knows the running sb-1
// and sb-2, the paused sb-p and the snapshot snap-1 at the start; it creates
// sb-new, forks sb-fork-N and snapshots snap-new.
type fakeAPI struct {
	mu sync.Mutex
	// reqs lists "METHOD /path body" of every request, in order.
	reqs      []string
	sandboxes map[string]wire.Sandbox
	snapshots map[string]wire.Snapshot
	// exec answers an exec with NDJSON events; nil answers exit 0.
	exec func(w http.ResponseWriter, r *http.Request, req wire.ExecRequest)
}

var created = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func newFakeAPI(t *testing.T) (*fakeAPI, string) {
	f := &fakeAPI{sandboxes: map[string]wire.Sandbox{}, snapshots: map[string]wire.Snapshot{}}
	for i, id := range []string{"sb-2", "sb-1"} {
		f.sandboxes[id] = wire.Sandbox{
			ID: id, Template: "base", State: wire.StateRunning,
			CreatedAt: created.Add(time.Duration(-i) * time.Minute),
			ExpiresAt: time.Now().Add(90 * time.Minute), CPU: 1, MemoryMB: 1024, OnTimeout: wire.OnTimeoutKill,
		}
	}
	f.sandboxes["sb-p"] = wire.Sandbox{
		ID: "sb-p", Template: "base", State: wire.StatePaused,
		CreatedAt: created.Add(time.Minute), ExpiresAt: time.Now().Add(-time.Hour),
		CPU: 1, MemoryMB: 1024, OnTimeout: wire.OnTimeoutPause, PausedBytes: 3 << 20,
	}
	f.snapshots["snap-1"] = wire.Snapshot{
		ID: "snap-1", SourceSandbox: "sb-1", Template: "base", SizeBytes: 5 << 19, CreatedAt: created,
	}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return f, srv.URL
}

func (f *fakeAPI) requests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.reqs)
}

func reply(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func replyError(w http.ResponseWriter, status int, code, msg string) {
	reply(w, status, wire.ErrorResponse{Error: wire.Error{Code: code, Message: msg}})
}

func (f *fakeAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	f.mu.Lock()
	f.reqs = append(f.reqs, strings.TrimSpace(r.Method+" "+r.URL.Path+" "+string(body)))
	f.mu.Unlock()
	if r.Header.Get("Authorization") != "Bearer "+testKey {
		replyError(w, http.StatusUnauthorized, wire.CodeUnauthenticated, "bad key")
		return
	}
	if rest, ok := strings.CutPrefix(r.URL.Path, "/v1/snapshots"); ok {
		f.serveSnapshots(w, r, strings.TrimPrefix(rest, "/"))
		return
	}
	rest, _ := strings.CutPrefix(r.URL.Path, "/v1/sandboxes")
	id, action, _ := strings.Cut(strings.TrimPrefix(rest, "/"), "/")

	f.mu.Lock()
	sb, found := f.sandboxes[id]
	f.mu.Unlock()
	if id != "" && !found {
		replyError(w, http.StatusNotFound, wire.CodeNotFound, fmt.Sprintf("sandbox %q not found", id))
		return
	}
	switch {
	case r.Method == "GET" && id == "":
		var l wire.SandboxList
		f.mu.Lock()
		for _, sb := range f.sandboxes {
			l.Sandboxes = append(l.Sandboxes, sb)
		}
		f.mu.Unlock()
		reply(w, http.StatusOK, l)
	case r.Method == "POST" && id == "":
		var req wire.CreateSandboxRequest
		json.Unmarshal(body, &req)
		if req.SnapshotID != "" {
			f.mu.Lock()
			snap, ok := f.snapshots[req.SnapshotID]
			f.mu.Unlock()
			if !ok {
				replyError(w, http.StatusNotFound, wire.CodeNotFound, fmt.Sprintf("snapshot %q not found", req.SnapshotID))
				return
			}
			req.Template = snap.Template
		}
		sb := wire.Sandbox{ID: "sb-new", Template: req.Template, State: wire.StateRunning,
			CreatedAt: created, ExpiresAt: created.Add(time.Duration(req.TTLSeconds) * time.Second),
			Metadata: req.Metadata, CPU: req.CPU, MemoryMB: req.MemoryMB, OnTimeout: req.OnTimeout}
		f.mu.Lock()
		f.sandboxes[sb.ID] = sb
		f.mu.Unlock()
		reply(w, http.StatusCreated, sb)
	case r.Method == "GET" && action == "":
		reply(w, http.StatusOK, sb)
	case r.Method == "DELETE" && action == "":
		f.mu.Lock()
		delete(f.sandboxes, id)
		f.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	case r.Method == "POST" && action == "timeout":
		var req wire.SetTimeoutRequest
		json.Unmarshal(body, &req)
		sb.ExpiresAt = created.Add(time.Duration(req.TTLSeconds) * time.Second)
		reply(w, http.StatusOK, sb)
	case r.Method == "POST" && action == "snapshot":
		snap := wire.Snapshot{ID: "snap-new", SourceSandbox: id, Template: sb.Template, SizeBytes: 1234, CreatedAt: created}
		f.mu.Lock()
		f.snapshots[snap.ID] = snap
		f.mu.Unlock()
		reply(w, http.StatusCreated, snap)
	case r.Method == "POST" && action == "fork":
		var req wire.ForkRequest
		json.Unmarshal(body, &req)
		if req.Count > 16 {
			replyError(w, http.StatusBadRequest, wire.CodeInvalid, "count must be 1 to 16")
			return
		}
		resp := wire.ForkResponse{Sandboxes: []wire.Sandbox{}}
		f.mu.Lock()
		for i := range max(req.Count, 1) {
			fork := sb
			fork.ID = fmt.Sprintf("sb-fork-%d", i+1)
			fork.CreatedAt = created
			fork.ExpiresAt = created.Add(time.Duration(req.TTLSeconds) * time.Second)
			f.sandboxes[fork.ID] = fork
			resp.Sandboxes = append(resp.Sandboxes, fork)
		}
		f.mu.Unlock()
		reply(w, http.StatusCreated, resp)
	case r.Method == "POST" && (action == "pause" || action == "resume"):
		if action == "pause" {
			sb.State, sb.PausedBytes = wire.StatePaused, 1<<20
		} else {
			sb.State, sb.PausedBytes, sb.ExpiresAt = wire.StateRunning, 0, created.Add(5*time.Minute)
		}
		f.mu.Lock()
		f.sandboxes[id] = sb
		f.mu.Unlock()
		reply(w, http.StatusOK, sb)
	case r.Method == "POST" && action == "exec":
		if r.Header.Get("Accept") != "application/x-ndjson" {
			replyError(w, http.StatusBadRequest, wire.CodeInvalid, "the CLI should stream")
			return
		}
		var req wire.ExecRequest
		json.Unmarshal(body, &req)
		w.Header().Set("Content-Type", "application/x-ndjson")
		if f.exec == nil {
			events(w, wire.ExecEvent{Type: wire.EventExit, Result: &wire.ExecResult{}})
			return
		}
		f.exec(w, r, req)
	default:
		replyError(w, http.StatusNotFound, wire.CodeNotFound, "no route")
	}
}

// serveSnapshots answers /v1/snapshots/id (all of them when id is "").
func (f *fakeAPI) serveSnapshots(w http.ResponseWriter, r *http.Request, id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	snap, found := f.snapshots[id]
	switch {
	case r.Method == "GET" && id == "":
		l := wire.SnapshotList{Snapshots: []wire.Snapshot{}}
		for _, s := range f.snapshots {
			l.Snapshots = append(l.Snapshots, s)
		}
		reply(w, http.StatusOK, l)
	case !found:
		replyError(w, http.StatusNotFound, wire.CodeNotFound, fmt.Sprintf("snapshot %q not found", id))
	case r.Method == "GET":
		reply(w, http.StatusOK, snap)
	case r.Method == "DELETE":
		delete(f.snapshots, id)
		w.WriteHeader(http.StatusNoContent)
	default:
		replyError(w, http.StatusNotFound, wire.CodeNotFound, "no route")
	}
}

// events writes NDJSON events, flushing after each.
func events(w http.ResponseWriter, evs ...wire.ExecEvent) {
	for _, ev := range evs {
		json.NewEncoder(w).Encode(ev)
		w.(http.Flusher).Flush()
	}
}

// runCLI runs the pandastack root command against url with args.
func runCLI(t *testing.T, url string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	// Keep the real environment and key file out of the test.
	t.Setenv("PANDASTACK_URL", "")
	t.Setenv("PANDASTACK_API_KEY", "")
	t.Setenv("PANDASTACK_DATA_DIR", t.TempDir())
	var out, errOut bytes.Buffer
	root := NewRoot()
	root.SetArgs(append([]string{"--url", url, "--api-key", testKey}, args...))
	root.SetOut(&out)
	root.SetErr(&errOut)
	err = root.Execute()
	return out.String(), errOut.String(), err
}

// exitWith is an exec answer that prints to both streams and exits with code.
func exitWith(code int, timedOut bool) func(http.ResponseWriter, *http.Request, wire.ExecRequest) {
	return func(w http.ResponseWriter, _ *http.Request, _ wire.ExecRequest) {
		events(w,
			wire.ExecEvent{Type: wire.EventStdout, Data: "out1\n"},
			wire.ExecEvent{Type: wire.EventStderr, Data: "err1\n"},
			wire.ExecEvent{Type: wire.EventStdout, Data: "out2\n"},
			wire.ExecEvent{Type: wire.EventExit, Result: &wire.ExecResult{ExitCode: code, TimedOut: timedOut}},
		)
	}
}

// commandTest is one run of the CLI against the fake API.
type commandTest struct {
	name       string
	args       []string
	exec       func(http.ResponseWriter, *http.Request, wire.ExecRequest)
	wantOut    string // exact, unless wantOutHas is set
	wantOutHas []string
	wantErrOut string // substring of stderr
	wantErr    string // substring of the error; "" for none
	wantExit   int    // ExitCodeError code; 0 for none
	wantReqs   []string
}

// TestCommands runs the commands of sandbox_test.go and snapshot_test.go.
func TestCommands(t *testing.T) {
	tests := []commandTest{
		{
			name:     "create prints the id",
			args:     []string{"sandbox", "create", "--template", "python", "--ttl", "60", "--env", "A=1=2", "--env", "B=", "--metadata", "team=x,y", "--cpu", "0.5", "--memory-mb", "256"},
			wantOut:  "sb-new\n",
			wantReqs: []string{`POST /v1/sandboxes {"template":"python","ttl_seconds":60,"env":{"A":"1=2","B":""},"metadata":{"team":"x,y"},"cpu":0.5,"memory_mb":256}`},
		},
		{
			name:       "create --json",
			args:       []string{"sandbox", "create", "--json"},
			wantOutHas: []string{`"id": "sb-new"`, `"state": "running"`},
			wantReqs:   []string{`POST /v1/sandboxes {}`},
		},
		{
			name:    "create with a bad --env",
			args:    []string{"sandbox", "create", "--env", "NOVALUE"},
			wantErr: `parsing --env "NOVALUE": want KEY=VALUE`,
		},
		{
			name: "list prints a table, oldest first",
			args: []string{"sandbox", "list"},
			wantOutHas: []string{
				"ID     TEMPLATE   STATE     EXPIRES\nsb-1   base       running   in 1h30m0s\n",
				"\nsb-2   base       running   in 1h30m0s\n",
				"\nsb-p   base       paused    -\n",
			},
			wantReqs: []string{"GET /v1/sandboxes"},
		},
		{
			name:       "list --json",
			args:       []string{"sandbox", "list", "--json"},
			wantOutHas: []string{`"id": "sb-1"`, `"id": "sb-2"`},
		},
		{
			name:       "get prints JSON",
			args:       []string{"sandbox", "get", "sb-1"},
			wantOutHas: []string{`"id": "sb-1"`, `"memory_mb": 1024`},
			wantReqs:   []string{"GET /v1/sandboxes/sb-1"},
		},
		{
			name:    "get an unknown sandbox",
			args:    []string{"sandbox", "get", "sb-x"},
			wantErr: `sandbox "sb-x" not found`,
		},
		{
			name:       "exec a shell string",
			args:       []string{"sandbox", "exec", "sb-1", "--timeout", "2.5", "--env", "K=V", "--cwd", "/tmp", "--", "echo hi | wc -c"},
			exec:       exitWith(0, false),
			wantOut:    "out1\nout2\n",
			wantErrOut: "err1\n",
			wantReqs: []string{
				"GET /v1/sandboxes/sb-1",
				`POST /v1/sandboxes/sb-1/exec {"cmd":"echo hi | wc -c","env":{"K":"V"},"cwd":"/tmp","timeout_seconds":2.5}`,
			},
		},
		{
			name: "exec argv passes on the exit code",
			args: []string{"sandbox", "exec", "sb-1", "--", "ls", "-l", "a b"},
			exec: exitWith(3, false), wantOut: "out1\nout2\n", wantErrOut: "err1\n", wantExit: 3,
			wantReqs: []string{"GET /v1/sandboxes/sb-1", `POST /v1/sandboxes/sb-1/exec {"argv":["ls","-l","a b"]}`},
		},
		{
			name: "exec that times out exits 124",
			args: []string{"sandbox", "exec", "sb-1", "--timeout", "5", "--", "sleep 10"},
			exec: exitWith(124, true), wantOut: "out1\nout2\n", wantErrOut: "timed out after 5s", wantExit: 124,
		},
		{
			name: "exec stream error",
			args: []string{"sandbox", "exec", "sb-1", "--", "x"},
			exec: func(w http.ResponseWriter, r *http.Request, _ wire.ExecRequest) {
				events(w, wire.ExecEvent{Type: wire.EventError, Error: &wire.Error{Code: wire.CodeUnavailable, Message: "agent died"}})
			},
			wantErr: "agent died",
		},
		{
			name:    "exec with two ids before --",
			args:    []string{"sandbox", "exec", "sb-1", "sb-2", "--", "x"},
			wantErr: "exactly one sandbox ID",
		},
		{
			name:    "exec in an unknown sandbox",
			args:    []string{"sandbox", "exec", "sb-x", "--", "x"},
			wantErr: `sandbox "sb-x" not found`,
		},
		{
			name:     "kill several",
			args:     []string{"sandbox", "kill", "sb-1", "sb-2"},
			wantReqs: []string{"GET /v1/sandboxes/sb-1", "DELETE /v1/sandboxes/sb-1", "GET /v1/sandboxes/sb-2", "DELETE /v1/sandboxes/sb-2"},
		},
		{
			name:     "kill goes on past a missing one",
			args:     []string{"sandbox", "kill", "sb-x", "sb-1"},
			wantErr:  `sandbox "sb-x" not found`,
			wantReqs: []string{"GET /v1/sandboxes/sb-x", "GET /v1/sandboxes/sb-1", "DELETE /v1/sandboxes/sb-1"},
		},
		{
			name:     "timeout",
			args:     []string{"sandbox", "timeout", "sb-1", "600"},
			wantOut:  "sb-1 expires at 2026-01-02T03:14:05Z\n",
			wantReqs: []string{"GET /v1/sandboxes/sb-1", `POST /v1/sandboxes/sb-1/timeout {"ttl_seconds":600}`},
		},
		{
			name:    "timeout needs a number",
			args:    []string{"sandbox", "timeout", "sb-1", "soon"},
			wantErr: `parsing SECONDS "soon"`,
		},
		{
			name: "run creates, execs and kills",
			args: []string{"run", "--template", "python", "--ttl", "30", "--timeout", "9", "--env", "A=b", "python3", "-c", "exit(7)"},
			exec: exitWith(7, false), wantOut: "out1\nout2\n", wantErrOut: "err1\n", wantExit: 7,
			wantReqs: []string{
				`POST /v1/sandboxes {"template":"python","ttl_seconds":30}`,
				`POST /v1/sandboxes/sb-new/exec {"argv":["python3","-c","exit(7)"],"env":{"A":"b"},"timeout_seconds":9}`,
				"DELETE /v1/sandboxes/sb-new",
			},
		},
		{
			name: "run kills the sandbox when the exec fails",
			args: []string{"run", "--", "true"},
			exec: func(w http.ResponseWriter, r *http.Request, _ wire.ExecRequest) {
				events(w, wire.ExecEvent{Type: wire.EventError, Error: &wire.Error{Code: wire.CodeUnavailable, Message: "agent died"}})
			},
			wantErr: "agent died",
			wantReqs: []string{
				`POST /v1/sandboxes {}`,
				`POST /v1/sandboxes/sb-new/exec {"cmd":"true"}`,
				"DELETE /v1/sandboxes/sb-new",
			},
		},
	}
	tests = append(tests, snapshotCommandTests...)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, url := newFakeAPI(t)
			f.exec = tt.exec
			out, errOut, err := runCLI(t, url, tt.args...)

			var ec ExitCodeError
			switch {
			case tt.wantExit != 0:
				if !errors.As(err, &ec) || ec.Code != tt.wantExit {
					t.Errorf("error: got %v, want exit code %d", err, tt.wantExit)
				}
			case tt.wantErr != "":
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("error: got %v, want one containing %q", err, tt.wantErr)
				}
			case err != nil:
				t.Errorf("error: got %v, want none", err)
			}
			if tt.wantOutHas != nil {
				for _, s := range tt.wantOutHas {
					if !strings.Contains(out, s) {
						t.Errorf("stdout %q does not contain %q", out, s)
					}
				}
			} else if out != tt.wantOut {
				t.Errorf("stdout: got %q, want %q", out, tt.wantOut)
			}
			if !strings.Contains(errOut, tt.wantErrOut) {
				t.Errorf("stderr %q does not contain %q", errOut, tt.wantErrOut)
			}
			if tt.wantReqs != nil { // []string{} checks that no request was sent
				if got := f.requests(); !slices.Equal(got, tt.wantReqs) {
					t.Errorf("requests:\ngot  %q\nwant %q", got, tt.wantReqs)
				}
			}
		})
	}
}

// signalOnWrite is a stdout that sends the test process SIGINT when the
// command's first output arrives, so that the signal lands mid-exec.
type signalOnWrite struct {
	// buf is a field, not embedded, so that io.WriteString cannot bypass
	// Write through an embedded WriteString.
	buf  bytes.Buffer
	once sync.Once
}

func (w *signalOnWrite) Write(p []byte) (int, error) {
	n, err := w.buf.Write(p)
	// run has its signal handler in place from before the create until the
	// sandbox is killed, so this SIGINT cannot end the test binary.
	w.once.Do(func() { syscall.Kill(syscall.Getpid(), syscall.SIGINT) })
	return n, err
}

// TestRunInterrupted checks that SIGINT during `run` stops the command,
// kills the sandbox and exits 130.
func TestRunInterrupted(t *testing.T) {
	f, url := newFakeAPI(t)
	f.exec = func(w http.ResponseWriter, r *http.Request, _ wire.ExecRequest) {
		events(w, wire.ExecEvent{Type: wire.EventStdout, Data: "working\n"})
		<-r.Context().Done() // the client hangs up
	}
	t.Setenv("PANDASTACK_DATA_DIR", t.TempDir())
	var out signalOnWrite
	var errOut bytes.Buffer
	root := NewRoot()
	root.SetArgs([]string{"--url", url, "--api-key", testKey, "run", "--", "sleep 100"})
	root.SetOut(&out)
	root.SetErr(&errOut)
	err := root.Execute()

	var ec ExitCodeError
	if !errors.As(err, &ec) || ec.Code != exitInterrupted {
		t.Errorf("error: got %v, want exit code %d", err, exitInterrupted)
	}
	if got := out.buf.String(); got != "working\n" {
		t.Errorf("stdout: got %q, want %q", got, "working\n")
	}
	if !strings.Contains(errOut.String(), "killing sandbox sb-new") {
		t.Errorf("stderr %q does not say the sandbox is killed", errOut.String())
	}
	reqs := f.requests()
	if len(reqs) == 0 || reqs[len(reqs)-1] != "DELETE /v1/sandboxes/sb-new" {
		t.Errorf("requests: got %q, want the last to kill sb-new", reqs)
	}
}
