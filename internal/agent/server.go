package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"
	"golang.org/x/sys/unix"
)

// outputGrace is how long an exec waits for its output pipes to close after
// its process exited: they stay open while a background child holds them.
// Past it, the exec reads what the pipes hold at that moment (everything the
// process wrote before exiting is there or already read) and closes them;
// the background child then gets EPIPE or SIGPIPE.
const outputGrace = 150 * time.Millisecond

// Server is the in-sandbox side. It runs commands and reaps every child,
// including orphans reparented to it when it is PID 1.
//
// Server is safe for concurrent use; Serve may be called again after a
// session ends (for example on fresh pipes after a restore).
type Server struct {
	log *slog.Logger
	// outputGrace is the package's outputGrace; tests shorten it.
	outputGrace time.Duration
	// onKill, if set (by tests, before Serve), gets the work of every
	// killExec.
	onKill func(killStats)

	mu sync.Mutex
	// waiters maps a started pid to the channel its wait status goes to.
	waiters map[int]chan unix.WaitStatus
	// oomKilled maps the process group of a process a reclaim killed to
	// the memory limit, for its exec's caller (reclaim.go).
	oomKilled map[int]int

	// procs holds the background processes (process.go).
	procs processTable

	// code holds the code contexts, live interpreters (code.go).
	code codeTable
}

// NewServer returns a Server and starts its reaper, which runs until ctx ends.
func NewServer(ctx context.Context, log *slog.Logger) *Server {
	s := &Server{log: log, outputGrace: outputGrace, waiters: make(map[int]chan unix.WaitStatus)}
	// Become a subreaper so orphans come to us even when we are not PID 1.
	_ = unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
	// SIGPIPE is caught and dropped, not ignored: an ignored disposition
	// is inherited across execve, and every command would run with SIGPIPE
	// ignored. (Go itself only dies of SIGPIPE on fds 1 and 2, but nothing
	// here should depend on which descriptor a write goes to.)
	sigc := make(chan os.Signal, 16)
	signal.Notify(sigc, syscall.SIGCHLD, syscall.SIGPIPE)
	go func() {
		defer signal.Stop(sigc)
		for {
			select {
			case <-ctx.Done():
				return
			case sig := <-sigc:
				if sig == syscall.SIGCHLD {
					s.reap()
				}
			}
		}
	}()
	return s
}

// reap collects every exited child and hands the status of the ones an exec
// waits for to it; orphans are simply reaped.
func (s *Server) reap() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
		s.mu.Lock()
		ch, ok := s.waiters[pid]
		delete(s.waiters, pid)
		s.mu.Unlock()
		if ok {
			ch <- ws
		}
	}
}

// Serve runs one yamux session over conn until it ends (conn fails or ctx
// ends), then waits for the session's calls to finish: ending the session
// ends their streams, which kills their commands.
func (s *Server) Serve(ctx context.Context, conn io.ReadWriteCloser) error {
	cfg := yamuxConfig()
	sess, err := yamux.Server(newHeaderJoiner(conn), cfg)
	if err != nil {
		return fmt.Errorf("starting yamux session: %w", err)
	}
	// Undone when Serve returns: the agent's own context never ends, and a
	// goroutine waiting for it would keep every past session alive.
	stop := context.AfterFunc(ctx, func() { sess.Close() })
	var calls sync.WaitGroup
	defer func() {
		stop()
		sess.Close()
		calls.Wait()
	}()
	for {
		st, err := sess.AcceptStream()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, io.EOF) || sess.IsClosed() {
				return nil
			}
			return fmt.Errorf("accepting stream: %w", err)
		}
		calls.Go(func() { s.handle(ctx, st) })
	}
}

// yamuxConfig is shared by both ends. Keepalives are off: a paused or
// checkpointed sandbox cannot answer them, and the daemon notices a dead
// sandbox from its runtime instead.
func yamuxConfig() *yamux.Config {
	cfg := yamux.DefaultConfig()
	cfg.EnableKeepAlive = false
	cfg.ConnectionWriteTimeout = 30 * time.Second
	cfg.MaxStreamWindowSize = 1 << 20
	cfg.LogOutput = io.Discard
	return cfg
}

func (s *Server) handle(ctx context.Context, st *yamux.Stream) {
	defer st.Close()
	typ, payload, err := ReadFrame(st)
	if err != nil {
		return
	}
	if typ != FrameRequest {
		s.log.Warn("first frame is not a request", "type", string(typ))
		return
	}
	var req Request
	if err := json.Unmarshal(payload, &req); err != nil {
		_ = WriteJSON(st, FrameExit, Exit{ExitCode: -1, Error: fmt.Sprintf("decoding request: %v", err)})
		return
	}
	switch req.Op {
	case OpPing:
		_ = WriteJSON(st, FrameReply, Pong{Version: ProtocolVersion, PID: os.Getpid()})
	case OpExec:
		if req.Exec == nil || len(req.Exec.Argv) == 0 {
			_ = WriteJSON(st, FrameExit, Exit{ExitCode: -1, Error: "exec request without argv"})
			return
		}
		s.exec(ctx, st, req.Exec)
	case OpReclaim:
		if req.Reclaim == nil {
			req.Reclaim = &Reclaim{}
		}
		_ = WriteJSON(st, FrameReply, s.reclaim(*req.Reclaim))
	default:
		if s.handleOp(ctx, st, req) {
			return
		}
		_ = WriteJSON(st, FrameExit, Exit{ExitCode: -1, Error: fmt.Sprintf("unknown op %q", req.Op)})
	}
}

// frameWriter serialises frames from the output readers onto one stream.
type frameWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (f *frameWriter) frame(typ byte, p []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return WriteFrame(f.w, typ, p)
}

func (f *frameWriter) json(typ byte, v any) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return WriteJSON(f.w, typ, v)
}

func mergeEnv(base, extra []string) []string {
	idx := make(map[string]int, len(base))
	out := make([]string, 0, len(base)+len(extra))
	for _, kv := range append(append([]string{}, base...), extra...) {
		k, _, _ := strings.Cut(kv, "=")
		if i, ok := idx[k]; ok {
			out[i] = kv
			continue
		}
		idx[k] = len(out)
		out = append(out, kv)
	}
	return out
}

func (s *Server) exec(ctx context.Context, st *yamux.Stream, req *ExecRequest) {
	fw := &frameWriter{w: st}
	fail := func(format string, args ...any) {
		_ = fw.json(FrameExit, Exit{ExitCode: -1, Error: fmt.Sprintf(format, args...)})
	}

	id, err := lookupIdentity(req.User)
	if err != nil {
		_ = fw.json(FrameExit, Exit{ExitCode: -1, Error: err.Error(), Invalid: errors.As(err, new(errUnknownUser))})
		return
	}
	if req.Cwd == "" && id.home != "" {
		if st, err := os.Stat(id.home); err == nil && st.IsDir() {
			req.Cwd = id.home
		}
	}
	if req.Cwd != "" {
		if st, err := os.Stat(req.Cwd); err != nil || !st.IsDir() {
			msg := fmt.Sprintf("cwd %s: not a directory", req.Cwd)
			if err != nil {
				msg = fmt.Sprintf("cwd %s: %v", req.Cwd, errors.Unwrap(err))
			}
			_ = fw.frame(FrameStderr, []byte(msg+"\n"))
			_ = fw.json(FrameExit, Exit{ExitCode: -1, Error: msg})
			return
		}
	}
	env := mergeEnv(mergeEnv(os.Environ(), id.env()), req.Env)
	path, err := lookPath(req.Argv[0], req.Cwd, envValue(env, "PATH"))
	if err != nil {
		// The shell's conventions: 126 for a file that cannot be executed,
		// 127 for a command that is not found.
		if errors.Is(err, fs.ErrPermission) {
			_ = fw.frame(FrameStderr, []byte(fmt.Sprintf("%s: permission denied\n", req.Argv[0])))
			_ = fw.json(FrameExit, Exit{ExitCode: 126, Error: err.Error()})
			return
		}
		_ = fw.frame(FrameStderr, []byte(fmt.Sprintf("%s: command not found\n", req.Argv[0])))
		_ = fw.json(FrameExit, Exit{ExitCode: 127, Error: err.Error()})
		return
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		fail("creating stdout pipe: %v", err)
		return
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		fail("creating stderr pipe: %v", err)
		return
	}
	var stdinR, stdinW *os.File
	if req.Stdin {
		stdinR, stdinW, err = os.Pipe()
	} else {
		stdinR, err = os.Open(os.DevNull)
	}
	if err != nil {
		outR.Close()
		outW.Close()
		errR.Close()
		errW.Close()
		fail("creating stdin: %v", err)
		return
	}

	cmd := exec.Command(path, req.Argv[1:]...)
	cmd.Args[0] = req.Argv[0]
	cmd.Env = env
	cmd.Dir = req.Cwd
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdinR, outW, errW
	// A process group of its own, so a timeout or kill reaches its children.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: id.credential()}

	exitc := make(chan unix.WaitStatus, 1)
	// Hold the lock across Start so the reaper cannot see the pid before it
	// is registered.
	s.mu.Lock()
	restore := lowerNproc()
	err = cmd.Start()
	restore()
	if err == nil {
		s.waiters[cmd.Process.Pid] = exitc
	}
	s.mu.Unlock()
	outW.Close()
	errW.Close()
	stdinR.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		if stdinW != nil {
			stdinW.Close()
		}
		code := -1
		if errors.Is(err, os.ErrPermission) {
			code = 126
		}
		_ = fw.frame(FrameStderr, []byte(err.Error()+"\n"))
		_ = fw.json(FrameExit, Exit{ExitCode: code, Error: err.Error()})
		return
	}
	pid := cmd.Process.Pid
	// The reaper may have missed the SIGCHLD of a process that exited before
	// registration; reaping again catches it.
	s.reap()

	// A timeout or the caller going away kills every process of the
	// command that can be found (see killExec), not only its group. Once
	// the process is reaped its pid may be reused, and nothing is killed:
	// background children of a command that ended are left alone, as they
	// are when nobody goes away.
	inodes := pipeInodes(outR, errR, stdinW)
	var reaped atomic.Bool
	var killOnce sync.Once
	killAll := func() {
		killOnce.Do(func() {
			if !reaped.Load() {
				s.killExec(pid, inodes)
			}
		})
	}

	// Stdin is written by its own goroutine from a queue, so that a process
	// that does not read its stdin cannot hold up signal frames or the
	// notice that the caller went away. The queue is bounded by the API's
	// request size and the sandbox's memory.
	stdinQ := newByteQueue()
	if stdinW != nil {
		go func(w *os.File) {
			defer w.Close()
			for {
				b, ok := stdinQ.pop()
				if !ok {
					return
				}
				if _, err := w.Write(b); err != nil {
					stdinQ.close()
					return
				}
			}
		}(stdinW)
	}

	// Frames from the daemon: stdin, signals. The stream closing early means
	// the caller went away: the command is killed.
	callerGone := make(chan struct{})
	go func() {
		defer stdinQ.close()
		for {
			typ, payload, err := ReadFrame(st)
			if err != nil {
				close(callerGone)
				return
			}
			switch typ {
			case FrameStdin:
				stdinQ.push(payload)
			case FrameStdinEOF:
				stdinQ.close()
			case FrameSignal:
				var sig Signal
				if json.Unmarshal(payload, &sig) == nil && sig.Signal > 0 && sig.Signal < 65 {
					_ = unix.Kill(-pid, unix.Signal(sig.Signal))
				}
			}
		}
	}()

	var wg sync.WaitGroup
	var truncated atomic.Bool
	pump := func(r *os.File, typ byte) {
		defer wg.Done()
		buf := make([]byte, 32<<10)
		var sent int64
		// forward sends a chunk and reports whether the caller still
		// takes output.
		forward := func(chunk []byte) bool {
			if limit := req.MaxOutputBytes; limit > 0 && sent+int64(len(chunk)) > limit {
				// Past the cap, output is read and dropped: the process
				// does not block, and nothing more crosses the transport.
				chunk = chunk[:max(0, limit-sent)]
				truncated.Store(true)
			}
			if len(chunk) > 0 {
				sent += int64(len(chunk))
				if err := fw.frame(typ, chunk); err != nil {
					killAll()
					return false
				}
			}
			return true
		}
		for {
			n, err := r.Read(buf)
			if !forward(buf[:n]) {
				return
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				// The grace after the process exited is over and a
				// background child still holds the pipe.
				drainBuffered(r, buf, forward)
				return
			}
			if err != nil {
				return
			}
		}
	}
	wg.Add(2)
	go pump(outR, FrameStdout)
	go pump(errR, FrameStderr)

	var timeout <-chan time.Time
	if req.TimeoutMS > 0 {
		t := time.NewTimer(time.Duration(req.TimeoutMS) * time.Millisecond)
		defer t.Stop()
		timeout = t.C
	}
	var ws unix.WaitStatus
	timedOut := false
wait:
	for {
		select {
		case ws = <-exitc:
			break wait
		case <-timeout:
			timedOut = true
			timeout = nil
			killAll()
		case <-callerGone:
			callerGone = nil
			killAll()
		case <-ctx.Done():
			killAll()
			ws = <-exitc
			break wait
		}
	}
	reaped.Store(true)

	// Everything the process wrote is now in the pipes or already read.
	// The pipes close when the last background child holding them exits;
	// past the grace the pumps stop waiting for that, but read what the
	// pipes hold first: a pump that was not scheduled in time (hundreds of
	// execs ending at once) must not lose the command's output.
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	grace := time.NewTimer(s.outputGrace)
	select {
	case <-done:
	case <-grace.C:
		_ = outR.SetReadDeadline(time.Now())
		_ = errR.SetReadDeadline(time.Now())
		<-done
	}
	grace.Stop()
	outR.Close()
	errR.Close()

	exit := Exit{TimedOut: timedOut, Truncated: truncated.Load()}
	switch {
	case ws.Exited():
		exit.ExitCode = ws.ExitStatus()
	case ws.Signaled():
		exit.Signal = int(ws.Signal())
		exit.ExitCode = 128 + exit.Signal
	}
	if timedOut {
		exit.ExitCode = 124
	}
	if note := s.oomNote(pid); note != "" {
		_ = fw.frame(FrameStderr, []byte(note))
	}
	_ = fw.json(FrameExit, exit)
}

// drainBuffered hands what the pipe r holds right now to forward, without
// waiting for more. It reads at most what FIONREAD reports at the start, so
// a background child that keeps writing cannot keep the exec reading. The
// reads are raw non-blocking ones: r's read deadline has passed, so r.Read
// would fail without reading.
func drainBuffered(r *os.File, buf []byte, forward func([]byte) bool) {
	rc, err := r.SyscallConn()
	if err != nil {
		return
	}
	left := 0
	var ierr error
	// TIOCINQ is FIONREAD's name in x/sys/unix; on a pipe it is the
	// number of bytes buffered, in Linux and in gVisor.
	if err := rc.Control(func(fd uintptr) { left, ierr = unix.IoctlGetInt(int(fd), unix.TIOCINQ) }); err != nil || ierr != nil {
		return
	}
	for left > 0 {
		var n int
		var rerr error
		err := rc.Control(func(fd uintptr) {
			for {
				n, rerr = unix.Read(int(fd), buf[:min(len(buf), left)])
				if rerr != unix.EINTR {
					return
				}
			}
		})
		if err != nil || rerr != nil || n <= 0 {
			return
		}
		left -= n
		if !forward(buf[:n]) {
			return
		}
	}
}

// byteQueue is an unbounded FIFO of byte slices with a close.
type byteQueue struct {
	mu     sync.Mutex
	cond   *sync.Cond
	items  [][]byte
	closed bool
}

func newByteQueue() *byteQueue {
	q := &byteQueue{}
	q.cond = sync.NewCond(&q.mu)
	return q
}

func (q *byteQueue) push(b []byte) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.closed {
		q.items = append(q.items, b)
		q.cond.Signal()
	}
}

// close ends the queue: pop returns what is queued, then reports false.
func (q *byteQueue) close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.closed = true
	q.cond.Broadcast()
}

func (q *byteQueue) pop() ([]byte, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.items) == 0 && !q.closed {
		q.cond.Wait()
	}
	if len(q.items) == 0 {
		return nil, false
	}
	b := q.items[0]
	q.items = q.items[1:]
	return b, true
}

// nprocHeadroom is how many processes of the sandbox's RLIMIT_NPROC the
// agent keeps for itself: commands start with a soft limit that much lower,
// so that a fork bomb runs out of processes before the agent (the same
// user, and init) can no longer create the threads it needs.
const nprocHeadroom = 64

// lowerNproc lowers the agent's soft RLIMIT_NPROC for the next fork, which
// the child inherits; the returned func restores it. The caller holds s.mu,
// so starts do not interleave.
func lowerNproc() (restore func()) {
	var cur unix.Rlimit
	if err := unix.Prlimit(0, unix.RLIMIT_NPROC, nil, &cur); err != nil || cur.Cur == unix.RLIM_INFINITY || cur.Cur <= 2*nprocHeadroom {
		return func() {}
	}
	lower := cur
	lower.Cur = cur.Cur - nprocHeadroom
	if err := unix.Prlimit(0, unix.RLIMIT_NPROC, &lower, nil); err != nil {
		return func() {}
	}
	return func() { _ = unix.Prlimit(0, unix.RLIMIT_NPROC, &cur, nil) }
}

// envValue returns the value of key in a KEY=VALUE list.
func envValue(env []string, key string) string {
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok && k == key {
			return v
		}
	}
	return ""
}

// lookPath finds the executable the way a shell would for this command: a
// name with a slash is taken relative to the command's working directory,
// others are searched in the command's own PATH (not the agent's). A file
// found but not executable is fs.ErrPermission.
func lookPath(file, cwd, pathEnv string) (string, error) {
	if cwd == "" {
		cwd = "/"
	}
	check := func(p string) error {
		fi, err := os.Stat(p)
		if err != nil {
			return err
		}
		if fi.IsDir() || fi.Mode()&0o111 == 0 {
			return fs.ErrPermission
		}
		return nil
	}
	if strings.Contains(file, "/") {
		p := file
		if !filepath.IsAbs(p) {
			p = filepath.Join(cwd, p)
		}
		if err := check(p); err != nil {
			return "", &exec.Error{Name: file, Err: err}
		}
		return p, nil
	}
	denied := false
	for _, dir := range filepath.SplitList(pathEnv) {
		if dir == "" {
			dir = "."
		}
		if !filepath.IsAbs(dir) {
			dir = filepath.Join(cwd, dir)
		}
		p := filepath.Join(dir, file)
		switch err := check(p); {
		case err == nil:
			return p, nil
		case errors.Is(err, fs.ErrPermission):
			denied = true
		}
	}
	if denied {
		return "", &exec.Error{Name: file, Err: fs.ErrPermission}
	}
	return "", &exec.Error{Name: file, Err: exec.ErrNotFound}
}
