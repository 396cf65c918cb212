package agent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/yamux"
	"golang.org/x/sys/unix"
)

// These tests run a real Server in the test process, connected to a real
// Client through a pair of os.Pipes, the same kind of byte stream the
// runtime gives the daemon for the agent's stdio.
//
// NewServer makes the test process a child subreaper and starts a SIGCHLD
// reaper that calls wait4(-1): it reaps every child of the process. Two
// reapers at once would steal each other's children, so a test owns at most
// one Server at a time (no t.Parallel at the top level), its cleanup waits
// until the reaper goroutine is gone, and no test here starts a child
// process except through the agent.

// patience bounds every wait in these tests for something that must happen
// (a line of output, a process ending, a goroutine returning). It is
// generous: the tests never assume how fast the machine is, only that it
// gets there.
const patience = time.Minute

// neverMS is an exec timeout that does not fire while a test waits within
// patience: for commands that a test ends itself (a signal, a cancel).
const neverMS = 10 * int64(patience/time.Millisecond)

// pipeConn is one end of a bidirectional byte stream made of two os.Pipes.
type pipeConn struct {
	r, w *os.File
}

func (c *pipeConn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *pipeConn) Write(p []byte) (int, error) { return c.w.Write(p) }
func (c *pipeConn) Close() error                { return errors.Join(c.r.Close(), c.w.Close()) }

// newPipeConns returns the two ends of a fresh stream: what one writes the
// other reads.
func newPipeConns(t testing.TB) (daemonEnd, agentEnd *pipeConn) {
	t.Helper()
	toAgentR, toAgentW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	toDaemonR, toDaemonW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	return &pipeConn{r: toDaemonR, w: toAgentW}, &pipeConn{r: toAgentR, w: toDaemonW}
}

// goroutinesMatching returns the stacks of the goroutines whose stack
// contains substr.
func goroutinesMatching(substr string) []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, substr) {
			out = append(out, g)
		}
	}
	return out
}

// waitGoroutinesGone waits until no goroutine's stack contains substr and
// reports the stragglers after timeout.
func waitGoroutinesGone(substr string, timeout time.Duration) []string {
	deadline := time.Now().Add(timeout)
	for {
		g := goroutinesMatching(substr)
		if len(g) == 0 || time.Now().After(deadline) {
			return g
		}
		time.Sleep(5 * time.Millisecond)
	}
}

const (
	// reaperStack is in the stack of the goroutine NewServer starts.
	reaperStack = "internal/agent.NewServer"
	// serverStack is in the stack of Serve and of every request handler.
	serverStack = "internal/agent.(*Server)"
)

// serverHandle is a Server whose reaper the test owns.
type serverHandle struct {
	srv  *Server
	stop func() error
}

// startServer starts a Server. stop waits for every goroutine of the Server
// (handlers included) to end, then stops the reaper and waits for it to
// end, so that the next Server starts alone.
func startServer(t testing.TB) serverHandle {
	if g := waitGoroutinesGone(reaperStack, patience); len(g) > 0 {
		t.Fatalf("another Server's reaper is still running (tests must not run in parallel):\n%s", g[0])
	}
	ctx, cancel := context.WithCancel(context.Background())
	srv := NewServer(ctx, slog.New(slog.DiscardHandler))
	stop := func() error {
		var err error
		if g := waitGoroutinesGone(serverStack, patience); len(g) > 0 {
			err = errors.New("server goroutines still running after the session ended:\n" + strings.Join(g, "\n\n"))
		}
		cancel()
		if g := waitGoroutinesGone(reaperStack, patience); len(g) > 0 && err == nil {
			err = errors.New("reaper still running after its context ended:\n" + g[0])
		}
		return err
	}
	return serverHandle{srv: srv, stop: stop}
}

// testAgent is a Server serving one session over pipes, and the daemon's
// end of that session.
type testAgent struct {
	srv *Server
	// daemonEnd is the raw stream the client's session runs on.
	daemonEnd *pipeConn
	// agentEnd is what Serve runs on; closing it is the sandbox dying.
	agentEnd *pipeConn
	// cancelServe ends Serve's context.
	cancelServe context.CancelFunc
	// served receives Serve's result.
	served chan error
}

// startAgentServer starts a Server and serves one session on fresh pipes.
// configure, if any, adjusts the Server before it serves. Everything is torn
// down, and checked for leaked goroutines, at cleanup.
func startAgentServer(t *testing.T, configure ...func(*Server)) *testAgent {
	t.Helper()
	h := startServer(t)
	for _, f := range configure {
		f(h.srv)
	}
	t.Cleanup(func() {
		if err := h.stop(); err != nil {
			t.Error(err)
		}
	})
	daemonEnd, agentEnd := newPipeConns(t)
	ctx, cancel := context.WithCancel(context.Background())
	a := &testAgent{srv: h.srv, daemonEnd: daemonEnd, agentEnd: agentEnd, cancelServe: cancel, served: make(chan error, 1)}
	go func() { a.served <- h.srv.Serve(ctx, agentEnd) }()
	t.Cleanup(func() {
		cancel()
		daemonEnd.Close()
		agentEnd.Close()
		select {
		case err := <-a.served:
			if err != nil {
				t.Errorf("Serve: got %v, want nil", err)
			}
		case <-time.After(patience):
			t.Error("Serve did not return after its session ended")
		}
	})
	return a
}

// startAgent starts a Server and returns a Client connected to it.
func startAgent(t *testing.T, configure ...func(*Server)) (*Client, *testAgent) {
	t.Helper()
	a := startAgentServer(t, configure...)
	c, err := NewClient(a.daemonEnd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, a
}

// rawSession returns a yamux session to a fresh Server, for tests that
// speak the frame protocol directly.
func rawSession(t *testing.T) *yamux.Session {
	t.Helper()
	a := startAgentServer(t)
	sess, err := yamux.Client(a.daemonEnd, yamuxConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sess.Close() })
	return sess
}

// execResult is what one Exec produced.
type execResult struct {
	stdout, stderr string
	exit           Exit
	err            error
	dur            time.Duration
}

// runExec runs req through c and collects its output.
func runExec(ctx context.Context, c *Client, req ExecRequest, eio ExecIO) execResult {
	var mu sync.Mutex
	var stdout, stderr bytes.Buffer
	collect := func(b *bytes.Buffer, next func([]byte) error) func([]byte) error {
		return func(p []byte) error {
			mu.Lock()
			b.Write(p)
			mu.Unlock()
			if next != nil {
				return next(p)
			}
			return nil
		}
	}
	eio.Stdout = collect(&stdout, eio.Stdout)
	eio.Stderr = collect(&stderr, eio.Stderr)
	start := time.Now()
	exit, err := c.Exec(ctx, req, eio)
	dur := time.Since(start)
	mu.Lock()
	defer mu.Unlock()
	return execResult{stdout: stdout.String(), stderr: stderr.String(), exit: exit, err: err, dur: dur}
}

// runTimingOut runs req, a command that only a timeout ends, first with
// req.TimeoutMS. ready reports whether the command had set up what the test
// is about (a background child, an escaped session) before the timeout
// fired; on a slow machine it may not have, and the command runs again with
// twice the timeout, up to patience. It returns the last run.
func runTimingOut(t *testing.T, c *Client, req ExecRequest, ready func(execResult) bool) execResult {
	t.Helper()
	for {
		r := runExec(context.Background(), c, req, ExecIO{})
		if r.err != nil || ready(r) {
			return r
		}
		if time.Duration(req.TimeoutMS)*time.Millisecond >= patience {
			t.Fatalf("the command never got ready before its timeout, up to %d ms: %+v, stdout %q, stderr %q", req.TimeoutMS, r.exit, r.stdout, r.stderr)
		}
		req.TimeoutMS *= 2
		t.Logf("the command was not ready before its timeout (a slow machine): again with %d ms", req.TimeoutMS)
	}
}

// sh returns the argv that runs script with /bin/sh -c.
func sh(script string) []string { return []string{"/bin/sh", "-c", script} }

// processGone reports whether pid no longer runs: it does not exist or is a
// zombie waiting to be reaped.
func processGone(pid int) bool {
	if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) {
		return true
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return errors.Is(err, os.ErrNotExist)
	}
	// The state follows the parenthesised command name.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return false
	}
	return s[i+2] == 'Z' || s[i+2] == 'X'
}

// waitProcessGone waits up to timeout for pid to end.
func waitProcessGone(pid int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for !processGone(pid) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

// lineWaiter is an ExecIO output callback that signals when a line is seen.
type lineWaiter struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	want string
	seen chan struct{}
	once sync.Once
}

func newLineWaiter(want string) *lineWaiter {
	return &lineWaiter{want: want, seen: make(chan struct{})}
}

func (l *lineWaiter) write(p []byte) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	if strings.Contains(l.buf.String(), l.want) {
		l.once.Do(func() { close(l.seen) })
	}
	return nil
}

func (l *lineWaiter) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// waitFor waits for the line or fails the test.
func (l *lineWaiter) waitFor(t *testing.T, timeout time.Duration) {
	t.Helper()
	select {
	case <-l.seen:
	case <-time.After(timeout):
		t.Fatalf("output %q never contained %q", l.String(), l.want)
	}
}

var _ io.ReadWriteCloser = (*pipeConn)(nil)
