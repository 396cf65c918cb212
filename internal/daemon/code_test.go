package daemon_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"image/png"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/internal/testenv"
	pandastack "github.com/pandastack/pandastack/sdk/go"
	"github.com/pandastack/pandastack/wire"
)

// Code execution against real sandboxes of the code-interpreter template:
// cells in live Jupyter kernels (code contexts), as docs/API.md describes.

// codeServer starts a server whose warm pool is for code-interpreter.
func codeServer(t *testing.T, mut func(*daemon.Config)) *daemontest.Server {
	t.Helper()
	testenv.Template(t, "code-interpreter")
	return daemontest.Start(t, func(c *daemon.Config) {
		c.Sandbox.PoolTemplates = []string{"code-interpreter"}
		if mut != nil {
			mut(c)
		}
	})
}

// codeSandbox creates a code-interpreter sandbox, killed when the test ends.
func codeSandbox(t *testing.T, c *pandastack.Client, opts pandastack.CreateOptions) *pandastack.Sandbox {
	t.Helper()
	opts.Template = "code-interpreter"
	if opts.TTL == 0 {
		opts.TTL = 20 * time.Minute
	}
	sb, err := c.Create(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sb.Close() })
	return sb
}

// run runs a cell that must not raise and returns its execution.
func run(t *testing.T, sb *pandastack.Sandbox, code string, opts pandastack.RunCodeOptions) *wire.Execution {
	t.Helper()
	exe := runAny(t, sb, code, opts)
	if exe.Error != nil {
		t.Fatalf("cell %q raised %s: %s\n%s", code, exe.Error.Name, exe.Error.Value, exe.Error.Traceback)
	}
	return exe
}

// runAny runs a cell, which may raise, failing the test on an API error.
func runAny(t *testing.T, sb *pandastack.Sandbox, code string, opts pandastack.RunCodeOptions) *wire.Execution {
	t.Helper()
	if opts.Timeout == 0 {
		opts.Timeout = patience
	}
	exe, err := sb.RunCode(context.Background(), code, opts)
	if err != nil {
		t.Fatalf("cell %q: %v", code, err)
	}
	return exe
}

func TestCodeInterpreter(t *testing.T) {
	s := codeServer(t, nil)
	c := s.Client(t)
	ctx := context.Background()

	t.Run("StateAcrossCells", func(t *testing.T) {
		sb := codeSandbox(t, c, pandastack.CreateOptions{})
		run(t, sb, "x = 20\ndef f(y):\n    return x + y", pandastack.RunCodeOptions{})
		exe := run(t, sb, "f(22)", pandastack.RunCodeOptions{})
		if got := exe.Text(); got != "42" {
			t.Errorf("f(22): got %q, want %q", got, "42")
		}
		if exe.ExecutionCount < 2 || exe.Context != wire.LanguagePython {
			t.Errorf("execution count %d, context %q: want at least 2 and %q", exe.ExecutionCount, exe.Context, wire.LanguagePython)
		}
	})

	t.Run("MatplotlibReturnsPNG", func(t *testing.T) {
		sb := codeSandbox(t, c, pandastack.CreateOptions{})
		exe := run(t, sb, "import matplotlib.pyplot as plt\nfig = plt.figure(figsize=(4, 3), dpi=100)\nplt.plot([1, 3, 2])\nplt.title('t')", pandastack.RunCodeOptions{})
		var pngs []string
		for _, r := range exe.Results {
			if r.PNG != "" {
				pngs = append(pngs, r.PNG)
			}
		}
		if len(pngs) != 1 {
			t.Fatalf("got %d PNG results, want 1: %+v", len(pngs), exe.Results)
		}
		raw, err := base64.StdEncoding.DecodeString(pngs[0])
		if err != nil {
			t.Fatalf("PNG is not base64: %v", err)
		}
		img, err := png.Decode(bytes.NewReader(raw))
		if err != nil {
			t.Fatalf("PNG does not decode: %v", err)
		}
		if b := img.Bounds(); b.Dx() != 400 || b.Dy() != 300 {
			t.Errorf("image size: got %dx%d, want 400x300 (figsize 4x3 at 100 dpi)", b.Dx(), b.Dy())
		}
	})

	t.Run("DataFrameReturnsHTML", func(t *testing.T) {
		sb := codeSandbox(t, c, pandastack.CreateOptions{})
		exe := run(t, sb, "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})", pandastack.RunCodeOptions{})
		if len(exe.Results) != 1 || !exe.Results[0].IsMainResult {
			t.Fatalf("results: got %+v, want one main result", exe.Results)
		}
		r := exe.Results[0]
		if !strings.Contains(r.HTML, "<table") || !strings.Contains(r.HTML, "<td>x</td>") {
			t.Errorf("html: got %q, want a table holding x", r.HTML)
		}
		if !strings.Contains(r.Text, "a  b") {
			t.Errorf("text: got %q, want the frame as plain text", r.Text)
		}
	})

	t.Run("RichFormats", func(t *testing.T) {
		sb := codeSandbox(t, c, pandastack.CreateOptions{})
		exe := run(t, sb, `from IPython.display import display, HTML, Markdown, JSON, SVG, Latex
display(HTML("<b>h</b>"))
display(Markdown("**m**"))
display(JSON({"k": [1, 2]}))
display(SVG('<svg xmlns="http://www.w3.org/2000/svg" width="2" height="2"></svg>'))
display(Latex(r"$x^2$"))
7`, pandastack.RunCodeOptions{})
		has := func(i int, key string) bool {
			return i < len(exe.Results) && strings.Contains(strings.Join(exe.Results[i].Formats(), ","), key)
		}
		for i, key := range []string{"html", "markdown", "json", "svg", "latex"} {
			if !has(i, key) || exe.Results[i].IsMainResult {
				t.Errorf("result %d: got %+v, want a displayed %s", i, exe.Results[i:min(i+1, len(exe.Results))], key)
			}
		}
		if string(exe.Results[2].JSON) != `{"k":[1,2]}` {
			t.Errorf("json: got %s, want {\"k\":[1,2]}", exe.Results[2].JSON)
		}
		if exe.Text() != "7" {
			t.Errorf("main result: got %q, want 7", exe.Text())
		}
	})

	t.Run("StdoutStreamsBeforeTheCellEnds", func(t *testing.T) {
		sb := codeSandbox(t, c, pandastack.CreateOptions{})
		// The cell prints, then waits for a file that the test makes only
		// once the first line has reached it.
		code := "import os, time\nprint('first', flush=True)\nwhile not os.path.exists('/tmp/go'):\n    time.sleep(0.05)\nprint('second')"
		var got []string
		exe, err := sb.RunCode(ctx, code, pandastack.RunCodeOptions{Timeout: patience, OnStdout: func(s string) {
			got = append(got, s)
			if strings.Contains(s, "first") {
				if _, err := sb.Exec(ctx, "touch /tmp/go", pandastack.ExecOptions{}); err != nil {
					t.Errorf("touch: %v", err)
				}
			}
		}})
		if err != nil {
			t.Fatal(err)
		}
		if exe.TimedOut || !strings.Contains(strings.Join(got, ""), "first\nsecond\n") {
			t.Errorf("got %q (timed out %v), want first then second, the first before the cell ended", got, exe.TimedOut)
		}
	})

	t.Run("ExceptionHasNameValueTraceback", func(t *testing.T) {
		sb := codeSandbox(t, c, pandastack.CreateOptions{})
		exe := runAny(t, sb, "def g():\n    raise ValueError('bad value 7')\ng()", pandastack.RunCodeOptions{})
		e := exe.Error
		if e == nil {
			t.Fatal("no error")
		}
		if e.Name != "ValueError" || e.Value != "bad value 7" || !strings.Contains(e.Traceback, "----> 2     raise ValueError") || strings.Contains(e.Traceback, "\x1b[") {
			t.Errorf("error: got %+v, want ValueError, its value and a plain-text traceback through g", e)
		}
	})

	t.Run("TimeoutInterruptsAndKeepsVariables", func(t *testing.T) {
		sb := codeSandbox(t, c, pandastack.CreateOptions{})
		code := "kept = 41\nprint('ready', flush=True)\nimport time\nwhile True:\n    time.sleep(0.05)"
		for timeout := 2 * time.Second; ; timeout *= 2 {
			exe := runAny(t, sb, code, pandastack.RunCodeOptions{Timeout: timeout})
			if !exe.TimedOut || exe.Error == nil || exe.Error.Name != "KeyboardInterrupt" {
				t.Fatalf("got %+v (error %+v), want a timeout ending in KeyboardInterrupt", exe, exe.Error)
			}
			if strings.Contains(strings.Join(exe.Logs.Stdout, ""), "ready") {
				break
			}
			if timeout >= patience {
				t.Fatalf("the cell never got ready before its timeout, up to %s", timeout)
			}
			t.Logf("the cell timed out before it was set up (a slow machine): again with %s", 2*timeout)
		}
		if got := run(t, sb, "kept + 1", pandastack.RunCodeOptions{}).Text(); got != "42" {
			t.Errorf("after the timeout: got %q, want 42", got)
		}
	})

	t.Run("RestartClearsVariables", func(t *testing.T) {
		sb := codeSandbox(t, c, pandastack.CreateOptions{})
		run(t, sb, "gone = 1", pandastack.RunCodeOptions{})
		cc, err := sb.RestartCodeContext(ctx, wire.LanguagePython)
		if err != nil || cc.State != wire.CodeStateIdle {
			t.Fatalf("restart: got %+v, %v", cc, err)
		}
		exe := runAny(t, sb, "gone", pandastack.RunCodeOptions{})
		if exe.Error == nil || exe.Error.Name != "NameError" {
			t.Errorf("after restart: got %+v, want NameError", exe.Error)
		}
	})

	t.Run("KilledKernelIsReportedAndRecovers", func(t *testing.T) {
		sb := codeSandbox(t, c, pandastack.CreateOptions{})
		// Killed while running a cell: the cell says so.
		exe := runAny(t, sb, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", pandastack.RunCodeOptions{})
		if exe.Error == nil || exe.Error.Name != "DeadKernelError" || !strings.Contains(exe.Error.Value, "signal 9") {
			t.Fatalf("got %+v, want DeadKernelError naming signal 9", exe.Error)
		}
		_, err := sb.RunCode(ctx, "1", pandastack.RunCodeOptions{})
		if !errors.Is(err, pandastack.ErrConflict) || !strings.Contains(err.Error(), "restart") {
			t.Errorf("a cell in the dead context: got %v, want a conflict telling to restart it", err)
		}
		waitContextState(t, sb, wire.LanguagePython, wire.CodeStateDead)
		if _, err := sb.RestartCodeContext(ctx, wire.LanguagePython); err != nil {
			t.Fatal(err)
		}
		if got := run(t, sb, "1 + 1", pandastack.RunCodeOptions{}).Text(); got != "2" {
			t.Errorf("after restart: got %q, want 2", got)
		}
		// Killed from outside while idle: the context shows dead.
		if res, err := sb.ExecArgv(ctx, []string{"pkill", "-KILL", "-f", "ipykernel_launcher"}, pandastack.ExecOptions{}); err != nil || res.ExitCode != 0 {
			t.Fatalf("pkill: %+v, %v", res, err)
		}
		waitContextState(t, sb, wire.LanguagePython, wire.CodeStateDead)
		if _, err := sb.RestartCodeContext(ctx, wire.LanguagePython); err != nil {
			t.Fatal(err)
		}
		if got := run(t, sb, "2 + 2", pandastack.RunCodeOptions{}).Text(); got != "4" {
			t.Errorf("after the second restart: got %q, want 4", got)
		}
	})

	t.Run("UninterruptibleCellRestartsItsContext", func(t *testing.T) {
		sb := codeSandbox(t, c, pandastack.CreateOptions{})
		run(t, sb, "lost = 1", pandastack.RunCodeOptions{})
		code := "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('ready', flush=True)\nwhile True:\n    pass"
		for timeout := 2 * time.Second; ; timeout *= 2 {
			exe := runAny(t, sb, code, pandastack.RunCodeOptions{Timeout: timeout})
			if !exe.TimedOut || exe.Error == nil || exe.Error.Name != "TimeoutError" || !strings.Contains(exe.Error.Value, "restarted") {
				t.Fatalf("got %+v (error %+v), want a timeout that restarted the context", exe, exe.Error)
			}
			if strings.Contains(strings.Join(exe.Logs.Stdout, ""), "ready") {
				break
			}
			if timeout >= patience {
				t.Fatalf("the cell never got ready before its timeout, up to %s", timeout)
			}
			run(t, sb, "lost = 1", pandastack.RunCodeOptions{})
		}
		exe := runAny(t, sb, "lost", pandastack.RunCodeOptions{})
		if exe.Error == nil || exe.Error.Name != "NameError" {
			t.Errorf("after the restart: got %+v, want NameError", exe.Error)
		}
	})

	t.Run("ContextsDoNotShareVariables", func(t *testing.T) {
		sb := codeSandbox(t, c, pandastack.CreateOptions{})
		a, err := sb.CreateCodeContext(ctx, pandastack.CodeContextOptions{Cwd: "/tmp", Env: map[string]string{"WHO": "a"}})
		if err != nil {
			t.Fatal(err)
		}
		b, err := sb.CreateCodeContext(ctx, pandastack.CodeContextOptions{User: wire.UserRoot})
		if err != nil {
			t.Fatal(err)
		}
		run(t, sb, "v = 'a'", pandastack.RunCodeOptions{Context: a.ID})
		run(t, sb, "v = 'default'", pandastack.RunCodeOptions{})
		if exe := runAny(t, sb, "v", pandastack.RunCodeOptions{Context: b.ID}); exe.Error == nil || exe.Error.Name != "NameError" {
			t.Errorf("v in context b: got %+v, want NameError", exe)
		}
		tests := []struct {
			context, code, want string
		}{
			{a.ID, "v", "'a'"},
			{"", "v", "'default'"},
			{a.ID, "import os; (os.getcwd(), os.environ['WHO'], os.getuid())", "('/tmp', 'a', 1000)"},
			{b.ID, "import os; (os.getcwd(), os.getuid())", "('/root', 0)"},
		}
		for _, tt := range tests {
			if got := run(t, sb, tt.code, pandastack.RunCodeOptions{Context: tt.context}).Text(); got != tt.want {
				t.Errorf("%q in context %q: got %s, want %s", tt.code, tt.context, got, tt.want)
			}
		}
		l, err := sb.ListCodeContexts(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, cc := range l {
			ids = append(ids, cc.ID)
		}
		for _, id := range []string{a.ID, b.ID, wire.LanguagePython} {
			if !strings.Contains(strings.Join(ids, ","), id) {
				t.Errorf("list: got %v, want %s in it", ids, id)
			}
		}
		if err := sb.DeleteCodeContext(ctx, a.ID); err != nil {
			t.Fatal(err)
		}
		if _, err := sb.RunCode(ctx, "v", pandastack.RunCodeOptions{Context: a.ID}); !errors.Is(err, pandastack.ErrNotFound) {
			t.Errorf("a cell in a deleted context: got %v, want not found", err)
		}
	})

	t.Run("PauseAndResumeKeepVariables", func(t *testing.T) {
		sb := codeSandbox(t, c, pandastack.CreateOptions{})
		run(t, sb, "through = 'the pause'", pandastack.RunCodeOptions{})
		if err := sb.Pause(ctx); err != nil {
			t.Fatal(err)
		}
		// The cell resumes the sandbox.
		if got := run(t, sb, "through", pandastack.RunCodeOptions{}).Text(); got != "'the pause'" {
			t.Errorf("after resume: got %s, want 'the pause'", got)
		}
	})

	t.Run("ReadyAtOnceFromThePool", func(t *testing.T) {
		// Pool members are readied in the background: a create finds one
		// sooner or later. Its first cell has the imports done, the
		// sandbox's env, and execution count 1.
		deadline := time.Now().Add(patience)
		for {
			sb := codeSandbox(t, c, pandastack.CreateOptions{Env: map[string]string{"GREETING": "hi"}})
			exe := run(t, sb, "import sys, os\n('pandas' in sys.modules, 'matplotlib.pyplot' in sys.modules, os.environ.get('GREETING'))", pandastack.RunCodeOptions{})
			if got := exe.Text(); got == "(True, True, 'hi')" {
				if exe.ExecutionCount != 1 {
					t.Errorf("execution count of the first cell: got %d, want 1", exe.ExecutionCount)
				}
				return
			} else if !strings.HasSuffix(got, "'hi')") {
				t.Fatalf("first cell: got %s, want the sandbox's env GREETING=hi", got)
			}
			if time.Now().After(deadline) {
				t.Fatalf("no create found a readied pool member within %s", patience)
			}
			_ = sb.Close()
			time.Sleep(time.Second)
		}
	})

	t.Run("WithoutPythonIsABadRequest", func(t *testing.T) {
		sb, err := c.Create(ctx, pandastack.CreateOptions{Template: "base", TTL: 10 * time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		defer sb.Close()
		_, err = sb.RunCode(ctx, "1", pandastack.RunCodeOptions{})
		if !errors.Is(err, pandastack.ErrInvalidArgument) || !strings.Contains(err.Error(), "python3") {
			t.Errorf("got %v, want a bad request naming python3", err)
		}
	})

	t.Run("ResponsesMatchTheSpec", func(t *testing.T) {
		doc := loadSpec(t)
		sb := codeSandbox(t, c, pandastack.CreateOptions{})
		base := "/v1/sandboxes/" + sb.ID() + "/code"
		fig := wire.RunCodeRequest{Code: "import matplotlib.pyplot as plt\nplt.plot([1])\nprint('p')\nfrom IPython.display import JSON\ndisplay(JSON({'a': 1}))\n1/0"}
		ctxID := ""
		cases := []struct {
			method, path, specPath string
			body                   any
			accept                 string
		}{
			{"POST", base, "/v1/sandboxes/{id}/code", fig, ""},
			{"POST", base, "/v1/sandboxes/{id}/code", fig, "application/x-ndjson"},
			{"POST", base, "/v1/sandboxes/{id}/code", `{"code":""}`, ""},
			{"POST", base, "/v1/sandboxes/{id}/code", wire.RunCodeRequest{Code: "1", Context: "ctx-000000000000"}, ""},
			{"POST", base + "/contexts", "/v1/sandboxes/{id}/code/contexts", wire.CreateCodeContextRequest{Cwd: "/tmp"}, ""},
			{"GET", base + "/contexts", "/v1/sandboxes/{id}/code/contexts", nil, ""},
			{"POST", base + "/contexts/CTX/restart", "/v1/sandboxes/{id}/code/contexts/{context}/restart", nil, ""},
			{"POST", base, "/v1/sandboxes/{id}/code", wire.RunCodeRequest{Code: "import os; os.kill(os.getpid(), 9)", Context: "CTX"}, ""},
			{"POST", base, "/v1/sandboxes/{id}/code", wire.RunCodeRequest{Code: "1", Context: "CTX"}, ""},
			{"DELETE", base + "/contexts/CTX", "/v1/sandboxes/{id}/code/contexts/{context}", nil, ""},
			{"DELETE", base + "/contexts/CTX", "/v1/sandboxes/{id}/code/contexts/{context}", nil, ""},
		}
		for _, tc := range cases {
			path := strings.ReplaceAll(tc.path, "CTX", ctxID)
			body := tc.body
			if r, ok := body.(wire.RunCodeRequest); ok && r.Context == "CTX" {
				r.Context = ctxID
				body = r
			}
			var hdr []string
			if tc.accept != "" {
				hdr = []string{"Accept", tc.accept}
			}
			resp, b := s.Do(t, tc.method, path, body, hdr...)
			if tc.method == "POST" && strings.HasSuffix(tc.path, "/contexts") {
				var cc wire.CodeContext
				if err := json.Unmarshal(b, &cc); err != nil || cc.ID == "" {
					t.Fatalf("create context: %d %s", resp.StatusCode, b)
				}
				ctxID = cc.ID
			}
			checkAgainstSpec(t, doc, tc.method, tc.specPath, resp, b)
		}
	})

	t.Run("BadRequests", func(t *testing.T) {
		sb := codeSandbox(t, c, pandastack.CreateOptions{})
		tests := []struct {
			body any
			want int
		}{
			{`{}`, http.StatusBadRequest},
			{wire.RunCodeRequest{Code: "1", Language: "ruby"}, http.StatusBadRequest},
			{wire.RunCodeRequest{Code: "1", Context: "no such"}, http.StatusBadRequest},
			{wire.RunCodeRequest{Code: "1", Context: "ctx-000000000000"}, http.StatusNotFound},
			{wire.RunCodeRequest{Code: "1", TimeoutSeconds: -1}, http.StatusBadRequest},
		}
		for _, tt := range tests {
			resp, b := s.Do(t, "POST", "/v1/sandboxes/"+sb.ID()+"/code", tt.body)
			if resp.StatusCode != tt.want {
				t.Errorf("%v: got %d %s, want %d", tt.body, resp.StatusCode, b, tt.want)
			}
		}
	})
}

// checkAgainstSpec checks an answer against the spec's schema for its
// status and media type.
func checkAgainstSpec(t *testing.T, doc *openAPI, method, specPath string, resp *http.Response, body []byte) {
	t.Helper()
	op := doc.operation(t, method, specPath)
	r, ok := op.Responses[strconv.Itoa(resp.StatusCode)]
	if !ok {
		t.Errorf("%s %s: status %d (%s) not in the spec", method, specPath, resp.StatusCode, body)
		return
	}
	if resp.StatusCode == http.StatusNoContent {
		return
	}
	ct, _, _ := strings.Cut(resp.Header.Get("Content-Type"), ";")
	media, ok := r.Content[ct]
	if !ok {
		t.Errorf("%s %s: media type %q not in the spec for %d", method, specPath, ct, resp.StatusCode)
		return
	}
	docs := [][]byte{body}
	if ct == "application/x-ndjson" {
		docs = bytes.Split(bytes.TrimSpace(body), []byte("\n"))
	}
	for _, d := range docs {
		var v any
		if err := json.Unmarshal(d, &v); err != nil {
			t.Errorf("%s %s: %q is not JSON: %v", method, specPath, d, err)
			continue
		}
		if errs := doc.validate(media.Schema, v, "$"); len(errs) > 0 {
			t.Errorf("%s %s: %.300s does not match the spec:\n%s", method, specPath, d, strings.Join(errs, "\n"))
		}
	}
}

// waitContextState waits until the sandbox lists context id in state.
func waitContextState(t *testing.T, sb *pandastack.Sandbox, id, state string) {
	t.Helper()
	waitUntil(t, fmt.Sprintf("code context %s %s", id, state), func() (bool, string) {
		l, err := sb.ListCodeContexts(context.Background())
		if err != nil {
			return false, err.Error()
		}
		for _, cc := range l {
			if cc.ID == id {
				return cc.State == state, fmt.Sprintf("%+v", cc)
			}
		}
		return false, fmt.Sprintf("%+v", l)
	})
}

// TestCodeForkKeepsVariablesAndReseeds forks a sandbox whose default
// context holds variables and imported generators: every fork keeps the
// variables and draws other numbers than the others (random, numpy.random,
// os.urandom).
func TestCodeForkKeepsVariablesAndReseeds(t *testing.T) {
	s := codeServer(t, nil)
	c := s.Client(t)
	sb := codeSandbox(t, c, pandastack.CreateOptions{})
	run(t, sb, "import os, random\nimport numpy as np\nsecret = 42\nrandom.random(); np.random.rand()", pandastack.RunCodeOptions{})
	forks, err := sb.Fork(context.Background(), pandastack.ForkOptions{Count: 2, TTL: 10 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	draw := "(secret, random.random(), float(np.random.rand()), os.urandom(8).hex())"
	seen := map[string]string{}
	for i, f := range append(forks, sb) {
		t.Cleanup(func() { _ = f.Close() })
		got := run(t, f, draw, pandastack.RunCodeOptions{}).Text()
		parts := strings.Split(strings.Trim(got, "()"), ", ")
		if len(parts) != 4 || parts[0] != "42" {
			t.Fatalf("copy %d: got %s, want secret 42 and three draws", i, got)
		}
		for j, p := range parts[1:] {
			key := fmt.Sprintf("%d:%s", j, p)
			if other, ok := seen[key]; ok {
				t.Errorf("copy %d drew %s as copy %s did (generator %d): not reseeded", i, p, other, j)
			}
			seen[key] = fmt.Sprint(i)
		}
	}
}

// TestCodeTemplateSnapshot creates sandboxes by restoring the template's
// snapshot, which is taken with the default context running and its
// imports done: the first cell finds them, and two sandboxes restored from
// the one image draw different numbers.
func TestCodeTemplateSnapshot(t *testing.T) {
	s := codeServer(t, func(c *daemon.Config) {
		c.Sandbox.TemplateSnapshots = true
		c.Sandbox.PoolSize = 0
	})
	c := s.Client(t)
	var draws []string
	for range 2 {
		sb := codeSandbox(t, c, pandastack.CreateOptions{Env: map[string]string{"GREETING": "hi"}})
		exe := run(t, sb, "import sys, os, random\n('pandas' in sys.modules, os.environ.get('GREETING'), random.random())", pandastack.RunCodeOptions{})
		got := exe.Text()
		if !strings.HasPrefix(got, "(True, 'hi', ") || exe.ExecutionCount != 1 {
			t.Fatalf("first cell: got %s (count %d), want pandas imported, GREETING=hi, count 1", got, exe.ExecutionCount)
		}
		draws = append(draws, got)
	}
	if draws[0] == draws[1] {
		t.Errorf("two sandboxes restored from the template's snapshot drew the same: %s", draws[0])
	}
}
