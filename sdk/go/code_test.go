package pandastack

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/pandastack/pandastack/wire"
)

// codeServer answers the code routes of one sandbox, "sb-1", as docs/API.md
// describes them; it records the last request.
type codeServer struct {
	lastMethod, lastPath, lastAccept string
	lastBody                         []byte
	// events is what a streamed run sends.
	events []wire.CodeEvent
}

func (c *codeServer) handler(t *testing.T) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.lastMethod, c.lastPath, c.lastAccept = r.Method, r.URL.EscapedPath(), r.Header.Get("Accept")
		c.lastBody, _ = io.ReadAll(r.Body)
		switch {
		case r.Method == "POST" && r.URL.Path == "/v1/sandboxes/sb-1/code":
			if r.Header.Get("Accept") == "application/x-ndjson" {
				w.Header().Set("Content-Type", "application/x-ndjson")
				for _, ev := range c.events {
					b, _ := json.Marshal(ev)
					fmt.Fprintf(w, "%s\n", b)
				}
				return
			}
			writeJSON(w, http.StatusOK, wire.Execution{
				Results: []wire.CodeResult{{Text: "2", IsMainResult: true}, {PNG: "iVBO", Text: "<Figure>"}},
				Logs:    wire.CodeLogs{Stdout: []string{"hi\n"}, Stderr: []string{}}, ExecutionCount: 3, Context: "python",
			})
		case r.Method == "POST" && r.URL.Path == "/v1/sandboxes/sb-1/code/contexts":
			writeJSON(w, http.StatusCreated, wire.CodeContext{ID: "ctx-1", Language: "python", Cwd: "/tmp", User: "user", State: "idle"})
		case r.Method == "GET" && r.URL.Path == "/v1/sandboxes/sb-1/code/contexts":
			writeJSON(w, http.StatusOK, wire.CodeContextList{Contexts: []wire.CodeContext{{ID: "python", State: "idle"}}})
		case r.Method == "POST" && r.URL.Path == "/v1/sandboxes/sb-1/code/contexts/ctx 1/restart":
			writeJSON(w, http.StatusOK, wire.CodeContext{ID: "ctx 1", State: "idle"})
		case r.Method == "DELETE" && r.URL.Path == "/v1/sandboxes/sb-1/code/contexts/gone":
			writeError(w, http.StatusNotFound, wire.CodeNotFound, `code context "gone" not found`)
		case r.Method == "DELETE":
			w.WriteHeader(http.StatusNoContent)
		default:
			writeError(w, http.StatusNotFound, wire.CodeNotFound, "no route")
		}
	})
}

func newCodeSandbox(t *testing.T) (*codeServer, *Sandbox) {
	t.Helper()
	cs := &codeServer{}
	srv := httptest.NewServer(cs.handler(t))
	t.Cleanup(srv.Close)
	c, err := NewClient(WithURL(srv.URL), WithAPIKey("k"))
	if err != nil {
		t.Fatal(err)
	}
	return cs, &Sandbox{c: c, id: "sb-1"}
}

func TestRunCodeBlocking(t *testing.T) {
	cs, sb := newCodeSandbox(t)
	exe, err := sb.RunCode(context.Background(), "1+1", RunCodeOptions{Context: "python", Timeout: 1500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	var req wire.RunCodeRequest
	if err := json.Unmarshal(cs.lastBody, &req); err != nil {
		t.Fatal(err)
	}
	if want := (wire.RunCodeRequest{Code: "1+1", Context: "python", TimeoutSeconds: 1.5}); req != want {
		t.Errorf("request: got %+v, want %+v", req, want)
	}
	if cs.lastAccept != "application/json" {
		t.Errorf("Accept: got %q, want application/json", cs.lastAccept)
	}
	if got := exe.Text(); got != "2" {
		t.Errorf("Text(): got %q, want %q", got, "2")
	}
	if got := exe.Results[1].Formats(); !reflect.DeepEqual(got, []string{"text", "png"}) {
		t.Errorf("Formats(): got %v, want [text png]", got)
	}
	if exe.ExecutionCount != 3 || len(exe.Logs.Stdout) != 1 {
		t.Errorf("execution: got %+v", exe)
	}
}

func TestRunCodeStreamed(t *testing.T) {
	cs, sb := newCodeSandbox(t)
	cellErr := &wire.ExecutionError{Name: "ValueError", Value: "bad", Traceback: "ValueError: bad"}
	cs.events = []wire.CodeEvent{
		{Type: wire.EventStdout, Data: "a"},
		{Type: wire.EventStderr, Data: "b"},
		{Type: wire.CodeEventResult, Result: &wire.CodeResult{HTML: "<p>", IsMainResult: false}},
		{Type: "future-event"},
		{Type: wire.CodeEventExecutionError, ExecutionError: cellErr},
		{Type: wire.CodeEventEnd, Execution: &wire.Execution{ExecutionCount: 4, Context: "python", Error: cellErr, DurationMS: 3}},
	}
	var got []string
	exe, err := sb.RunCode(context.Background(), "x", RunCodeOptions{
		OnStdout: func(s string) { got = append(got, "stdout:"+s) },
		OnStderr: func(s string) { got = append(got, "stderr:"+s) },
		OnResult: func(r wire.CodeResult) { got = append(got, "result:"+r.HTML) },
		OnError:  func(e wire.ExecutionError) { got = append(got, "error:"+e.Name) },
	})
	if err != nil {
		t.Fatal(err)
	}
	if cs.lastAccept != "application/x-ndjson" {
		t.Errorf("Accept: got %q, want application/x-ndjson", cs.lastAccept)
	}
	if want := []string{"stdout:a", "stderr:b", "result:<p>", "error:ValueError"}; !reflect.DeepEqual(got, want) {
		t.Errorf("callbacks: got %v, want %v", got, want)
	}
	if exe.ExecutionCount != 4 || exe.Error == nil || len(exe.Results) != 1 || exe.Logs.Stdout[0] != "a" {
		t.Errorf("execution: got %+v", exe)
	}

	// A stream that fails mid-way is an error of its code.
	cs.events = []wire.CodeEvent{{Type: wire.EventStdout, Data: "a"},
		{Type: wire.EventError, Error: &wire.Error{Code: wire.CodeConflict, Message: "it died"}}}
	_, err = sb.RunCode(context.Background(), "x", RunCodeOptions{OnStdout: func(string) {}})
	if !errors.Is(err, ErrConflict) {
		t.Errorf("error event: got %v, want ErrConflict", err)
	}
	// A stream cut before its end is an error too.
	cs.events = cs.events[:1]
	if _, err = sb.RunCode(context.Background(), "x", RunCodeOptions{OnStdout: func(string) {}}); err == nil || !strings.Contains(err.Error(), "end event") {
		t.Errorf("cut stream: got %v, want an error about the missing end event", err)
	}
}

func TestCodeContexts(t *testing.T) {
	cs, sb := newCodeSandbox(t)
	ctx := context.Background()
	c, err := sb.CreateCodeContext(ctx, CodeContextOptions{Cwd: "/tmp", Env: map[string]string{"A": "1"}})
	if err != nil || c.ID != "ctx-1" {
		t.Fatalf("create: got %+v, %v", c, err)
	}
	if want := `{"cwd":"/tmp","env":{"A":"1"}}`; string(cs.lastBody) != want {
		t.Errorf("create body: got %s, want %s", cs.lastBody, want)
	}
	l, err := sb.ListCodeContexts(ctx)
	if err != nil || len(l) != 1 || l[0].ID != "python" {
		t.Fatalf("list: got %+v, %v", l, err)
	}
	if _, err := sb.RestartCodeContext(ctx, "ctx 1"); err != nil {
		t.Fatalf("restart: %v", err)
	}
	if want := "/v1/sandboxes/sb-1/code/contexts/ctx%201/restart"; cs.lastPath != want {
		t.Errorf("restart path: got %q, want %q", cs.lastPath, want)
	}
	if err := sb.DeleteCodeContext(ctx, "ctx-1"); err != nil {
		t.Fatalf("delete: %v", err)
	}
	if err := sb.DeleteCodeContext(ctx, "gone"); !errors.Is(err, ErrNotFound) {
		t.Errorf("delete of an unknown context: got %v, want ErrNotFound", err)
	}
}
