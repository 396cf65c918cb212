package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// These tests run background processes on the host through a real Server
// and Client (see helpers_test.go). Every test ends its processes itself:
// the harness checks that no goroutine of the Server is left.

// killProcesses kills every background process of srv and waits for their
// exits to be recorded.
func killProcesses(t *testing.T, srv *Server) {
	t.Helper()
	for _, p := range srv.procs.list(time.Now()) {
		_ = p.signal(9)
		select {
		case <-p.done:
		case <-time.After(patience):
			t.Errorf("process %d did not end after SIGKILL", p.pid)
		}
	}
}

// startProcessAgent starts an agent whose background processes are killed
// when the test ends (before the harness checks for goroutines).
func startProcessAgent(t *testing.T) (*Client, *testAgent) {
	t.Helper()
	c, a := startAgent(t)
	t.Cleanup(func() { killProcesses(t, a.srv) })
	return c, a
}

// attached is what one attach collected.
type attached struct {
	mu      sync.Mutex
	stdout  bytes.Buffer
	stderr  bytes.Buffer
	order   []string
	dropped []Dropped
	changed chan struct{}
}

func newAttached() *attached { return &attached{changed: make(chan struct{}, 1)} }

func (a *attached) io(input <-chan ProcessInput) AttachIO {
	return AttachIO{
		Output: func(stream byte, data []byte) error {
			a.mu.Lock()
			if stream == FrameStderr {
				a.stderr.Write(data)
				a.order = append(a.order, "err:"+string(data))
			} else {
				a.stdout.Write(data)
				a.order = append(a.order, "out:"+string(data))
			}
			a.mu.Unlock()
			a.poke()
			return nil
		},
		Dropped: func(d Dropped) error {
			a.mu.Lock()
			a.dropped = append(a.dropped, d)
			a.mu.Unlock()
			a.poke()
			return nil
		},
		Input: input,
	}
}

func (a *attached) poke() {
	select {
	case a.changed <- struct{}{}:
	default:
	}
}

func (a *attached) out() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.stdout.String()
}

// waitOut waits until stdout contains want.
func (a *attached) waitOut(t *testing.T, want string) {
	t.Helper()
	deadline := time.After(patience)
	for !strings.Contains(a.out(), want) {
		select {
		case <-a.changed:
		case <-deadline:
			t.Fatalf("output %q never contained %q", a.out(), want)
		}
	}
}

// attachAsync attaches in the background; the result comes on the channel.
type attachResult struct {
	info   ProcessInfo
	exited bool
	err    error
}

func attachAsync(ctx context.Context, c *Client, pid int, a *attached, input <-chan ProcessInput) <-chan attachResult {
	res := make(chan attachResult, 1)
	go func() {
		info, exited, err := c.AttachProcess(ctx, ProcessAttach{PID: pid, Follow: true}, a.io(input))
		res <- attachResult{info, exited, err}
	}()
	return res
}

func waitResult(t *testing.T, res <-chan attachResult) attachResult {
	t.Helper()
	select {
	case r := <-res:
		return r
	case <-time.After(patience):
		t.Fatal("attach did not end")
		return attachResult{}
	}
}

func start(t *testing.T, c *Client, req ProcessStart) ProcessInfo {
	t.Helper()
	info, err := c.StartProcess(context.Background(), req)
	if err != nil {
		t.Fatalf("starting %v: %v", req.Argv, err)
	}
	if info.PID <= 0 || !info.Running {
		t.Fatalf("started %+v", info)
	}
	return info
}

func opKind(err error) string {
	var oe *OpError
	if errors.As(err, &oe) {
		return oe.Kind
	}
	return ""
}

// TestProcessReattach: output produced while nobody is attached is
// replayed to a later attach, which then follows the process to its exit;
// exited processes stay listed with their exit code.
func TestProcessReattach(t *testing.T) {
	c, _ := startProcessAgent(t)
	ctx := context.Background()
	p := start(t, c, ProcessStart{Argv: sh("echo one; read x; echo two $x; echo err >&2; exit 3"), Stdin: true, Tag: "t1"})
	if p.Tag != "t1" || !p.Stdin {
		t.Errorf("started %+v, want tag t1 and stdin open", p)
	}

	// A first caller attaches and detaches after "one".
	first := newAttached()
	actx, cancel := context.WithCancel(ctx)
	res := attachAsync(actx, c, p.PID, first, nil)
	first.waitOut(t, "one\n")
	cancel()
	if r := waitResult(t, res); r.err == nil {
		t.Errorf("detached attach: got %+v, want an error (cancelled)", r)
	}

	// The process goes on without anybody attached.
	if err := c.WriteProcessStdin(ctx, p.PID, []byte("hi\n"), false); err != nil {
		t.Fatal(err)
	}
	done, err := c.WaitProcess(ctx, p.PID)
	if err != nil || done.Running || done.ExitCode != 3 {
		t.Fatalf("wait: got %+v %v, want exit code 3", done, err)
	}

	// A later attach gets everything, in order, and the exit.
	second := newAttached()
	info, exited, err := c.AttachProcess(ctx, ProcessAttach{PID: p.PID, Follow: true}, second.io(nil))
	if err != nil || !exited || info.ExitCode != 3 {
		t.Fatalf("attach after exit: got %+v %v %v, want exit code 3", info, exited, err)
	}
	// (Each stream keeps its order; between the two, the order is that
	// in which the agent read its pipes.)
	if got, want := second.out(), "one\ntwo hi\n"; got != want {
		t.Errorf("replayed stdout: got %q, want %q", got, want)
	}
	if got, want := second.stderr.String(), "err\n"; got != want {
		t.Errorf("replayed stderr: got %q, want %q", got, want)
	}
	list, err := c.ListProcesses(ctx)
	if err != nil || len(list) != 1 || list[0].PID != p.PID || list[0].Running || list[0].ExitCode != 3 || list[0].Tag != "t1" {
		t.Errorf("list: got %+v %v, want the exited process with code 3", list, err)
	}
	// A late waiter gets the code too.
	if again, err := c.WaitProcess(ctx, p.PID); err != nil || again.ExitCode != 3 {
		t.Errorf("second wait: got %+v %v", again, err)
	}
}

// TestProcessOutlivesSession: a process keeps running when its session
// ends (a reconnect, a pause), and a new session finds it with the output
// produced in between.
func TestProcessOutlivesSession(t *testing.T) {
	c, a := startProcessAgent(t)
	ctx := context.Background()
	p := start(t, c, ProcessStart{Argv: sh("i=0; while :; do echo line $i; i=$((i+1)); sleep 0.05; done")})
	watching := newAttached()
	res := attachAsync(ctx, c, p.PID, watching, nil)
	watching.waitOut(t, "line 1\n")

	// The session ends, as at a daemon restart: the attach ends with it.
	c.Close()
	a.agentEnd.Close()
	if r := waitResult(t, res); r.err == nil || !errors.Is(r.err, ErrSessionClosed) {
		t.Errorf("attach across the session's end: got %+v, want ErrSessionClosed", r)
	}

	// A new session on fresh pipes, as the next daemon gets.
	daemonEnd, agentEnd := newPipeConns(t)
	sctx, cancel := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- a.srv.Serve(sctx, agentEnd) }()
	t.Cleanup(func() {
		cancel()
		daemonEnd.Close()
		agentEnd.Close()
		<-served
	})
	c2, err := NewClient(daemonEnd)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	info, err := c2.GetProcess(ctx, p.PID)
	if err != nil || !info.Running {
		t.Fatalf("after reconnect: got %+v %v, want it running", info, err)
	}
	// Output made while nobody was connected is there, and more follows.
	seen := info.StdoutBytes
	again := newAttached()
	res = attachAsync(ctx, c2, p.PID, again, nil)
	deadline := time.Now().Add(patience)
	for int64(len(again.out())) <= seen+20 {
		if time.Now().After(deadline) {
			t.Fatalf("no new output after reconnect: %q", again.out())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.HasPrefix(again.out(), "line 0\nline 1\n") {
		t.Errorf("re-attach does not replay from the start: %q", again.out()[:min(len(again.out()), 100)])
	}
	if err := c2.SignalProcess(ctx, p.PID, 15); err != nil {
		t.Fatal(err)
	}
	r := waitResult(t, res)
	if r.err != nil || !r.exited || r.info.ExitCode != 143 || r.info.Signal != 15 {
		t.Errorf("after SIGTERM: got %+v, want exit code 143", r)
	}
}

// TestProcessStdin: input is delivered in order, closing stdin ends cat;
// stdin is refused for a process started without it and after it is
// closed.
func TestProcessStdin(t *testing.T) {
	c, _ := startProcessAgent(t)
	ctx := context.Background()
	p := start(t, c, ProcessStart{Argv: []string{"cat"}, Stdin: true})
	for _, s := range []string{"a", "b", strings.Repeat("c", 100000), "\n"} {
		if err := c.WriteProcessStdin(ctx, p.PID, []byte(s), false); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.WriteProcessStdin(ctx, p.PID, []byte("end\n"), true); err != nil {
		t.Fatal(err)
	}
	done, err := c.WaitProcess(ctx, p.PID)
	if err != nil || done.ExitCode != 0 {
		t.Fatalf("cat after EOF: got %+v %v, want exit 0", done, err)
	}
	a := newAttached()
	if _, _, err := c.AttachProcess(ctx, ProcessAttach{PID: p.PID}, a.io(nil)); err != nil {
		t.Fatal(err)
	}
	if want := "ab" + strings.Repeat("c", 100000) + "\nend\n"; a.out() != want {
		t.Errorf("cat echoed %d bytes, want %d", len(a.out()), len(want))
	}
	if err := c.WriteProcessStdin(ctx, p.PID, []byte("x"), false); opKind(err) != ErrKindProcessState {
		t.Errorf("stdin after exit: got %v, want %s", err, ErrKindProcessState)
	}

	noStdin := start(t, c, ProcessStart{Argv: sh("sleep 1000")})
	if err := c.WriteProcessStdin(ctx, noStdin.PID, []byte("x"), false); opKind(err) != ErrKindProcessState {
		t.Errorf("stdin of a process without: got %v, want %s", err, ErrKindProcessState)
	}
	closed := start(t, c, ProcessStart{Argv: sh("sleep 1000"), Stdin: true})
	if err := c.WriteProcessStdin(ctx, closed.PID, nil, true); err != nil {
		t.Fatal(err)
	}
	if info, _ := c.GetProcess(ctx, closed.PID); info.Stdin {
		t.Errorf("stdin still open after EOF: %+v", info)
	}
	if err := c.WriteProcessStdin(ctx, closed.PID, []byte("x"), false); opKind(err) != ErrKindProcessState {
		t.Errorf("stdin after close: got %v, want %s", err, ErrKindProcessState)
	}
}

// TestProcessSignals: signals reach the process group by number; a trap
// sees SIGUSR1; SIGTERM ends it with 143.
func TestProcessSignals(t *testing.T) {
	c, _ := startProcessAgent(t)
	ctx := context.Background()
	p := start(t, c, ProcessStart{Argv: sh("trap 'echo got USR1' USR1; echo ready; while :; do sleep 0.05; done")})
	a := newAttached()
	res := attachAsync(ctx, c, p.PID, a, nil)
	a.waitOut(t, "ready\n")
	if err := c.SignalProcess(ctx, p.PID, 10); err != nil {
		t.Fatal(err)
	}
	a.waitOut(t, "got USR1\n")
	if err := c.SignalProcess(ctx, p.PID, 0); opKind(err) != ErrKindInvalid {
		t.Errorf("signal 0: got %v, want %s", err, ErrKindInvalid)
	}
	if err := c.SignalProcess(ctx, p.PID, 15); err != nil {
		t.Fatal(err)
	}
	if r := waitResult(t, res); r.err != nil || r.info.ExitCode != 143 {
		t.Errorf("after SIGTERM: got %+v, want 143", r)
	}
	if err := c.SignalProcess(ctx, p.PID, 15); opKind(err) != ErrKindProcessState {
		t.Errorf("signal after exit: got %v, want %s", err, ErrKindProcessState)
	}
	if _, err := c.GetProcess(ctx, 1<<30); opKind(err) != ErrKindNotFound {
		t.Errorf("unknown pid: got %v, want %s", err, ErrKindNotFound)
	}
}

// TestProcessTimeout: a process past its timeout is killed with its
// children and reports 124.
func TestProcessTimeout(t *testing.T) {
	c, _ := startProcessAgent(t)
	p := start(t, c, ProcessStart{Argv: sh("sleep 1000 & sleep 1000"), TimeoutMS: 200})
	done, err := c.WaitProcess(context.Background(), p.PID)
	if err != nil || done.ExitCode != 124 || !done.TimedOut {
		t.Errorf("got %+v %v, want exit 124 timed out", done, err)
	}
}

// TestProcessStartErrors: what cannot start is an error of the call, not a
// process.
func TestProcessStartErrors(t *testing.T) {
	c, _ := startProcessAgent(t)
	tests := []struct {
		name string
		req  ProcessStart
		want string
	}{
		{"no argv", ProcessStart{}, ErrKindInvalid},
		{"not found", ProcessStart{Argv: []string{"no-such-command-here"}}, ErrKindInvalid},
		{"bad cwd", ProcessStart{Argv: []string{"true"}, Cwd: "/no/such/dir"}, ErrKindInvalid},
		{"unknown user", ProcessStart{Argv: []string{"true"}, User: "no-such-user"}, ErrKindInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := c.StartProcess(context.Background(), tt.req); opKind(err) != tt.want {
				t.Errorf("got %v, want kind %s", err, tt.want)
			}
		})
	}
	if l, err := c.ListProcesses(context.Background()); err != nil || len(l) != 0 {
		t.Errorf("list after failed starts: %+v %v, want none", l, err)
	}
}

// TestProcessReplayCap: a process that writes more than the ring holds is
// replayed from the last ProcessRingBytes, after a Dropped notice.
func TestProcessReplayCap(t *testing.T) {
	c, _ := startProcessAgent(t)
	ctx := context.Background()
	const total = 3 * ProcessRingBytes
	p := start(t, c, ProcessStart{Argv: sh(fmt.Sprintf("head -c %d /dev/zero | tr '\\0' x; echo tail", total))})
	if done, err := c.WaitProcess(ctx, p.PID); err != nil || done.ExitCode != 0 || done.StdoutBytes != total+5 {
		t.Fatalf("wait: got %+v %v", done, err)
	}
	a := newAttached()
	if _, _, err := c.AttachProcess(ctx, ProcessAttach{PID: p.PID, Follow: true}, a.io(nil)); err != nil {
		t.Fatal(err)
	}
	out := a.out()
	if len(out) != ProcessRingBytes || !strings.HasSuffix(out, "xxtail\n") {
		t.Errorf("replay: got %d bytes ending %q, want %d ending in tail", len(out), out[max(0, len(out)-10):], ProcessRingBytes)
	}
	if len(a.dropped) != 1 || a.dropped[0] != (Dropped{Stream: "stdout", Bytes: total + 5 - ProcessRingBytes}) {
		t.Errorf("dropped: got %+v, want one notice of %d stdout bytes", a.dropped, total+5-ProcessRingBytes)
	}
}

// TestProcessConcurrentAttach: several callers attached at once each get
// the whole output.
func TestProcessConcurrentAttach(t *testing.T) {
	c, _ := startProcessAgent(t)
	ctx := context.Background()
	p := start(t, c, ProcessStart{Argv: sh("read x; for i in $(seq 1000); do echo $i; done"), Stdin: true})
	var callers []*attached
	var results []<-chan attachResult
	for range 4 {
		a := newAttached()
		callers = append(callers, a)
		results = append(results, attachAsync(ctx, c, p.PID, a, nil))
	}
	if err := c.WriteProcessStdin(ctx, p.PID, []byte("go\n"), true); err != nil {
		t.Fatal(err)
	}
	var want strings.Builder
	for i := 1; i <= 1000; i++ {
		fmt.Fprintf(&want, "%d\n", i)
	}
	for i, res := range results {
		r := waitResult(t, res)
		if r.err != nil || !r.exited || callers[i].out() != want.String() {
			t.Errorf("caller %d: got %+v and %d bytes, want the exit and %d bytes", i, r, len(callers[i].out()), want.Len())
		}
	}
}

// TestProcessPTY: a process on a terminal sees it (size, TERM, a
// controlling tty), gets input through it, and a resize reaches it as
// SIGWINCH.
func TestProcessPTY(t *testing.T) {
	c, _ := startProcessAgent(t)
	ctx := context.Background()
	p := start(t, c, ProcessStart{
		Argv: sh(`stty size; echo "term=$TERM"; [ -t 0 ] && echo tty0; echo ready; read line; echo "got $line"; trap 'stty size' WINCH; echo trapped; while :; do sleep 0.05; done`),
		PTY:  &TermSize{Cols: 100, Rows: 30},
	})
	if !p.PTY || !p.Stdin {
		t.Errorf("started %+v, want a PTY with input", p)
	}
	input := make(chan ProcessInput, 4)
	a := newAttached()
	res := attachAsync(ctx, c, p.PID, a, input)
	a.waitOut(t, "ready")
	for _, want := range []string{"30 100", "term=xterm-256color", "tty0"} {
		if !strings.Contains(a.out(), want) {
			t.Errorf("output %q lacks %q", a.out(), want)
		}
	}
	input <- ProcessInput{Data: []byte("hello\r")}
	a.waitOut(t, "got hello")
	a.waitOut(t, "trapped")
	input <- ProcessInput{Resize: &TermSize{Cols: 120, Rows: 40}}
	a.waitOut(t, "40 120")
	if err := c.ResizeProcess(ctx, p.PID, TermSize{Cols: 90, Rows: 20}); err != nil {
		t.Fatal(err)
	}
	a.waitOut(t, "20 90")
	// ^C through the terminal reaches the foreground group.
	input <- ProcessInput{Data: []byte{3}}
	r := waitResult(t, res)
	if r.err != nil || !r.exited || r.info.ExitCode != 130 {
		t.Errorf("after ^C: got %+v, want exit 130", r)
	}

	plain := start(t, c, ProcessStart{Argv: sh("sleep 1000")})
	if err := c.ResizeProcess(ctx, plain.PID, TermSize{Cols: 80, Rows: 24}); opKind(err) != ErrKindProcessState {
		t.Errorf("resize without a terminal: got %v, want %s", err, ErrKindProcessState)
	}
}

// TestRingOrder: the rings keep the order of writes across both streams,
// coalesce consecutive writes of one stream, keep the last bytes and bound
// their chunks.
func TestRingOrder(t *testing.T) {
	type write struct {
		stream int
		data   string
	}
	tests := []struct {
		name        string
		writes      []write
		want        string
		wantChunks  [2]int
		wantDropped [2]int64
	}{
		{"interleaved", []write{{0, "a"}, {1, "b"}, {0, "c"}}, "out:a|err:b|out:c", [2]int{2, 1}, [2]int64{}},
		{"coalesced", []write{{0, "a"}, {0, "b"}, {1, "c"}, {1, "d"}, {0, "e"}}, "out:ab|err:cd|out:e", [2]int{2, 1}, [2]int64{}},
		{"cut", []write{{0, strings.Repeat("x", ProcessRingBytes-1)}, {1, "e"}, {0, "yz"}}, "out:" + strings.Repeat("x", ProcessRingBytes-2) + "|err:e|out:yz", [2]int{2, 1}, [2]int64{1, 0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := &process{changed: make(chan struct{})}
			for _, w := range tt.writes {
				for b := []byte(w.data); len(b) > 0; {
					n := min(len(b), maxChunk)
					p.record(w.stream, b[:n])
					b = b[n:]
				}
			}
			var c cursor
			var got []string
			var dropped [2]int64
			for {
				ev, ok, _, _ := p.next(&c)
				if !ok {
					break
				}
				if ev.dropped > 0 {
					dropped[ev.stream] += ev.dropped
					continue
				}
				// Pieces of one chunk come together; join neighbours of
				// one stream for the comparison.
				tag := [2]string{"out:", "err:"}[ev.stream]
				if n := len(got); n > 0 && strings.HasPrefix(got[n-1], tag) {
					got[n-1] += string(ev.data)
				} else {
					got = append(got, tag+string(ev.data))
				}
			}
			if g := strings.Join(got, "|"); g != tt.want {
				t.Errorf("got %.60q…, want %.60q…", g, tt.want)
			}
			if dropped != tt.wantDropped {
				t.Errorf("dropped: got %v, want %v", dropped, tt.wantDropped)
			}
			for s := range p.rings {
				if n := len(p.rings[s].chunks); tt.wantChunks[s] != 0 && n != tt.wantChunks[s] && tt.name != "cut" {
					t.Errorf("stream %d: got %d chunks, want %d", s, n, tt.wantChunks[s])
				}
			}
		})
	}
	// Alternating single bytes: at most maxRingChunks chunks per stream.
	p := &process{changed: make(chan struct{})}
	for i := range 3 * maxRingChunks {
		p.record(i%2, []byte{'a'})
	}
	for s := range p.rings {
		if n := len(p.rings[s].chunks); n > maxRingChunks {
			t.Errorf("stream %d holds %d chunks, want at most %d", s, n, maxRingChunks)
		}
	}
}

// TestProcessTablePrune: exited processes are forgotten past KeepExited
// or KeepExitedFor, running ones never.
func TestProcessTablePrune(t *testing.T) {
	now := time.Now()
	mk := func(pid int, exitedAgo time.Duration) *process {
		p := &process{pid: pid, changed: make(chan struct{}), done: make(chan struct{})}
		if exitedAgo >= 0 {
			p.exited, p.exitedAt = true, now.Add(-exitedAgo)
		}
		return p
	}
	var tbl processTable
	tbl.byPID = map[int]*process{}
	tbl.byPID[1] = mk(1, -1) // running
	tbl.byPID[2] = mk(2, KeepExitedFor+time.Second)
	for i := range KeepExited + 5 {
		tbl.byPID[100+i] = mk(100+i, time.Duration(KeepExited+5-i)*time.Second)
	}
	ps := tbl.list(now)
	if len(ps) != 1+KeepExited {
		t.Fatalf("got %d processes, want %d", len(ps), 1+KeepExited)
	}
	if _, oe := tbl.get(1, now); oe != nil {
		t.Errorf("running process forgotten: %v", oe)
	}
	for _, pid := range []int{2, 100, 104} {
		if _, oe := tbl.get(pid, now); oe == nil {
			t.Errorf("process %d kept, want it forgotten", pid)
		}
	}
	if _, oe := tbl.get(105, now); oe != nil {
		t.Errorf("recent exited process forgotten: %v", oe)
	}
}
