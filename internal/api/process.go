package api

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/sandbox"
	"github.com/pandastack/pandastack/wire"
)

// Background processes and terminals (docs/API.md, "Processes" and
// "Terminals"). The long-lived routes (output, wait, the terminals) count
// against MaxConcurrentExecs as execs do, and have no body deadline: only
// JSON bodies get one, and it is cleared once they are read.

// Processes is what the API needs of the sandbox manager for background
// processes; part of Sandboxes.
type Processes interface {
	StartProcess(ctx context.Context, tenant, id string, req wire.StartProcessRequest) (wire.Process, error)
	StartLoginShell(ctx context.Context, tenant, id, user string, size wire.PTYSize) (wire.Process, error)
	ListProcesses(ctx context.Context, tenant, id string) ([]wire.Process, error)
	GetProcess(ctx context.Context, tenant, id string, pid int) (wire.Process, error)
	WriteProcessStdin(ctx context.Context, tenant, id string, pid int, data []byte, eof bool) error
	SignalProcess(ctx context.Context, tenant, id string, pid int, sig wire.Signal) error
	ResizeProcess(ctx context.Context, tenant, id string, pid int, size wire.PTYSize) error
	WaitProcess(ctx context.Context, tenant, id string, pid int) (wire.Process, error)
	AttachProcess(ctx context.Context, tenant, id string, pid int, opts sandbox.AttachOptions, out sandbox.ProcessOutput) (wire.Process, error)
}

// processRoutes registers the routes of background processes and
// terminals. The terminal routes authenticate themselves: browsers cannot
// set headers on a WebSocket, so they also take ?access_token=.
func (s *Server) processRoutes() {
	s.route("POST /v1/sandboxes/{id}/processes", true, s.startProcess)
	s.route("GET /v1/sandboxes/{id}/processes", true, s.listProcesses)
	s.route("GET /v1/sandboxes/{id}/processes/{pid}", true, s.getProcess)
	s.route("GET /v1/sandboxes/{id}/processes/{pid}/output", true, s.processOutput)
	s.route("POST /v1/sandboxes/{id}/processes/{pid}/stdin", true, s.processStdin)
	s.route("POST /v1/sandboxes/{id}/processes/{pid}/signal", true, s.signalProcess)
	s.route("POST /v1/sandboxes/{id}/processes/{pid}/resize", true, s.resizeProcess)
	s.route("POST /v1/sandboxes/{id}/processes/{pid}/wait", true, s.waitProcess)
	s.route("GET /v1/sandboxes/{id}/processes/{pid}/terminal", false, s.processTerminal)
	s.route("GET /v1/sandboxes/{id}/terminal", false, s.terminal)
}

// pathPID returns the {pid} of the request's path; one that is not a
// positive number names no process.
func pathPID(r *http.Request) (int, error) {
	v := r.PathValue("pid")
	pid, err := strconv.Atoi(v)
	if err != nil || pid <= 0 {
		return 0, errdefs.NotFound("no background process %q", truncateString(v, 32))
	}
	return pid, nil
}

func truncateString(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// streamSlot takes one of MaxConcurrentExecs for a long-lived call; release
// gives it back.
func (s *Server) streamSlot() (release func(), err error) {
	if n := s.execs.Add(1); n > int64(s.cfg.MaxConcurrentExecs) {
		s.execs.Add(-1)
		return nil, errdefs.Quota("this server serves at most %d commands and process streams at once; try again when some have finished", s.cfg.MaxConcurrentExecs)
	}
	return func() { s.execs.Add(-1) }, nil
}

func (s *Server) startProcess(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req wire.StartProcessRequest
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	p, err := s.cfg.Sandboxes.StartProcess(r.Context(), tenant, r.PathValue("id"), req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, p)
	return nil
}

func (s *Server) listProcesses(w http.ResponseWriter, r *http.Request, tenant string) error {
	l, err := s.cfg.Sandboxes.ListProcesses(r.Context(), tenant, r.PathValue("id"))
	if err != nil {
		return err
	}
	if l == nil {
		l = []wire.Process{}
	}
	writeJSON(w, http.StatusOK, wire.ProcessList{Processes: l})
	return nil
}

func (s *Server) getProcess(w http.ResponseWriter, r *http.Request, tenant string) error {
	pid, err := pathPID(r)
	if err != nil {
		return err
	}
	p, err := s.cfg.Sandboxes.GetProcess(r.Context(), tenant, r.PathValue("id"), pid)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, p)
	return nil
}

func (s *Server) processStdin(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req wire.ProcessStdinRequest
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	pid, err := pathPID(r)
	if err != nil {
		return err
	}
	data := []byte(req.Data)
	switch {
	case req.Data != "" && req.DataBase64 != "":
		return errdefs.Invalid("give data or data_base64, not both")
	case req.DataBase64 != "":
		if data, err = base64.StdEncoding.DecodeString(req.DataBase64); err != nil {
			return errdefs.Invalid("data_base64 is not base64: %v", err)
		}
	case req.Data == "" && !req.EOF:
		return errdefs.Invalid("data, data_base64 or eof is required")
	}
	if err := s.cfg.Sandboxes.WriteProcessStdin(r.Context(), tenant, r.PathValue("id"), pid, data, req.EOF); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) signalProcess(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req wire.SignalRequest
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	pid, err := pathPID(r)
	if err != nil {
		return err
	}
	if err := s.cfg.Sandboxes.SignalProcess(r.Context(), tenant, r.PathValue("id"), pid, req.Signal); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) resizeProcess(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req wire.PTYSize
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	pid, err := pathPID(r)
	if err != nil {
		return err
	}
	if err := s.cfg.Sandboxes.ResizeProcess(r.Context(), tenant, r.PathValue("id"), pid, req); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) waitProcess(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req struct{}
	if err := s.decodeOptional(w, r, &req); err != nil {
		return err
	}
	pid, err := pathPID(r)
	if err != nil {
		return err
	}
	release, err := s.streamSlot()
	if err != nil {
		return err
	}
	defer release()
	p, err := s.cfg.Sandboxes.WaitProcess(r.Context(), tenant, r.PathValue("id"), pid)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, p)
	return nil
}

// processEventWriter writes process events as NDJSON lines or SSE events,
// sending the header with the first, as exec's eventWriter does.
type processEventWriter struct {
	w       http.ResponseWriter
	rc      *http.ResponseController
	sse     bool
	started bool
}

// start sends the answer's header, once.
func (e *processEventWriter) start() error {
	if e.started {
		return nil
	}
	e.started = true
	ct := "application/x-ndjson"
	if e.sse {
		ct = "text/event-stream"
	}
	e.w.Header().Set("Content-Type", ct)
	e.w.Header().Set("Cache-Control", "no-cache")
	e.w.Header().Set("X-Accel-Buffering", "no")
	e.w.WriteHeader(http.StatusOK)
	return e.rc.Flush()
}

func (e *processEventWriter) send(ev wire.ProcessEvent) error {
	if err := e.start(); err != nil {
		return err
	}
	b, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	if e.sse {
		_, err = fmt.Fprintf(e.w, "event: %s\ndata: %s\n\n", ev.Type, b)
	} else {
		_, err = fmt.Fprintf(e.w, "%s\n", b)
	}
	if err != nil {
		return fmt.Errorf("writing event: %w", err)
	}
	return e.rc.Flush()
}

// processOutput streams a process's output: what it wrote since it started
// (as far as the server keeps it), then, with follow (the default), its
// output as it comes until it exits.
func (s *Server) processOutput(w http.ResponseWriter, r *http.Request, tenant string) error {
	pid, err := pathPID(r)
	if err != nil {
		return err
	}
	follow := true
	if v := r.URL.Query().Get("follow"); v != "" {
		if follow, err = strconv.ParseBool(v); err != nil {
			return errdefs.Invalid("follow must be true or false, got %q", truncateString(v, 32))
		}
	}
	release, err := s.streamSlot()
	if err != nil {
		return err
	}
	defer release()
	ew := &processEventWriter{w: w, rc: http.NewResponseController(w), sse: negotiate(r) == modeSSE}
	carries := map[string]*utf8Carry{wire.EventStdout: {}, wire.EventStderr: {}}
	// The header goes out as soon as the attach runs: a client waits for
	// it before it reads, and output may not come for a long time.
	attached := func(wire.Process) { _ = ew.start() }
	p, err := s.cfg.Sandboxes.AttachProcess(r.Context(), tenant, r.PathValue("id"), pid, sandbox.AttachOptions{Follow: follow, Attached: attached},
		func(ev sandbox.ProcessOutputEvent) error {
			c := carries[ev.Stream]
			if c == nil {
				return nil
			}
			if ev.Dropped > 0 {
				// What was held back belongs to bytes that are gone.
				if rest := c.flush(); rest != "" {
					if err := ew.send(wire.ProcessEvent{Type: ev.Stream, Data: rest}); err != nil {
						return err
					}
				}
				return ew.send(wire.ProcessEvent{Type: wire.EventDropped, Stream: ev.Stream, Bytes: ev.Dropped})
			}
			if text := c.next(ev.Data); text != "" {
				return ew.send(wire.ProcessEvent{Type: ev.Stream, Data: text})
			}
			return nil
		})
	if err != nil {
		if !ew.started {
			return err
		}
		_, e := s.describe(r, tenant, err)
		_ = ew.send(wire.ProcessEvent{Type: wire.EventError, Error: &e})
		return nil
	}
	for _, stream := range []string{wire.EventStdout, wire.EventStderr} {
		if rest := carries[stream].flush(); rest != "" {
			_ = ew.send(wire.ProcessEvent{Type: stream, Data: rest})
		}
	}
	last := wire.EventExit
	if p.State != wire.ProcessExited {
		last = wire.EventEnd
	}
	return ew.send(wire.ProcessEvent{Type: last, Process: &p})
}

// authenticateWS authenticates a WebSocket route: the Authorization header,
// or the access_token query parameter that browsers must use (they cannot
// set headers on a WebSocket). Only the path is ever logged, never the
// query.
func (s *Server) authenticateWS(r *http.Request) (string, error) {
	if r.Header.Get("Authorization") == "" {
		if tok := r.URL.Query().Get("access_token"); tok != "" {
			r.Header.Set("Authorization", "Bearer "+tok)
		}
	}
	return s.authenticate(r)
}

// isWebSocket reports whether r asks for a WebSocket upgrade.
func isWebSocket(r *http.Request) bool {
	return headerHasToken(r.Header, "Connection", "upgrade") && headerHasToken(r.Header, "Upgrade", "websocket")
}

func headerHasToken(h http.Header, key, token string) bool {
	for _, v := range h.Values(key) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

func errNotWebSocket() error {
	return errdefs.Invalid("this route is a WebSocket: send an upgrade request (Connection: Upgrade, Upgrade: websocket)")
}

// processTerminal attaches a WebSocket to a background process (usually
// one on a PTY): binary messages are its input and output, text messages
// JSON wire.TerminalMessage controls.
func (s *Server) processTerminal(w http.ResponseWriter, r *http.Request, _ string) error {
	tenant, err := s.authenticateWS(r)
	if err != nil {
		return err
	}
	if !isWebSocket(r) {
		return errNotWebSocket()
	}
	pid, err := pathPID(r)
	if err != nil {
		return err
	}
	id := r.PathValue("id")
	// Unknown sandboxes and processes are answered before the upgrade.
	if _, err := s.cfg.Sandboxes.GetProcess(r.Context(), tenant, id, pid); err != nil {
		return err
	}
	return s.serveTerminal(w, r, tenant, id, pid, false)
}

// terminal starts a login shell (or cmd) on a PTY of the asked size and
// attaches a WebSocket to it. The shell gets SIGHUP when the client goes
// away, as a shell does when its terminal closes.
func (s *Server) terminal(w http.ResponseWriter, r *http.Request, _ string) error {
	tenant, err := s.authenticateWS(r)
	if err != nil {
		return err
	}
	if !isWebSocket(r) {
		return errNotWebSocket()
	}
	q := r.URL.Query()
	var size wire.PTYSize
	for _, f := range []struct {
		name string
		v    *int
	}{{"cols", &size.Cols}, {"rows", &size.Rows}} {
		if v := q.Get(f.name); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil {
				return errdefs.Invalid("%s must be a number, got %q", f.name, truncateString(v, 32))
			}
			*f.v = n
		}
	}
	if (size.Cols == 0) != (size.Rows == 0) {
		return errdefs.Invalid("give both cols and rows, or neither (80x24)")
	}
	id := r.PathValue("id")
	var p wire.Process
	if cmd := q.Get("cmd"); cmd != "" {
		if size.Cols == 0 {
			size = wire.PTYSize{Cols: 80, Rows: 24}
		}
		p, err = s.cfg.Sandboxes.StartProcess(r.Context(), tenant, id, wire.StartProcessRequest{Cmd: cmd, User: q.Get("user"), PTY: &size, Tag: "terminal"})
	} else {
		p, err = s.cfg.Sandboxes.StartLoginShell(r.Context(), tenant, id, q.Get("user"), size)
	}
	if err != nil {
		return err
	}
	return s.serveTerminal(w, r, tenant, id, p.PID, true)
}

// hangupTimeout bounds the SIGHUP sent to a terminal's shell whose client
// went away.
const hangupTimeout = 10 * time.Second

// serveTerminal upgrades the request and connects it to process pid until
// the process exits (the server sends an exit message and closes), the
// client goes away, or the sandbox's session ends (an error message, then
// the close). Errors after the upgrade are the client's to read, not the
// handler's to return.
func (s *Server) serveTerminal(w http.ResponseWriter, r *http.Request, tenant, id string, pid int, hangup bool) error {
	release, err := s.streamSlot()
	if err != nil {
		if hangup {
			s.hangup(r, tenant, id, pid)
		}
		return err
	}
	defer release()
	// The API authenticates with a token, never a cookie: a page of
	// another origin gains nothing a token does not already give.
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
	if err != nil {
		// Accept has answered the client.
		if hangup {
			s.hangup(r, tenant, id, pid)
		}
		return nil
	}
	defer c.CloseNow()
	c.SetReadLimit(1 << 20)

	// The connection is hijacked: its request context no longer tells of
	// a hang-up; the reader below does.
	ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
	defer cancel()
	input := make(chan sandbox.ProcessInput)
	// clientGone: the client closed or broke the connection while the
	// attach still ran.
	var clientGone, attachDone atomic.Bool
	var readers sync.WaitGroup
	readers.Go(func() {
		defer cancel()
		for {
			typ, data, err := c.Read(ctx)
			if err != nil {
				if !attachDone.Load() {
					clientGone.Store(true)
				}
				return
			}
			var in sandbox.ProcessInput
			if typ == websocket.MessageBinary {
				in.Data = data
			} else {
				var m wire.TerminalMessage
				if json.Unmarshal(data, &m) != nil {
					continue
				}
				switch m.Type {
				case wire.TerminalResize:
					in.Resize = &wire.PTYSize{Cols: m.Cols, Rows: m.Rows}
				case wire.TerminalSignal:
					in.Signal = m.Signal
				case wire.TerminalEOF:
					in.EOF = true
				default:
					continue
				}
			}
			if len(in.Data) == 0 && in.Resize == nil && in.Signal == "" && !in.EOF {
				continue
			}
			select {
			case input <- in:
			case <-ctx.Done():
				return
			}
		}
	})
	sendJSON := func(m wire.TerminalMessage) error {
		b, err := json.Marshal(m)
		if err != nil {
			return err
		}
		return c.Write(ctx, websocket.MessageText, b)
	}
	p, err := s.cfg.Sandboxes.AttachProcess(ctx, tenant, id, pid, sandbox.AttachOptions{Follow: true, Input: input},
		func(ev sandbox.ProcessOutputEvent) error {
			if ev.Dropped > 0 {
				return sendJSON(wire.TerminalMessage{Type: wire.TerminalDropped, Stream: ev.Stream, Bytes: ev.Dropped})
			}
			return c.Write(ctx, websocket.MessageBinary, ev.Data)
		})
	attachDone.Store(true)
	switch {
	case err == nil:
		_ = sendJSON(wire.TerminalMessage{Type: wire.TerminalExit, ExitCode: p.ExitCode, Process: &p})
		_ = c.Close(websocket.StatusNormalClosure, "the process exited")
	case clientGone.Load():
		// The client went away (or the close came from it).
	default:
		_, e := s.describe(r, tenant, err)
		_ = sendJSON(wire.TerminalMessage{Type: wire.TerminalError, Error: &e})
		_ = c.Close(websocket.StatusTryAgainLater, truncateString(e.Message, 100))
	}
	cancel()
	readers.Wait()
	if hangup && clientGone.Load() && err != nil && !errors.Is(err, errdefs.ErrConflict) {
		s.hangup(r, tenant, id, pid)
	}
	return nil
}

// hangup sends SIGHUP to a terminal's process whose client is gone.
func (s *Server) hangup(r *http.Request, tenant, id string, pid int) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), hangupTimeout)
	defer cancel()
	if err := s.cfg.Sandboxes.SignalProcess(ctx, tenant, id, pid, "SIGHUP"); err != nil {
		s.cfg.Log.Debug("hanging up a terminal", "request_id", infoOf(r).id, "pid", pid, "err", err)
	}
}
