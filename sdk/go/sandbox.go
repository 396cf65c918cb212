package pandastack

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"mime"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/pandastack/pandastack/wire"
)

// closeTimeout bounds the kill done by Close, which has no context of its own.
const closeTimeout = 30 * time.Second

// Sandbox is a handle on one sandbox on the server. It is safe for concurrent
// use; execs in one sandbox may run in parallel.
type Sandbox struct {
	c  *Client
	id string

	// mu guards info, which Refresh, SetTimeout, Pause and Resume replace.
	mu   sync.Mutex
	info wire.Sandbox
}

// ID returns the sandbox's id.
func (s *Sandbox) ID() string { return s.id }

// Info returns what the server last said about the sandbox (at Create,
// Connect, Get, Refresh, SetTimeout, Pause or Resume); it does not ask the
// server. An exec that resumed a paused sandbox does not update it.
func (s *Sandbox) Info() wire.Sandbox {
	s.mu.Lock()
	defer s.mu.Unlock()
	info := s.info
	info.Metadata = maps.Clone(info.Metadata)
	return info
}

func (s *Sandbox) setInfo(info wire.Sandbox) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.info = info
}

// path returns the API path of the sandbox, plus suffix.
func (s *Sandbox) path(suffix string) string {
	return "/sandboxes/" + url.PathEscape(s.id) + suffix
}

// Refresh fetches the sandbox's current description; Info returns it after.
func (s *Sandbox) Refresh(ctx context.Context) error {
	var info wire.Sandbox
	if err := s.c.do(ctx, http.MethodGet, s.path(""), nil, &info, http.StatusOK); err != nil {
		return fmt.Errorf("getting sandbox %q: %w", s.id, err)
	}
	s.setInfo(info)
	return nil
}

// SetTimeout makes the sandbox expire ttl (rounded up to whole seconds)
// from now, whether that is sooner or later than before.
func (s *Sandbox) SetTimeout(ctx context.Context, ttl time.Duration) error {
	req := wire.SetTimeoutRequest{TTLSeconds: ceilSeconds(ttl)}
	var info wire.Sandbox
	if err := s.c.do(ctx, http.MethodPost, s.path("/timeout"), req, &info, http.StatusOK); err != nil {
		return fmt.Errorf("setting timeout of sandbox %q: %w", s.id, err)
	}
	s.setInfo(info)
	return nil
}

// Pause saves the sandbox's memory and processes to disk and stops them,
// freeing their memory; its TTL stops counting. Pausing a paused sandbox
// does nothing. Info reports state "paused" after.
func (s *Sandbox) Pause(ctx context.Context) error {
	var info wire.Sandbox
	if err := s.c.do(ctx, http.MethodPost, s.path("/pause"), nil, &info, http.StatusOK); err != nil {
		return fmt.Errorf("pausing sandbox %q: %w", s.id, err)
	}
	s.setInfo(info)
	return nil
}

// Resume restores a paused sandbox where it stopped and restarts its TTL
// (its TTL setting from now). Resuming a running sandbox does nothing; an
// exec in a paused sandbox resumes it too.
func (s *Sandbox) Resume(ctx context.Context) error {
	var info wire.Sandbox
	if err := s.c.do(ctx, http.MethodPost, s.path("/resume"), nil, &info, http.StatusOK); err != nil {
		return fmt.Errorf("resuming sandbox %q: %w", s.id, err)
	}
	s.setInfo(info)
	return nil
}

// Snapshot saves the sandbox's memory and writable filesystem as a new
// snapshot, which Create (CreateOptions.SnapshotID) can start sandboxes
// from. The sandbox keeps running. The snapshot lives until DeleteSnapshot.
func (s *Sandbox) Snapshot(ctx context.Context) (wire.Snapshot, error) {
	var snap wire.Snapshot
	if err := s.c.do(ctx, http.MethodPost, s.path("/snapshot"), nil, &snap, http.StatusCreated); err != nil {
		return wire.Snapshot{}, fmt.Errorf("snapshotting sandbox %q: %w", s.id, err)
	}
	return snap, nil
}

// ForkOptions describes the forks of one Fork call. Zero fields take the
// server's defaults.
type ForkOptions struct {
	// Count is how many forks to make, 1 to 16; 1 when zero.
	Count int
	// TTL is each fork's lifetime, rounded up to whole seconds; the parent's
	// TTL setting when zero.
	TTL time.Duration
}

// Fork makes copies of the running sandbox: each has the parent's memory
// and files as they are now, but its own id, TTL, writable layer and fresh
// randomness. The parent keeps running. The caller owns the forks.
func (s *Sandbox) Fork(ctx context.Context, opts ForkOptions) ([]*Sandbox, error) {
	req := wire.ForkRequest{Count: opts.Count, TTLSeconds: ceilSeconds(opts.TTL)}
	var resp wire.ForkResponse
	if err := s.c.do(ctx, http.MethodPost, s.path("/fork"), req, &resp, http.StatusCreated); err != nil {
		return nil, fmt.Errorf("forking sandbox %q: %w", s.id, err)
	}
	forks := make([]*Sandbox, len(resp.Sandboxes))
	for i, info := range resp.Sandboxes {
		forks[i] = &Sandbox{c: s.c, id: info.ID, info: info}
	}
	return forks, nil
}

// Kill destroys the sandbox. Killing it again fails with ErrNotFound.
func (s *Sandbox) Kill(ctx context.Context) error {
	if err := s.c.do(ctx, http.MethodDelete, s.path(""), nil, nil, http.StatusNoContent); err != nil {
		return fmt.Errorf("killing sandbox %q: %w", s.id, err)
	}
	return nil
}

// Close kills the sandbox, treating one that is already gone as success, so
// that it can be deferred right after Create.
func (s *Sandbox) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
	defer cancel()
	if err := s.Kill(ctx); err != nil && !errors.Is(err, ErrNotFound) {
		return err
	}
	return nil
}

// ExecOptions tunes one command. Zero fields take the server's defaults.
type ExecOptions struct {
	// Timeout is how long the command may run before the server kills it
	// (result TimedOut, exit code 124). The server's default is 60 s.
	Timeout time.Duration
	// Env adds to the sandbox's environment for this command.
	Env map[string]string
	// Cwd is the working directory.
	Cwd string
	// Stdin is given to the process as its standard input.
	Stdin string
	// User runs the command as that user of the sandbox: "user" (the
	// default, unprivileged; also the default cwd, its home /home/user) or
	// "root".
	User string
	// OnStdout and OnStderr, when either is set, switch to streamed output:
	// they are called with each chunk as it arrives, in order, on the
	// goroutine that called Exec. The result still holds the whole output.
	OnStdout, OnStderr func(string)
}

// Exec runs cmd with /bin/sh -c and returns its result once it exits. A
// command that fails is not an error: check ExitCode. Errors are for failures
// to run it at all, or a sandbox that died while it ran.
func (s *Sandbox) Exec(ctx context.Context, cmd string, opts ExecOptions) (*wire.ExecResult, error) {
	return s.exec(ctx, wire.ExecRequest{Cmd: cmd}, opts)
}

// ExecArgv runs argv directly, without a shell; see Exec.
func (s *Sandbox) ExecArgv(ctx context.Context, argv []string, opts ExecOptions) (*wire.ExecResult, error) {
	return s.exec(ctx, wire.ExecRequest{Argv: argv}, opts)
}

func (s *Sandbox) exec(ctx context.Context, req wire.ExecRequest, opts ExecOptions) (*wire.ExecResult, error) {
	req.Env, req.Cwd, req.Stdin, req.User = opts.Env, opts.Cwd, opts.Stdin, opts.User
	req.TimeoutSeconds = opts.Timeout.Seconds()
	var (
		res *wire.ExecResult
		err error
	)
	if opts.OnStdout == nil && opts.OnStderr == nil {
		res = new(wire.ExecResult)
		err = s.c.do(ctx, http.MethodPost, s.path("/exec"), req, res, http.StatusOK)
	} else {
		res, err = s.execStream(ctx, req, opts)
	}
	if err != nil {
		return nil, fmt.Errorf("running command in sandbox %q: %w", s.id, err)
	}
	return res, nil
}

// execStream runs req with NDJSON output, passing chunks to the callbacks.
func (s *Sandbox) execStream(ctx context.Context, req wire.ExecRequest, opts ExecOptions) (*wire.ExecResult, error) {
	hreq, err := s.c.newRequest(ctx, http.MethodPost, s.path("/exec"), req)
	if err != nil {
		return nil, err
	}
	hreq.Header.Set("Accept", "application/x-ndjson")
	resp, err := s.c.send(hreq, http.StatusOK)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()

	var stdout, stderr strings.Builder
	emit := func(typ, data string) {
		switch typ {
		case wire.EventStdout:
			stdout.WriteString(data)
			if opts.OnStdout != nil {
				opts.OnStdout(data)
			}
		case wire.EventStderr:
			stderr.WriteString(data)
			if opts.OnStderr != nil {
				opts.OnStderr(data)
			}
		}
	}

	// A server (or proxy) that ignores Accept answers with the blocking
	// form; hand its output to the callbacks in one piece each.
	if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); mt == "application/json" {
		var res wire.ExecResult
		if err := json.NewDecoder(resp.Body).Decode(&res); err != nil {
			return nil, fmt.Errorf("decoding exec result: %w", err)
		}
		if res.Stdout != "" && opts.OnStdout != nil {
			opts.OnStdout(res.Stdout)
		}
		if res.Stderr != "" && opts.OnStderr != nil {
			opts.OnStderr(res.Stderr)
		}
		return &res, nil
	}

	// json.Decoder reads NDJSON as a stream of values and, unlike a line
	// scanner, has no limit on the length of one line.
	dec := json.NewDecoder(resp.Body)
	for {
		var ev wire.ExecEvent
		if err := dec.Decode(&ev); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, fmt.Errorf("reading exec stream before the exit event: %w", err)
		}
		switch ev.Type {
		case wire.EventStdout, wire.EventStderr:
			emit(ev.Type, ev.Data)
		case wire.EventExit:
			res := wire.ExecResult{}
			if ev.Result != nil {
				res = *ev.Result
			}
			// The exit event carries no output by contract: it was streamed.
			res.Stdout, res.Stderr = stdout.String(), stderr.String()
			return &res, nil
		case wire.EventError:
			e := &APIError{Code: wire.CodeInternal, Message: "exec stream reported an error without details"}
			if ev.Error != nil {
				e.Code, e.Message, e.RequestID = ev.Error.Code, ev.Error.Message, ev.Error.RequestID
			}
			return nil, e
		}
		// Unknown event types are skipped: newer servers may add some.
	}
}
