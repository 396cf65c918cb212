package cli

import (
	"bytes"
	"errors"
	"image"
	_ "image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/internal/testenv"
	"github.com/pandastack/pandastack/wire"
)

// TestCLIRealServer drives the CLI against a real server and real sandboxes.
func TestCLIRealServer(t *testing.T) {
	s := daemontest.Start(t, nil)
	cli := func(args ...string) (string, string, error) {
		t.Helper()
		var out, errOut bytes.Buffer
		root := NewRoot()
		root.SetArgs(append([]string{"--url", s.URL, "--api-key", s.Key}, args...))
		root.SetOut(&out)
		root.SetErr(&errOut)
		err := root.Execute()
		return out.String(), errOut.String(), err
	}
	exitCode := func(err error) int {
		var ec ExitCodeError
		if errors.As(err, &ec) {
			return ec.Code
		}
		if err != nil {
			return -1
		}
		return 0
	}

	out, errOut, err := cli("run", "--", "echo hi; echo oops >&2; exit 3")
	if out != "hi\n" || errOut != "oops\n" || exitCode(err) != 3 {
		t.Errorf("run: got %q %q %v, want %q %q exit 3", out, errOut, err, "hi\n", "oops\n")
	}
	out, _, err = cli("run", "--timeout", "0.5", "--", "sleep 10")
	if exitCode(err) != 124 {
		t.Errorf("run past its timeout: got %v (%q), want exit 124", err, out)
	}

	out, _, err = cli("sandbox", "create", "--ttl", "600", "--metadata", "job=e2e")
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	id := strings.TrimSpace(out)
	out, _, err = cli("sandbox", "exec", id, "--", "printf", "%s-%s", "a", "b")
	if out != "a-b" || err != nil {
		t.Errorf("exec argv: got %q %v, want %q", out, err, "a-b")
	}
	out, _, _ = cli("sandbox", "list")
	if !strings.Contains(out, id) {
		t.Errorf("list lacks %s:\n%s", id, out)
	}
	out, _, err = cli("sandbox", "get", id)
	if err != nil || !strings.Contains(out, `"job": "e2e"`) {
		t.Errorf("get: %v\n%s", err, out)
	}
	if _, _, err := cli("sandbox", "timeout", id, "120"); err != nil {
		t.Errorf("timeout: %v", err)
	}
	if _, _, err := cli("sandbox", "kill", id); err != nil {
		t.Fatalf("kill: %v", err)
	}
	if _, _, err := cli("sandbox", "kill", id); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Errorf("second kill: got %v, want a not-found error", err)
	}
	out, _, _ = cli("sandbox", "list")
	if strings.Contains(out, id) {
		t.Errorf("list still has killed %s:\n%s", id, out)
	}
	// run leaves no sandbox behind.
	if out, _, _ := cli("sandbox", "list", "--json"); strings.Contains(out, "sb-") {
		t.Errorf("sandboxes left after run: %s", out)
	}
}

// TestRunCodeRealServer: `sandbox run-code` against a real code-interpreter
// sandbox prints the cell's output and main result and saves a matplotlib
// figure as a PNG of the figure's size; state persists from one run to the
// next; an exception exits 1 with its traceback on stderr.
func TestRunCodeRealServer(t *testing.T) {
	testenv.Template(t, "code-interpreter")
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{Template: "code-interpreter", TTLSeconds: 600})
	dir := t.TempDir()
	cell := func(name, code string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(code), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	out := filepath.Join(dir, "out")
	stdout, stderr, err := runCLI(t, s.URL, "--api-key", s.Key, "sandbox", "run-code", sb.ID, cell("a.py",
		"import matplotlib.pyplot as plt\nx = 41\nprint('plotting')\nplt.figure(figsize=(4, 3), dpi=50)\nplt.plot([1, 2, 3])\nplt.show()\nx + 1\n"), "--out-dir", out)
	if err != nil {
		t.Fatalf("run-code: %v (stderr %q)", err, stderr)
	}
	png := filepath.Join(out, "result-1.png")
	if want := "plotting\n[" + png + "]\n42\n"; stdout != want {
		t.Errorf("stdout: got %q, want %q", stdout, want)
	}
	f, err := os.Open(png)
	if err != nil {
		t.Fatalf("the figure: %v", err)
	}
	defer f.Close()
	cfg, format, err := image.DecodeConfig(f)
	if err != nil || format != "png" || cfg.Width != 200 || cfg.Height != 150 {
		t.Errorf("the figure: %s %dx%d (%v), want a 200x150 png", format, cfg.Width, cfg.Height, err)
	}
	stdout, _, err = runCLI(t, s.URL, "--api-key", s.Key, "sandbox", "run-code", sb.ID, cell("b.py", "x * 2"))
	if err != nil || stdout != "82\n" {
		t.Errorf("the next cell: got %q, %v, want 82 (x kept)", stdout, err)
	}
	_, stderr, err = runCLI(t, s.URL, "--api-key", s.Key, "sandbox", "run-code", sb.ID, cell("c.py", "1/0"))
	var ec ExitCodeError
	if !errors.As(err, &ec) || ec.Code != 1 || !strings.Contains(stderr, "ZeroDivisionError") || !strings.Contains(stderr, "Traceback") {
		t.Errorf("an exception: got %v, stderr %q, want exit 1 and the traceback", err, stderr)
	}
}
