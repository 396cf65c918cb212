package daemon_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/wire"
)

// procs calls the background process routes of one sandbox.
type procs struct {
	t  *testing.T
	s  *daemontest.Server
	id string
}

func (p procs) path(suffix string) string { return "/v1/sandboxes/" + p.id + "/processes" + suffix }

// call sends a request and fails the test unless the status is want.
func (p procs) call(method, suffix string, body any, want int) []byte {
	p.t.Helper()
	resp, b := p.s.Do(p.t, method, p.path(suffix), body)
	if resp.StatusCode != want {
		p.t.Fatalf("%s %s: %d %s, want %d", method, p.path(suffix), resp.StatusCode, b, want)
	}
	return b
}

func (p procs) start(req wire.StartProcessRequest) wire.Process {
	p.t.Helper()
	var proc wire.Process
	if err := json.Unmarshal(p.call("POST", "", req, http.StatusCreated), &proc); err != nil {
		p.t.Fatal(err)
	}
	if proc.PID <= 0 || proc.State != wire.ProcessRunning {
		p.t.Fatalf("started %+v", proc)
	}
	return proc
}

func (p procs) get(pid int) wire.Process {
	p.t.Helper()
	var proc wire.Process
	if err := json.Unmarshal(p.call("GET", "/"+strconv.Itoa(pid), nil, http.StatusOK), &proc); err != nil {
		p.t.Fatal(err)
	}
	return proc
}

func (p procs) list() []wire.Process {
	p.t.Helper()
	var l wire.ProcessList
	if err := json.Unmarshal(p.call("GET", "", nil, http.StatusOK), &l); err != nil {
		p.t.Fatal(err)
	}
	return l.Processes
}

func (p procs) wait(pid int) wire.Process {
	p.t.Helper()
	var proc wire.Process
	if err := json.Unmarshal(p.call("POST", "/"+strconv.Itoa(pid)+"/wait", nil, http.StatusOK), &proc); err != nil {
		p.t.Fatal(err)
	}
	if proc.State != wire.ProcessExited || proc.ExitCode == nil {
		p.t.Fatalf("waited for %+v, want it exited", proc)
	}
	return proc
}

func (p procs) signal(pid int, sig any) {
	p.t.Helper()
	p.call("POST", "/"+strconv.Itoa(pid)+"/signal", map[string]any{"signal": sig}, http.StatusNoContent)
}

// output reads what the process wrote so far (follow=false).
func (p procs) output(pid int) []wire.ProcessEvent {
	p.t.Helper()
	return decodeEvents(p.t, p.call("GET", "/"+strconv.Itoa(pid)+"/output?follow=false", nil, http.StatusOK))
}

func decodeEvents(t *testing.T, b []byte) []wire.ProcessEvent {
	t.Helper()
	var evs []wire.ProcessEvent
	dec := json.NewDecoder(bytes.NewReader(b))
	for {
		var ev wire.ProcessEvent
		if err := dec.Decode(&ev); err == io.EOF {
			return evs
		} else if err != nil {
			t.Fatalf("bad event stream %q: %v", b, err)
		}
		evs = append(evs, ev)
	}
}

// text joins the data of the events of stream.
func text(evs []wire.ProcessEvent, stream string) string {
	var b strings.Builder
	for _, ev := range evs {
		if ev.Type == stream {
			b.WriteString(ev.Data)
		}
	}
	return b.String()
}

// follower reads a following output stream in the background.
type follower struct {
	cancel context.CancelFunc
	events chan wire.ProcessEvent
	done   chan error
}

func (p procs) follow(pid int) *follower {
	p.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, "GET", p.s.URL+p.path("/"+strconv.Itoa(pid)+"/output"), nil)
	if err != nil {
		p.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+p.s.Key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		p.t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		p.t.Fatalf("output: %d %s", resp.StatusCode, b)
	}
	f := &follower{cancel: cancel, events: make(chan wire.ProcessEvent, 1<<16), done: make(chan error, 1)}
	go func() {
		defer resp.Body.Close()
		defer close(f.events)
		dec := json.NewDecoder(resp.Body)
		for {
			var ev wire.ProcessEvent
			if err := dec.Decode(&ev); err != nil {
				f.done <- err
				return
			}
			f.events <- ev
		}
	}()
	p.t.Cleanup(cancel)
	return f
}

// until reads events until one satisfies stop, returning all read.
func (f *follower) until(t *testing.T, what string, stop func(wire.ProcessEvent, string) bool) ([]wire.ProcessEvent, string) {
	t.Helper()
	var evs []wire.ProcessEvent
	var out strings.Builder
	deadline := time.After(patience)
	for {
		select {
		case ev, ok := <-f.events:
			if !ok {
				t.Fatalf("stream ended before %s; read %q", what, out.String())
			}
			evs = append(evs, ev)
			if ev.Type == wire.EventStdout {
				out.WriteString(ev.Data)
			}
			if stop(ev, out.String()) {
				return evs, out.String()
			}
		case <-deadline:
			t.Fatalf("no %s after %v; read %q", what, patience, out.String())
		}
	}
}

func outputHas(s string) func(wire.ProcessEvent, string) bool {
	return func(_ wire.ProcessEvent, out string) bool { return strings.Contains(out, s) }
}

func eventIs(typ string) func(wire.ProcessEvent, string) bool {
	return func(ev wire.ProcessEvent, _ string) bool { return ev.Type == typ }
}

// counterLoop prints "line N" for N = 0, 1, … every 0.1 s, for ever.
const counterLoop = "i=0; while :; do echo line $i; i=$((i+1)); sleep 0.1; done"

// checkCounterLines checks that out is "line 0\n", "line 1\n", … with no
// gap (the same process counting on), and returns the last number.
func checkCounterLines(t *testing.T, out string) int {
	t.Helper()
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	for i, l := range lines {
		if l != fmt.Sprintf("line %d", i) {
			t.Fatalf("line %d is %q, want %q (output %q)", i, l, fmt.Sprintf("line %d", i), out)
		}
	}
	return len(lines) - 1
}

// TestBackgroundProcesses runs background processes in a real sandbox:
// re-attach from a second client after the first went away, stdin, signals,
// timeouts, exit codes kept after exit, the replay cap, users, a PTY, and
// the errors of each route.
func TestBackgroundProcesses(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 1800})
	p := procs{t, s, sb.ID}

	t.Run("reattach", func(t *testing.T) {
		p := procs{t, s, sb.ID}
		proc := p.start(wire.StartProcessRequest{Cmd: counterLoop, Tag: "counter"})
		first := p.follow(proc.PID)
		_, seen := first.until(t, "line 2", outputHas("line 2\n"))
		// The first client goes away; the process does not.
		first.cancel()
		waitUntil(t, "output produced after the first client left", func() (bool, string) {
			got := p.get(proc.PID)
			return got.State == wire.ProcessRunning && got.StdoutBytes > int64(len(seen))+50, fmt.Sprintf("%+v", got)
		})
		// A second client gets everything, from the start.
		evs := p.output(proc.PID)
		out := text(evs, wire.EventStdout)
		if last := checkCounterLines(t, out); last <= strings.Count(seen, "\n") {
			t.Errorf("second client: last line %d, want past the first client's %d", last, strings.Count(seen, "\n")-1)
		}
		if end := evs[len(evs)-1]; end.Type != wire.EventEnd || end.Process == nil || end.Process.State != wire.ProcessRunning || end.Process.Tag != "counter" {
			t.Errorf("last event %+v, want end with the running process", end)
		}
		p.signal(proc.PID, "SIGTERM")
		if got := p.wait(proc.PID); *got.ExitCode != 143 {
			t.Errorf("after SIGTERM: exit code %d, want 143", *got.ExitCode)
		}
	})

	t.Run("stdin", func(t *testing.T) {
		p := procs{t, s, sb.ID}
		proc := p.start(wire.StartProcessRequest{Argv: []string{"cat"}, Stdin: true})
		if !proc.Stdin {
			t.Errorf("started %+v, want stdin open", proc)
		}
		f := p.follow(proc.PID)
		p.call("POST", "/"+strconv.Itoa(proc.PID)+"/stdin", wire.ProcessStdinRequest{Data: "hello\n"}, http.StatusNoContent)
		f.until(t, "the echo", outputHas("hello\n"))
		p.call("POST", "/"+strconv.Itoa(proc.PID)+"/stdin", wire.ProcessStdinRequest{DataBase64: base64.StdEncoding.EncodeToString([]byte("bin\x01\n"))}, http.StatusNoContent)
		p.call("POST", "/"+strconv.Itoa(proc.PID)+"/stdin", wire.ProcessStdinRequest{EOF: true}, http.StatusNoContent)
		evs, out := f.until(t, "the exit", eventIs(wire.EventExit))
		// out is what came after the first echo.
		if exit := evs[len(evs)-1]; out != "bin\x01\n" || exit.Process.ExitCode == nil || *exit.Process.ExitCode != 0 || exit.Process.Stdin {
			t.Errorf("cat: got %q and %+v, want the input echoed and exit code 0", out, exit.Process)
		}
	})

	t.Run("signals", func(t *testing.T) {
		p := procs{t, s, sb.ID}
		proc := p.start(wire.StartProcessRequest{Cmd: "trap 'echo got USR1' USR1; echo ready; while :; do sleep 0.1; done"})
		f := p.follow(proc.PID)
		f.until(t, "ready", outputHas("ready\n"))
		p.signal(proc.PID, "USR1")
		f.until(t, "the trap", outputHas("got USR1\n"))
		p.signal(proc.PID, 15)
		evs, _ := f.until(t, "the exit", eventIs(wire.EventExit))
		if code := *evs[len(evs)-1].Process.ExitCode; code != 143 {
			t.Errorf("after signal 15: exit code %d, want 143", code)
		}
	})

	t.Run("exit codes are kept", func(t *testing.T) {
		p := procs{t, s, sb.ID}
		proc := p.start(wire.StartProcessRequest{Cmd: "echo bye; exit 7", Tag: "short"})
		waitUntil(t, "the process exited", func() (bool, string) {
			got := p.get(proc.PID)
			return got.State == wire.ProcessExited, fmt.Sprintf("%+v", got)
		})
		found := false
		for _, l := range p.list() {
			if l.PID == proc.PID {
				found = l.State == wire.ProcessExited && l.ExitCode != nil && *l.ExitCode == 7 && l.Tag == "short"
			}
		}
		if !found {
			t.Errorf("list lacks the exited process with code 7: %+v", p.list())
		}
		// A late waiter gets the code, and the output is still there.
		if got := p.wait(proc.PID); *got.ExitCode != 7 {
			t.Errorf("late wait: got %d, want 7", *got.ExitCode)
		}
		if out := text(p.output(proc.PID), wire.EventStdout); out != "bye\n" {
			t.Errorf("output after exit: got %q", out)
		}
	})

	t.Run("timeout", func(t *testing.T) {
		p := procs{t, s, sb.ID}
		proc := p.start(wire.StartProcessRequest{Cmd: "sleep 1000 & sleep 1000", TimeoutSeconds: 0.5})
		got := p.wait(proc.PID)
		if *got.ExitCode != 124 || !got.TimedOut {
			t.Errorf("got %+v, want exit code 124, timed out", got)
		}
		waitNoProcs(t, s, sb.ID, "sleep 1000")
	})

	t.Run("replay cap", func(t *testing.T) {
		p := procs{t, s, sb.ID}
		const total, ring = 3 << 20, 1 << 20
		proc := p.start(wire.StartProcessRequest{Cmd: fmt.Sprintf("head -c %d /dev/zero | tr '\\0' x; echo tail", total)})
		if got := p.wait(proc.PID); *got.ExitCode != 0 || got.StdoutBytes != total+5 {
			t.Fatalf("got %+v", got)
		}
		evs := p.output(proc.PID)
		out := text(evs, wire.EventStdout)
		if len(out) != ring || !strings.HasSuffix(out, "xtail\n") {
			t.Errorf("replay: %d bytes ending %q, want %d ending in tail", len(out), out[max(0, len(out)-8):], ring)
		}
		if evs[0].Type != wire.EventDropped || evs[0].Stream != wire.EventStdout || evs[0].Bytes != total+5-ring {
			t.Errorf("first event %+v, want %d stdout bytes dropped", evs[0], total+5-ring)
		}
	})

	t.Run("users and terminal", func(t *testing.T) {
		p := procs{t, s, sb.ID}
		for _, tt := range []struct {
			user, want string
		}{{"", "1000 /home/user\n"}, {"root", "0 /root\n"}} {
			proc := p.start(wire.StartProcessRequest{Cmd: "echo $(id -u) $PWD", User: tt.user})
			p.wait(proc.PID)
			if out := text(p.output(proc.PID), wire.EventStdout); out != tt.want {
				t.Errorf("user %q: got %q, want %q", tt.user, out, tt.want)
			}
		}
		proc := p.start(wire.StartProcessRequest{Cmd: "stty size; tty; echo $TERM", PTY: &wire.PTYSize{Cols: 100, Rows: 30}})
		if !proc.PTY || !proc.Stdin {
			t.Errorf("started %+v, want a PTY with input", proc)
		}
		p.wait(proc.PID)
		out := text(p.output(proc.PID), wire.EventStdout)
		for _, want := range []string{"30 100\r\n", "/dev/pts/", "xterm-256color"} {
			if !strings.Contains(out, want) {
				t.Errorf("terminal output %q lacks %q", out, want)
			}
		}
	})

	t.Run("errors", func(t *testing.T) {
		p := procs{t, s, sb.ID}
		sleeper := p.start(wire.StartProcessRequest{Cmd: "sleep 1000"})
		defer p.signal(sleeper.PID, "KILL")
		pid := "/" + strconv.Itoa(sleeper.PID)
		tests := []struct {
			name, method, suffix string
			body                 any
			want                 int
		}{
			{"unknown pid", "GET", "/999999", nil, 404},
			{"unknown pid wait", "POST", "/999999/wait", nil, 404},
			{"bad signal", "POST", pid + "/signal", map[string]any{"signal": "SIGNOPE"}, 400},
			{"stdin without stdin", "POST", pid + "/stdin", wire.ProcessStdinRequest{Data: "x"}, 409},
			{"resize without terminal", "POST", pid + "/resize", wire.PTYSize{Cols: 80, Rows: 24}, 409},
			{"command not found", "POST", "", wire.StartProcessRequest{Argv: []string{"no-such-command"}}, 400},
			{"unknown user", "POST", "", wire.StartProcessRequest{Cmd: "true", User: "nobody-here"}, 400},
			{"bad timeout", "POST", "", wire.StartProcessRequest{Cmd: "true", TimeoutSeconds: -1}, 400},
			{"bad terminal", "POST", "", wire.StartProcessRequest{Cmd: "true", PTY: &wire.PTYSize{Cols: -1, Rows: 2}}, 400},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				resp, b := s.Do(t, tt.method, p.path(tt.suffix), tt.body)
				var e wire.ErrorResponse
				if resp.StatusCode != tt.want || json.Unmarshal(b, &e) != nil || e.Error.Message == "" || e.Error.RequestID == "" {
					t.Errorf("got %d %s, want %d with a message", resp.StatusCode, b, tt.want)
				}
			})
		}
	})

	// The sandbox's end ends its processes; a client's going away did not.
	t.Run("dies with the sandbox", func(t *testing.T) {
		other := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 600})
		op := procs{t, s, other.ID}
		proc := op.start(wire.StartProcessRequest{Cmd: "sleep 1000"})
		f := op.follow(proc.PID)
		if resp, b := s.Do(t, "DELETE", "/v1/sandboxes/"+other.ID, nil); resp.StatusCode != http.StatusNoContent {
			t.Fatalf("kill: %d %s", resp.StatusCode, b)
		}
		evs, _ := f.until(t, "the stream's end", func(ev wire.ProcessEvent, _ string) bool { return ev.Type == wire.EventError })
		if ev := evs[len(evs)-1]; ev.Error == nil || ev.Error.Code != wire.CodeConflict {
			t.Errorf("attached stream at the kill: got %+v, want a conflict error event", ev)
		}
		if resp, _ := s.Do(t, "GET", op.path(""), nil); resp.StatusCode != http.StatusNotFound {
			t.Errorf("processes of a killed sandbox: %d, want 404", resp.StatusCode)
		}
		waitUntil(t, "the killed sandbox's directory removed", func() (bool, string) {
			_, err := os.Stat(filepath.Join(s.DataDir, "runtime", "sandboxes", other.ID))
			return os.IsNotExist(err), fmt.Sprint(err)
		})
	})
	if l := p.list(); len(l) == 0 {
		t.Errorf("list is empty after the subtests")
	}
}

// TestProcessesAcrossPause: a process started before a pause runs on after
// the resume, counting on where it was, and can be re-attached; a stream
// attached at the pause ends with a conflict that says so.
func TestProcessesAcrossPause(t *testing.T) {
	// Two calls at once per sandbox: with the follower and the wait in
	// flight, a third is refused (429), which is how the test knows the
	// wait has reached the sandbox before it pauses it (a wait that came
	// after the pause would resume the sandbox and wait on).
	s := daemontest.Start(t, func(c *daemon.Config) { c.Sandbox.MaxExecsPerSandbox = 2 })
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 1800})
	p := procs{t, s, sb.ID}
	proc := p.start(wire.StartProcessRequest{Cmd: counterLoop})
	sleeper := p.start(wire.StartProcessRequest{Cmd: "sleep 1000"})
	f := p.follow(proc.PID)
	f.until(t, "line 2", outputHas("line 2\n"))
	waited := make(chan *http.Response, 1)
	go func() {
		// A wait refused because the test's own probe held the second
		// call is sent again.
		deadline := time.Now().Add(patience)
		for {
			req, _ := http.NewRequest("POST", s.URL+p.path("/"+strconv.Itoa(sleeper.PID)+"/wait"), nil)
			req.Header.Set("Authorization", "Bearer "+s.Key)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				waited <- nil
				return
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusTooManyRequests || time.Now().After(deadline) {
				waited <- resp
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()

	waitUntil(t, "the wait in flight (a third call refused)", func() (bool, string) {
		req, _ := http.NewRequest("GET", s.URL+p.path("/"+strconv.Itoa(sleeper.PID)), nil)
		req.Header.Set("Authorization", "Bearer "+s.Key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return false, err.Error()
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusTooManyRequests, resp.Status
	})
	post[wire.Sandbox](t, s, "/v1/sandboxes/"+sb.ID+"/pause", nil, http.StatusOK)
	evs, _ := f.until(t, "the stream's end at the pause", eventIs(wire.EventError))
	if e := evs[len(evs)-1].Error; e.Code != wire.CodeConflict || !strings.Contains(e.Message, "paused") {
		t.Errorf("attached stream at the pause: got %+v, want a conflict naming the pause", e)
	}
	select {
	case resp := <-waited:
		if resp == nil || resp.StatusCode != http.StatusConflict {
			t.Errorf("wait across the pause: got %+v, want 409", resp)
		}
	case <-time.After(patience):
		t.Fatal("the wait did not end at the pause")
	}

	post[wire.Sandbox](t, s, "/v1/sandboxes/"+sb.ID+"/resume", nil, http.StatusOK)
	atResume := p.get(proc.PID)
	if atResume.State != wire.ProcessRunning {
		t.Fatalf("after resume: %+v, want running", atResume)
	}
	waitUntil(t, "the counter going on after the resume", func() (bool, string) {
		got := p.get(proc.PID)
		return got.StdoutBytes > atResume.StdoutBytes+20, fmt.Sprintf("%+v", got)
	})
	// One process counting on from where it was: no gap, no restart.
	out := text(p.output(proc.PID), wire.EventStdout)
	checkCounterLines(t, out)
	again := p.follow(proc.PID)
	again.until(t, "live output after re-attach", outputHas(fmt.Sprintf("line %d\n", strings.Count(out, "\n")+2)))
	again.cancel()
	p.signal(proc.PID, "KILL")
	if got := p.wait(proc.PID); *got.ExitCode != 137 {
		t.Errorf("after SIGKILL: %d, want 137", *got.ExitCode)
	}
}

// wsURL is the WebSocket URL of an API path.
func wsURL(s *daemontest.Server, path string) string {
	return "ws" + strings.TrimPrefix(s.URL, "http") + path
}

// terminalReader collects a terminal WebSocket's output.
type terminalReader struct {
	c    *websocket.Conn
	out  strings.Builder
	msgs []wire.TerminalMessage
}

// until reads until the output holds want (counted from from), or fails.
func (r *terminalReader) until(t *testing.T, ctx context.Context, want string) {
	t.Helper()
	from := r.out.Len()
	for !strings.Contains(r.out.String()[from:], want) {
		typ, data, err := r.c.Read(ctx)
		if err != nil {
			t.Fatalf("reading for %q: %v; output %q", want, err, r.out.String())
		}
		if typ == websocket.MessageBinary {
			r.out.Write(data)
			continue
		}
		var m wire.TerminalMessage
		if err := json.Unmarshal(data, &m); err != nil {
			t.Fatalf("bad text message %q", data)
		}
		r.msgs = append(r.msgs, m)
		if m.Type == wire.TerminalExit || m.Type == wire.TerminalError {
			t.Fatalf("terminal ended (%+v) before %q; output %q", m, want, r.out.String())
		}
	}
}

// exit reads until the exit message and the close.
func (r *terminalReader) exit(t *testing.T, ctx context.Context) wire.TerminalMessage {
	t.Helper()
	var exit *wire.TerminalMessage
	for {
		typ, data, err := r.c.Read(ctx)
		if err != nil {
			if exit == nil || websocket.CloseStatus(err) != websocket.StatusNormalClosure {
				t.Fatalf("closed (%v) with exit message %+v; output %q", err, exit, r.out.String())
			}
			return *exit
		}
		if typ == websocket.MessageBinary {
			r.out.Write(data)
			continue
		}
		var m wire.TerminalMessage
		if err := json.Unmarshal(data, &m); err != nil {
			t.Fatal(err)
		}
		if m.Type == wire.TerminalExit {
			exit = &m
		}
	}
}

func (r *terminalReader) send(t *testing.T, ctx context.Context, s string) {
	t.Helper()
	if err := r.c.Write(ctx, websocket.MessageBinary, []byte(s)); err != nil {
		t.Fatal(err)
	}
}

func (r *terminalReader) control(t *testing.T, ctx context.Context, m wire.TerminalMessage) {
	t.Helper()
	b, _ := json.Marshal(m)
	if err := r.c.Write(ctx, websocket.MessageText, b); err != nil {
		t.Fatal(err)
	}
}

// TestTerminalWebSocket drives a login shell in a real sandbox over the
// terminal WebSocket: typing, resizing, the exit code; and attaches a
// second terminal to a PTY process started through the API, authenticated
// by query.
func TestTerminalWebSocket(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 1800})
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()

	c, _, err := websocket.Dial(ctx, wsURL(s, "/v1/sandboxes/"+sb.ID+"/terminal?cols=100&rows=30"), &websocket.DialOptions{
		HTTPHeader: http.Header{"Authorization": {"Bearer " + s.Key}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()
	r := &terminalReader{c: c}
	r.send(t, ctx, "stty size; echo \"who=$(id -un) in $PWD\"\r")
	r.until(t, ctx, "30 100")
	r.until(t, ctx, "who=user in /home/user")
	r.control(t, ctx, wire.TerminalMessage{Type: wire.TerminalResize, Cols: 120, Rows: 40})
	r.send(t, ctx, "stty size\r")
	r.until(t, ctx, "40 120")
	r.send(t, ctx, "exit 3\r")
	if m := r.exit(t, ctx); m.ExitCode == nil || *m.ExitCode != 3 {
		t.Errorf("exit message %+v, want exit code 3", m)
	}

	// A PTY process of the API, attached to with the key in the query.
	p := procs{t, s, sb.ID}
	proc := p.start(wire.StartProcessRequest{Argv: []string{"/bin/bash", "--norc", "-i"}, PTY: &wire.PTYSize{Cols: 80, Rows: 24}})
	c2, _, err := websocket.Dial(ctx, wsURL(s, fmt.Sprintf("/v1/sandboxes/%s/processes/%d/terminal?access_token=%s", sb.ID, proc.PID, s.Key)), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.CloseNow()
	r2 := &terminalReader{c: c2}
	r2.send(t, ctx, "echo $((6*7))\r")
	r2.until(t, ctx, "42")
	// Leaving does not end it: attach again, and end it with a signal.
	c2.Close(websocket.StatusNormalClosure, "")
	if got := p.get(proc.PID); got.State != wire.ProcessRunning {
		t.Fatalf("after the terminal closed: %+v, want running", got)
	}
	c3, _, err := websocket.Dial(ctx, wsURL(s, fmt.Sprintf("/v1/sandboxes/%s/processes/%d/terminal", sb.ID, proc.PID)), &websocket.DialOptions{
		HTTPHeader: http.Header{"Authorization": {"Bearer " + s.Key}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c3.CloseNow()
	r3 := &terminalReader{c: c3}
	r3.until(t, ctx, "42") // replayed
	r3.control(t, ctx, wire.TerminalMessage{Type: wire.TerminalSignal, Signal: "KILL"})
	if m := r3.exit(t, ctx); m.ExitCode == nil || *m.ExitCode != 137 {
		t.Errorf("exit message %+v, want 137", m)
	}
	for _, bad := range []struct {
		url  string
		want int
	}{
		{wsURL(s, "/v1/sandboxes/"+sb.ID+"/terminal"), http.StatusUnauthorized},
		{wsURL(s, "/v1/sandboxes/"+sb.ID+"/terminal?access_token=wrong"), http.StatusUnauthorized},
		{wsURL(s, "/v1/sandboxes/"+sb.ID+"/processes/999999/terminal?access_token="+s.Key), http.StatusNotFound},
	} {
		if _, resp, err := websocket.Dial(ctx, bad.url, nil); err == nil || resp == nil || resp.StatusCode != bad.want {
			t.Errorf("%s: got %v %v, want %d", bad.url, resp, err, bad.want)
		}
	}
}

// TestProcessResponsesMatchSpec checks real answers of the process routes
// against api/openapi.json.
func TestProcessResponsesMatchSpec(t *testing.T) {
	doc := loadSpec(t)
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 1800})
	p := procs{t, s, sb.ID}
	cat := p.start(wire.StartProcessRequest{Argv: []string{"cat"}, Stdin: true, Tag: "t"})
	done := p.start(wire.StartProcessRequest{Cmd: "echo out; echo err >&2"})
	p.wait(done.PID)
	base := "/v1/sandboxes/" + sb.ID + "/processes"
	spec := "/v1/sandboxes/{id}/processes"
	pid := func(n int) string { return "/" + strconv.Itoa(n) }
	cases := []struct {
		method, path, specPath string
		body                   any
		hdr                    []string
	}{
		{"POST", base, spec, wire.StartProcessRequest{Cmd: "true"}, nil},
		{"POST", base, spec, `{}`, nil},
		{"GET", base, spec, nil, nil},
		{"GET", base + pid(cat.PID), spec + "/{pid}", nil, nil},
		{"GET", base + "/999999", spec + "/{pid}", nil, nil},
		{"GET", base + pid(done.PID) + "/output", spec + "/{pid}/output", nil, nil},
		{"GET", base + pid(cat.PID) + "/output?follow=false", spec + "/{pid}/output", nil, nil},
		{"POST", base + pid(cat.PID) + "/stdin", spec + "/{pid}/stdin", wire.ProcessStdinRequest{Data: "x"}, nil},
		{"POST", base + pid(done.PID) + "/stdin", spec + "/{pid}/stdin", wire.ProcessStdinRequest{Data: "x"}, nil},
		{"POST", base + pid(cat.PID) + "/resize", spec + "/{pid}/resize", wire.PTYSize{Cols: 80, Rows: 24}, nil},
		{"POST", base + pid(cat.PID) + "/signal", spec + "/{pid}/signal", `{"signal":"NOPE"}`, nil},
		{"POST", base + pid(done.PID) + "/wait", spec + "/{pid}/wait", nil, nil},
		{"POST", base + pid(cat.PID) + "/signal", spec + "/{pid}/signal", `{"signal":"TERM"}`, nil},
		{"GET", base + pid(cat.PID) + "/terminal", spec + "/{pid}/terminal", nil, nil},
		{"GET", "/v1/sandboxes/" + sb.ID + "/terminal", "/v1/sandboxes/{id}/terminal", nil, nil},
	}
	for _, c := range cases {
		t.Run(c.method+" "+c.path, func(t *testing.T) {
			resp, body := s.Do(t, c.method, c.path, c.body, c.hdr...)
			op := doc.operation(t, c.method, c.specPath)
			r, ok := op.Responses[strconv.Itoa(resp.StatusCode)]
			if !ok {
				t.Fatalf("status %d (%s) not in spec for %s %s", resp.StatusCode, body, c.method, c.specPath)
			}
			if resp.StatusCode == http.StatusNoContent {
				return
			}
			ct, _, _ := strings.Cut(resp.Header.Get("Content-Type"), ";")
			media, ok := r.Content[ct]
			if !ok {
				t.Fatalf("media type %q not in spec for %d", ct, resp.StatusCode)
			}
			docs := [][]byte{body}
			if ct == "application/x-ndjson" {
				docs = nil
				sc := bufio.NewScanner(bytes.NewReader(body))
				for sc.Scan() {
					docs = append(docs, append([]byte(nil), sc.Bytes()...))
				}
			}
			for _, d := range docs {
				var v any
				if err := json.Unmarshal(d, &v); err != nil {
					t.Fatalf("response %q is not JSON: %v", d, err)
				}
				if errs := doc.validate(media.Schema, v, "$"); len(errs) > 0 {
					t.Errorf("response %s does not match the spec:\n%s", d, strings.Join(errs, "\n"))
				}
			}
		})
	}
}

// getJSON GETs path as the server's tenant and decodes the 200 answer.
func getJSON[T any](t *testing.T, s *daemontest.Server, path string) T {
	t.Helper()
	resp, b := s.Do(t, "GET", path, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %s", path, resp.StatusCode, b)
	}
	var v T
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	return v
}
