package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/yamux"
	"golang.org/x/sys/unix"
)

func TestPing(t *testing.T) {
	c, _ := startAgent(t)
	for i := range 3 {
		p, err := c.Ping(context.Background())
		if err != nil {
			t.Fatalf("ping %d: %v", i, err)
		}
		if got, want := p, (Pong{Version: ProtocolVersion, PID: os.Getpid()}); got != want {
			t.Fatalf("ping %d: got %+v, want %+v", i, got, want)
		}
	}
}

func TestExecOutputAndExitCode(t *testing.T) {
	c, _ := startAgent(t)
	tests := []struct {
		name       string
		argv       []string
		wantStdout string
		wantStderr string
		wantExit   Exit
	}{
		{name: "true", argv: []string{"true"}, wantExit: Exit{ExitCode: 0}},
		{name: "stdout and stderr", argv: sh("echo out; echo err >&2"), wantStdout: "out\n", wantStderr: "err\n"},
		{name: "exit code", argv: sh("echo partial; exit 3"), wantStdout: "partial\n", wantExit: Exit{ExitCode: 3}},
		{name: "exit 255", argv: sh("exit 255"), wantExit: Exit{ExitCode: 255}},
		{name: "argv passed verbatim", argv: []string{"/bin/sh", "-c", `printf '%s|' "$0" "$@"`, "zero", "a b", "", "$HOME"}, wantStdout: "zero|a b||$HOME|"},
		{name: "argv0 is kept", argv: []string{"sh", "-c", `echo "$0"`}, wantStdout: "sh\n"},
		{name: "killed by a signal", argv: sh("kill -KILL $$"), wantExit: Exit{ExitCode: 128 + 9, Signal: 9}},
		{name: "no trailing newline", argv: sh("printf abc"), wantStdout: "abc"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runExec(context.Background(), c, ExecRequest{Argv: tt.argv, TimeoutMS: 10_000}, ExecIO{})
			if r.err != nil {
				t.Fatal(r.err)
			}
			if r.stdout != tt.wantStdout {
				t.Errorf("stdout: got %q, want %q", r.stdout, tt.wantStdout)
			}
			if r.stderr != tt.wantStderr {
				t.Errorf("stderr: got %q, want %q", r.stderr, tt.wantStderr)
			}
			if r.exit != tt.wantExit {
				t.Errorf("exit: got %+v, want %+v", r.exit, tt.wantExit)
			}
		})
	}
}

func TestExecLargeOutput(t *testing.T) {
	c, _ := startAgent(t)
	// More than the stream window and the pump buffer, on both streams.
	const n = 3 << 20
	script := fmt.Sprintf("head -c %d /dev/zero; head -c %d /dev/zero >&2", n, n/2)
	r := runExec(context.Background(), c, ExecRequest{Argv: sh(script), TimeoutMS: 30_000}, ExecIO{})
	if r.err != nil {
		t.Fatal(r.err)
	}
	if len(r.stdout) != n || len(r.stderr) != n/2 {
		t.Fatalf("got %d stdout and %d stderr bytes, want %d and %d", len(r.stdout), len(r.stderr), n, n/2)
	}
	if strings.Trim(r.stdout, "\x00") != "" {
		t.Fatal("stdout is not all zero bytes")
	}
}

func TestMergeEnv(t *testing.T) {
	tests := []struct {
		name        string
		base, extra []string
		want        []string
	}{
		{name: "empty", want: []string{}},
		{name: "base only", base: []string{"A=1", "B=2"}, want: []string{"A=1", "B=2"}},
		{name: "extra only", extra: []string{"A=1"}, want: []string{"A=1"}},
		{name: "extra appended", base: []string{"A=1"}, extra: []string{"B=2"}, want: []string{"A=1", "B=2"}},
		{name: "extra replaces in place", base: []string{"A=1", "B=2", "C=3"}, extra: []string{"B=x"}, want: []string{"A=1", "B=x", "C=3"}},
		{name: "last extra wins", base: []string{"A=1"}, extra: []string{"A=2", "A=3"}, want: []string{"A=3"}},
		{name: "duplicate in base collapses", base: []string{"A=1", "A=2"}, want: []string{"A=2"}},
		{name: "value with equals", base: []string{"A=1"}, extra: []string{"A=b=c"}, want: []string{"A=b=c"}},
		{name: "empty value", base: []string{"A=1"}, extra: []string{"A="}, want: []string{"A="}},
		{name: "key without equals", base: []string{"A"}, extra: []string{"A=1"}, want: []string{"A=1"}},
		{name: "prefix is another key", base: []string{"AB=1"}, extra: []string{"A=2"}, want: []string{"AB=1", "A=2"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base := slices.Clone(tt.base)
			got := mergeEnv(tt.base, tt.extra)
			if !slices.Equal(got, tt.want) {
				t.Errorf("mergeEnv(%q, %q): got %q, want %q", tt.base, tt.extra, got, tt.want)
			}
			if !slices.Equal(tt.base, base) {
				t.Errorf("mergeEnv modified base: got %q, want %q", tt.base, base)
			}
		})
	}
}

func TestExecEnv(t *testing.T) {
	c, _ := startAgent(t)
	const inherited = "PANDASTACK_AGENT_TEST_INHERITED"
	t.Setenv(inherited, "from-agent")
	tests := []struct {
		name string
		env  []string
		want string
	}{
		{name: "inherits the agent's environment", want: "from-agent,,\n"},
		{name: "adds keys", env: []string{"FOO=bar", "EMPTY="}, want: "from-agent,bar,set\n"},
		{name: "replaces keys", env: []string{inherited + "=replaced", "FOO=x=y"}, want: "replaced,x=y,\n"},
	}
	script := fmt.Sprintf(`echo "$%s,$FOO,${EMPTY+set}"`, inherited)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runExec(context.Background(), c, ExecRequest{Argv: sh(script), Env: tt.env, TimeoutMS: 10_000}, ExecIO{})
			if r.err != nil || r.exit.ExitCode != 0 {
				t.Fatalf("got %+v, %v (stderr %q), want exit 0", r.exit, r.err, r.stderr)
			}
			if r.stdout != tt.want {
				t.Errorf("got %q, want %q", r.stdout, tt.want)
			}
		})
	}
	// The variable is set once, not once per duplicate.
	r := runExec(context.Background(), c, ExecRequest{Argv: sh("env | grep -c '^" + inherited + "='"), Env: []string{inherited + "=x"}}, ExecIO{})
	if r.stdout != "1\n" {
		t.Errorf("occurrences of %s: got %q, want %q", inherited, r.stdout, "1\n")
	}
}

func TestExecCwd(t *testing.T) {
	c, _ := startAgent(t)
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	r := runExec(context.Background(), c, ExecRequest{Argv: []string{"pwd"}, Cwd: dir}, ExecIO{})
	if r.err != nil || r.exit != (Exit{}) {
		t.Fatalf("got %+v, %v, want exit 0", r.exit, r.err)
	}
	if want := dir + "\n"; r.stdout != want {
		t.Errorf("got %q, want %q", r.stdout, want)
	}

	// A directory that does not exist fails the start, not the agent.
	r = runExec(context.Background(), c, ExecRequest{Argv: []string{"pwd"}, Cwd: filepath.Join(dir, "missing")}, ExecIO{})
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.exit.ExitCode != -1 || r.exit.Error == "" || r.stderr == "" {
		t.Errorf("missing cwd: got %+v (stderr %q), want exit -1 with an error", r.exit, r.stderr)
	}
	if _, err := c.Ping(context.Background()); err != nil {
		t.Fatalf("ping after failed start: %v", err)
	}
}

func TestExecStdin(t *testing.T) {
	c, _ := startAgent(t)
	big := strings.Repeat("0123456789abcdef", 40<<10) // 640 KiB: many frames, more than a pipe holds
	tests := []struct {
		name  string
		argv  []string
		stdin io.Reader
		want  string
	}{
		{name: "no stdin is empty", argv: []string{"cat"}, want: ""},
		{name: "empty stdin", argv: []string{"cat"}, stdin: strings.NewReader(""), want: ""},
		{name: "small", argv: []string{"cat"}, stdin: strings.NewReader("hello\nworld\n"), want: "hello\nworld\n"},
		{name: "large", argv: sh("wc -c"), stdin: strings.NewReader(big), want: strconv.Itoa(len(big)) + "\n"},
		{name: "large echoed", argv: []string{"cat"}, stdin: strings.NewReader(big), want: big},
		{name: "binary", argv: []string{"cat"}, stdin: strings.NewReader("\x00\xff\xfe\n\x00"), want: "\x00\xff\xfe\n\x00"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runExec(context.Background(), c, ExecRequest{Argv: tt.argv, TimeoutMS: 30_000}, ExecIO{Stdin: tt.stdin})
			if r.err != nil || r.exit != (Exit{}) {
				t.Fatalf("got %+v, %v (stderr %q), want exit 0", r.exit, r.err, r.stderr)
			}
			if r.stdout != tt.want {
				t.Errorf("stdout: got %d bytes %.40q, want %d bytes %.40q", len(r.stdout), r.stdout, len(tt.want), tt.want)
			}
		})
	}

	t.Run("streams until EOF", func(t *testing.T) {
		pr, pw := io.Pipe()
		defer pw.Close()
		first := newLineWaiter("one\n")
		done := make(chan execResult, 1)
		go func() {
			done <- runExec(context.Background(), c, ExecRequest{Argv: []string{"cat"}, TimeoutMS: neverMS}, ExecIO{Stdin: pr, Stdout: first.write})
		}()
		if _, err := pw.Write([]byte("one\n")); err != nil {
			t.Fatal(err)
		}
		// cat echoes the first line while its stdin is still open.
		first.waitFor(t, patience)
		select {
		case r := <-done:
			t.Fatalf("exec ended before stdin was closed: %+v", r)
		default:
		}
		if _, err := pw.Write([]byte("two\n")); err != nil {
			t.Fatal(err)
		}
		pw.Close()
		r := <-done
		if r.err != nil || r.exit != (Exit{}) {
			t.Fatalf("got %+v, %v, want exit 0", r.exit, r.err)
		}
		if want := "one\ntwo\n"; r.stdout != want {
			t.Errorf("got %q, want %q", r.stdout, want)
		}
	})
}

func TestExecCommandNotFound(t *testing.T) {
	c, _ := startAgent(t)
	for _, name := range []string{"pandastack-no-such-command", "/nonexistent/bin/tool", "./relative-missing"} {
		t.Run(name, func(t *testing.T) {
			r := runExec(context.Background(), c, ExecRequest{Argv: []string{name, "arg"}}, ExecIO{})
			if r.err != nil {
				t.Fatal(r.err)
			}
			if r.exit.ExitCode != 127 || r.exit.Error == "" {
				t.Errorf("exit: got %+v, want code 127 with an error", r.exit)
			}
			if want := name + ": command not found\n"; r.stderr != want {
				t.Errorf("stderr: got %q, want %q", r.stderr, want)
			}
			if r.stdout != "" {
				t.Errorf("stdout: got %q, want empty", r.stdout)
			}
		})
	}
}

func TestExecTimeoutKillsProcessGroup(t *testing.T) {
	c, _ := startAgent(t)
	// The background child ignores SIGTERM and does not share the shell's
	// stdout: only a kill of the whole group ends it.
	script := `trap '' TERM; sleep 1000 </dev/null >/dev/null 2>&1 & echo $!; wait`
	// Ready once the child's pid is out: the child runs when the timeout
	// fires.
	r := runTimingOut(t, c, ExecRequest{Argv: sh(script), TimeoutMS: 300}, func(r execResult) bool {
		return strings.HasSuffix(r.stdout, "\n")
	})
	if r.err != nil {
		t.Fatal(r.err)
	}
	if want := (Exit{ExitCode: 124, Signal: 9, TimedOut: true}); r.exit != want {
		t.Errorf("exit: got %+v, want %+v", r.exit, want)
	}
	// The timeout ended it, not the child's sleep.
	if r.dur < 300*time.Millisecond || r.dur > patience {
		t.Errorf("took %v, want its timeout (300 ms or a few times that), far below the child's 1000 s", r.dur)
	}
	child, err := strconv.Atoi(strings.TrimSpace(r.stdout))
	if err != nil {
		t.Fatalf("background child's pid: %q: %v", r.stdout, err)
	}
	if !waitProcessGone(child, patience) {
		_ = unix.Kill(child, unix.SIGKILL)
		t.Errorf("background child %d still runs after the timeout", child)
	}
}

func TestExecSignal(t *testing.T) {
	c, _ := startAgent(t)
	tests := []struct {
		name       string
		script     string
		sig        syscall.Signal
		wantExit   Exit
		wantStdout string
	}{
		{name: "default action", script: "echo ready; exec sleep 1000", sig: syscall.SIGTERM, wantExit: Exit{ExitCode: 128 + 15, Signal: 15}, wantStdout: "ready\n"},
		{name: "trapped", script: "trap 'kill $!; echo trapped; exit 7' USR1; sleep 1000 & echo ready; wait", sig: syscall.SIGUSR1, wantExit: Exit{ExitCode: 7}, wantStdout: "ready\ntrapped\n"},
		{name: "kill", script: "echo ready; sleep 1000", sig: syscall.SIGKILL, wantExit: Exit{ExitCode: 128 + 9, Signal: 9}, wantStdout: "ready\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ready := newLineWaiter("ready\n")
			sigs := make(chan int)
			done := make(chan execResult, 1)
			go func() {
				done <- runExec(context.Background(), c, ExecRequest{Argv: sh(tt.script), TimeoutMS: neverMS}, ExecIO{Stdout: ready.write, Signals: sigs})
			}()
			ready.waitFor(t, patience)
			select {
			case sigs <- int(tt.sig):
			case r := <-done:
				t.Fatalf("exec ended before the signal: %+v", r)
			}
			select {
			case r := <-done:
				if r.err != nil {
					t.Fatal(r.err)
				}
				if r.exit != tt.wantExit {
					t.Errorf("exit: got %+v, want %+v", r.exit, tt.wantExit)
				}
				if r.stdout != tt.wantStdout {
					t.Errorf("stdout: got %q, want %q", r.stdout, tt.wantStdout)
				}
			case <-time.After(patience):
				t.Fatal("process did not end after the signal")
			}
		})
	}
}

func TestExecCancelKillsProcess(t *testing.T) {
	c, _ := startAgent(t)
	tests := []struct {
		name string
		// failOutput makes the stdout callback fail instead of the context
		// being cancelled.
		failOutput bool
	}{
		{name: "context cancelled"},
		{name: "output callback fails", failOutput: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			pid := newLineWaiter("\n")
			stdout := pid.write
			if tt.failOutput {
				stdout = func(p []byte) error {
					_ = pid.write(p)
					return errors.New("caller gone")
				}
			}
			done := make(chan execResult, 1)
			go func() {
				done <- runExec(ctx, c, ExecRequest{Argv: sh("echo $$; exec sleep 1000"), TimeoutMS: neverMS}, ExecIO{Stdout: stdout})
			}()
			pid.waitFor(t, patience)
			n, err := strconv.Atoi(strings.TrimSpace(pid.String()))
			if err != nil {
				t.Fatalf("pid: %q: %v", pid.String(), err)
			}
			if !tt.failOutput {
				cancel()
			}
			var r execResult
			select {
			case r = <-done:
			case <-time.After(patience):
				t.Fatal("Exec did not return after its caller went away")
			}
			// Either the caller sees its own error, or the agent's report
			// that it killed the process.
			if r.err == nil && r.exit.Signal != int(unix.SIGKILL) {
				t.Errorf("got %+v, want an error or a SIGKILL exit", r.exit)
			}
			if !waitProcessGone(n, patience) {
				_ = unix.Kill(n, unix.SIGKILL)
				t.Errorf("process %d still runs after its caller went away", n)
			}
		})
	}
}

func TestExecBackgroundChildKeepsStdoutOpen(t *testing.T) {
	c, _ := startAgent(t)
	// The child inherits stdout and stderr and outlives the shell: the exec
	// ends (exit 0, not at its timeout) while the child still runs.
	r := runExec(context.Background(), c, ExecRequest{Argv: sh("sleep 1000 & echo $!; echo done >&2"), TimeoutMS: patience.Milliseconds()}, ExecIO{})
	if r.err != nil {
		t.Fatal(r.err)
	}
	child, err := strconv.Atoi(strings.TrimSpace(r.stdout))
	if err == nil {
		t.Cleanup(func() { _ = unix.Kill(child, unix.SIGKILL) })
		if processGone(child) {
			t.Errorf("background child %d gone when the exec returned after %v: the exec waited for it", child, r.dur)
		}
	}
	if r.exit != (Exit{}) {
		t.Errorf("exit: got %+v, want exit 0", r.exit)
	}
	if err != nil || r.stderr != "done\n" {
		t.Errorf("output: got stdout %q stderr %q, want a pid and %q", r.stdout, r.stderr, "done\n")
	}
}

func TestExecConcurrent(t *testing.T) {
	c, _ := startAgent(t)
	const n = 24
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			var stdin io.Reader
			if i%2 == 0 {
				stdin = strings.NewReader(strings.Repeat("x", i*1000))
			}
			script := fmt.Sprintf("echo out-%d; echo err-%d >&2; wc -c; exit %d", i, i, i)
			r := runExec(context.Background(), c, ExecRequest{Argv: sh(script), TimeoutMS: patience.Milliseconds()}, ExecIO{Stdin: stdin})
			wantIn := 0
			if stdin != nil {
				wantIn = i * 1000
			}
			wantOut := fmt.Sprintf("out-%d\n%d\n", i, wantIn)
			wantErr := fmt.Sprintf("err-%d\n", i)
			if r.err != nil || r.exit != (Exit{ExitCode: i}) || r.stdout != wantOut || r.stderr != wantErr {
				errs <- fmt.Errorf("exec %d: got %+v, %v, stdout %q, stderr %q; want exit %d, stdout %q, stderr %q",
					i, r.exit, r.err, r.stdout, r.stderr, i, wantOut, wantErr)
			}
		})
	}
	// Pings are answered while the execs run.
	for range 10 {
		if _, err := c.Ping(context.Background()); err != nil {
			t.Errorf("ping during execs: %v", err)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestClientSessionClosed(t *testing.T) {
	tests := []struct {
		name   string
		goAway func(a *testAgent)
	}{
		{name: "agent's stdio closed", goAway: func(a *testAgent) { a.agentEnd.Close() }},
		{name: "agent's session ended", goAway: func(a *testAgent) { a.cancelServe() }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, a := startAgent(t)
			pid := newLineWaiter("\n")
			done := make(chan execResult, 1)
			go func() {
				done <- runExec(context.Background(), c, ExecRequest{Argv: sh("echo $$; exec sleep 1000"), TimeoutMS: neverMS}, ExecIO{Stdout: pid.write})
			}()
			pid.waitFor(t, patience)
			tt.goAway(a)
			select {
			case r := <-done:
				if !errors.Is(r.err, ErrSessionClosed) {
					t.Errorf("Exec: got %+v, %v, want ErrSessionClosed", r.exit, r.err)
				}
			case <-time.After(patience):
				t.Fatal("Exec did not return after the session ended")
			}
			select {
			case <-c.Closed():
			case <-time.After(patience):
				t.Error("Closed() not closed after the session ended")
			}
			if _, err := c.Ping(context.Background()); err == nil {
				t.Error("Ping on a closed session: got nil error")
			}
			// The agent does not leave the caller-less process running.
			if n, err := strconv.Atoi(strings.TrimSpace(pid.String())); err == nil && !waitProcessGone(n, patience) {
				_ = unix.Kill(n, unix.SIGKILL)
				t.Errorf("process %d still runs after its session ended", n)
			}
		})
	}
}

// The two tests below reproduce bugs found earlier, now fixed.

func TestPingHonoursContextWhenAgentHangs(t *testing.T) {
	// Regression: Client.open's context.AfterFunc only half-closes the stream
	// (yamux Close sends FIN but keeps reads blocking), so a call whose agent
	// never answers blocks forever whatever its ctx says. Fix: also
	// st.SetReadDeadline(time.Now()) in that AfterFunc.
	daemonEnd, agentEnd := newPipeConns(t)
	// An agent that accepts streams and never answers.
	hung, err := yamux.Server(agentEnd, yamuxConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer hung.Close()
	go func() {
		for {
			if _, err := hung.AcceptStream(); err != nil {
				return
			}
		}
	}()
	c, err := NewClient(daemonEnd)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := c.Ping(ctx)
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("got %v, want context.DeadlineExceeded", err)
		}
	case <-time.After(patience):
		t.Fatal("Ping did not return after its context ended")
	}
}

func TestExecCancelWhileStdinBackedUp(t *testing.T) {
	// Regression: the agent writes stdin frames to the process's stdin pipe
	// from the goroutine that reads the stream. Once a process leaves more
	// than a pipe's worth of stdin unread, that goroutine blocks in Write
	// and sees neither signal frames nor the caller going away, so the
	// process runs on until it exits or times out. Fix: write stdin from a
	// goroutine of its own, and close stdinW when the stream ends.
	c, _ := startAgent(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pid := newLineWaiter("\n")
	done := make(chan execResult, 1)
	go func() {
		done <- runExec(ctx, c, ExecRequest{Argv: sh("echo $$; exec sleep 1000"), TimeoutMS: neverMS},
			ExecIO{Stdout: pid.write, Stdin: strings.NewReader(strings.Repeat("x", 1<<20))})
	}()
	pid.waitFor(t, patience)
	n, err := strconv.Atoi(strings.TrimSpace(pid.String()))
	if err != nil {
		t.Fatalf("pid: %q: %v", pid.String(), err)
	}
	t.Cleanup(func() { _ = unix.Kill(n, unix.SIGKILL) })
	// The process never reads: wait until its stdin pipe is full, so that
	// the agent's writer is blocked when the caller goes away.
	waitPipeFull(t, n, 0)
	cancel()
	select {
	case <-done:
	case <-time.After(patience):
		t.Error("Exec did not return after its context was cancelled")
	}
	if !waitProcessGone(n, patience) {
		_ = unix.Kill(n, unix.SIGKILL)
		t.Errorf("process %d still runs after its caller went away", n)
	}
}

func TestExecOutputCap(t *testing.T) {
	c, _ := startAgent(t)
	tests := []struct {
		name          string
		script        string
		max           int64
		wantStdout    int
		wantStderr    int
		wantTruncated bool
	}{
		{name: "no cap", script: "head -c 100000 /dev/zero", wantStdout: 100000},
		{name: "under the cap", script: "head -c 10 /dev/zero", max: 11, wantStdout: 10},
		{name: "exactly the cap", script: "head -c 10 /dev/zero", max: 10, wantStdout: 10},
		{name: "one over", script: "head -c 11 /dev/zero", max: 10, wantStdout: 10, wantTruncated: true},
		{name: "each stream capped on its own", script: "head -c 50 /dev/zero; head -c 5 /dev/zero >&2", max: 20, wantStdout: 20, wantStderr: 5, wantTruncated: true},
		// Past the cap output is drained, so a writer never blocks.
		{name: "much more than the cap", script: "head -c 4000000 /dev/zero; head -c 4000000 /dev/zero >&2", max: 1000, wantStdout: 1000, wantStderr: 1000, wantTruncated: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runExec(context.Background(), c, ExecRequest{Argv: sh(tt.script), MaxOutputBytes: tt.max, TimeoutMS: 20_000}, ExecIO{})
			if r.err != nil {
				t.Fatal(r.err)
			}
			if want := (Exit{Truncated: tt.wantTruncated}); r.exit != want {
				t.Errorf("exit: got %+v, want %+v", r.exit, want)
			}
			if len(r.stdout) != tt.wantStdout || len(r.stderr) != tt.wantStderr {
				t.Errorf("output: got %d and %d bytes, want %d and %d", len(r.stdout), len(r.stderr), tt.wantStdout, tt.wantStderr)
			}
		})
	}
}

func TestLookPath(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "tool")
	if err := os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	plain := filepath.Join(dir, "data")
	if err := os.WriteFile(plain, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		file, cwd, path string
		want            string
		wantErr         error
	}{
		{"tool", "/", dir, exe, nil},
		{"tool", "/", "/nowhere:" + dir, exe, nil},
		{"tool", "/", "/usr/bin", "", exec.ErrNotFound},
		{"./tool", dir, "", exe, nil},
		{"tool", dir, "", "", exec.ErrNotFound},
		{"tool", dir, ".", exe, nil},
		{exe, "/", "", exe, nil},
		{"data", "/", dir, "", fs.ErrPermission},
		{plain, "/", "", "", fs.ErrPermission},
		{"sh", "/", "/usr/bin:/bin", "", nil},
	}
	for _, tt := range tests {
		got, err := lookPath(tt.file, tt.cwd, tt.path)
		if tt.wantErr != nil {
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("lookPath(%q, %q, %q): got %q, %v, want error %v", tt.file, tt.cwd, tt.path, got, err, tt.wantErr)
			}
			continue
		}
		if err != nil || (tt.want != "" && got != tt.want) {
			t.Errorf("lookPath(%q, %q, %q): got %q, %v, want %q", tt.file, tt.cwd, tt.path, got, err, tt.want)
		}
	}
}

func TestExecChildSignalDispositions(t *testing.T) {
	// Regression: the agent ignored SIGPIPE with signal.Ignore, and an
	// ignored disposition survives execve: every command then ran with
	// SIGPIPE ignored (`yes | head` spun on EPIPE instead of dying). The
	// agent drops the signals it catches through handlers instead, which
	// execve resets to the default.
	c, _ := startAgent(t)
	r := runExec(context.Background(), c, ExecRequest{Argv: []string{"grep", "^SigIgn:", "/proc/self/status"}, TimeoutMS: 10_000}, ExecIO{})
	if r.err != nil || r.exit != (Exit{}) {
		t.Fatalf("got %+v, %v (stderr %q), want exit 0", r.exit, r.err, r.stderr)
	}
	if want := "SigIgn:\t0000000000000000\n"; r.stdout != want {
		t.Errorf("ignored signals of a command: got %q, want %q", r.stdout, want)
	}
	for _, sig := range []unix.Signal{unix.SIGHUP, unix.SIGINT, unix.SIGUSR1, unix.SIGUSR2, unix.SIGPIPE, unix.SIGALRM, unix.SIGTERM} {
		t.Run(unix.SignalName(sig), func(t *testing.T) {
			script := fmt.Sprintf("kill -%d $$; sleep 10", int(sig))
			r := runExec(context.Background(), c, ExecRequest{Argv: sh(script), TimeoutMS: 20_000}, ExecIO{})
			if r.err != nil {
				t.Fatal(r.err)
			}
			if want := (Exit{ExitCode: 128 + int(sig), Signal: int(sig)}); r.exit != want {
				t.Errorf("exit of a shell that sent itself %v: got %+v, want %+v", sig, r.exit, want)
			}
		})
	}
}

func TestExecOutputNotLostAfterExit(t *testing.T) {
	// Regression: after the process exited, the exec read output for at
	// most outputGrace and then closed the pipes, even when the output was
	// already in them and only the reader goroutine had not run yet (200
	// concurrent `sleep 1; echo ok` in one sandbox sometimes returned exit
	// 0 with no output). A zero grace is that reader never being scheduled
	// in time.
	tests := []struct {
		name   string
		grace  time.Duration
		n      int
		script string // %d is the exec's index
		// prefix is the stdout before the exec's line.
		prefix string
	}{
		{name: "reader never in time", grace: 0, n: 40, script: "echo line-%d"},
		{name: "reader never in time, more than one read", grace: 0, n: 8, script: "head -c 100000 /dev/zero | tr '\\0' x; echo; echo line-%d", prefix: strings.Repeat("x", 100000) + "\n"},
		{name: "many at once", grace: outputGrace, n: 200, script: "sleep 1; echo line-%d"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, _ := startAgent(t, func(s *Server) { s.outputGrace = tt.grace })
			var wg sync.WaitGroup
			errs := make(chan error, tt.n)
			for i := range tt.n {
				wg.Go(func() {
					r := runExec(context.Background(), c, ExecRequest{Argv: sh(fmt.Sprintf(tt.script, i)), TimeoutMS: 120_000}, ExecIO{})
					want := tt.prefix + fmt.Sprintf("line-%d\n", i)
					if r.err != nil || r.exit != (Exit{}) || r.stdout != want {
						errs <- fmt.Errorf("exec %d: got %+v, %v, stdout %d bytes ending %q; want exit 0, stdout %d bytes ending %q",
							i, r.exit, r.err, len(r.stdout), r.stdout[max(0, len(r.stdout)-20):], len(want), want[max(0, len(want)-20):])
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}

func TestExecBackgroundWriterDoesNotHoldExec(t *testing.T) {
	// Output buffered when the process exits is read to the end, but a
	// background child that keeps writing must not keep the exec alive.
	c, _ := startAgent(t)
	r := runExec(context.Background(), c, ExecRequest{Argv: sh("yes & echo $! >&2"), TimeoutMS: 60_000, MaxOutputBytes: 1 << 10}, ExecIO{})
	if r.err != nil {
		t.Fatal(r.err)
	}
	child, err := strconv.Atoi(strings.TrimSpace(r.stderr))
	if err != nil {
		t.Fatalf("background child's pid: %q: %v", r.stderr, err)
	}
	t.Cleanup(func() { _ = unix.Kill(child, unix.SIGKILL) })
	if r.exit.ExitCode != 0 || r.exit.TimedOut {
		t.Errorf("exit: got %+v, want exit 0", r.exit)
	}
	// Once the exec closed its end, the writer dies of SIGPIPE.
	if !waitProcessGone(child, patience) {
		t.Errorf("background writer %d still runs after the exec closed its pipe", child)
	}
}

// waitPipeFull waits until the pipe that is descriptor fd of process pid
// holds as many bytes as it can (its writer blocks), or fails the test
// after patience. It opens the pipe through /proc for FIONREAD and reads
// nothing.
func waitPipeFull(t *testing.T, pid, fd int) {
	t.Helper()
	f, err := os.OpenFile(fmt.Sprintf("/proc/%d/fd/%d", pid, fd), os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		t.Fatalf("opening the pipe: %v", err)
	}
	defer f.Close()
	size, err := unix.FcntlInt(f.Fd(), unix.F_GETPIPE_SZ, 0)
	if err != nil {
		t.Fatalf("pipe size: %v", err)
	}
	deadline := time.Now().Add(patience)
	for {
		n, err := unix.IoctlGetInt(int(f.Fd()), unix.TIOCINQ) // FIONREAD
		if err != nil {
			t.Fatalf("bytes in the pipe: %v", err)
		}
		if n >= size {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the pipe holds %d of %d bytes after %v", n, size, patience)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// processesWithEnv returns the running (not zombie) processes whose initial
// environment holds kv.
func processesWithEnv(kv string) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/environ")
		if err != nil || !slices.Contains(strings.Split(string(b), "\x00"), kv) {
			continue
		}
		if !processGone(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// waitNoProcessesWithEnv waits up to timeout until no process with kv in
// its environment runs, and returns the ones that still do.
func waitNoProcessesWithEnv(kv string, timeout time.Duration) []int {
	deadline := time.Now().Add(timeout)
	for {
		left := processesWithEnv(kv)
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestExecKillsEscapedProcesses(t *testing.T) {
	// Regression: a timeout or a caller going away killed only the
	// process group, so `setsid cmd &` (a new session, hence a new group)
	// inside an exec ran on.
	c, _ := startAgent(t)
	// Each escaped process touches $READY once it runs in its new session:
	// a timeout that fired before (a slow machine) proves nothing, and the
	// command runs again with a longer one.
	tests := []struct {
		name      string
		script    string
		timeoutMS int64
		// cancelOnReady: the caller goes away once "ready" is printed.
		cancelOnReady bool
	}{
		{name: "new session, timeout", script: `setsid sh -c 'touch "$READY"; sleep 1000' & sleep 1000`, timeoutMS: 1000},
		{name: "new session without the exec's pipes, timeout", script: `setsid sh -c 'touch "$READY"; sleep 1000' </dev/null >/dev/null 2>&1 & sleep 1000`, timeoutMS: 1000},
		{name: "double fork holding the output pipe, timeout", script: `(setsid sh -c 'touch "$READY"; exec sleep 1000' &); sleep 1000`, timeoutMS: 1000},
		{name: "new session, caller gone", script: `setsid sh -c 'touch "$READY"; sleep 1000' & until [ -e "$READY" ]; do sleep 0.01; done; echo ready; sleep 1000`, timeoutMS: neverMS, cancelOnReady: true},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mark := fmt.Sprintf("PANDASTACK_TEST_MARK=%d-%d", os.Getpid(), i)
			t.Cleanup(func() {
				for _, pid := range processesWithEnv(mark) {
					_ = unix.Kill(pid, unix.SIGKILL)
				}
			})
			readyFile := filepath.Join(t.TempDir(), "ready")
			env := []string{mark, "READY=" + readyFile}
			var r execResult
			if tt.cancelOnReady {
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				ready := newLineWaiter("ready\n")
				done := make(chan execResult, 1)
				go func() {
					done <- runExec(ctx, c, ExecRequest{Argv: sh(tt.script), Env: env, TimeoutMS: tt.timeoutMS}, ExecIO{Stdout: ready.write})
				}()
				ready.waitFor(t, patience)
				cancel()
				select {
				case r = <-done:
				case <-time.After(patience):
					t.Fatal("exec did not end after its caller went away")
				}
			} else {
				r = runTimingOut(t, c, ExecRequest{Argv: sh(tt.script), Env: env, TimeoutMS: tt.timeoutMS}, func(execResult) bool {
					_, err := os.Stat(readyFile)
					return err == nil
				})
				if r.err != nil || !r.exit.TimedOut {
					t.Errorf("got %+v, %v, want a timeout", r.exit, r.err)
				}
			}
			if left := waitNoProcessesWithEnv(mark, patience); len(left) > 0 {
				var cmds []string
				for _, pid := range left {
					b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
					cmds = append(cmds, fmt.Sprintf("%d %q", pid, strings.ReplaceAll(string(b), "\x00", " ")))
				}
				t.Errorf("processes of the exec still running: got %v, want none", cmds)
			}
		})
	}
	// The agent is alive and well.
	if _, err := c.Ping(context.Background()); err != nil {
		t.Fatalf("ping after the kills: %v", err)
	}
}
