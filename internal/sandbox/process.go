package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pandastack/pandastack/internal/agent"
	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/wire"
)

// Background processes live in the sandbox's agent (internal/agent's
// process.go), not in the daemon: they outlive the agent session, and so a
// client's disconnect, a daemon restart and a pause (the agent's memory is
// in the checkpoint; a resume restores it). Calls that wait on a process
// (wait, attach) are calls into the sandbox like an exec: counted against
// MaxExecsPerSandbox while they last, ended when the session ends (a
// pause, a kill), with the reason as a conflict; after a resume they can
// be made again.

// maxTagBytes bounds a process's tag.
const maxTagBytes = 256

// maxTermSize bounds a terminal's columns and rows.
const maxTermSize = 10000

// ProcessOutputEvent is what an attach to a background process reads next:
// Data of Stream (wire.EventStdout or wire.EventStderr), or, with Dropped,
// that many bytes of Stream's output that the agent no longer held.
type ProcessOutputEvent struct {
	Stream  string
	Data    []byte
	Dropped int64
}

// ProcessOutput receives an attached process's output; an error detaches.
type ProcessOutput func(ProcessOutputEvent) error

// ProcessInput is input an attached caller sends a process: one of bytes,
// the end of its input, a signal for its group, or a terminal size.
type ProcessInput struct {
	Data   []byte
	EOF    bool
	Signal wire.Signal
	Resize *wire.PTYSize
}

// AttachOptions tunes an attach.
type AttachOptions struct {
	// Follow goes on with the output as it comes until the process exits;
	// without it the attach ends after the output kept so far.
	Follow bool
	// Input, when set, is sent to the process while attached. Bad input
	// (an unknown signal) is dropped.
	Input <-chan ProcessInput
	// Attached, when set, is called once the process was found and the
	// attach runs, before any output.
	Attached func(wire.Process)
}

// StartProcess starts a background process in the tenant's sandbox
// (resuming it first if paused) and returns it once it runs.
func (m *Manager) StartProcess(ctx context.Context, tenant, id string, req wire.StartProcessRequest) (wire.Process, error) {
	areq, err := m.processRequest(req)
	if err != nil {
		return wire.Process{}, err
	}
	in, client, release, err := m.acquire(ctx, tenant, id)
	if err != nil {
		return wire.Process{}, err
	}
	defer release()
	in.mu.Lock()
	env, cwd, user := m.commandDefaults(in, req.Env, req.Cwd, req.User)
	areq.Env, areq.Cwd, areq.User = envList(env), cwd, user
	in.mu.Unlock()
	if err := checkArgsSize(agent.OpProcessStart, areq); err != nil {
		return wire.Process{}, err
	}
	info, err := client.StartProcess(ctx, areq)
	if err != nil {
		return wire.Process{}, m.processError(ctx, in, client, err)
	}
	m.log.Debug("background process started", "id", id, "pid", info.PID, "tag", info.Tag)
	return processToWire(info), nil
}

// ListProcesses returns the background processes of the tenant's sandbox:
// running ones and recently exited ones, oldest first.
func (m *Manager) ListProcesses(ctx context.Context, tenant, id string) ([]wire.Process, error) {
	in, client, release, err := m.acquire(ctx, tenant, id)
	if err != nil {
		return nil, err
	}
	defer release()
	l, err := client.ListProcesses(ctx)
	if err != nil {
		return nil, m.processError(ctx, in, client, err)
	}
	out := make([]wire.Process, 0, len(l))
	for _, p := range l {
		out = append(out, processToWire(p))
	}
	return out, nil
}

// GetProcess describes background process pid of the tenant's sandbox.
func (m *Manager) GetProcess(ctx context.Context, tenant, id string, pid int) (wire.Process, error) {
	var info agent.ProcessInfo
	err := m.processCall(ctx, tenant, id, pid, func(c *agent.Client) (err error) {
		info, err = c.GetProcess(ctx, pid)
		return err
	})
	if err != nil {
		return wire.Process{}, err
	}
	return processToWire(info), nil
}

// WriteProcessStdin gives data to the process's input, then closes the
// input if eof. It waits while the process has much input it has not read.
func (m *Manager) WriteProcessStdin(ctx context.Context, tenant, id string, pid int, data []byte, eof bool) error {
	return m.processCall(ctx, tenant, id, pid, func(c *agent.Client) error {
		// Pieces well within a frame, whatever the API's body limit.
		const piece = 256 << 10
		for len(data) > piece {
			if err := c.WriteProcessStdin(ctx, pid, data[:piece], false); err != nil {
				return err
			}
			data = data[piece:]
		}
		return c.WriteProcessStdin(ctx, pid, data, eof)
	})
}

// SignalProcess sends sig to the process's group.
func (m *Manager) SignalProcess(ctx context.Context, tenant, id string, pid int, sig wire.Signal) error {
	n, err := ParseSignal(sig)
	if err != nil {
		return err
	}
	return m.processCall(ctx, tenant, id, pid, func(c *agent.Client) error {
		return c.SignalProcess(ctx, pid, n)
	})
}

// ResizeProcess sets the window size of the process's terminal.
func (m *Manager) ResizeProcess(ctx context.Context, tenant, id string, pid int, size wire.PTYSize) error {
	ts, err := termSize(size)
	if err != nil {
		return err
	}
	return m.processCall(ctx, tenant, id, pid, func(c *agent.Client) error {
		return c.ResizeProcess(ctx, pid, ts)
	})
}

// WaitProcess blocks until the process has exited (or ctx ends) and
// returns it; a process that exited already answers at once.
func (m *Manager) WaitProcess(ctx context.Context, tenant, id string, pid int) (wire.Process, error) {
	var info agent.ProcessInfo
	err := m.processCall(ctx, tenant, id, pid, func(c *agent.Client) (err error) {
		info, err = c.WaitProcess(ctx, pid)
		return err
	})
	if err != nil {
		return wire.Process{}, err
	}
	return processToWire(info), nil
}

// AttachProcess sends out what the process wrote since it started (as far
// as the agent keeps it: agent.ProcessRingBytes per stream; an event with
// Dropped says how much older output is gone), then, with Follow, its
// output as it comes until it exits. It returns the process as it was at
// the end: exited, or still running without Follow. Cancelling ctx, or an
// error from out, detaches; the process goes on.
func (m *Manager) AttachProcess(ctx context.Context, tenant, id string, pid int, opts AttachOptions, out ProcessOutput) (wire.Process, error) {
	if pid <= 0 {
		return wire.Process{}, errNoProcess(pid)
	}
	in, client, release, err := m.acquire(ctx, tenant, id)
	if err != nil {
		return wire.Process{}, err
	}
	defer release()
	aio := agent.AttachIO{
		Output: func(stream byte, data []byte) error {
			name := wire.EventStdout
			if stream == agent.FrameStderr {
				name = wire.EventStderr
			}
			return out(ProcessOutputEvent{Stream: name, Data: data})
		},
		Dropped: func(d agent.Dropped) error {
			return out(ProcessOutputEvent{Stream: d.Stream, Dropped: d.Bytes})
		},
	}
	if opts.Attached != nil {
		aio.Attached = func(info agent.ProcessInfo) { opts.Attached(processToWire(info)) }
	}
	var translate sync.WaitGroup
	if opts.Input != nil {
		// The caller's input, checked and turned into the agent's; this
		// goroutine ends with the attach.
		ain := make(chan agent.ProcessInput)
		aio.Input = ain
		stop := make(chan struct{})
		defer func() {
			close(stop)
			translate.Wait()
		}()
		translate.Go(func() {
			for {
				var pi ProcessInput
				var ok bool
				select {
				case <-stop:
					return
				case pi, ok = <-opts.Input:
					if !ok {
						return
					}
				}
				var ai agent.ProcessInput
				switch {
				case len(pi.Data) > 0:
					ai.Data = pi.Data
				case pi.EOF:
					ai.EOF = true
				case pi.Signal != "":
					n, err := ParseSignal(pi.Signal)
					if err != nil {
						continue
					}
					ai.Signal = n
				case pi.Resize != nil:
					ts, err := termSize(*pi.Resize)
					if err != nil {
						continue
					}
					ai.Resize = &ts
				default:
					continue
				}
				select {
				case ain <- ai:
				case <-stop:
					return
				}
			}
		})
	}
	info, _, err := client.AttachProcess(ctx, agent.ProcessAttach{PID: pid, Follow: opts.Follow}, aio)
	if err != nil {
		return wire.Process{}, m.processError(ctx, in, client, err)
	}
	return processToWire(info), nil
}

// processCall runs call on the agent of the tenant's sandbox for process
// pid, classifying its error.
func (m *Manager) processCall(ctx context.Context, tenant, id string, pid int, call func(*agent.Client) error) error {
	if pid <= 0 {
		return errNoProcess(pid)
	}
	in, client, release, err := m.acquire(ctx, tenant, id)
	if err != nil {
		return err
	}
	defer release()
	if err := call(client); err != nil {
		return m.processError(ctx, in, client, err)
	}
	return nil
}

func errNoProcess(pid int) error {
	return errdefs.NotFound("no background process %d", pid)
}

// processError classifies the error of a process call: the agent's own
// kinds for processes, an agent that predates them, then as agentError.
func (m *Manager) processError(ctx context.Context, in *instance, client *agent.Client, err error) error {
	var oe *agent.OpError
	if errors.As(err, &oe) {
		switch oe.Kind {
		case agent.ErrKindProcessState:
			return errdefs.Conflict("%s", oe.Message)
		case agent.ErrKindProcessLimit:
			return errdefs.Quota("%s", oe.Message)
		}
	}
	if ctx.Err() == nil && client.IsClosed() {
		// A pause, kill or reconnect ended the session, and said why
		// before it did: no need to wait for a death's cause.
		in.mu.Lock()
		known := in.endReason != ""
		in.mu.Unlock()
		if known {
			return in.sessionEndedError()
		}
	}
	if errors.Is(err, agent.ErrUnsupported) {
		return errdefs.Wrap(errdefs.ErrConflict, err, "sandbox %q runs an agent older than background processes (it was made before they existed): create a new sandbox", in.id)
	}
	return m.agentError(ctx, in, client, err)
}

// processRequest validates a start request and turns it into the agent's.
func (m *Manager) processRequest(req wire.StartProcessRequest) (agent.ProcessStart, error) {
	// The command, environment, cwd and user are checked as an exec's;
	// the timeout is a background process's own (none by default).
	ereq, _, err := m.execRequest(wire.ExecRequest{Cmd: req.Cmd, Argv: req.Argv, Env: req.Env, Cwd: req.Cwd, User: req.User})
	if err != nil {
		return agent.ProcessStart{}, err
	}
	if len(req.Tag) > maxTagBytes || strings.ContainsRune(req.Tag, 0) {
		return agent.ProcessStart{}, errdefs.Invalid("tag must be at most %d bytes without NUL bytes", maxTagBytes)
	}
	var ms int64
	if ts := req.TimeoutSeconds; ts != 0 {
		if !(ts > 0 && ts <= m.cfg.MaxTTL.Seconds()) {
			return agent.ProcessStart{}, errdefs.Invalid("timeout_seconds must be between 0 (none) and %d, got %g", int(m.cfg.MaxTTL/time.Second), ts)
		}
		ms = max(int64(ts*1000), 1)
	}
	a := agent.ProcessStart{Argv: ereq.Argv, Cwd: req.Cwd, Tag: req.Tag, Stdin: req.Stdin, TimeoutMS: ms}
	if req.PTY != nil {
		ts, err := termSize(*req.PTY)
		if err != nil {
			return agent.ProcessStart{}, err
		}
		a.PTY = &ts
		a.Stdin = true
	}
	return a, nil
}

// StartLoginShell starts the user's login shell as a background process on
// a terminal of the given size (zero: 80x24); the agent picks the shell
// from the sandbox's /etc/passwd.
func (m *Manager) StartLoginShell(ctx context.Context, tenant, id, user string, size wire.PTYSize) (wire.Process, error) {
	if err := checkUser(user); err != nil {
		return wire.Process{}, err
	}
	ts, err := termSize(size)
	if err != nil {
		return wire.Process{}, err
	}
	in, client, release, err := m.acquire(ctx, tenant, id)
	if err != nil {
		return wire.Process{}, err
	}
	defer release()
	in.mu.Lock()
	env, cwd, user := m.commandDefaults(in, nil, "", user)
	areq := agent.ProcessStart{Login: true, PTY: &ts, Stdin: true, Env: envList(env), Cwd: cwd, User: user, Tag: "terminal"}
	in.mu.Unlock()
	info, err := client.StartProcess(ctx, areq)
	if err != nil {
		return wire.Process{}, m.processError(ctx, in, client, err)
	}
	return processToWire(info), nil
}

// termSize checks a terminal size; zero in both means the default 80x24.
func termSize(s wire.PTYSize) (agent.TermSize, error) {
	if s.Cols == 0 && s.Rows == 0 {
		return agent.TermSize{Cols: 80, Rows: 24}, nil
	}
	if s.Cols < 1 || s.Rows < 1 || s.Cols > maxTermSize || s.Rows > maxTermSize {
		return agent.TermSize{}, errdefs.Invalid("cols and rows must be between 1 and %d, got %d and %d", maxTermSize, s.Cols, s.Rows)
	}
	return agent.TermSize{Cols: uint16(s.Cols), Rows: uint16(s.Rows)}, nil
}

// checkArgsSize refuses an operation whose arguments do not fit in one
// agent frame.
func checkArgsSize(op string, args any) error {
	b, err := json.Marshal(args)
	if err != nil {
		return err
	}
	n, err := agent.EncodedSize(agent.Request{Op: op, Args: b})
	if err != nil {
		return err
	}
	if n > agent.MaxFrame {
		return errdefs.Invalid("the command and its environment are %d bytes encoded; at most %d are allowed", n, agent.MaxFrame)
	}
	return nil
}

// ParseSignal turns a signal name ("SIGTERM", "TERM", any case) or number
// (1-64) into its number, as a 400 when it is neither.
func ParseSignal(s wire.Signal) (int, error) {
	str := strings.TrimSpace(string(s))
	if n, err := strconv.Atoi(str); err == nil {
		if n < 1 || n > 64 {
			return 0, errdefs.Invalid("signal must be 1 to 64, got %d", n)
		}
		return n, nil
	}
	name := strings.ToUpper(str)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if n := unix.SignalNum(name); n != 0 {
		return int(n), nil
	}
	return 0, errdefs.Invalid("unknown signal %q: give a name such as SIGTERM or a number 1 to 64", truncate(str, 32))
}

// processToWire is the API's view of a process.
func processToWire(p agent.ProcessInfo) wire.Process {
	w := wire.Process{
		PID: p.PID, Tag: p.Tag, Argv: p.Argv, User: p.User, Cwd: p.Cwd, PTY: p.PTY, Stdin: p.Stdin,
		State: wire.ProcessRunning, StartedAt: p.StartedAt.UTC(), TimedOut: p.TimedOut,
		StdoutBytes: p.StdoutBytes, StderrBytes: p.StderrBytes,
	}
	if w.Argv == nil {
		w.Argv = []string{}
	}
	if !p.Running {
		code := p.ExitCode
		w.State, w.ExitCode, w.ExitedAt = wire.ProcessExited, &code, p.ExitedAt.UTC()
	}
	return w
}
