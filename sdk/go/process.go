package pandastack

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"

	"github.com/pandastack/pandastack/wire"
)

// StartOptions tunes a background process. Zero fields take the defaults.
type StartOptions struct {
	// Env adds to the sandbox's environment for this process.
	Env map[string]string
	// Cwd is the working directory (the user's home by default).
	Cwd string
	// User runs the process as "user" (the default) or "root".
	User string
	// Tag is your name for the process, shown in lists.
	Tag string
	// Stdin keeps the process's stdin open for SendStdin; otherwise it
	// reads an empty stdin. A process on a PTY always takes input.
	Stdin bool
	// Timeout kills the process, with its children, after that long
	// (exit code 124); zero: no timeout.
	Timeout time.Duration
	// PTY runs the process on a pseudo-terminal of that size.
	PTY *wire.PTYSize
}

// Start starts cmd (run by /bin/sh -c) as a background process and returns
// once it runs. It runs until it exits, is signalled, reaches its timeout or
// the sandbox ends: neither this program's exit nor a lost connection ends
// it. Attach to its output with Output, at once or later, from here or from
// another client (Processes().Connect).
func (s *Sandbox) Start(ctx context.Context, cmd string, opts StartOptions) (*Process, error) {
	return s.start(ctx, wire.StartProcessRequest{Cmd: cmd}, opts)
}

// StartArgv is Start for argv run directly, without a shell.
func (s *Sandbox) StartArgv(ctx context.Context, argv []string, opts StartOptions) (*Process, error) {
	return s.start(ctx, wire.StartProcessRequest{Argv: argv}, opts)
}

func (s *Sandbox) start(ctx context.Context, req wire.StartProcessRequest, opts StartOptions) (*Process, error) {
	req.Env, req.Cwd, req.User, req.Tag, req.Stdin, req.PTY = opts.Env, opts.Cwd, opts.User, opts.Tag, opts.Stdin, opts.PTY
	req.TimeoutSeconds = opts.Timeout.Seconds()
	var info wire.Process
	if err := s.c.do(ctx, http.MethodPost, s.path("/processes"), req, &info, http.StatusCreated); err != nil {
		return nil, fmt.Errorf("starting a process in sandbox %q: %w", s.id, err)
	}
	return &Process{sb: s, pid: info.PID, info: info}, nil
}

// Processes returns the sandbox's background processes.
func (s *Sandbox) Processes() *Processes { return &Processes{sb: s} }

// Processes are the background processes of one sandbox.
type Processes struct{ sb *Sandbox }

// List returns the running background processes and those that exited
// recently (kept 10 minutes, the 64 most recent), oldest first.
func (p *Processes) List(ctx context.Context) ([]wire.Process, error) {
	var l wire.ProcessList
	if err := p.sb.c.do(ctx, http.MethodGet, p.sb.path("/processes"), nil, &l, http.StatusOK); err != nil {
		return nil, fmt.Errorf("listing processes of sandbox %q: %w", p.sb.id, err)
	}
	return l.Processes, nil
}

// Connect returns a handle on background process pid (ErrNotFound if there
// is none), for a process another client or an earlier run started.
func (p *Processes) Connect(ctx context.Context, pid int) (*Process, error) {
	proc := &Process{sb: p.sb, pid: pid}
	if err := proc.Refresh(ctx); err != nil {
		return nil, err
	}
	return proc, nil
}

// Process is a handle on a background process. It is safe for concurrent
// use.
type Process struct {
	sb  *Sandbox
	pid int

	// mu guards info, which Refresh and Wait replace.
	mu   sync.Mutex
	info wire.Process
}

// PID returns the process's id inside the sandbox.
func (p *Process) PID() int { return p.pid }

// Tag returns the process's tag.
func (p *Process) Tag() string { return p.Info().Tag }

// Info returns what the server last said about the process.
func (p *Process) Info() wire.Process {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.info
}

func (p *Process) setInfo(info wire.Process) {
	p.mu.Lock()
	p.info = info
	p.mu.Unlock()
}

func (p *Process) path(suffix string) string {
	return p.sb.path("/processes/" + strconv.Itoa(p.pid) + suffix)
}

// Refresh asks the server about the process; Info returns it after.
func (p *Process) Refresh(ctx context.Context) error {
	var info wire.Process
	if err := p.sb.c.do(ctx, http.MethodGet, p.path(""), nil, &info, http.StatusOK); err != nil {
		return fmt.Errorf("getting process %d of sandbox %q: %w", p.pid, p.sb.id, err)
	}
	p.setInfo(info)
	return nil
}

// Wait blocks until the process exits (or ctx ends) and returns its exit
// code: 128+N when signal N ended it, 124 when its timeout did. A pause of
// the sandbox ends the wait with ErrConflict; wait again after the resume.
func (p *Process) Wait(ctx context.Context) (int, error) {
	var info wire.Process
	if err := p.sb.c.do(ctx, http.MethodPost, p.path("/wait"), nil, &info, http.StatusOK); err != nil {
		return 0, fmt.Errorf("waiting for process %d of sandbox %q: %w", p.pid, p.sb.id, err)
	}
	p.setInfo(info)
	if info.ExitCode == nil {
		return 0, fmt.Errorf("waiting for process %d of sandbox %q: the server answered without an exit code", p.pid, p.sb.id)
	}
	return *info.ExitCode, nil
}

// Signal sends sig ("SIGTERM", "TERM" or a number as a string) to the
// process's group.
func (p *Process) Signal(ctx context.Context, sig string) error {
	req := wire.SignalRequest{Signal: wire.Signal(sig)}
	if err := p.sb.c.do(ctx, http.MethodPost, p.path("/signal"), req, nil, http.StatusNoContent); err != nil {
		return fmt.Errorf("signalling process %d of sandbox %q: %w", p.pid, p.sb.id, err)
	}
	return nil
}

// Kill sends SIGKILL to the process's group.
func (p *Process) Kill(ctx context.Context) error { return p.Signal(ctx, "SIGKILL") }

// stdinPiece bounds one stdin request: base64 of it fits in the server's
// body limit.
const stdinPiece = 512 << 10

// SendStdin gives data to the process's input (it must have been started
// with Stdin, or on a PTY). It waits while the process has much input it
// has not read.
func (p *Process) SendStdin(ctx context.Context, data []byte) error {
	for len(data) > 0 {
		n := min(len(data), stdinPiece)
		if err := p.stdin(ctx, wire.ProcessStdinRequest{DataBase64: base64.StdEncoding.EncodeToString(data[:n])}); err != nil {
			return err
		}
		data = data[n:]
	}
	return nil
}

// CloseStdin ends the process's input (on a PTY: sends ^D).
func (p *Process) CloseStdin(ctx context.Context) error {
	return p.stdin(ctx, wire.ProcessStdinRequest{EOF: true})
}

func (p *Process) stdin(ctx context.Context, req wire.ProcessStdinRequest) error {
	if err := p.sb.c.do(ctx, http.MethodPost, p.path("/stdin"), req, nil, http.StatusNoContent); err != nil {
		return fmt.Errorf("writing to process %d of sandbox %q: %w", p.pid, p.sb.id, err)
	}
	return nil
}

// Resize changes the window size of the process's terminal.
func (p *Process) Resize(ctx context.Context, cols, rows int) error {
	if err := p.sb.c.do(ctx, http.MethodPost, p.path("/resize"), wire.PTYSize{Cols: cols, Rows: rows}, nil, http.StatusNoContent); err != nil {
		return fmt.Errorf("resizing the terminal of process %d of sandbox %q: %w", p.pid, p.sb.id, err)
	}
	return nil
}

// Output attaches to the process's output: what it wrote since it started
// (the server keeps the last 1 MiB of each stream; a "dropped" event says
// how much older output is gone), then, with follow, its output as it
// comes until it exits. Read it with Next; Close detaches (the process goes
// on).
func (p *Process) Output(ctx context.Context, follow bool) (*OutputStream, error) {
	req, err := p.sb.c.newRequest(ctx, http.MethodGet, p.path("/output?follow="+strconv.FormatBool(follow)), nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/x-ndjson")
	resp, err := p.sb.c.send(req, http.StatusOK)
	if err != nil {
		return nil, fmt.Errorf("attaching to process %d of sandbox %q: %w", p.pid, p.sb.id, err)
	}
	return &OutputStream{p: p, body: resp.Body, dec: json.NewDecoder(resp.Body)}, nil
}

// OutputStream is an attach to a process's output. It is not safe for
// concurrent use.
type OutputStream struct {
	p    *Process
	body io.ReadCloser
	dec  *json.Decoder
	done bool
}

// Next returns the next event: "stdout" and "stderr" with Data, "dropped"
// with Stream and Bytes, and last "exit" (the process exited; Process has
// its exit code) or "end" (without follow: what was kept so far has been
// sent). After the last event it returns io.EOF. A stream the server broke
// off (the sandbox was paused, killed or died) returns the error it sent.
func (o *OutputStream) Next() (wire.ProcessEvent, error) {
	if o.done {
		return wire.ProcessEvent{}, io.EOF
	}
	var ev wire.ProcessEvent
	if err := o.dec.Decode(&ev); err != nil {
		o.done = true
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return wire.ProcessEvent{}, fmt.Errorf("reading the output of process %d before its end: %w", o.p.pid, err)
	}
	switch ev.Type {
	case wire.EventExit, wire.EventEnd:
		o.done = true
		if ev.Process != nil {
			o.p.setInfo(*ev.Process)
		}
	case wire.EventError:
		o.done = true
		e := &APIError{Code: wire.CodeInternal, Message: "the output stream reported an error without details"}
		if ev.Error != nil {
			e.Code, e.Message, e.RequestID = ev.Error.Code, ev.Error.Message, ev.Error.RequestID
		}
		return wire.ProcessEvent{}, e
	}
	return ev, nil
}

// Close detaches; the process goes on.
func (o *OutputStream) Close() error {
	o.done = true
	return o.body.Close()
}

// TerminalOptions describes the shell OpenTerminal starts. Zero fields take
// the defaults.
type TerminalOptions struct {
	// Cols and Rows are the terminal's size; 80x24 by default.
	Cols, Rows int
	// User runs the shell as "user" (the default) or "root".
	User string
	// Cmd runs this command line (by /bin/sh -c) instead of the user's
	// login shell.
	Cmd string
}

// OpenTerminal starts the user's login shell (or opts.Cmd) on a new
// pseudo-terminal in the sandbox and connects to it over a WebSocket. The
// shell gets SIGHUP when the connection goes away before it exits.
func (s *Sandbox) OpenTerminal(ctx context.Context, opts TerminalOptions) (*Terminal, error) {
	q := url.Values{}
	if opts.Cols != 0 || opts.Rows != 0 {
		q.Set("cols", strconv.Itoa(opts.Cols))
		q.Set("rows", strconv.Itoa(opts.Rows))
	}
	if opts.User != "" {
		q.Set("user", opts.User)
	}
	if opts.Cmd != "" {
		q.Set("cmd", opts.Cmd)
	}
	path := s.path("/terminal")
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	t, err := s.c.dialTerminal(ctx, path)
	if err != nil {
		return nil, fmt.Errorf("opening a terminal in sandbox %q: %w", s.id, err)
	}
	return t, nil
}

// Terminal connects to the process over a WebSocket: its output (replayed
// from what the server keeps, then live) and input. Closing the Terminal
// detaches; the process goes on.
func (p *Process) Terminal(ctx context.Context) (*Terminal, error) {
	t, err := p.sb.c.dialTerminal(ctx, p.path("/terminal"))
	if err != nil {
		return nil, fmt.Errorf("attaching a terminal to process %d of sandbox %q: %w", p.pid, p.sb.id, err)
	}
	return t, nil
}

// dialTerminal opens a terminal WebSocket on path (under /v1).
func (c *Client) dialTerminal(ctx context.Context, path string) (*Terminal, error) {
	u := c.baseURL + wire.APIVersion + path
	switch {
	case strings.HasPrefix(u, "https://"):
		u = "wss://" + strings.TrimPrefix(u, "https://")
	case strings.HasPrefix(u, "http://"):
		u = "ws://" + strings.TrimPrefix(u, "http://")
	}
	hdr := http.Header{"User-Agent": {"pandastack-go"}}
	if c.apiKey != "" {
		hdr.Set("Authorization", "Bearer "+c.apiKey)
	}
	conn, resp, err := websocket.Dial(ctx, u, &websocket.DialOptions{HTTPClient: c.http, HTTPHeader: hdr})
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols && resp.Body != nil {
			// coder/websocket keeps the start of the refusal's body.
			return nil, c.responseError(resp)
		}
		return nil, err
	}
	conn.SetReadLimit(4 << 20)
	pr, pw := io.Pipe()
	bg, cancel := context.WithCancel(context.Background())
	t := &Terminal{conn: conn, out: pr, cancel: cancel, done: make(chan struct{})}
	// The reader starts with the first Read, Wait or Close, so that
	// OnDropped, set before, is never read while being set.
	t.start = sync.OnceFunc(func() { go t.read(bg, pw) })
	return t, nil
}

// Terminal is a terminal WebSocket: Read is the process's output, Write its
// input. Read and Write may be used by different goroutines at once.
type Terminal struct {
	conn   *websocket.Conn
	out    *io.PipeReader
	cancel context.CancelFunc
	// start starts the goroutine that reads the connection, once.
	start func()
	// done is closed when the connection has ended; exit and err are set
	// by then.
	done chan struct{}
	exit *wire.TerminalMessage
	err  error
	// OnDropped, if set before the first Read (or Wait), is told of
	// output the server no longer held when it replayed.
	OnDropped func(stream string, bytes int64)
}

// read owns the connection's reading: output into the pipe, then the exit
// or error message; it ends when the connection does.
func (t *Terminal) read(ctx context.Context, pw *io.PipeWriter) {
	defer close(t.done)
	for {
		typ, data, err := t.conn.Read(ctx)
		if err != nil {
			if t.exit == nil && t.err == nil {
				t.err = fmt.Errorf("the terminal's connection ended before the process exited: %w", err)
			}
			if t.err != nil {
				pw.CloseWithError(t.err)
			} else {
				pw.Close()
			}
			return
		}
		if typ == websocket.MessageBinary {
			if _, err := pw.Write(data); err != nil {
				// The reader closed the terminal.
				return
			}
			continue
		}
		var m wire.TerminalMessage
		if json.Unmarshal(data, &m) != nil {
			continue
		}
		switch m.Type {
		case wire.TerminalExit:
			t.exit = &m
		case wire.TerminalError:
			e := &APIError{Code: wire.CodeInternal, Message: "the terminal reported an error without details"}
			if m.Error != nil {
				e.Code, e.Message, e.RequestID = m.Error.Code, m.Error.Message, m.Error.RequestID
			}
			t.err = e
		case wire.TerminalDropped:
			if t.OnDropped != nil {
				t.OnDropped(m.Stream, m.Bytes)
			}
		}
	}
}

// Read reads the process's output; io.EOF once it has exited (Wait then
// has its exit code).
func (t *Terminal) Read(p []byte) (int, error) {
	t.start()
	return t.out.Read(p)
}

// Write sends input to the process.
func (t *Terminal) Write(p []byte) (int, error) {
	if err := t.conn.Write(context.Background(), websocket.MessageBinary, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (t *Terminal) control(ctx context.Context, m wire.TerminalMessage) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	return t.conn.Write(ctx, websocket.MessageText, b)
}

// Resize changes the terminal's window size.
func (t *Terminal) Resize(ctx context.Context, cols, rows int) error {
	return t.control(ctx, wire.TerminalMessage{Type: wire.TerminalResize, Cols: cols, Rows: rows})
}

// Signal sends sig ("SIGINT", "INT" or a number) to the process's group.
func (t *Terminal) Signal(ctx context.Context, sig string) error {
	return t.control(ctx, wire.TerminalMessage{Type: wire.TerminalSignal, Signal: wire.Signal(sig)})
}

// CloseInput ends the process's input (on a terminal: ^D).
func (t *Terminal) CloseInput(ctx context.Context) error {
	return t.control(ctx, wire.TerminalMessage{Type: wire.TerminalEOF})
}

// Wait waits until the connection ends (read the output to its end first,
// or Wait returns only once the pending output is read) and returns the
// process's exit code, or why the connection ended without one.
func (t *Terminal) Wait(ctx context.Context) (int, error) {
	t.start()
	select {
	case <-t.done:
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	if t.exit != nil && t.exit.ExitCode != nil {
		return *t.exit.ExitCode, nil
	}
	if t.err != nil {
		return 0, t.err
	}
	return 0, errors.New("the terminal ended without an exit code")
}

// Close detaches from the process (it goes on, except a shell started by
// OpenTerminal, which gets SIGHUP).
func (t *Terminal) Close() error {
	// The close handshake fails when the server closed first (the
	// process exited): nothing is lost either way.
	_ = t.conn.Close(websocket.StatusNormalClosure, "")
	t.start()
	t.cancel()
	t.out.Close()
	<-t.done
	return nil
}
