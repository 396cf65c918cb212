package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"
	"golang.org/x/sys/unix"
)

// Background processes: commands started without a caller waiting on
// them. They belong to the agent, not to a session: sessions end at every
// reconnect, pause, restore and daemon restart, and the processes go on.
// Each keeps what it wrote in a bounded ring per stream, so that any number
// of callers can attach to it, at once or later, and get what it wrote since
// it started (as far as the ring reaches), then its output as it comes, then
// its exit. Only the sandbox's end (or a signal, or its timeout) ends one.
//
// Ownership: the processTable owns the processes; each process's goroutines
// (its output pumps, its stdin writer and the waiter that records its exit)
// end on their own once the process has exited and its output is read. The
// handlers of the operations below own only the goroutine that watches
// their stream, and wait for it.

// Operations on background processes; each takes Request.Args of the type
// named.
const (
	// OpProcessStart starts a process (ProcessStart) and answers a
	// FrameReply ProcessInfo once it runs.
	OpProcessStart = "process.start"
	// OpProcessList answers a FrameReply ProcessList (no arguments).
	OpProcessList = "process.list"
	// OpProcessGet answers a FrameReply ProcessInfo (ProcessRef).
	OpProcessGet = "process.get"
	// OpProcessStdin queues bytes for the process's input (ProcessStdin)
	// and answers an empty FrameReply; it waits while the input queue is
	// full.
	OpProcessStdin = "process.stdin"
	// OpProcessSignal signals the process group (ProcessSignal).
	OpProcessSignal = "process.signal"
	// OpProcessResize changes a PTY's window size (ProcessResize).
	OpProcessResize = "process.resize"
	// OpProcessWait answers a FrameReply ProcessInfo once the process has
	// exited (ProcessRef).
	OpProcessWait = "process.wait"
	// OpProcessAttach (ProcessAttach) answers a FrameStarted with the
	// ProcessInfo at once, then sends what the process wrote since
	// it started, as far as its rings reach (a FrameDropped says how much
	// older output is gone), then its output as it comes, as FrameStdout
	// and FrameStderr, then a FrameExit carrying its ProcessInfo. Without
	// Follow it stops at what was written so far: a FrameExit if the
	// process has exited, else a FrameReply with its ProcessInfo. The
	// daemon may send FrameStdin, FrameStdinEOF, FrameSignal and
	// FrameResize on the same stream. Closing the stream detaches; the
	// process goes on.
	OpProcessAttach = "process.attach"
)

// Frame types of process.attach beyond the exec ones.
const (
	// FrameDropped (agent→daemon) carries a JSON Dropped: output the
	// attaching caller will not see, because the ring had to let it go.
	FrameDropped byte = 'D'
	// FrameResize (daemon→agent) carries a JSON TermSize for a PTY.
	FrameResize byte = 'Z'
)

// Kinds of OpError of the process operations, beyond ops.go's.
const (
	// ErrKindProcessState: the process's state does not allow the
	// operation (it has exited, has no stdin, is not on a terminal).
	ErrKindProcessState = "process_state"
	// ErrKindProcessLimit: the agent already runs ProcessLimit processes.
	ErrKindProcessLimit = "process_limit"
)

// Bounds of the process table.
const (
	// ProcessRingBytes is what is kept of each output stream of a process
	// (stdout, stderr; a PTY has one): the most recent bytes.
	ProcessRingBytes = 1 << 20
	// maxRingChunks bounds the writes one ring keeps apart, whatever
	// their size: a process writing single bytes alternately to stdout
	// and stderr must not cost a chunk header per byte. Past it the oldest
	// chunk is dropped.
	maxRingChunks = 1 << 14
	// maxChunk is the most a chunk grows to by coalescing writes.
	maxChunk = 64 << 10
	// ProcessLimit is the most processes the table holds: running ones,
	// and exited ones kept for their exit code and output.
	ProcessLimit = 256
	// KeepExited and KeepExitedFor bound how many exited processes are
	// kept, and for how long after their exit.
	KeepExited    = 64
	KeepExitedFor = 10 * time.Minute
	// maxQueuedInput is what a process's input queue holds before a
	// sender waits: input is written by its own goroutine, so that a
	// process that does not read cannot hold up its callers, and this
	// bounds what that costs the sandbox.
	maxQueuedInput = 4 << 20
)

// ProcessStart asks the agent to start a background process.
type ProcessStart struct {
	// Argv is run directly; Argv[0] is looked up in the command's PATH.
	Argv []string `json:"argv,omitempty"`
	// Login runs the user's login shell instead of Argv (its shell in the
	// sandbox's /etc/passwd, /bin/sh when that names none, with -l).
	Login bool `json:"login,omitempty"`
	// Env entries (KEY=VALUE) are added to the agent's environment.
	Env []string `json:"env,omitempty"`
	Cwd string   `json:"cwd,omitempty"`
	// User runs the process as that user (see ExecRequest.User).
	User string `json:"user,omitempty"`
	// Tag is the caller's name for the process.
	Tag string `json:"tag,omitempty"`
	// Stdin keeps the process's stdin open for OpProcessStdin and
	// attach input; without it stdin is /dev/null. A PTY always has
	// input.
	Stdin bool `json:"stdin,omitempty"`
	// TimeoutMS kills the process (as an exec's timeout does) after that
	// many milliseconds; 0: no timeout.
	TimeoutMS int64 `json:"timeout_ms,omitempty"`
	// PTY runs the process on a new pseudo-terminal of that size, as the
	// leader of a new session with the terminal as its controlling
	// terminal, and TERM=xterm-256color. Its output is the terminal's, on
	// FrameStdout; its input goes to the terminal.
	PTY *TermSize `json:"pty,omitempty"`
}

// TermSize is a terminal's window size in characters.
type TermSize struct {
	Cols uint16 `json:"cols"`
	Rows uint16 `json:"rows"`
}

// ProcessInfo describes a background process.
type ProcessInfo struct {
	PID  int      `json:"pid"`
	Tag  string   `json:"tag,omitempty"`
	Argv []string `json:"argv"`
	User string   `json:"user,omitempty"`
	Cwd  string   `json:"cwd,omitempty"`
	PTY  bool     `json:"pty,omitempty"`
	// Stdin reports whether the process's input is open.
	Stdin     bool      `json:"stdin,omitempty"`
	StartedAt time.Time `json:"started_at"`
	Running   bool      `json:"running"`
	// ExitCode, Signal and TimedOut are set once it has exited, as for
	// an exec: 128+N for a process ended by signal N, 124 after a
	// timeout.
	ExitCode int       `json:"exit_code,omitempty"`
	Signal   int       `json:"signal,omitempty"`
	TimedOut bool      `json:"timed_out,omitempty"`
	ExitedAt time.Time `json:"exited_at,omitzero"`
	// StdoutBytes and StderrBytes count what it wrote in all.
	StdoutBytes int64 `json:"stdout_bytes,omitempty"`
	StderrBytes int64 `json:"stderr_bytes,omitempty"`
}

// ProcessList is the reply to OpProcessList, oldest first.
type ProcessList struct {
	Processes []ProcessInfo `json:"processes"`
}

// ProcessRef names a process.
type ProcessRef struct {
	PID int `json:"pid"`
}

// ProcessStdin is input for a process; EOF closes its stdin after Data
// (on a PTY it sends the terminal's end-of-file character, ^D).
type ProcessStdin struct {
	PID  int    `json:"pid"`
	Data []byte `json:"data,omitempty"`
	EOF  bool   `json:"eof,omitempty"`
}

// ProcessSignal sends Signal (1-64) to the process's group.
type ProcessSignal struct {
	PID    int `json:"pid"`
	Signal int `json:"signal"`
}

// ProcessResize changes the window size of a process's PTY.
type ProcessResize struct {
	PID int `json:"pid"`
	TermSize
}

// ProcessAttach attaches to a process's output (OpProcessAttach).
type ProcessAttach struct {
	PID    int  `json:"pid"`
	Follow bool `json:"follow,omitempty"`
}

// Dropped reports output an attaching caller does not get: Bytes bytes of
// Stream (FrameStdout or FrameStderr, as a string "stdout" or "stderr")
// that the ring no longer held.
type Dropped struct {
	Stream string `json:"stream"`
	Bytes  int64  `json:"bytes"`
}

// Output streams of a process, as ring indexes.
const (
	streamStdout = 0
	streamStderr = 1
)

var streamNames = [2]string{"stdout", "stderr"}
var streamFrames = [2]byte{FrameStdout, FrameStderr}

// chunk is one piece of a ring: bytes at offset off of the stream, written
// as the seq-th write of the process (over both streams). Its data is never
// changed in place, only extended, so a reader may hold a slice of it.
type chunk struct {
	seq  uint64
	off  int64
	data []byte
}

// ring keeps the last ProcessRingBytes of one output stream.
type ring struct {
	chunks []chunk
	// start is the offset of the oldest byte kept; end the number of
	// bytes written in all.
	start, end int64
}

// add appends data, written as the seq-th write; last is the seq of the
// process's previous write. The copy is the ring's own.
func (r *ring) add(seq, last uint64, data []byte) {
	if n := len(r.chunks); n > 0 && r.chunks[n-1].seq == last && len(r.chunks[n-1].data)+len(data) <= maxChunk {
		// Nothing of the other stream came between: the write extends
		// the last chunk and keeps its place in the order.
		c := &r.chunks[n-1]
		c.data = append(c.data, data...)
	} else {
		r.chunks = append(r.chunks, chunk{seq: seq, off: r.end, data: append([]byte(nil), data...)})
	}
	r.end += int64(len(data))
	for r.end-r.start > ProcessRingBytes || len(r.chunks) > maxRingChunks {
		c := &r.chunks[0]
		excess := r.end - r.start - ProcessRingBytes
		if len(r.chunks) <= maxRingChunks && excess < int64(len(c.data)) {
			// Cut the oldest chunk's front; a new slice, the bytes stay
			// as readers may hold them.
			c.data = c.data[excess:]
			c.off += excess
			r.start += excess
			break
		}
		r.start += int64(len(c.data))
		r.chunks[0] = chunk{}
		r.chunks = r.chunks[1:]
	}
	if len(r.chunks) > 0 {
		r.start = r.chunks[0].off
	} else {
		r.start = r.end
	}
}

// from returns the chunk holding offset off, and the bytes from there; ok
// is false when the ring holds nothing at or after off.
func (r *ring) from(off int64) (c chunk, data []byte, ok bool) {
	i := sort.Search(len(r.chunks), func(i int) bool {
		return r.chunks[i].off+int64(len(r.chunks[i].data)) > off
	})
	if i == len(r.chunks) {
		return chunk{}, nil, false
	}
	c = r.chunks[i]
	skip := max(off-c.off, 0)
	return c, c.data[skip:], true
}

// process is one background process. Its fields after the first group are
// guarded by mu.
type process struct {
	pid       int
	tag       string
	argv      []string
	user, cwd string
	startedAt time.Time
	// master is the PTY's controlling end; nil without a PTY.
	master *os.File
	// input is the queue to the process's stdin (or its PTY); nil when it
	// has none.
	input *inputQueue
	// inodes are the process's stdio pipes, for a kill (killExec).
	inodes []uint64
	// reaped is set once its pid is reaped: from then on nothing is
	// killed by it, as it may be reused.
	reaped atomic.Bool
	// done is closed once its exit is recorded (after its output).
	done chan struct{}

	mu    sync.Mutex
	rings [2]ring
	// seq counts the writes of both streams.
	seq uint64
	// changed is closed, and replaced, whenever output or the exit is
	// recorded: attached callers wait on it.
	changed   chan struct{}
	stdinOpen bool
	exited    bool
	exit      Exit
	exitedAt  time.Time
}

// info describes p.
func (p *process) info() ProcessInfo {
	p.mu.Lock()
	defer p.mu.Unlock()
	i := ProcessInfo{
		PID: p.pid, Tag: p.tag, Argv: p.argv, User: p.user, Cwd: p.cwd, PTY: p.master != nil,
		Stdin: p.stdinOpen, StartedAt: p.startedAt, Running: !p.exited,
		StdoutBytes: p.rings[streamStdout].end, StderrBytes: p.rings[streamStderr].end,
	}
	if p.exited {
		i.ExitCode, i.Signal, i.TimedOut, i.ExitedAt = p.exit.ExitCode, p.exit.Signal, p.exit.TimedOut, p.exitedAt
	}
	return i
}

// notifyLocked wakes whoever waits for a change; the caller holds p.mu.
func (p *process) notifyLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// record adds output of stream to its ring.
func (p *process) record(stream int, data []byte) {
	if len(data) == 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	last := p.seq
	p.seq++
	p.rings[stream].add(p.seq, last, data)
	p.notifyLocked()
}

// cursor is how far one attached caller has read each stream.
type cursor [2]int64

// outEvent is what an attached caller is sent next: data of a stream, or a
// count of dropped bytes.
type outEvent struct {
	stream  int
	data    []byte
	dropped int64
}

// next returns the next event for cursor c, advancing it: first any drop
// (the ring let go of bytes c had not read), then the unread chunk written
// first. When there is none, it returns ok false, the channel that is
// closed at the next change, and whether the process has exited (then all
// its output is in the rings).
func (p *process) next(c *cursor) (ev outEvent, ok bool, changed <-chan struct{}, exited bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for s := range p.rings {
		if r := &p.rings[s]; c[s] < r.start {
			ev = outEvent{stream: s, dropped: r.start - c[s]}
			c[s] = r.start
			return ev, true, nil, false
		}
	}
	best := -1
	var bestSeq uint64
	var bestData []byte
	for s := range p.rings {
		ch, data, found := p.rings[s].from(c[s])
		if found && (best < 0 || ch.seq < bestSeq) {
			best, bestSeq, bestData = s, ch.seq, data
		}
	}
	if best < 0 {
		return outEvent{}, false, p.changed, p.exited
	}
	c[best] += int64(len(bestData))
	return outEvent{stream: best, data: bestData}, true, nil, false
}

// signal sends sig to p's process group.
func (p *process) signal(sig int) *OpError {
	if sig < 1 || sig > 64 {
		return &OpError{Kind: ErrKindInvalid, Message: fmt.Sprintf("signal must be 1 to 64, got %d", sig)}
	}
	if p.reaped.Load() {
		return &OpError{Kind: ErrKindProcessState, Message: fmt.Sprintf("process %d has exited", p.pid)}
	}
	// ESRCH: the group is gone and the exit not yet recorded; the
	// signal had nowhere to go, which is no error of the caller's.
	_ = unix.Kill(-p.pid, unix.Signal(sig))
	return nil
}

// resize sets the window size of p's PTY; the kernel tells the terminal's
// foreground process group (SIGWINCH).
func (p *process) resize(size TermSize) *OpError {
	if p.master == nil {
		return &OpError{Kind: ErrKindProcessState, Message: fmt.Sprintf("process %d has no terminal to resize", p.pid)}
	}
	if size.Cols == 0 || size.Rows == 0 {
		return &OpError{Kind: ErrKindInvalid, Message: "cols and rows must be positive"}
	}
	// Under p.mu: the terminal is closed under it once the process has
	// exited.
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exited {
		return &OpError{Kind: ErrKindProcessState, Message: fmt.Sprintf("process %d has exited", p.pid)}
	}
	if err := setWinsize(p.master, size); err != nil {
		return &OpError{Kind: ErrKindOther, Message: fmt.Sprintf("resizing the terminal of process %d: %v", p.pid, err)}
	}
	return nil
}

// write queues data for p's input, waiting while the queue is full until
// cancel is closed; eof then closes the input (on a PTY: sends ^D).
func (p *process) write(data []byte, eof bool, cancel <-chan struct{}) *OpError {
	if p.input == nil {
		return &OpError{Kind: ErrKindProcessState, Message: fmt.Sprintf("process %d was started without stdin", p.pid)}
	}
	closed := func() *OpError {
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.exited {
			return &OpError{Kind: ErrKindProcessState, Message: fmt.Sprintf("process %d has exited", p.pid)}
		}
		return &OpError{Kind: ErrKindProcessState, Message: fmt.Sprintf("the stdin of process %d is closed", p.pid)}
	}
	if len(data) > 0 {
		switch err := p.input.push(data, cancel); {
		case errors.Is(err, errInputClosed):
			return closed()
		case err != nil:
			return &OpError{Kind: ErrKindOther, Message: err.Error()}
		}
	}
	if !eof {
		return nil
	}
	if p.master != nil {
		if err := p.input.push([]byte{4}, cancel); errors.Is(err, errInputClosed) {
			return closed()
		} else if err != nil {
			return &OpError{Kind: ErrKindOther, Message: err.Error()}
		}
		return nil
	}
	if !p.input.close() {
		return closed()
	}
	p.mu.Lock()
	p.stdinOpen = false
	p.mu.Unlock()
	return nil
}

// processTable holds the background processes; its zero value is ready.
type processTable struct {
	mu    sync.Mutex
	byPID map[int]*process
	// starting counts starts that have a place reserved.
	starting int
}

// reserve makes room for one more process, forgetting exited ones (see
// prune), and reports whether there is room; release gives it back.
func (t *processTable) reserve(now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.pruneLocked(now, ProcessLimit-1-t.starting)
	if len(t.byPID)+t.starting >= ProcessLimit {
		return false
	}
	t.starting++
	return true
}

func (t *processTable) release() {
	t.mu.Lock()
	t.starting--
	t.mu.Unlock()
}

// add records a started process in the place release gave back.
func (t *processTable) add(p *process) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.starting--
	if t.byPID == nil {
		t.byPID = make(map[int]*process)
	}
	// A pid of an exited process kept here may have been reused.
	t.byPID[p.pid] = p
}

// pruneLocked forgets exited processes: those that exited more than
// KeepExitedFor ago, all but the KeepExited most recent, and then as many
// of the oldest as it takes to leave at most room entries. The caller holds
// t.mu.
func (t *processTable) pruneLocked(now time.Time, room int) {
	var exited []*process
	for _, p := range t.byPID {
		p.mu.Lock()
		done, at := p.exited, p.exitedAt
		p.mu.Unlock()
		if !done {
			continue
		}
		if now.Sub(at) > KeepExitedFor {
			delete(t.byPID, p.pid)
			continue
		}
		exited = append(exited, p)
	}
	sort.Slice(exited, func(i, j int) bool { return exited[i].exitedAt.Before(exited[j].exitedAt) })
	for len(exited) > 0 && (len(exited) > KeepExited || len(t.byPID) > room) {
		delete(t.byPID, exited[0].pid)
		exited = exited[1:]
	}
}

func (t *processTable) get(pid int, now time.Time) (*process, *OpError) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.pruneLocked(now, ProcessLimit)
	p, ok := t.byPID[pid]
	if !ok {
		return nil, &OpError{Kind: ErrKindNotFound, Message: fmt.Sprintf("no background process %d (processes that exited are kept for %s)", pid, KeepExitedFor)}
	}
	return p, nil
}

// list returns the processes, oldest first.
func (t *processTable) list(now time.Time) []*process {
	t.mu.Lock()
	t.pruneLocked(now, ProcessLimit)
	ps := make([]*process, 0, len(t.byPID))
	for _, p := range t.byPID {
		ps = append(ps, p)
	}
	t.mu.Unlock()
	sort.Slice(ps, func(i, j int) bool {
		if !ps[i].startedAt.Equal(ps[j].startedAt) {
			return ps[i].startedAt.Before(ps[j].startedAt)
		}
		return ps[i].pid < ps[j].pid
	})
	return ps
}

// handleProcessOp serves the process operations; it reports false for an
// operation that is not one of them.
func (s *Server) handleProcessOp(ctx context.Context, st *yamux.Stream, req Request) bool {
	switch req.Op {
	case OpProcessStart:
		var a ProcessStart
		if !decodeArgs(st, req, &a) {
			return true
		}
		p, oe := s.startProcess(a)
		if oe != nil {
			_ = WriteJSON(st, FrameError, oe)
			return true
		}
		_ = WriteJSON(st, FrameReply, p.info())
	case OpProcessList:
		l := ProcessList{Processes: []ProcessInfo{}}
		for _, p := range s.procs.list(time.Now()) {
			l.Processes = append(l.Processes, p.info())
		}
		_ = WriteJSON(st, FrameReply, l)
	case OpProcessGet:
		var a ProcessRef
		if p := s.findProcess(st, req, &a, &a.PID); p != nil {
			_ = WriteJSON(st, FrameReply, p.info())
		}
	case OpProcessSignal:
		var a ProcessSignal
		if p := s.findProcess(st, req, &a, &a.PID); p != nil {
			reply(st, p.signal(a.Signal))
		}
	case OpProcessResize:
		var a ProcessResize
		if p := s.findProcess(st, req, &a, &a.PID); p != nil {
			reply(st, p.resize(a.TermSize))
		}
	case OpProcessStdin:
		var a ProcessStdin
		if p := s.findProcess(st, req, &a, &a.PID); p != nil {
			w := watchStream(st)
			oe := p.write(a.Data, a.EOF, w.gone)
			w.stop()
			reply(st, oe)
		}
	case OpProcessWait:
		var a ProcessRef
		if p := s.findProcess(st, req, &a, &a.PID); p != nil {
			w := watchStream(st)
			select {
			case <-p.done:
				_ = WriteJSON(st, FrameReply, p.info())
			case <-w.gone:
			case <-ctx.Done():
			}
			w.stop()
		}
	case OpProcessAttach:
		var a ProcessAttach
		if p := s.findProcess(st, req, &a, &a.PID); p != nil {
			attach(ctx, st, p, a.Follow)
		}
	default:
		return false
	}
	return true
}

// findProcess decodes the arguments into args and returns the process
// *pid names, answering the error itself when there is none.
func (s *Server) findProcess(st *yamux.Stream, req Request, args any, pid *int) *process {
	if !decodeArgs(st, req, args) {
		return nil
	}
	p, oe := s.procs.get(*pid, time.Now())
	if oe != nil {
		_ = WriteJSON(st, FrameError, oe)
		return nil
	}
	return p
}

// reply answers an operation that returns nothing: an empty FrameReply, or
// its error.
func reply(st *yamux.Stream, oe *OpError) {
	if oe != nil {
		_ = WriteJSON(st, FrameError, oe)
		return
	}
	_ = WriteJSON(st, FrameReply, struct{}{})
}

// streamWatch notices the end of an operation's stream while its handler
// waits for something else: the caller went away, or the session ended.
type streamWatch struct {
	st   *yamux.Stream
	gone chan struct{}
	done chan struct{}
}

// watchStream starts reading st, dropping what comes, until it ends; stop
// ends the watch and waits for it.
func watchStream(st *yamux.Stream) *streamWatch {
	w := &streamWatch{st: st, gone: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		defer close(w.gone)
		for {
			if _, _, err := ReadFrame(st); err != nil {
				return
			}
		}
	}()
	return w
}

func (w *streamWatch) stop() {
	_ = w.st.SetReadDeadline(time.Now())
	<-w.done
}

// attach serves OpProcessAttach on st (see there).
func attach(ctx context.Context, st *yamux.Stream, p *process, follow bool) {
	// Input from the caller, until the stream ends or the attach does.
	gone := make(chan struct{})
	ended := make(chan struct{})
	inputDone := make(chan struct{})
	go func() {
		defer close(inputDone)
		defer close(gone)
		for {
			typ, payload, err := ReadFrame(st)
			if err != nil {
				return
			}
			switch typ {
			case FrameStdin:
				_ = p.write(payload, false, ended)
			case FrameStdinEOF:
				_ = p.write(nil, true, ended)
			case FrameSignal:
				var sig Signal
				if json.Unmarshal(payload, &sig) == nil {
					_ = p.signal(sig.Signal)
				}
			case FrameResize:
				var size TermSize
				if json.Unmarshal(payload, &size) == nil {
					_ = p.resize(size)
				}
			}
		}
	}()
	defer func() {
		close(ended)
		_ = st.SetReadDeadline(time.Now())
		<-inputDone
	}()

	// The caller learns at once that it is attached, whether or not
	// output follows soon.
	if WriteJSON(st, FrameStarted, p.info()) != nil {
		return
	}
	var c cursor
	for {
		ev, ok, changed, exited := p.next(&c)
		switch {
		case ok && ev.dropped > 0:
			if WriteJSON(st, FrameDropped, Dropped{Stream: streamNames[ev.stream], Bytes: ev.dropped}) != nil {
				return
			}
		case ok:
			if WriteFrame(st, streamFrames[ev.stream], ev.data) != nil {
				return
			}
		case exited:
			_ = WriteJSON(st, FrameExit, p.info())
			return
		case !follow:
			_ = WriteJSON(st, FrameReply, p.info())
			return
		default:
			select {
			case <-changed:
			case <-gone:
				return
			case <-ctx.Done():
				return
			}
		}
	}
}

// startProcess starts a background process and records it.
func (s *Server) startProcess(req ProcessStart) (*process, *OpError) {
	invalid := func(format string, args ...any) *OpError {
		return &OpError{Kind: ErrKindInvalid, Message: fmt.Sprintf(format, args...)}
	}
	other := func(format string, args ...any) *OpError {
		return &OpError{Kind: ErrKindOther, Message: fmt.Sprintf(format, args...)}
	}
	if !req.Login && len(req.Argv) == 0 {
		return nil, invalid("argv is empty")
	}
	if !s.procs.reserve(time.Now()) {
		return nil, &OpError{Kind: ErrKindProcessLimit, Message: fmt.Sprintf("the sandbox already runs %d background processes, the most it may", ProcessLimit)}
	}
	started := false
	defer func() {
		if !started {
			s.procs.release()
		}
	}()

	id, err := lookupIdentity(req.User)
	if err != nil {
		if errors.As(err, new(errUnknownUser)) {
			return nil, invalid("%v", err)
		}
		return nil, other("%v", err)
	}
	if req.Login {
		req.Argv = []string{loginShell(id), "-l"}
	}
	if req.Cwd == "" && id.home != "" {
		if fi, err := os.Stat(id.home); err == nil && fi.IsDir() {
			req.Cwd = id.home
		}
	}
	if req.Cwd != "" {
		if fi, err := os.Stat(req.Cwd); err != nil || !fi.IsDir() {
			if err != nil {
				return nil, invalid("cwd %s: %v", req.Cwd, errors.Unwrap(err))
			}
			return nil, invalid("cwd %s: not a directory", req.Cwd)
		}
	}
	env := mergeEnv(os.Environ(), id.env())
	if req.PTY != nil {
		env = mergeEnv(env, []string{"TERM=xterm-256color"})
	}
	env = mergeEnv(env, req.Env)
	path, err := lookPath(req.Argv[0], req.Cwd, envValue(env, "PATH"))
	if err != nil {
		if errors.Is(err, fs.ErrPermission) {
			return nil, invalid("%s: permission denied", req.Argv[0])
		}
		return nil, invalid("%s: command not found", req.Argv[0])
	}

	p := &process{
		tag: req.Tag, argv: req.Argv, user: req.User, cwd: req.Cwd,
		done: make(chan struct{}), changed: make(chan struct{}),
	}
	if p.user == "" && id.uid == 0 {
		p.user = "root"
	}
	cmd := exec.Command(path, req.Argv[1:]...)
	cmd.Args[0] = req.Argv[0]
	cmd.Env = env
	cmd.Dir = req.Cwd
	// The ends the agent keeps (readers of output, writer of input) and
	// the ones the child gets, closed here once it has started.
	var outputs [2]*os.File
	var inputW *os.File
	var childEnds []*os.File
	closeAll := func() {
		for _, f := range append(childEnds, outputs[0], outputs[1], inputW) {
			if f != nil {
				f.Close()
			}
		}
	}
	if req.PTY != nil {
		size := *req.PTY
		if size.Cols == 0 || size.Rows == 0 {
			size = TermSize{Cols: 80, Rows: 24}
		}
		master, tty, err := openPTY(size, id)
		if err != nil {
			return nil, other("opening a terminal: %v", err)
		}
		p.master = master
		outputs[streamStdout] = master
		childEnds = []*os.File{tty}
		cmd.Stdin, cmd.Stdout, cmd.Stderr = tty, tty, tty
		// A session of its own with the terminal as its controlling
		// terminal (Ctty is the child's descriptor 0); its process group
		// is its pid, as for every command.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0, Credential: id.credential()}
	} else {
		outR, outW, err := os.Pipe()
		if err != nil {
			return nil, other("creating stdout pipe: %v", err)
		}
		errR, errW, err := os.Pipe()
		if err != nil {
			outR.Close()
			outW.Close()
			return nil, other("creating stderr pipe: %v", err)
		}
		outputs = [2]*os.File{outR, errR}
		childEnds = []*os.File{outW, errW}
		var stdinR *os.File
		if req.Stdin {
			stdinR, inputW, err = os.Pipe()
		} else {
			stdinR, err = os.Open(os.DevNull)
		}
		if err != nil {
			closeAll()
			return nil, other("creating stdin: %v", err)
		}
		childEnds = append(childEnds, stdinR)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = stdinR, outW, errW
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: id.credential()}
	}

	exitc := make(chan unix.WaitStatus, 1)
	// As for an exec: the reaper must not see the pid before it is
	// registered, and the child starts below the agent's NPROC headroom.
	s.mu.Lock()
	restore := lowerNproc()
	err = cmd.Start()
	restore()
	if err == nil {
		s.waiters[cmd.Process.Pid] = exitc
	}
	s.mu.Unlock()
	for _, f := range childEnds {
		f.Close()
	}
	childEnds = nil
	if err != nil {
		closeAll()
		if errors.Is(err, os.ErrPermission) {
			return nil, invalid("%s: permission denied", req.Argv[0])
		}
		return nil, other("starting %s: %v", req.Argv[0], err)
	}
	p.pid = cmd.Process.Pid
	p.startedAt = time.Now()
	p.inodes = pipeInodes(outputs[streamStdout], outputs[streamStderr], inputW)
	if p.master != nil {
		p.input = newInputQueue()
		p.stdinOpen = true
		go p.writeInput(p.master, false)
	} else if inputW != nil {
		p.input = newInputQueue()
		p.stdinOpen = true
		go p.writeInput(inputW, true)
	}
	s.procs.add(p)
	started = true
	// A process that exited before it was registered is reaped now.
	s.reap()

	var pumps sync.WaitGroup
	for i, r := range outputs {
		if r != nil {
			pumps.Add(1)
			go p.pump(r, i, &pumps)
		}
	}
	go p.wait(s, exitc, time.Duration(req.TimeoutMS)*time.Millisecond, outputs, inputW, &pumps)
	return p, nil
}

// pump copies one output of p into its ring until the output ends: EOF
// once every holder of the pipe (or terminal) closed it, or, once the
// process has exited and its grace has passed, a deadline, after which it
// takes what the pipe holds at that moment.
func (p *process) pump(r *os.File, stream int, wg *sync.WaitGroup) {
	defer wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		p.record(stream, buf[:n])
		if errors.Is(err, os.ErrDeadlineExceeded) {
			drainBuffered(r, buf, func(b []byte) bool {
				p.record(stream, b)
				return true
			})
			return
		}
		if err != nil {
			// EOF, or EIO from a terminal whose other end is closed.
			return
		}
	}
}

// writeInput writes what is queued for p's input to w until the queue is
// closed (or a write fails: the reader is gone), closing w then if
// closeAtEnd.
func (p *process) writeInput(w *os.File, closeAtEnd bool) {
	if closeAtEnd {
		defer w.Close()
	}
	for {
		b, ok := p.input.pop()
		if !ok {
			return
		}
		if _, err := w.Write(b); err != nil {
			p.input.close()
			p.mu.Lock()
			p.stdinOpen = false
			p.mu.Unlock()
			return
		}
	}
}

// wait records p's exit: it waits for the reaper's status (killing the
// process at its timeout), then for its output as an exec does (what is
// in the pipes, up to outputGrace for background children that hold
// them), and then marks it exited.
func (p *process) wait(s *Server, exitc chan unix.WaitStatus, timeout time.Duration, outputs [2]*os.File, inputW *os.File, pumps *sync.WaitGroup) {
	var ws unix.WaitStatus
	timedOut := false
	if timeout > 0 {
		t := time.NewTimer(timeout)
		select {
		case ws = <-exitc:
		case <-t.C:
			timedOut = true
			s.killExec(p.pid, p.inodes)
			ws = <-exitc
		}
		t.Stop()
	} else {
		ws = <-exitc
	}
	p.reaped.Store(true)

	pumped := make(chan struct{})
	go func() { pumps.Wait(); close(pumped) }()
	grace := time.NewTimer(s.outputGrace)
	select {
	case <-pumped:
	case <-grace.C:
		for _, r := range outputs {
			if r != nil {
				_ = r.SetReadDeadline(time.Now())
			}
		}
		<-pumped
	}
	grace.Stop()
	exit := Exit{TimedOut: timedOut}
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
	if note := s.oomNote(p.pid); note != "" {
		p.record(streamStderr, []byte(note))
	}
	// Input ends with the process; a write blocked on a pipe that a
	// background child holds and does not read fails as its end closes.
	if p.input != nil {
		p.input.close()
	}
	p.mu.Lock()
	p.exited = true
	p.exit = exit
	p.exitedAt = time.Now()
	p.stdinOpen = false
	if p.master != nil {
		p.master.Close()
	}
	p.notifyLocked()
	p.mu.Unlock()
	if inputW != nil {
		inputW.Close()
	}
	for _, r := range outputs {
		if r != nil {
			r.Close()
		}
	}
	close(p.done)
}

// errInputClosed: the process's input was closed (asked for, or the
// process exited).
var errInputClosed = errors.New("input closed")

// inputQueue is a process's pending input, written by its own goroutine. A
// push waits while more than maxQueuedInput is queued.
type inputQueue struct {
	mu     sync.Mutex
	items  [][]byte
	queued int
	closed bool
	// ready has a token when items were added or the queue closed.
	ready chan struct{}
	// room is closed, and replaced, when items are taken.
	room chan struct{}
}

func newInputQueue() *inputQueue {
	return &inputQueue{ready: make(chan struct{}, 1), room: make(chan struct{})}
}

// push queues b (a copy), waiting for room until cancel is closed.
func (q *inputQueue) push(b []byte, cancel <-chan struct{}) error {
	b = append([]byte(nil), b...)
	for {
		q.mu.Lock()
		if q.closed {
			q.mu.Unlock()
			return errInputClosed
		}
		if q.queued == 0 || q.queued+len(b) <= maxQueuedInput {
			q.items = append(q.items, b)
			q.queued += len(b)
			q.mu.Unlock()
			q.wake()
			return nil
		}
		room := q.room
		q.mu.Unlock()
		select {
		case <-room:
		case <-cancel:
			return errors.New("the caller went away while the process's input queue was full")
		}
	}
}

func (q *inputQueue) wake() {
	select {
	case q.ready <- struct{}{}:
	default:
	}
}

// close ends the queue, reporting whether it was open: pop returns what is
// queued, then reports false.
func (q *inputQueue) close() bool {
	q.mu.Lock()
	was := !q.closed
	q.closed = true
	q.mu.Unlock()
	q.wake()
	return was
}

// pop returns the next queued item, waiting for one; false once the queue
// is closed and empty.
func (q *inputQueue) pop() ([]byte, bool) {
	for {
		q.mu.Lock()
		if len(q.items) > 0 {
			b := q.items[0]
			q.items[0] = nil
			q.items = q.items[1:]
			q.queued -= len(b)
			close(q.room)
			q.room = make(chan struct{})
			q.mu.Unlock()
			return b, true
		}
		if q.closed {
			q.mu.Unlock()
			return nil, false
		}
		q.mu.Unlock()
		<-q.ready
	}
}
