package cli

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/pandastack/pandastack/internal/daemontest"
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
