package api

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sync"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/sandbox"
	"github.com/pandastack/pandastack/wire"
)

// CodeSandboxes is what the code routes need of the sandbox manager: cells
// in live interpreters (code contexts) and the contexts themselves.
type CodeSandboxes interface {
	RunCode(ctx context.Context, tenant, id string, req wire.RunCodeRequest, out sandbox.CodeOutput) (wire.Execution, error)
	CreateCodeContext(ctx context.Context, tenant, id string, req wire.CreateCodeContextRequest) (wire.CodeContext, error)
	ListCodeContexts(ctx context.Context, tenant, id string) ([]wire.CodeContext, error)
	RestartCodeContext(ctx context.Context, tenant, id, contextID string) (wire.CodeContext, error)
	DeleteCodeContext(ctx context.Context, tenant, id, contextID string) error
}

// codeRoutes registers the code routes.
func (s *Server) codeRoutes() {
	s.route("POST /v1/sandboxes/{id}/code", true, s.runCode)
	s.route("POST /v1/sandboxes/{id}/code/contexts", true, s.createCodeContext)
	s.route("GET /v1/sandboxes/{id}/code/contexts", true, s.listCodeContexts)
	s.route("POST /v1/sandboxes/{id}/code/contexts/{context}/restart", true, s.restartCodeContext)
	s.route("DELETE /v1/sandboxes/{id}/code/contexts/{context}", true, s.deleteCodeContext)
}

// runCode runs a cell: a blocking JSON Execution, or its events streamed as
// NDJSON or SSE, as for exec. Cells count against the server's cap of
// commands running at once.
func (s *Server) runCode(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req wire.RunCodeRequest
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	if n := s.execs.Add(1); n > int64(s.cfg.MaxConcurrentExecs) {
		s.execs.Add(-1)
		return errdefs.Quota("this server runs at most %d commands and cells at once; try again when some have finished", s.cfg.MaxConcurrentExecs)
	}
	defer s.execs.Add(-1)
	id := r.PathValue("id")
	if mode := negotiate(r); mode != modeBlocking {
		return s.runCodeStream(w, r, tenant, id, req, mode)
	}
	return s.runCodeBlocking(w, r, tenant, id, req)
}

// runCodeBlocking answers with the whole Execution. What it holds until it
// answers counts against the server's budget of buffered output, as a
// blocking exec's does; past it, output is dropped and truncated set.
func (s *Server) runCodeBlocking(w http.ResponseWriter, r *http.Request, tenant, id string, req wire.RunCodeRequest) error {
	var (
		mu        sync.Mutex
		held      int64
		truncated bool
		results   = []wire.CodeResult{}
		logs      = wire.CodeLogs{Stdout: []string{}, Stderr: []string{}}
	)
	defer func() { s.output.release(held) }()
	hold := func(n int) bool {
		got := s.output.reserve(int64(n))
		held += got
		if got < int64(n) {
			truncated = true
			return false
		}
		return true
	}
	exe, err := s.cfg.Sandboxes.RunCode(r.Context(), tenant, id, req, func(ev wire.CodeEvent) error {
		mu.Lock()
		defer mu.Unlock()
		switch ev.Type {
		case wire.EventStdout:
			if hold(len(ev.Data)) {
				logs.Stdout = append(logs.Stdout, ev.Data)
			}
		case wire.EventStderr:
			if hold(len(ev.Data)) {
				logs.Stderr = append(logs.Stderr, ev.Data)
			}
		case wire.CodeEventResult:
			if ev.Result != nil && hold(resultSize(ev.Result)) {
				results = append(results, *ev.Result)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	exe.Results, exe.Logs = results, logs
	exe.Truncated = exe.Truncated || truncated
	writeJSON(w, http.StatusOK, exe)
	return nil
}

// resultSize is about what a result holds in memory.
func resultSize(r *wire.CodeResult) int {
	n := len(r.Text) + len(r.HTML) + len(r.Markdown) + len(r.SVG) + len(r.PNG) + len(r.JPEG) +
		len(r.PDF) + len(r.LaTeX) + len(r.JavaScript) + len(r.JSON)
	for _, v := range r.Extra {
		n += len(v)
	}
	return n
}

func (s *Server) runCodeStream(w http.ResponseWriter, r *http.Request, tenant, id string, req wire.RunCodeRequest, mode execMode) error {
	ew := &eventWriter{w: w, rc: http.NewResponseController(w), mode: mode}
	exe, err := s.cfg.Sandboxes.RunCode(r.Context(), tenant, id, req, func(ev wire.CodeEvent) error {
		return ew.sendValue(ev.Type, ev)
	})
	if err != nil {
		if !ew.started {
			return err
		}
		// The answer has started with 200: the error goes in an event,
		// classified and logged like any other.
		_, e := s.describe(r, tenant, err)
		_ = ew.sendValue(wire.EventError, wire.CodeEvent{Type: wire.EventError, Error: &e})
		return nil
	}
	exe.Results, exe.Logs = []wire.CodeResult{}, wire.CodeLogs{Stdout: []string{}, Stderr: []string{}}
	return ew.sendValue(wire.CodeEventEnd, wire.CodeEvent{Type: wire.CodeEventEnd, Execution: &exe})
}

// sendValue writes one event of any type: an NDJSON line, or an SSE event
// named typ.
func (e *eventWriter) sendValue(typ string, v any) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.started {
		e.started = true
		ct := "application/x-ndjson"
		if e.mode == modeSSE {
			ct = "text/event-stream"
		}
		e.w.Header().Set("Content-Type", ct)
		e.w.Header().Set("Cache-Control", "no-cache")
		e.w.Header().Set("X-Accel-Buffering", "no")
		e.w.WriteHeader(http.StatusOK)
	}
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if e.mode == modeSSE {
		_, err = fmt.Fprintf(e.w, "event: %s\ndata: %s\n\n", typ, b)
	} else {
		_, err = fmt.Fprintf(e.w, "%s\n", b)
	}
	if err != nil {
		return fmt.Errorf("writing event: %w", err)
	}
	return e.rc.Flush()
}

func (s *Server) createCodeContext(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req wire.CreateCodeContextRequest
	if err := s.decodeOptional(w, r, &req); err != nil {
		return err
	}
	c, err := s.cfg.Sandboxes.CreateCodeContext(r.Context(), tenant, r.PathValue("id"), req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, c)
	return nil
}

func (s *Server) listCodeContexts(w http.ResponseWriter, r *http.Request, tenant string) error {
	l, err := s.cfg.Sandboxes.ListCodeContexts(r.Context(), tenant, r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, wire.CodeContextList{Contexts: l})
	return nil
}

func (s *Server) restartCodeContext(w http.ResponseWriter, r *http.Request, tenant string) error {
	c, err := s.cfg.Sandboxes.RestartCodeContext(r.Context(), tenant, r.PathValue("id"), r.PathValue("context"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, c)
	return nil
}

func (s *Server) deleteCodeContext(w http.ResponseWriter, r *http.Request, tenant string) error {
	if err := s.cfg.Sandboxes.DeleteCodeContext(r.Context(), tenant, r.PathValue("id"), r.PathValue("context")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
