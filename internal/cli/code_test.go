package cli

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pandastack/pandastack/wire"
)

// codeAPI answers the two calls run-code makes for sandbox sb-1: the
// connect, and the cell with the events in events.
func codeAPI(t *testing.T, events []wire.CodeEvent, gotCode *string) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == "GET" && r.URL.Path == "/v1/sandboxes/sb-1":
			reply(w, http.StatusOK, wire.Sandbox{ID: "sb-1", Template: "code-interpreter", State: wire.StateRunning})
		case r.Method == "POST" && r.URL.Path == "/v1/sandboxes/sb-1/code":
			var req wire.RunCodeRequest
			b, _ := io.ReadAll(r.Body)
			_ = json.Unmarshal(b, &req)
			*gotCode = req.Code
			w.Header().Set("Content-Type", "application/x-ndjson")
			for _, ev := range events {
				b, _ := json.Marshal(ev)
				fmt.Fprintf(w, "%s\n", b)
			}
		default:
			replyError(w, http.StatusNotFound, wire.CodeNotFound, "no route")
		}
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

func TestRunCode(t *testing.T) {
	png := base64.StdEncoding.EncodeToString([]byte("\x89PNG fake"))
	cellErr := &wire.ExecutionError{Name: "ValueError", Value: "bad", Traceback: "Traceback\nValueError: bad"}
	tests := []struct {
		name       string
		events     []wire.CodeEvent
		wantOut    string
		wantErrOut string
		wantCode   int // 0: no error
		wantFiles  []string
	}{
		{
			name: "output, a figure and a value",
			events: []wire.CodeEvent{
				{Type: wire.EventStdout, Data: "plotting\n"},
				{Type: wire.CodeEventResult, Result: &wire.CodeResult{Text: "<Figure>", PNG: png}},
				{Type: wire.CodeEventResult, Result: &wire.CodeResult{Text: "42", IsMainResult: true}},
				{Type: wire.CodeEventEnd, Execution: &wire.Execution{ExecutionCount: 1}},
			},
			wantOut:   "plotting\n[OUT/result-1.png]\n42\n",
			wantFiles: []string{"result-1.png"},
		},
		{
			name: "an exception",
			events: []wire.CodeEvent{
				{Type: wire.EventStderr, Data: "warning\n"},
				{Type: wire.CodeEventExecutionError, ExecutionError: cellErr},
				{Type: wire.CodeEventEnd, Execution: &wire.Execution{Error: cellErr}},
			},
			wantErrOut: "warning\nTraceback\nValueError: bad\n",
			wantCode:   1,
		},
		{
			name: "a timeout",
			events: []wire.CodeEvent{
				{Type: wire.CodeEventEnd, Execution: &wire.Execution{TimedOut: true}},
			},
			wantErrOut: "pandastack: the cell was interrupted at its timeout\n",
			wantCode:   124,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var gotCode string
			url := codeAPI(t, tt.events, &gotCode)
			dir := t.TempDir()
			file := filepath.Join(dir, "cell.py")
			if err := os.WriteFile(file, []byte("print('plotting')"), 0o644); err != nil {
				t.Fatal(err)
			}
			out := filepath.Join(dir, "out")
			stdout, stderr, err := runCLI(t, url, "sandbox", "run-code", "sb-1", file, "--out-dir", out)
			if gotCode != "print('plotting')" {
				t.Errorf("code sent: got %q, want the file's", gotCode)
			}
			if want := strings.ReplaceAll(tt.wantOut, "OUT", out); stdout != want {
				t.Errorf("stdout: got %q, want %q", stdout, want)
			}
			if stderr != tt.wantErrOut {
				t.Errorf("stderr: got %q, want %q", stderr, tt.wantErrOut)
			}
			var ec ExitCodeError
			switch {
			case tt.wantCode == 0 && err != nil:
				t.Errorf("error: got %v, want none", err)
			case tt.wantCode != 0 && (!errors.As(err, &ec) || ec.Code != tt.wantCode):
				t.Errorf("error: got %v, want exit code %d", err, tt.wantCode)
			}
			for _, f := range tt.wantFiles {
				b, err := os.ReadFile(filepath.Join(out, f))
				if err != nil || string(b) != "\x89PNG fake" {
					t.Errorf("saved %s: got %q, %v, want the decoded PNG", f, b, err)
				}
			}
		})
	}
}

func TestCreateNewNeverOverwrites(t *testing.T) {
	dir := t.TempDir()
	for i, want := range []string{"result-1.png", "result-2.png"} {
		p, err := createNew(dir, "result-", ".png", []byte{byte(i)})
		if err != nil {
			t.Fatal(err)
		}
		if filepath.Base(p) != want {
			t.Errorf("file %d: got %s, want %s", i, filepath.Base(p), want)
		}
	}
}
