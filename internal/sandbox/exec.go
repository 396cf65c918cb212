package sandbox

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/pandastack/pandastack/internal/agent"
	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/wire"
)

// Output receives a command's output as it is produced; stream is
// wire.EventStdout or wire.EventStderr. An error stops the command.
type Output func(stream string, data []byte) error

// Exec runs one command in the tenant's sandbox (resuming it first if
// paused). The result's Stdout and Stderr are left empty: output goes to out.
//
// The daemon enforces the command's timeout itself too: when the agent has
// not reported the command's end ExecGrace after its timeout, the agent is
// asked for a sign of life, and a sandbox whose agent gives none is ended
// as failed.
func (m *Manager) Exec(ctx context.Context, tenant, id string, req wire.ExecRequest, out Output) (wire.ExecResult, error) {
	areq, timeout, err := m.execRequest(req)
	if err != nil {
		return wire.ExecResult{}, err
	}
	in, client, release, err := m.acquire(ctx, tenant, id)
	if err != nil {
		return wire.ExecResult{}, err
	}
	defer release()
	in.mu.Lock()
	// The sandbox's own env applies to every command, also after a restore
	// whose agent started with another sandbox's environment.
	env, cwd, user := m.commandDefaults(in, req.Env, req.Cwd, req.User)
	areq.Env, areq.Cwd, areq.User = envList(env), cwd, user
	in.mu.Unlock()
	if err := checkFrameSize(areq); err != nil {
		return wire.ExecResult{}, err
	}
	eio := agent.ExecIO{
		Stdout: func(b []byte) error { return out(wire.EventStdout, b) },
		Stderr: func(b []byte) error { return out(wire.EventStderr, b) },
	}
	if req.Stdin != "" {
		eio.Stdin = strings.NewReader(req.Stdin)
	}
	ectx, cancel := context.WithTimeout(ctx, timeout+m.cfg.ExecGrace)
	defer cancel()
	start := time.Now()
	ex, err := client.Exec(ectx, areq, eio)
	dur := time.Since(start)
	if err != nil {
		return wire.ExecResult{}, m.execError(ctx, ectx, in, client, timeout, err)
	}
	if ex.Invalid {
		return wire.ExecResult{}, errdefs.Invalid("%s", ex.Error)
	}
	return wire.ExecResult{
		ExitCode:   ex.ExitCode,
		TimedOut:   ex.TimedOut,
		Truncated:  ex.Truncated,
		DurationMS: float64(dur.Microseconds()) / 1000,
	}, nil
}

// acquire returns the tenant's sandbox, running (a paused one is resumed),
// and its agent session, counted as one of the sandbox's calls in progress
// (MaxExecsPerSandbox bounds them: commands, file transfers, watches, …)
// until release is called. Every call into a sandbox goes through it.
func (m *Manager) acquire(ctx context.Context, tenant, id string) (in *instance, client *agent.Client, release func(), err error) {
	in, err = m.lookup(tenant, id)
	if err != nil {
		return nil, nil, nil, err
	}
	in.mu.Lock()
	running := in.phase == phaseRunning
	in.mu.Unlock()
	if !running {
		if err := in.op.lock(ctx); err != nil {
			return nil, nil, nil, err
		}
		err := m.ensureRunningLocked(ctx, in)
		in.op.unlock()
		if err != nil {
			return nil, nil, nil, err
		}
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.phase != phaseRunning && in.phase != phasePausing || in.client == nil {
		if in.phase >= phaseStopping {
			return nil, nil, nil, errGone(in)
		}
		return nil, nil, nil, errdefs.Conflict("sandbox %q is %s; try again", id, in.phase)
	}
	if in.execs >= m.cfg.MaxExecsPerSandbox {
		return nil, nil, nil, errdefs.Quota("sandbox %q already runs %d calls, the most it may run at once", id, m.cfg.MaxExecsPerSandbox)
	}
	in.execs++
	release = func() {
		in.mu.Lock()
		in.execs--
		in.mu.Unlock()
	}
	return in, in.client, release, nil
}

// agentError turns the error of an agent call into the caller's: an
// operation's own failure (*agent.OpError) by its kind, a session that
// ended by its cause, anything else as the sandbox being unavailable.
func (m *Manager) agentError(ctx context.Context, in *instance, client *agent.Client, err error) error {
	var oe *agent.OpError
	switch {
	case errors.As(err, &oe):
		switch oe.Kind {
		case agent.ErrKindInvalid:
			return errdefs.Invalid("%s", oe.Message)
		case agent.ErrKindNotFound:
			return errdefs.NotFound("%s", oe.Message)
		case agent.ErrKindExists, agent.ErrKindDenied:
			return errdefs.Conflict("%s", oe.Message)
		case agent.ErrKindNoSpace:
			return errdefs.InsufficientStorage("%s", oe.Message)
		}
		return errdefs.Wrap(errdefs.ErrUnavailable, err, "the sandbox could not do it: %s", oe.Message)
	case ctx.Err() != nil:
		return fmt.Errorf("calling the sandbox's agent: %w", ctx.Err())
	case client.IsClosed():
		select {
		case <-in.ended:
		case <-time.After(2 * time.Second):
		}
		return in.sessionEndedError()
	}
	return errdefs.Wrap(errdefs.ErrUnavailable, err, "calling sandbox %q failed", in.id)
}

// execError explains why a command's stream ended without its exit.
func (m *Manager) execError(ctx, ectx context.Context, in *instance, client *agent.Client, timeout time.Duration, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("running command: %w", ctx.Err())
	}
	if errors.Is(ectx.Err(), context.DeadlineExceeded) && !client.IsClosed() {
		// The agent let the command's timeout pass without a word.
		if perr := m.pingWithin(client, m.cfg.AgentTimeout); perr != nil {
			if in.isSaving() {
				// A checkpoint stops the whole sandbox while it saves
				// it, a large one for longer than the ping waits.
				return errdefs.Wrap(errdefs.ErrTimeout, perr, "the command did not finish within its timeout of %s (the sandbox was being saved meanwhile)", timeout)
			}
			reason := "its agent stopped answering (it may have been stopped from inside the sandbox)"
			m.fail(in, reason)
			return errdefs.Wrap(errdefs.ErrUnavailable, perr, "sandbox %q was ended: %s", in.id, reason)
		}
		return errdefs.Wrap(errdefs.ErrTimeout, err, "the command did not finish within its timeout of %s", timeout)
	}
	if client.IsClosed() {
		// Give the session's end a moment to be explained (a death's
		// cause, a pause, a kill) before answering.
		select {
		case <-in.ended:
		case <-time.After(2 * time.Second):
		}
		return in.sessionEndedError()
	}
	return errdefs.Wrap(errdefs.ErrUnavailable, err, "running the command in sandbox %q failed", in.id)
}

// pingWithin asks the agent for a sign of life, waiting at most d whatever
// state the transport is in.
func (m *Manager) pingWithin(client *agent.Client, d time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		_, err := client.Ping(ctx)
		errc <- err
	}()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// checkFrameSize refuses a command that, with its environment, does not fit
// in one agent frame.
func checkFrameSize(req agent.ExecRequest) error {
	n, err := agent.EncodedSize(agent.Request{Op: agent.OpExec, Exec: &req})
	if err != nil {
		return err
	}
	if n > agent.MaxFrame {
		return errdefs.Invalid("the command and its environment are %d bytes encoded; at most %d are allowed", n, agent.MaxFrame)
	}
	return nil
}

func (m *Manager) execRequest(req wire.ExecRequest) (agent.ExecRequest, time.Duration, error) {
	var argv []string
	switch {
	case req.Cmd != "" && len(req.Argv) > 0:
		return agent.ExecRequest{}, 0, errdefs.Invalid("give either cmd or argv, not both")
	case req.Cmd != "":
		argv = []string{"/bin/sh", "-c", req.Cmd}
	case len(req.Argv) > 0:
		if req.Argv[0] == "" {
			return agent.ExecRequest{}, 0, errdefs.Invalid("argv[0] is empty")
		}
		argv = req.Argv
	default:
		return agent.ExecRequest{}, 0, errdefs.Invalid("cmd or argv is required")
	}
	total := 0
	for i, a := range argv {
		if strings.ContainsRune(a, 0) {
			return agent.ExecRequest{}, 0, errdefs.Invalid("command contains a NUL byte")
		}
		if len(a) > maxArgBytes {
			what := fmt.Sprintf("argv[%d]", i)
			if req.Cmd != "" {
				what = "cmd"
			}
			return agent.ExecRequest{}, 0, errdefs.Invalid("%s is %d bytes; at most %d are allowed (write long scripts to a file, or pass them on stdin)", what, len(a), maxArgBytes)
		}
		total += len(a)
	}
	if total > maxCmdBytes {
		return agent.ExecRequest{}, 0, errdefs.Invalid("argv is %d bytes in all; at most %d are allowed", total, maxCmdBytes)
	}
	if err := checkEnv(req.Env); err != nil {
		return agent.ExecRequest{}, 0, err
	}
	if req.Cwd != "" && !strings.HasPrefix(req.Cwd, "/") {
		return agent.ExecRequest{}, 0, errdefs.Invalid("cwd must be an absolute path, got %q", truncate(req.Cwd, 256))
	}
	if strings.ContainsRune(req.Cwd, 0) || len(req.Cwd) > 4096 {
		return agent.ExecRequest{}, 0, errdefs.Invalid("cwd must be at most 4096 bytes without NUL bytes")
	}
	if err := checkUser(req.User); err != nil {
		return agent.ExecRequest{}, 0, err
	}
	timeout := m.cfg.DefaultExecTimeout
	if req.TimeoutSeconds != 0 {
		// Compare as floats first: a huge value would overflow Duration.
		ts := req.TimeoutSeconds
		if !(ts > 0 && ts <= m.cfg.MaxExecTimeout.Seconds()) {
			return agent.ExecRequest{}, 0, errdefs.Invalid("timeout_seconds must be between 0 and %d, got %g", int(m.cfg.MaxExecTimeout/time.Second), ts)
		}
		timeout = time.Duration(ts * float64(time.Second))
	}
	// A zero TimeoutMS means no timeout to the agent: never send one.
	ms := max(timeout.Milliseconds(), 1)
	return agent.ExecRequest{Argv: argv, Env: envList(req.Env), Cwd: req.Cwd, TimeoutMS: ms,
		MaxOutputBytes: int64(m.cfg.MaxOutputBytes)}, timeout, nil
}

var userName = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)

// checkUser validates the user a call asks to run as ("" for the default).
func checkUser(name string) error {
	if name != "" && !userName.MatchString(name) {
		return errdefs.Invalid("user must be a user name of the sandbox such as %q or %q, got %q", wire.UserDefault, wire.UserRoot, truncate(name, 64))
	}
	return nil
}

// user is who a call runs as in the sandbox: the one asked for, else the
// unprivileged default user — except in sandboxes made from a template
// build that predates that user (recorded without a template hash), where
// commands have always run as root. The caller holds in.mu.
func (in *instance) user(asked string) string {
	switch {
	case asked != "":
		return asked
	case in.rec.TemplateHash == "":
		return wire.UserRoot
	default:
		return wire.UserDefault
	}
}
