package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/agent"
	"github.com/pandastack/pandastack/internal/runtime"
	"github.com/pandastack/pandastack/internal/runtime/gvisor"
	"github.com/pandastack/pandastack/internal/runtime/runtimetest"
	"github.com/pandastack/pandastack/internal/template"
	"github.com/pandastack/pandastack/internal/testenv"
	"golang.org/x/sys/unix"
)

// These tests run the real agent binary: on the host with `serve` (a child
// of the test, its stdio three os.Pipes and a file), and as the init of a
// real gVisor sandbox.

// patience bounds every wait for something that must happen (a sandbox
// starting, an answer, processes ending): generous, because the tests never
// assume how fast the machine is.
const patience = 2 * time.Minute

// pipeConn is the daemon's end of the agent's stdio.
type pipeConn struct {
	r, w *os.File
}

func (c *pipeConn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *pipeConn) Write(p []byte) (int, error) { return c.w.Write(p) }
func (c *pipeConn) Close() error                { return errors.Join(c.r.Close(), c.w.Close()) }

// hostAgent is the agent binary running on the host.
type hostAgent struct {
	c      *agent.Client
	pid    int
	stderr string // the file that is the agent's stderr
	exited chan struct{}
}

func startHostAgent(t *testing.T) *hostAgent {
	t.Helper()
	bin := testenv.Agent(t)
	inR, inW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr := filepath.Join(t.TempDir(), "agent.log")
	logf, err := os.OpenFile(stderr, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	// A descriptor beyond stdio, as a runtime might leave one to init.
	extra, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	cmd := exec.Command(bin, "serve")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, logf
	cmd.ExtraFiles = []*os.File{extra}
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	inR.Close()
	outW.Close()
	logf.Close()
	a := &hostAgent{pid: cmd.Process.Pid, stderr: stderr, exited: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		close(a.exited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-a.exited
	})
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	c, err := agent.Dial(ctx, &pipeConn{r: outR, w: inW})
	if err != nil {
		t.Fatalf("Dial: %v (agent stderr: %q)", err, readSmall(stderr))
	}
	t.Cleanup(func() { c.Close() })
	a.c = c
	return a
}

// readSmall returns the start of a file, for failure messages.
func readSmall(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	b := make([]byte, 2048)
	n, _ := f.Read(b)
	return string(b[:n])
}

// ping checks that the agent answers, with a generous deadline: a stopped
// or dead agent never does.
func ping(t *testing.T, c *agent.Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	if _, err := c.Ping(ctx); err != nil {
		t.Fatalf("ping: got %v, want an answer", err)
	}
}

type result struct {
	stdout, stderr string
	exit           agent.Exit
}

func run(t *testing.T, c *agent.Client, req agent.ExecRequest) result {
	t.Helper()
	var stdout, stderr bytes.Buffer
	if req.TimeoutMS == 0 {
		req.TimeoutMS = patience.Milliseconds()
	}
	ex, err := c.Exec(context.Background(), req, agent.ExecIO{
		Stdout: func(b []byte) error { stdout.Write(b); return nil },
		Stderr: func(b []byte) error { stderr.Write(b); return nil },
	})
	if err != nil {
		t.Fatalf("exec %q: %v", req.Argv, err)
	}
	return result{stdout: stdout.String(), stderr: stderr.String(), exit: ex}
}

func sh(script string) []string { return []string{"/bin/sh", "-c", script} }

// catchable are the signals a process can catch: all but SIGKILL and
// SIGSTOP.
func catchable() []unix.Signal {
	var sigs []unix.Signal
	for sig := unix.Signal(1); sig <= 64; sig++ {
		if sig != unix.SIGKILL && sig != unix.SIGSTOP {
			sigs = append(sigs, sig)
		}
	}
	return sigs
}

func sigName(sig unix.Signal) string {
	if n := unix.SignalName(sig); n != "" {
		return n
	}
	return "signal-" + strconv.Itoa(int(sig))
}

func TestAgentSurvivesSignals(t *testing.T) {
	// Regression: Go's default for SIGTERM, SIGHUP and SIGINT is to exit
	// (and to stop for SIGTSTP), so `kill -TERM 1` in a sandbox ended its
	// init and the whole sandbox.
	a := startHostAgent(t)
	for _, sig := range catchable() {
		t.Run(sigName(sig), func(t *testing.T) {
			if err := unix.Kill(a.pid, sig); err != nil {
				t.Fatal(err)
			}
			// A fatal signal is acted on before any of the agent's
			// threads returns to user space, so before it can answer.
			ping(t, a.c)
			select {
			case <-a.exited:
				t.Fatalf("agent exited after %v", sig)
			default:
			}
		})
	}
	// Commands still get the default dispositions.
	checkChildSignals(t, a.c)
}

// checkChildSignals checks that commands start with no signal ignored and
// die of the usual signals.
func checkChildSignals(t *testing.T, c *agent.Client) {
	t.Helper()
	// gVisor's /proc/<pid>/status has no SigIgn line; Linux's does.
	r := run(t, c, agent.ExecRequest{Argv: []string{"grep", "^SigIgn:", "/proc/self/status"}})
	if want := "SigIgn:\t0000000000000000\n"; r.stdout != "" && r.stdout != want {
		t.Errorf("ignored signals of a command: got %q, want %q", r.stdout, want)
	}
	// 32 and 34 are the ones the agent drops with a handler of its own.
	for _, sig := range []unix.Signal{unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGPIPE, 32, 34} {
		r := run(t, c, agent.ExecRequest{Argv: sh(fmt.Sprintf("kill -%d $$; sleep 10", int(sig)))})
		if want := (agent.Exit{ExitCode: 128 + int(sig), Signal: int(sig)}); r.exit != want {
			t.Errorf("a command sending itself %v: got %+v, want %+v", sig, r.exit, want)
		}
	}
}

func TestAgentStdioDetached(t *testing.T) {
	// Regression: the agent's fds 0 and 1 were the transport and fd 2 a
	// host file, so a command writing to /proc/1/fd/N corrupted the
	// session or filled the host's disk. On the host the test runs as
	// root with CAP_SYS_PTRACE, which the agent's non-dumpability does not
	// stop: this checks that the descriptors lead to /dev/null.
	a := startHostAgent(t)
	proc := fmt.Sprintf("/proc/%d", a.pid)
	for fd := 0; fd <= 2; fd++ {
		if got, err := os.Readlink(fmt.Sprintf("%s/fd/%d", proc, fd)); err != nil || got != os.DevNull {
			t.Errorf("agent's fd %d: got %q, %v, want %s", fd, got, err, os.DevNull)
		}
	}
	// Nothing else of the agent's, inherited (fd 3) or its own, reaches its
	// commands.
	entries, err := os.ReadDir(proc + "/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if fd, _ := strconv.Atoi(e.Name()); fd <= 2 {
			continue
		}
		info, err := os.ReadFile(proc + "/fdinfo/" + e.Name())
		if err != nil {
			continue // closed in between
		}
		var flags int64
		for _, line := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, "flags:"); ok {
				flags, _ = strconv.ParseInt(strings.TrimSpace(v), 8, 64)
			}
		}
		if flags&unix.O_CLOEXEC == 0 {
			link, _ := os.Readlink(proc + "/fd/" + e.Name())
			t.Errorf("agent's fd %s (%s) is not close-on-exec", e.Name(), link)
		}
	}

	script := fmt.Sprintf(`printf garbage > %[1]s/fd/1; printf garbage > %[1]s/fd/0; head -c 50000000 /dev/zero > %[1]s/fd/2`, proc)
	r := run(t, a.c, agent.ExecRequest{Argv: sh(script)})
	t.Logf("writes to the agent's stdio: %+v, stderr %q", r.exit, r.stderr)
	ping(t, a.c)
	if r := run(t, a.c, agent.ExecRequest{Argv: []string{"echo", "ok"}}); r.stdout != "ok\n" {
		t.Errorf("exec after the writes: got %q, want %q", r.stdout, "ok\n")
	}
	if fi, err := os.Stat(a.stderr); err != nil || fi.Size() >= 1<<20 {
		t.Errorf("agent's stderr file: got %v bytes (%v), want under 1 MiB", fi.Size(), err)
	}
}

// startSandbox starts a gVisor sandbox of the base template with the
// freshly built agent as init, and returns its agent and its state
// directory.
func startSandbox(t *testing.T) (*agent.Client, string) {
	t.Helper()
	runsc := testenv.Runsc(t)
	tpl := testenv.Template(t, "base")
	agentPath, err := template.InstallAgent(tpl, testenv.Agent(t))
	if err != nil {
		t.Fatal(err)
	}
	state := t.TempDir()
	rt, err := gvisor.New(gvisor.Config{Runsc: runsc, StateDir: state, CgroupParent: "/pandastack-test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	id := runtimetest.NewID()
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	spec := runtime.Spec{
		ID:        id,
		RootfsDir: tpl.Rootfs,
		Init:      []string{agentPath},
		Env:       []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"},
		Limits:    runtime.Limits{CPU: 1, MemoryBytes: 256 << 20, DiskBytes: 256 << 20},
	}
	if err := rt.Start(ctx, spec); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { _ = rt.Delete(context.Background(), id) })
	conn, err := rt.Connect(ctx, id)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	c, err := agent.Dial(ctx, conn)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c, state
}

// findFile returns the one file called name under dir.
func findFile(t *testing.T, dir, name string) string {
	t.Helper()
	var found []string
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && d.Name() == name {
			found = append(found, p)
		}
		return nil
	})
	if len(found) != 1 {
		t.Fatalf("files called %s under %s: got %q, want one", name, dir, found)
	}
	return found[0]
}

func TestSandboxAgentHardening(t *testing.T) {
	c, state := startSandbox(t)
	ping(t, c)

	t.Run("stdio unreachable", func(t *testing.T) {
		// Regression: a command could write to the agent's stdio through
		// /proc/1/fd: into the transport, or into agent.log on the host
		// without bound.
		logPath := findFile(t, state, "agent.log")
		r := run(t, c, agent.ExecRequest{Argv: []string{"readlink", "/proc/1/fd/1"}})
		if r.exit.ExitCode == 0 {
			t.Errorf("readlink /proc/1/fd/1 in the sandbox: got %q, exit 0, want permission denied", r.stdout)
		}
		for fd := 0; fd <= 2; fd++ {
			script := fmt.Sprintf("head -c 50000000 /dev/zero > /proc/1/fd/%d", fd)
			r := run(t, c, agent.ExecRequest{Argv: sh(script)})
			t.Logf("fd %d: %+v, stderr %q", fd, r.exit, r.stderr)
			ping(t, c)
		}
		r = run(t, c, agent.ExecRequest{Argv: sh("printf garbage > /proc/1/fd/1; printf garbage > /proc/1/fd/0")})
		t.Logf("garbage: %+v, stderr %q", r.exit, r.stderr)
		ping(t, c)
		if r := run(t, c, agent.ExecRequest{Argv: []string{"echo", "ok"}}); r.stdout != "ok\n" {
			t.Errorf("exec after the writes: got %q, want %q", r.stdout, "ok\n")
		}
		if fi, err := os.Stat(logPath); err != nil || fi.Size() >= 1<<20 {
			t.Errorf("host agent.log: got %v bytes (%v), want under 1 MiB", fi.Size(), err)
		}
	})

	t.Run("signals to init", func(t *testing.T) {
		// Regression: `kill -TERM 1` (and HUP, INT, QUIT, USR1...) ended
		// the agent and with it the sandbox.
		var script strings.Builder
		for _, sig := range catchable() {
			fmt.Fprintf(&script, "kill -%d 1 || echo 'kill -%d 1 failed' >&2\n", int(sig), int(sig))
		}
		r := run(t, c, agent.ExecRequest{Argv: sh(script.String())})
		if r.exit != (agent.Exit{}) || r.stderr != "" {
			t.Errorf("sending every signal to PID 1: got %+v, stderr %q, want exit 0", r.exit, r.stderr)
		}
		ping(t, c)
		checkChildSignals(t, c)
	})

	t.Run("output of many execs at once", func(t *testing.T) {
		// Regression: with 200 of these at once some returned exit 0 and
		// no output: the agent stopped reading 150 ms after the process
		// exited, even when the output was already in the pipe.
		const n = 200
		errs := make(chan error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				var out bytes.Buffer
				var mu sync.Mutex
				ex, err := c.Exec(context.Background(), agent.ExecRequest{Argv: sh(fmt.Sprintf("sleep 1; echo ok-%d", i)), TimeoutMS: 300_000},
					agent.ExecIO{Stdout: func(b []byte) error { mu.Lock(); out.Write(b); mu.Unlock(); return nil }})
				mu.Lock()
				defer mu.Unlock()
				if want := fmt.Sprintf("ok-%d\n", i); err != nil || ex != (agent.Exit{}) || out.String() != want {
					errs <- fmt.Errorf("exec %d: got %+v, %v, stdout %q; want exit 0, stdout %q", i, ex, err, out.String(), want)
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})

	t.Run("escaped processes killed", func(t *testing.T) {
		// Regression: a timeout killed only the process group. The escaped
		// session touches /tmp/escaped once it runs; a timeout that fired
		// before (a slow machine) proves nothing, and the command runs
		// again with twice the timeout.
		for timeout := int64(1000); ; timeout *= 2 {
			r := run(t, c, agent.ExecRequest{Argv: sh("rm -f /tmp/escaped; setsid sh -c 'touch /tmp/escaped; sleep 1000' & sleep 1000"), TimeoutMS: timeout})
			if !r.exit.TimedOut {
				t.Errorf("exit: got %+v, want a timeout", r.exit)
			}
			if run(t, c, agent.ExecRequest{Argv: []string{"test", "-e", "/tmp/escaped"}}).exit.ExitCode == 0 {
				break
			}
			if time.Duration(timeout)*time.Millisecond >= patience {
				t.Fatalf("the escaped session never ran before the timeout, up to %d ms", timeout)
			}
			t.Logf("the escaped session did not run before the %d ms timeout (a slow machine): again", timeout)
		}
		deadline := time.Now().Add(patience)
		for {
			// pgrep exits 1 when nothing matches; no shell, so nothing
			// else's command line holds the pattern.
			r := run(t, c, agent.ExecRequest{Argv: []string{"pgrep", "-a", "-f", "^sleep 1000$"}})
			if r.exit.ExitCode == 1 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("processes left after the timeout: got %q (%+v), want none", r.stdout, r.exit)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})

	t.Run("orphan holding the output killed", func(t *testing.T) {
		// A double fork in its own session: orphaned to the agent (PID 1
		// here), out of the exec's group and tree, found only by the
		// exec's stdout and stderr it holds, through gVisor's /proc.
		for timeout := int64(1000); ; timeout *= 2 {
			r := run(t, c, agent.ExecRequest{Argv: sh("rm -f /tmp/orphaned; (setsid sh -c 'touch /tmp/orphaned; exec sleep 1001' &); exec sleep 1000"), TimeoutMS: timeout})
			if !r.exit.TimedOut {
				t.Errorf("exit: got %+v, want a timeout", r.exit)
			}
			if run(t, c, agent.ExecRequest{Argv: []string{"test", "-e", "/tmp/orphaned"}}).exit.ExitCode == 0 {
				break
			}
			if time.Duration(timeout)*time.Millisecond >= patience {
				t.Fatalf("the orphan never ran before the timeout, up to %d ms", timeout)
			}
			t.Logf("the orphan did not run before the %d ms timeout (a slow machine): again", timeout)
		}
		deadline := time.Now().Add(patience)
		for {
			r := run(t, c, agent.ExecRequest{Argv: []string{"pgrep", "-a", "-f", "^sleep 1001$"}})
			if r.exit.ExitCode == 1 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("orphan left after the timeout: got %q (%+v), want none", r.stdout, r.exit)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
	ping(t, c)
}
