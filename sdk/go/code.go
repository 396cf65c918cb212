package pandastack

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"time"

	"github.com/pandastack/pandastack/wire"
)

// RunCodeOptions tunes one cell. Zero fields take the server's defaults.
type RunCodeOptions struct {
	// Context is the id of the code context to run in; empty: the default
	// Python context (id "python"), which the server starts on first use.
	Context string
	// Language picks the default context when Context is empty: "python".
	Language string
	// Timeout interrupts the cell (KeyboardInterrupt) that long after it
	// started; the context keeps its variables. The server's default is
	// 60 s.
	Timeout time.Duration
	// OnStdout, OnStderr, OnResult and OnError, when any is set, switch to
	// a streamed run: each is called as the cell produces output, a result
	// (its value, a figure, a display()) or its exception, in order, on
	// the goroutine that called RunCode. The Execution still holds all of
	// it.
	OnStdout, OnStderr func(string)
	OnResult           func(wire.CodeResult)
	OnError            func(wire.ExecutionError)
}

// RunCode runs code in a live interpreter of the sandbox: variables,
// imports and definitions persist from one call to the next within a
// context. A cell that raises is not an error: check Execution.Error.
// Errors are for failures to run it at all (an unknown or dead context, a
// sandbox that died).
func (s *Sandbox) RunCode(ctx context.Context, code string, opts RunCodeOptions) (*wire.Execution, error) {
	req := wire.RunCodeRequest{Code: code, Context: opts.Context, Language: opts.Language, TimeoutSeconds: opts.Timeout.Seconds()}
	var (
		exe *wire.Execution
		err error
	)
	if opts.OnStdout == nil && opts.OnStderr == nil && opts.OnResult == nil && opts.OnError == nil {
		exe = new(wire.Execution)
		err = s.c.do(ctx, http.MethodPost, s.path("/code"), req, exe, http.StatusOK)
	} else {
		exe, err = s.runCodeStream(ctx, req, opts)
	}
	if err != nil {
		return nil, fmt.Errorf("running code in sandbox %q: %w", s.id, err)
	}
	return exe, nil
}

// runCodeStream runs a cell with NDJSON events, passing them to the
// callbacks.
func (s *Sandbox) runCodeStream(ctx context.Context, req wire.RunCodeRequest, opts RunCodeOptions) (*wire.Execution, error) {
	hreq, err := s.c.newRequest(ctx, http.MethodPost, s.path("/code"), req)
	if err != nil {
		return nil, err
	}
	hreq.Header.Set("Accept", "application/x-ndjson")
	resp, err := s.c.send(hreq, http.StatusOK)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()

	exe := wire.Execution{Results: []wire.CodeResult{}, Logs: wire.CodeLogs{Stdout: []string{}, Stderr: []string{}}}
	emit := func(ev wire.CodeEvent) {
		switch ev.Type {
		case wire.EventStdout:
			exe.Logs.Stdout = append(exe.Logs.Stdout, ev.Data)
			if opts.OnStdout != nil {
				opts.OnStdout(ev.Data)
			}
		case wire.EventStderr:
			exe.Logs.Stderr = append(exe.Logs.Stderr, ev.Data)
			if opts.OnStderr != nil {
				opts.OnStderr(ev.Data)
			}
		case wire.CodeEventResult:
			if ev.Result != nil {
				exe.Results = append(exe.Results, *ev.Result)
				if opts.OnResult != nil {
					opts.OnResult(*ev.Result)
				}
			}
		case wire.CodeEventExecutionError:
			if ev.ExecutionError != nil {
				exe.Error = ev.ExecutionError
				if opts.OnError != nil {
					opts.OnError(*ev.ExecutionError)
				}
			}
		}
	}

	// A server (or proxy) that ignores Accept answers with the blocking
	// form; hand its parts to the callbacks in order.
	if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); mt == "application/json" {
		var res wire.Execution
		if err := json.NewDecoder(resp.Body).Decode(&res); err != nil {
			return nil, fmt.Errorf("decoding code execution: %w", err)
		}
		for _, d := range res.Logs.Stdout {
			emit(wire.CodeEvent{Type: wire.EventStdout, Data: d})
		}
		for _, d := range res.Logs.Stderr {
			emit(wire.CodeEvent{Type: wire.EventStderr, Data: d})
		}
		for i := range res.Results {
			emit(wire.CodeEvent{Type: wire.CodeEventResult, Result: &res.Results[i]})
		}
		if res.Error != nil {
			emit(wire.CodeEvent{Type: wire.CodeEventExecutionError, ExecutionError: res.Error})
		}
		return &res, nil
	}

	dec := json.NewDecoder(resp.Body)
	for {
		var ev wire.CodeEvent
		if err := dec.Decode(&ev); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, fmt.Errorf("reading code stream before its end event: %w", err)
		}
		switch ev.Type {
		case wire.CodeEventEnd:
			if ev.Execution != nil {
				results, logs, cellErr := exe.Results, exe.Logs, exe.Error
				exe = *ev.Execution
				// The end carries no results or logs by contract: they
				// were streamed.
				exe.Results, exe.Logs = results, logs
				if exe.Error == nil {
					exe.Error = cellErr
				}
			}
			return &exe, nil
		case wire.EventError:
			e := &APIError{Code: wire.CodeInternal, Message: "code stream reported an error without details"}
			if ev.Error != nil {
				e.Code, e.Message, e.RequestID = ev.Error.Code, ev.Error.Message, ev.Error.RequestID
			}
			return nil, e
		default:
			// Unknown event types are skipped: newer servers may add some.
			emit(ev)
		}
	}
}

// CodeContextOptions describes a new code context. Zero fields take the
// defaults.
type CodeContextOptions struct {
	// Language is "python" (the default).
	Language string
	// Cwd is the interpreter's working directory; the user's home when
	// empty.
	Cwd string
	// Env adds to the sandbox's environment for this context.
	Env map[string]string
	// User runs the interpreter as "user" (the default) or "root".
	User string
}

// CreateCodeContext starts a new live interpreter in the sandbox and
// returns it once it answers; pass its ID as RunCodeOptions.Context. Its
// variables are its own.
func (s *Sandbox) CreateCodeContext(ctx context.Context, opts CodeContextOptions) (wire.CodeContext, error) {
	req := wire.CreateCodeContextRequest{Language: opts.Language, Cwd: opts.Cwd, Env: opts.Env, User: opts.User}
	var c wire.CodeContext
	if err := s.c.do(ctx, http.MethodPost, s.path("/code/contexts"), req, &c, http.StatusCreated); err != nil {
		return wire.CodeContext{}, fmt.Errorf("creating a code context in sandbox %q: %w", s.id, err)
	}
	return c, nil
}

// ListCodeContexts returns the sandbox's started code contexts, oldest
// first.
func (s *Sandbox) ListCodeContexts(ctx context.Context) ([]wire.CodeContext, error) {
	var l wire.CodeContextList
	if err := s.c.do(ctx, http.MethodGet, s.path("/code/contexts"), nil, &l, http.StatusOK); err != nil {
		return nil, fmt.Errorf("listing code contexts of sandbox %q: %w", s.id, err)
	}
	return l.Contexts, nil
}

// RestartCodeContext gives the context a fresh interpreter: its variables
// are gone, a cell running in it ends. It is how a dead context (its
// interpreter died) comes back.
func (s *Sandbox) RestartCodeContext(ctx context.Context, id string) (wire.CodeContext, error) {
	var c wire.CodeContext
	if err := s.c.do(ctx, http.MethodPost, s.path("/code/contexts/"+url.PathEscape(id)+"/restart"), nil, &c, http.StatusOK); err != nil {
		return wire.CodeContext{}, fmt.Errorf("restarting code context %q of sandbox %q: %w", id, s.id, err)
	}
	return c, nil
}

// DeleteCodeContext ends the context and its interpreter.
func (s *Sandbox) DeleteCodeContext(ctx context.Context, id string) error {
	if err := s.c.do(ctx, http.MethodDelete, s.path("/code/contexts/"+url.PathEscape(id)), nil, nil, http.StatusNoContent); err != nil {
		return fmt.Errorf("deleting code context %q of sandbox %q: %w", id, s.id, err)
	}
	return nil
}
