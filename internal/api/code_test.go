package api

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/sandbox"
	"github.com/pandastack/pandastack/wire"
)

// The fake's code methods: a cell prints its code to stdout and "e" to
// stderr, returns a result with text, HTML and a PNG, and raises when its
// code is "raise". Its one context is the default one, "python".

func (f *fakeSandboxes) RunCode(_ context.Context, tenant, id string, req wire.RunCodeRequest, out sandbox.CodeOutput) (wire.Execution, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return wire.Execution{}, err
	}
	if req.Code == "" {
		return wire.Execution{}, errdefs.Invalid("code is required")
	}
	if req.Context != "" && req.Context != wire.LanguagePython {
		return wire.Execution{}, errdefs.NotFound("code context %q not found", req.Context)
	}
	exe := wire.Execution{Context: wire.LanguagePython, ExecutionCount: 1}
	events := []wire.CodeEvent{
		{Type: wire.EventStdout, Data: req.Code},
		{Type: wire.EventStderr, Data: "e"},
		{Type: wire.CodeEventResult, Result: &wire.CodeResult{Text: "2", HTML: "<b>2</b>", PNG: "iVBORw0KGgo=", IsMainResult: true}},
	}
	if req.Code == "raise" {
		exe.Error = &wire.ExecutionError{Name: "ValueError", Value: "no", Traceback: "ValueError: no"}
		events = append(events, wire.CodeEvent{Type: wire.CodeEventExecutionError, ExecutionError: exe.Error})
	}
	for _, ev := range events {
		if err := out(ev); err != nil {
			return wire.Execution{}, err
		}
	}
	return exe, nil
}

func (f *fakeSandboxes) CreateCodeContext(_ context.Context, tenant, id string, req wire.CreateCodeContextRequest) (wire.CodeContext, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return wire.CodeContext{}, err
	}
	return wire.CodeContext{ID: "ctx-1", Language: wire.LanguagePython, Cwd: req.Cwd, User: "user", State: wire.CodeStateIdle}, nil
}

func (f *fakeSandboxes) ListCodeContexts(_ context.Context, tenant, id string) ([]wire.CodeContext, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return nil, err
	}
	return []wire.CodeContext{{ID: wire.LanguagePython, Language: wire.LanguagePython, Cwd: "/home/user", User: "user", State: wire.CodeStateIdle}}, nil
}

func (f *fakeSandboxes) RestartCodeContext(_ context.Context, tenant, id, contextID string) (wire.CodeContext, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return wire.CodeContext{}, err
	}
	if contextID != wire.LanguagePython {
		return wire.CodeContext{}, errdefs.NotFound("code context %q not found", contextID)
	}
	return wire.CodeContext{ID: contextID, Language: wire.LanguagePython, State: wire.CodeStateIdle}, nil
}

func (f *fakeSandboxes) DeleteCodeContext(_ context.Context, tenant, id, contextID string) error {
	if _, err := f.sandbox(tenant, id); err != nil {
		return err
	}
	if contextID != wire.LanguagePython {
		return errdefs.NotFound("code context %q not found", contextID)
	}
	return nil
}

func doCode(t *testing.T, s *Server, method, path, body, accept string) *httptest.ResponseRecorder {
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

func TestRunCodeBlocking(t *testing.T) {
	s := newTestServer()
	tests := []struct {
		name      string
		body      string
		wantError string
	}{
		{"value", `{"code":"1+1"}`, ""},
		{"exception", `{"code":"raise"}`, "ValueError"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := doCode(t, s, "POST", "/v1/sandboxes/"+knownID+"/code", tt.body, "")
			if w.Code != http.StatusOK {
				t.Fatalf("status: got %d, want 200 (%s)", w.Code, w.Body)
			}
			var exe wire.Execution
			if err := json.Unmarshal(w.Body.Bytes(), &exe); err != nil {
				t.Fatal(err)
			}
			if len(exe.Results) != 1 || exe.Results[0].Text != "2" || !exe.Results[0].IsMainResult || exe.Results[0].PNG == "" {
				t.Errorf("results: got %+v, want one main result with text 2 and a PNG", exe.Results)
			}
			if len(exe.Logs.Stdout) != 1 || len(exe.Logs.Stderr) != 1 || exe.Logs.Stderr[0] != "e" {
				t.Errorf("logs: got %+v, want one chunk each", exe.Logs)
			}
			gotErr := ""
			if exe.Error != nil {
				gotErr = exe.Error.Name
			}
			if gotErr != tt.wantError {
				t.Errorf("error: got %q, want %q", gotErr, tt.wantError)
			}
		})
	}
}

func TestRunCodeStreamed(t *testing.T) {
	s := newTestServer()
	for _, accept := range []string{"application/x-ndjson", "text/event-stream"} {
		t.Run(accept, func(t *testing.T) {
			w := doCode(t, s, "POST", "/v1/sandboxes/"+knownID+"/code", `{"code":"raise"}`, accept)
			if w.Code != http.StatusOK {
				t.Fatalf("status: got %d, want 200 (%s)", w.Code, w.Body)
			}
			if ct := w.Header().Get("Content-Type"); ct != accept {
				t.Errorf("Content-Type: got %q, want %q", ct, accept)
			}
			var types []string
			sc := bufio.NewScanner(w.Body)
			for sc.Scan() {
				line := sc.Text()
				if accept == "text/event-stream" {
					var ok bool
					if line, ok = strings.CutPrefix(line, "data: "); !ok {
						continue
					}
				}
				var ev wire.CodeEvent
				if err := json.Unmarshal([]byte(line), &ev); err != nil {
					t.Fatalf("line %q: %v", line, err)
				}
				types = append(types, ev.Type)
				if ev.Type == wire.CodeEventEnd && (ev.Execution == nil || ev.Execution.Error == nil || len(ev.Execution.Results) != 0) {
					t.Errorf("end event: got %+v, want the execution with its error and no results", ev.Execution)
				}
			}
			want := "stdout,stderr,result,execution_error,end"
			if got := strings.Join(types, ","); got != want {
				t.Errorf("events: got %s, want %s", got, want)
			}
		})
	}
}

func TestCodeRoutes(t *testing.T) {
	s := newTestServer()
	base := "/v1/sandboxes/" + knownID + "/code"
	tests := []struct {
		method, path, body string
		wantStatus         int
	}{
		{"POST", base, `{}`, http.StatusBadRequest},
		{"POST", base, `{"code":"1","nope":1}`, http.StatusBadRequest},
		{"POST", base, `{"code":"1","context":"ctx-9"}`, http.StatusNotFound},
		{"POST", "/v1/sandboxes/sb-unknown/code", `{"code":"1"}`, http.StatusNotFound},
		{"POST", base + "/contexts", ``, http.StatusCreated},
		{"POST", base + "/contexts", `{"cwd":"/tmp","env":{"A":"1"},"user":"root","language":"python"}`, http.StatusCreated},
		{"GET", base + "/contexts", ``, http.StatusOK},
		{"POST", base + "/contexts/python/restart", ``, http.StatusOK},
		{"POST", base + "/contexts/ctx-9/restart", ``, http.StatusNotFound},
		{"DELETE", base + "/contexts/python", ``, http.StatusNoContent},
		{"DELETE", base + "/contexts/ctx-9", ``, http.StatusNotFound},
		{"GET", "/v1/sandboxes/sb-unknown/code/contexts", ``, http.StatusNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+tt.path+" "+tt.body, func(t *testing.T) {
			w := doCode(t, s, tt.method, tt.path, tt.body, "")
			if w.Code != tt.wantStatus {
				t.Fatalf("status: got %d, want %d (%s)", w.Code, tt.wantStatus, w.Body)
			}
			if w.Code >= 400 {
				checkErrorBody(t, w.Code, w.Body.Bytes())
			}
		})
	}
}
