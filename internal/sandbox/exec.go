package sandbox

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/pandastack/pandastack/internal/agent"
	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/wire"
)

// Output receives a command's output as it is produced; stream is
// wire.EventStdout or wire.EventStderr. An error stops the command.
type Output func(stream string, data []byte) error

// Exec runs one command in the tenant's sandbox. The result's Stdout and
// Stderr are left empty: output goes to out.
func (m *Manager) Exec(ctx context.Context, tenant, id string, req wire.ExecRequest, out Output) (wire.ExecResult, error) {
	areq, err := m.execRequest(req)
	if err != nil {
		return wire.ExecResult{}, err
	}
	in, err := m.lookup(tenant, id)
	if err != nil {
		return wire.ExecResult{}, err
	}
	in.mu.Lock()
	if err := m.ensureRunning(ctx, in); err != nil {
		in.mu.Unlock()
		return wire.ExecResult{}, err
	}
	client := in.client
	// The sandbox's own env applies to every command, also after a restore
	// whose agent started with another sandbox's environment.
	areq.Env = envList(mergeMaps(in.rec.Env, req.Env))
	in.mu.Unlock()
	eio := agent.ExecIO{
		Stdout: func(b []byte) error { return out(wire.EventStdout, b) },
		Stderr: func(b []byte) error { return out(wire.EventStderr, b) },
	}
	if req.Stdin != "" {
		eio.Stdin = strings.NewReader(req.Stdin)
	}
	start := time.Now()
	ex, err := client.Exec(ctx, areq, eio)
	dur := time.Since(start)
	if err != nil {
		if ctx.Err() != nil {
			return wire.ExecResult{}, fmt.Errorf("running command: %w", err)
		}
		in.mu.Lock()
		ending := in.ending
		in.mu.Unlock()
		if ending || errors.Is(err, agent.ErrSessionClosed) {
			return wire.ExecResult{}, errdefs.Conflict("sandbox %q stopped while the command ran", id)
		}
		return wire.ExecResult{}, errdefs.Unavailable("running command in %s: %v", id, err)
	}
	return wire.ExecResult{
		ExitCode:   ex.ExitCode,
		TimedOut:   ex.TimedOut,
		Truncated:  ex.Truncated,
		DurationMS: float64(dur.Microseconds()) / 1000,
	}, nil
}

func (m *Manager) execRequest(req wire.ExecRequest) (agent.ExecRequest, error) {
	var argv []string
	switch {
	case req.Cmd != "" && len(req.Argv) > 0:
		return agent.ExecRequest{}, errdefs.Invalid("give either cmd or argv, not both")
	case req.Cmd != "":
		argv = []string{"/bin/sh", "-c", req.Cmd}
	case len(req.Argv) > 0:
		if req.Argv[0] == "" {
			return agent.ExecRequest{}, errdefs.Invalid("argv[0] is empty")
		}
		argv = req.Argv
	default:
		return agent.ExecRequest{}, errdefs.Invalid("cmd or argv is required")
	}
	for _, a := range argv {
		if strings.ContainsRune(a, 0) {
			return agent.ExecRequest{}, errdefs.Invalid("command contains a NUL byte")
		}
	}
	if err := checkEnv(req.Env); err != nil {
		return agent.ExecRequest{}, err
	}
	if req.Cwd != "" && !strings.HasPrefix(req.Cwd, "/") {
		return agent.ExecRequest{}, errdefs.Invalid("cwd must be an absolute path, got %q", req.Cwd)
	}
	timeout := m.cfg.DefaultExecTimeout
	if req.TimeoutSeconds != 0 {
		// Compare as floats first: a huge value would overflow Duration.
		ts := req.TimeoutSeconds
		if !(ts > 0 && ts <= m.cfg.MaxExecTimeout.Seconds()) {
			return agent.ExecRequest{}, errdefs.Invalid("timeout_seconds must be between 0 and %d, got %g", int(m.cfg.MaxExecTimeout/time.Second), ts)
		}
		timeout = time.Duration(ts * float64(time.Second))
	}
	// A zero TimeoutMS means no timeout to the agent: never send one.
	ms := max(timeout.Milliseconds(), 1)
	return agent.ExecRequest{Argv: argv, Env: envList(req.Env), Cwd: req.Cwd, TimeoutMS: ms,
		MaxOutputBytes: int64(m.cfg.MaxOutputBytes)}, nil
}
