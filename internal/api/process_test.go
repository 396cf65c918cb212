package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/sandbox"
	"github.com/pandastack/pandastack/wire"
)

// The fake's background processes: runningPID runs on a PTY, exitedPID
// exited with code 3. Attaching to the running one sends "hello", a
// dropped notice, then echoes input back ("in:" + data), answers a
// resize with "size CxR", ends with exit code 0 at EOF and 128+N at
// signal N.
const (
	runningPID = 42
	exitedPID  = 7
)

func fakeProcess(pid int) wire.Process {
	p := wire.Process{PID: pid, Argv: []string{"sh"}, User: "user", Cwd: "/home/user", State: wire.ProcessRunning,
		StartedAt: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC), PTY: pid == runningPID, Stdin: pid == runningPID}
	if pid == exitedPID {
		code := 3
		p.State, p.ExitCode, p.ExitedAt = wire.ProcessExited, &code, p.StartedAt.Add(time.Second)
	}
	return p
}

func exitedWith(pid, code int) wire.Process {
	p := fakeProcess(pid)
	p.State, p.ExitCode, p.ExitedAt, p.Stdin = wire.ProcessExited, &code, p.StartedAt.Add(time.Second), false
	return p
}

func (f *fakeSandboxes) process(tenant, id string, pid int) (wire.Process, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return wire.Process{}, err
	}
	if pid != runningPID && pid != exitedPID {
		return wire.Process{}, errdefs.NotFound("no background process %d", pid)
	}
	return fakeProcess(pid), nil
}

func (f *fakeSandboxes) StartProcess(_ context.Context, tenant, id string, req wire.StartProcessRequest) (wire.Process, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return wire.Process{}, err
	}
	if req.Cmd == "" && len(req.Argv) == 0 {
		return wire.Process{}, errdefs.Invalid("cmd or argv is required")
	}
	p := fakeProcess(runningPID)
	p.Tag = req.Tag
	return p, nil
}

func (f *fakeSandboxes) StartLoginShell(_ context.Context, tenant, id, user string, size wire.PTYSize) (wire.Process, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return wire.Process{}, err
	}
	return fakeProcess(runningPID), nil
}

func (f *fakeSandboxes) ListProcesses(_ context.Context, tenant, id string) ([]wire.Process, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return nil, err
	}
	return []wire.Process{fakeProcess(exitedPID), fakeProcess(runningPID)}, nil
}

func (f *fakeSandboxes) GetProcess(_ context.Context, tenant, id string, pid int) (wire.Process, error) {
	return f.process(tenant, id, pid)
}

func (f *fakeSandboxes) WriteProcessStdin(_ context.Context, tenant, id string, pid int, data []byte, eof bool) error {
	p, err := f.process(tenant, id, pid)
	if err != nil {
		return err
	}
	if p.State == wire.ProcessExited {
		return errdefs.Conflict("process %d has exited", pid)
	}
	return nil
}

func (f *fakeSandboxes) SignalProcess(_ context.Context, tenant, id string, pid int, sig wire.Signal) error {
	if _, err := sandbox.ParseSignal(sig); err != nil {
		return err
	}
	_, err := f.process(tenant, id, pid)
	return err
}

func (f *fakeSandboxes) ResizeProcess(_ context.Context, tenant, id string, pid int, size wire.PTYSize) error {
	if size.Cols < 1 || size.Rows < 1 {
		return errdefs.Invalid("cols and rows must be positive")
	}
	_, err := f.process(tenant, id, pid)
	return err
}

func (f *fakeSandboxes) WaitProcess(ctx context.Context, tenant, id string, pid int) (wire.Process, error) {
	p, err := f.process(tenant, id, pid)
	if err != nil || p.State == wire.ProcessExited {
		return p, err
	}
	<-ctx.Done()
	return wire.Process{}, ctx.Err()
}

func (f *fakeSandboxes) AttachProcess(ctx context.Context, tenant, id string, pid int, opts sandbox.AttachOptions, out sandbox.ProcessOutput) (wire.Process, error) {
	p, err := f.process(tenant, id, pid)
	if err != nil {
		return wire.Process{}, err
	}
	if p.State == wire.ProcessExited {
		// What the exited one wrote: a character cut across two pieces,
		// stderr.
		for _, ev := range []sandbox.ProcessOutputEvent{
			{Stream: wire.EventStdout, Data: []byte("h\xc3")}, {Stream: wire.EventStdout, Data: []byte("\xa9\n")},
			{Stream: wire.EventStderr, Data: []byte("oops\n")},
		} {
			if err := out(ev); err != nil {
				return wire.Process{}, err
			}
		}
		return p, nil
	}
	if err := out(sandbox.ProcessOutputEvent{Stream: wire.EventStdout, Data: []byte("hello\n")}); err != nil {
		return wire.Process{}, err
	}
	if err := out(sandbox.ProcessOutputEvent{Stream: wire.EventStdout, Dropped: 10}); err != nil {
		return wire.Process{}, err
	}
	if !opts.Follow {
		return p, nil
	}
	for {
		select {
		case <-ctx.Done():
			return wire.Process{}, ctx.Err()
		case in := <-opts.Input:
			switch {
			case len(in.Data) > 0:
				if err := out(sandbox.ProcessOutputEvent{Stream: wire.EventStdout, Data: append([]byte("in:"), in.Data...)}); err != nil {
					return wire.Process{}, err
				}
			case in.Resize != nil:
				msg := fmt.Sprintf("size %dx%d", in.Resize.Cols, in.Resize.Rows)
				if err := out(sandbox.ProcessOutputEvent{Stream: wire.EventStdout, Data: []byte(msg)}); err != nil {
					return wire.Process{}, err
				}
			case in.EOF:
				return exitedWith(pid, 0), nil
			case in.Signal != "":
				n, err := sandbox.ParseSignal(in.Signal)
				if err != nil {
					continue
				}
				return exitedWith(pid, 128+n), nil
			}
		}
	}
}

func doProcess(t *testing.T, s *Server, method, path, body, accept string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(method, path, strings.NewReader(body))
	r.Header.Set("Authorization", "Bearer "+testKey)
	if accept != "" {
		r.Header.Set("Accept", accept)
	}
	w := httptest.NewRecorder()
	s.ServeHTTP(w, r)
	return w
}

// TestProcessRoutes checks statuses, bodies and error codes of the plain
// process routes.
func TestProcessRoutes(t *testing.T) {
	s := newTestServer()
	base := "/v1/sandboxes/" + knownID + "/processes"
	tests := []struct {
		name, method, path, body string
		want                     int
		wantCode                 string
	}{
		{"start", "POST", base, `{"cmd":"sleep 1","tag":"t"}`, 201, ""},
		{"start without command", "POST", base, `{}`, 400, wire.CodeInvalid},
		{"start unknown field", "POST", base, `{"cmd":"x","nope":1}`, 400, wire.CodeInvalid},
		{"start in unknown sandbox", "POST", "/v1/sandboxes/sb-nope/processes", `{"cmd":"x"}`, 404, wire.CodeNotFound},
		{"list", "GET", base, ``, 200, ""},
		{"get", "GET", base + "/42", ``, 200, ""},
		{"get unknown", "GET", base + "/43", ``, 404, wire.CodeNotFound},
		{"get non-numeric", "GET", base + "/abc", ``, 404, wire.CodeNotFound},
		{"get zero", "GET", base + "/0", ``, 404, wire.CodeNotFound},
		{"stdin text", "POST", base + "/42/stdin", `{"data":"hi\n"}`, 204, ""},
		{"stdin base64", "POST", base + "/42/stdin", `{"data_base64":"AAH/","eof":true}`, 204, ""},
		{"stdin eof", "POST", base + "/42/stdin", `{"eof":true}`, 204, ""},
		{"stdin both", "POST", base + "/42/stdin", `{"data":"a","data_base64":"YQ=="}`, 400, wire.CodeInvalid},
		{"stdin bad base64", "POST", base + "/42/stdin", `{"data_base64":"!!"}`, 400, wire.CodeInvalid},
		{"stdin nothing", "POST", base + "/42/stdin", `{}`, 400, wire.CodeInvalid},
		{"stdin exited", "POST", base + "/7/stdin", `{"data":"x"}`, 409, wire.CodeConflict},
		{"signal name", "POST", base + "/42/signal", `{"signal":"SIGTERM"}`, 204, ""},
		{"signal short name", "POST", base + "/42/signal", `{"signal":"usr1"}`, 204, ""},
		{"signal number", "POST", base + "/42/signal", `{"signal":9}`, 204, ""},
		{"signal unknown", "POST", base + "/42/signal", `{"signal":"SIGNOPE"}`, 400, wire.CodeInvalid},
		{"signal out of range", "POST", base + "/42/signal", `{"signal":65}`, 400, wire.CodeInvalid},
		{"signal not a name", "POST", base + "/42/signal", `{"signal":true}`, 400, wire.CodeInvalid},
		{"signal missing", "POST", base + "/42/signal", `{}`, 400, wire.CodeInvalid},
		{"resize", "POST", base + "/42/resize", `{"cols":100,"rows":30}`, 204, ""},
		{"resize bad", "POST", base + "/42/resize", `{"cols":0,"rows":30}`, 400, wire.CodeInvalid},
		{"wait exited", "POST", base + "/7/wait", ``, 200, ""},
		{"wait with empty object", "POST", base + "/7/wait", `{}`, 200, ""},
		{"wait unknown", "POST", base + "/43/wait", ``, 404, wire.CodeNotFound},
		{"output not following", "GET", base + "/42/output?follow=false", ``, 200, ""},
		{"output bad follow", "GET", base + "/42/output?follow=maybe", ``, 400, wire.CodeInvalid},
		{"output unknown", "GET", base + "/43/output", ``, 404, wire.CodeNotFound},
		{"terminal without upgrade", "GET", base + "/42/terminal", ``, 400, wire.CodeInvalid},
		{"new terminal without upgrade", "GET", "/v1/sandboxes/" + knownID + "/terminal", ``, 400, wire.CodeInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := doProcess(t, s, tt.method, tt.path, tt.body, "")
			if w.Code != tt.want {
				t.Fatalf("got %d %s, want %d", w.Code, w.Body, tt.want)
			}
			if tt.wantCode != "" {
				if e := checkErrorBody(t, w.Code, w.Body.Bytes()); e.Code != tt.wantCode {
					t.Errorf("code: got %q, want %q", e.Code, tt.wantCode)
				}
			}
		})
	}
	var list wire.ProcessList
	w := doProcess(t, s, "GET", base, "", "")
	if err := json.Unmarshal(w.Body.Bytes(), &list); err != nil || len(list.Processes) != 2 || list.Processes[0].ExitCode == nil || *list.Processes[0].ExitCode != 3 {
		t.Errorf("list: got %s (%v)", w.Body, err)
	}
	// Another tenant's key on the process routes is a 401 for a wrong
	// key, 404 for the sandbox.
	r := httptest.NewRequest("GET", base, nil)
	r.Header.Set("Authorization", "Bearer wrong")
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, r)
	if rec.Code != 401 {
		t.Errorf("wrong key: got %d, want 401", rec.Code)
	}
}

// TestProcessOutputEvents checks the output stream's events in both forms:
// UTF-8 put together across pieces, the dropped notice, the last event.
func TestProcessOutputEvents(t *testing.T) {
	s := newTestServer()
	base := "/v1/sandboxes/" + knownID + "/processes"
	tests := []struct {
		name, path, accept string
		want               []string
	}{
		{"exited", base + "/7/output", "", []string{"stdout:h", "stdout:é\n", "stderr:oops\n", "exit:3"}},
		{"running, not following", base + "/42/output?follow=0", "", []string{"stdout:hello\n", "dropped:stdout:10", "end:running"}},
		{"sse", base + "/7/output", "text/event-stream", []string{"stdout:h", "stdout:é\n", "stderr:oops\n", "exit:3"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := doProcess(t, s, "GET", tt.path, "", tt.accept)
			if w.Code != 200 {
				t.Fatalf("got %d %s", w.Code, w.Body)
			}
			wantCT := "application/x-ndjson"
			if tt.accept != "" {
				wantCT = tt.accept
			}
			if ct := w.Header().Get("Content-Type"); ct != wantCT {
				t.Errorf("content type: got %q, want %q", ct, wantCT)
			}
			var got []string
			sc := bufio.NewScanner(bytes.NewReader(w.Body.Bytes()))
			for sc.Scan() {
				line := sc.Text()
				if tt.accept != "" {
					var ok bool
					if line, ok = strings.CutPrefix(line, "data: "); !ok {
						continue
					}
				}
				var ev wire.ProcessEvent
				if err := json.Unmarshal([]byte(line), &ev); err != nil {
					t.Fatalf("bad event %q: %v", line, err)
				}
				switch ev.Type {
				case wire.EventStdout, wire.EventStderr:
					got = append(got, ev.Type+":"+ev.Data)
				case wire.EventDropped:
					got = append(got, fmt.Sprintf("dropped:%s:%d", ev.Stream, ev.Bytes))
				case wire.EventExit:
					got = append(got, fmt.Sprintf("exit:%d", *ev.Process.ExitCode))
				case wire.EventEnd:
					got = append(got, "end:"+ev.Process.State)
				default:
					got = append(got, "?"+line)
				}
			}
			if strings.Join(got, "|") != strings.Join(tt.want, "|") {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

// dialTerminal opens a terminal WebSocket on the test server.
func dialTerminal(t *testing.T, ctx context.Context, url string, hdr http.Header) (*websocket.Conn, *http.Response, error) {
	t.Helper()
	c, resp, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPHeader: hdr})
	if c != nil {
		t.Cleanup(func() { c.CloseNow() })
	}
	return c, resp, err
}

// readUntil reads binary messages until their text contains want, and
// returns the text messages seen meanwhile.
func readUntil(t *testing.T, ctx context.Context, c *websocket.Conn, want string) []wire.TerminalMessage {
	t.Helper()
	var got strings.Builder
	var msgs []wire.TerminalMessage
	for !strings.Contains(got.String(), want) {
		typ, data, err := c.Read(ctx)
		if err != nil {
			t.Fatalf("reading for %q (have %q): %v", want, got.String(), err)
		}
		if typ == websocket.MessageBinary {
			got.Write(data)
			continue
		}
		var m wire.TerminalMessage
		if err := json.Unmarshal(data, &m); err != nil {
			t.Fatalf("bad text message %q: %v", data, err)
		}
		msgs = append(msgs, m)
	}
	return msgs
}

// readExit reads until the exit message and the close that follows.
func readExit(t *testing.T, ctx context.Context, c *websocket.Conn) wire.TerminalMessage {
	t.Helper()
	var exit *wire.TerminalMessage
	for {
		typ, data, err := c.Read(ctx)
		if err != nil {
			if exit == nil {
				t.Fatalf("closed without an exit message: %v", err)
			}
			if websocket.CloseStatus(err) != websocket.StatusNormalClosure {
				t.Errorf("close: got %v, want a normal closure", err)
			}
			return *exit
		}
		if typ == websocket.MessageText {
			var m wire.TerminalMessage
			if err := json.Unmarshal(data, &m); err != nil {
				t.Fatal(err)
			}
			if m.Type == wire.TerminalExit {
				exit = &m
			}
		}
	}
}

// TestTerminalWebSocket drives both terminal routes: input bytes, resize
// and eof/signal controls, the exit message and close, header and query
// authentication, and a session that outlives the body deadline.
func TestTerminalWebSocket(t *testing.T) {
	srv := httptest.NewServer(newTestServerWith(func(c *Config) { c.BodyReadTimeout = 50 * time.Millisecond }))
	defer srv.Close()
	ws := "ws" + strings.TrimPrefix(srv.URL, "http") + "/v1/sandboxes/" + knownID
	auth := http.Header{"Authorization": {"Bearer " + testKey}}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	c, _, err := dialTerminal(t, ctx, ws+"/processes/42/terminal", auth)
	if err != nil {
		t.Fatal(err)
	}
	msgs := readUntil(t, ctx, c, "hello\n")
	if err := c.Write(ctx, websocket.MessageBinary, []byte("ls\r")); err != nil {
		t.Fatal(err)
	}
	msgs = append(msgs, readUntil(t, ctx, c, "in:ls\r")...)
	if len(msgs) != 1 || msgs[0].Type != wire.TerminalDropped || msgs[0].Bytes != 10 {
		t.Errorf("text messages: got %+v, want one dropped notice of 10 bytes", msgs)
	}
	// Longer than the body deadline: a terminal is not a body.
	time.Sleep(200 * time.Millisecond)
	resize, _ := json.Marshal(wire.TerminalMessage{Type: wire.TerminalResize, Cols: 120, Rows: 40})
	if err := c.Write(ctx, websocket.MessageText, resize); err != nil {
		t.Fatal(err)
	}
	readUntil(t, ctx, c, "size 120x40")
	eof, _ := json.Marshal(wire.TerminalMessage{Type: wire.TerminalEOF})
	if err := c.Write(ctx, websocket.MessageText, eof); err != nil {
		t.Fatal(err)
	}
	if m := readExit(t, ctx, c); m.ExitCode == nil || *m.ExitCode != 0 || m.Process == nil || m.Process.State != wire.ProcessExited {
		t.Errorf("exit message: got %+v, want exit code 0", m)
	}

	// A new shell, authenticated by query (as a browser must), ended by a
	// signal.
	c, _, err = dialTerminal(t, ctx, ws+"/terminal?cols=100&rows=30&access_token="+testKey, nil)
	if err != nil {
		t.Fatal(err)
	}
	readUntil(t, ctx, c, "hello\n")
	sig, _ := json.Marshal(wire.TerminalMessage{Type: wire.TerminalSignal, Signal: "INT"})
	if err := c.Write(ctx, websocket.MessageText, sig); err != nil {
		t.Fatal(err)
	}
	if m := readExit(t, ctx, c); m.ExitCode == nil || *m.ExitCode != 130 {
		t.Errorf("exit message after SIGINT: got %+v, want 130", m)
	}

	// Refusals come before the upgrade, as JSON errors.
	for _, tt := range []struct {
		name string
		url  string
		hdr  http.Header
		want int
	}{
		{"no key", ws + "/processes/42/terminal", nil, 401},
		{"wrong query key", ws + "/processes/42/terminal?access_token=wrong", nil, 401},
		{"unknown process", ws + "/processes/43/terminal", auth, 404},
		{"unknown sandbox", "ws" + strings.TrimPrefix(srv.URL, "http") + "/v1/sandboxes/sb-nope/terminal", auth, 404},
		{"half a size", ws + "/terminal?cols=10", auth, 400},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, resp, err := dialTerminal(t, ctx, tt.url, tt.hdr)
			if err == nil || resp == nil || resp.StatusCode != tt.want {
				status := 0
				if resp != nil {
					status = resp.StatusCode
				}
				t.Errorf("got %d (%v), want %d", status, err, tt.want)
			}
		})
	}
}
