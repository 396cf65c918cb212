package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/internal/testenv"
	pandastack "github.com/pandastack/pandastack/sdk/go"
	"github.com/pandastack/pandastack/wire"
)

// shellPatience bounds every wait for something that must happen:
// machines differ several-fold in speed; the tests assume only that they
// get there.
const shellPatience = 5 * time.Minute

// ptyScreen is what the terminal of a CLI run under a pseudo-terminal
// shows: everything the CLI wrote to it, as it comes.
type ptyScreen struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	done chan struct{}
}

func readScreen(ptmx *os.File) *ptyScreen {
	s := &ptyScreen{done: make(chan struct{})}
	go func() {
		defer close(s.done)
		b := make([]byte, 4096)
		for {
			// The read fails (EIO) once the CLI has exited and closed
			// the terminal's last other end.
			n, err := ptmx.Read(b)
			s.mu.Lock()
			s.buf.Write(b[:n])
			s.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return s
}

func (s *ptyScreen) text() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

// waitFor waits until what the screen shows after offset from matches re
// and returns the match's submatches and the offset past it.
func (s *ptyScreen) waitFor(t *testing.T, from int, re *regexp.Regexp) ([]string, int) {
	t.Helper()
	deadline := time.Now().Add(shellPatience)
	delay := 10 * time.Millisecond
	for {
		text := s.text()
		if loc := re.FindStringSubmatchIndex(text[from:]); loc != nil {
			m := make([]string, len(loc)/2)
			for i := range m {
				if loc[2*i] >= 0 {
					m[i] = text[from+loc[2*i] : from+loc[2*i+1]]
				}
			}
			return m, from + loc[1]
		}
		if time.Now().After(deadline) {
			t.Fatalf("the terminal never showed %s; it shows:\n%q", re, text)
		}
		select {
		case <-s.done:
			if !re.MatchString(s.text()[from:]) {
				t.Fatalf("the CLI's terminal closed before it showed %s; it shows:\n%q", re, s.text())
			}
		case <-time.After(delay):
		}
		delay = min(2*delay, 200*time.Millisecond)
	}
}

// typeLine types line and Enter, as a keyboard does (a carriage return).
func typeLine(t *testing.T, ptmx *os.File, line string) {
	t.Helper()
	if _, err := ptmx.Write([]byte(line + "\r")); err != nil {
		t.Fatalf("typing %q: %v", line, err)
	}
}

// driveShell works a shell the CLI connected to terminal ptmx (80x24 at
// first): a command's output on the screen, the local terminal in raw
// mode, a window-size change that stty inside sees, then `exit 3`. It
// returns the CLI's exit code and checks the local terminal was restored.
func driveShell(t *testing.T, cmd *exec.Cmd, ptmx *os.File) int {
	t.Helper()
	scr := readScreen(ptmx)
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	// The shell's answer, not the echo of what was typed: the echo
	// holds the expression, the answer its value.
	typeLine(t, ptmx, `echo "answer:$((6*7)):$(id -u):$TERM"`)
	_, at := scr.waitFor(t, 0, regexp.MustCompile(`answer:42:1000:xterm-256color`))

	// The local terminal is in raw mode while the session runs: no local
	// echo or line editing (the remote terminal does both), no signals
	// from keys (^C goes to the remote shell).
	tio, err := unix.IoctlGetTermios(int(ptmx.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	if tio.Lflag&(unix.ECHO|unix.ICANON|unix.ISIG) != 0 {
		t.Errorf("the local terminal is not in raw mode during the session: lflag %#x", tio.Lflag)
	}
	typeLine(t, ptmx, `echo "size:$(stty size)"`)
	m, at := scr.waitFor(t, at, regexp.MustCompile(`size:(\d+) (\d+)`))
	if m[1] != "24" || m[2] != "80" {
		t.Errorf("stty size at first: %s %s, want 24 80", m[1], m[2])
	}

	// The window changes: the kernel tells the CLI (SIGWINCH), which
	// tells the remote terminal. That is asynchronous to what is typed, so
	// ask until stty inside sees the new size.
	if err := pty.Setsize(ptmx, &pty.Winsize{Rows: 40, Cols: 123}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(shellPatience)
	for asked := 1; ; asked++ {
		typeLine(t, ptmx, `echo "size:$(stty size)"`)
		m, at = scr.waitFor(t, at, regexp.MustCompile(`size:(\d+) (\d+)`))
		if m[1] == "40" && m[2] == "123" {
			t.Logf("stty saw the new size at the %d. asking", asked)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("stty inside never saw the new size 40x123; it says %s %s", m[1], m[2])
		}
	}

	typeLine(t, ptmx, "exit 3")
	var werr error
	select {
	case werr = <-exited:
	case <-time.After(shellPatience):
		_ = cmd.Process.Kill()
		t.Fatalf("the CLI did not exit after the shell did; the terminal shows:\n%q", scr.text())
	}
	// The CLI put the terminal back as it found it.
	tio, err = unix.IoctlGetTermios(int(ptmx.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	if tio.Lflag&(unix.ECHO|unix.ICANON|unix.ISIG) != unix.ECHO|unix.ICANON|unix.ISIG {
		t.Errorf("the local terminal was not restored after the session: lflag %#x", tio.Lflag)
	}
	var ee *exec.ExitError
	switch {
	case werr == nil:
		return 0
	case errors.As(werr, &ee):
		return ee.ExitCode()
	default:
		t.Fatalf("waiting for the CLI: %v", werr)
		return -1
	}
}

// startUnderPTY runs the CLI binary with args on a new pseudo-terminal of
// 80x24, its controlling terminal, as a user's terminal would be.
func startUnderPTY(t *testing.T, s *daemontest.Server, args ...string) (*exec.Cmd, *os.File) {
	t.Helper()
	cmd := exec.Command(testenv.Daemon(t), append([]string{"--url", s.URL, "--api-key", s.Key}, args...)...)
	cmd.Env = append(os.Environ(), "TERM=xterm-256color")
	ptmx, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 24, Cols: 80})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		ptmx.Close()
	})
	return cmd, ptmx
}

// TestShellUnderPTY drives `pandastack sandbox shell ID` and `pandastack
// run -it` as a user at a terminal would: the CLI binary runs on a real
// pseudo-terminal; the test types, reads the screen, resizes the window
// and exits the shell, whose exit code the CLI's must be.
func TestShellUnderPTY(t *testing.T) {
	s := daemontest.Start(t, nil)
	c := s.Client(t)
	ctx := context.Background()

	t.Run("sandbox shell", func(t *testing.T) {
		sb, err := c.Create(ctx, pandastack.CreateOptions{TTL: 10 * time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		defer sb.Close()
		cmd, ptmx := startUnderPTY(t, s, "sandbox", "shell", sb.ID())
		if code := driveShell(t, cmd, ptmx); code != 3 {
			t.Errorf("the CLI exited %d, want the shell's 3", code)
		}
		// The sandbox goes on; only the shell ended.
		if res, err := sb.Exec(ctx, "true", pandastack.ExecOptions{}); err != nil || res.ExitCode != 0 {
			t.Errorf("the sandbox after the shell: %+v %v", res, err)
		}
	})

	t.Run("run -it", func(t *testing.T) {
		before, err := c.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		cmd, ptmx := startUnderPTY(t, s, "run", "-it")
		if code := driveShell(t, cmd, ptmx); code != 3 {
			t.Errorf("the CLI exited %d, want the shell's 3", code)
		}
		// run -it destroys the sandbox it made.
		after, err := c.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(after) != len(before) {
			t.Errorf("run -it left a sandbox behind: %d before, %d after", len(before), len(after))
		}
	})
}

// TestShellPipesAndPs runs `sandbox shell` without a terminal (stdin a
// pipe: no remote terminal, stdout and stderr apart, the exit code passed
// on) and lists the sandbox's processes with `sandbox ps`.
func TestShellPipesAndPs(t *testing.T) {
	s := daemontest.Start(t, nil)
	c := s.Client(t)
	ctx := context.Background()
	sb, err := c.Create(ctx, pandastack.CreateOptions{TTL: 10 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer sb.Close()
	cli := func(stdin io.Reader, args ...string) (string, string, int) {
		t.Helper()
		var out, errOut bytes.Buffer
		root := NewRoot()
		root.SetArgs(append([]string{"--url", s.URL, "--api-key", s.Key}, args...))
		root.SetIn(stdin)
		root.SetOut(&out)
		root.SetErr(&errOut)
		err := root.Execute()
		var ec ExitCodeError
		switch {
		case err == nil:
			return out.String(), errOut.String(), 0
		case errors.As(err, &ec):
			return out.String(), errOut.String(), ec.Code
		default:
			return out.String(), errOut.String() + err.Error(), -1
		}
	}

	out, errOut, code := cli(strings.NewReader("echo hi; echo oops >&2; [ -t 0 ] || echo no-tty; exit 5\n"), "sandbox", "shell", sb.ID())
	if out != "hi\nno-tty\n" || errOut != "oops\n" || code != 5 {
		t.Errorf("shell on a pipe: out %q err %q exit %d; want %q %q 5", out, errOut, code, "hi\nno-tty\n", "oops\n")
	}
	out, _, code = cli(strings.NewReader("from stdin"), "sandbox", "shell", sb.ID(), "--user", "root", "--", "cat; id -u")
	if out != "from stdin0\n" || code != 0 {
		t.Errorf("shell CMD as root: %q exit %d", out, code)
	}
	out, _, code = cli(strings.NewReader(""), "sandbox", "shell", sb.ID(), "--", "printf", "%s|", "a b", "c'd")
	if out != "a b|c'd|" || code != 0 {
		t.Errorf("shell with argv: %q exit %d", out, code)
	}

	p, err := sb.Start(ctx, "sleep 1000", pandastack.StartOptions{Tag: "sleeper"})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill(ctx)
	out, errOut, code = cli(nil, "sandbox", "ps", sb.ID())
	if code != 0 || !strings.Contains(out, "sleeper") || !strings.Contains(out, fmt.Sprint(p.PID())) || !strings.Contains(out, "running") {
		t.Errorf("ps: exit %d %s\n%s", code, errOut, out)
	}
	out, _, code = cli(nil, "sandbox", "ps", sb.ID(), "--json")
	var l []wire.Process
	if err := json.Unmarshal([]byte(out), &l); err != nil || code != 0 {
		t.Fatalf("ps --json: %v exit %d\n%s", err, code, out)
	}
	shells, sleepers := 0, 0
	for _, pr := range l {
		switch pr.Tag {
		case "shell":
			shells++
			if pr.State != wire.ProcessExited || pr.ExitCode == nil {
				t.Errorf("a shell that ended: %+v", pr)
			}
		case "sleeper":
			sleepers++
			if pr.PID != p.PID() || pr.State != wire.ProcessRunning {
				t.Errorf("the sleeper: %+v", pr)
			}
		}
	}
	if shells != 3 || sleepers != 1 {
		t.Errorf("ps --json: %d shells and %d sleepers, want 3 and 1: %+v", shells, sleepers, l)
	}
	if _, errOut, code := cli(nil, "sandbox", "ps", "sb-nope"); code == 0 || !strings.Contains(errOut, "not found") {
		t.Errorf("ps of an unknown sandbox: exit %d %q", code, errOut)
	}
}
