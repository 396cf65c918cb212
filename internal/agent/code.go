package agent

import (
	"bufio"
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"
	"golang.org/x/sys/unix"
)

// Code contexts are live interpreters: a Jupyter kernel (ipykernel) per
// context, so that variables, imports and figures persist from one cell to
// the next, and results come back as Jupyter's MIME bundles.
//
// The agent does not speak ZeroMQ: each context is a small Python bridge
// (codebridge.py, embedded here) that the agent starts as the context's
// user. The bridge runs the kernel with jupyter_client's KernelManager and
// speaks JSON lines with the agent on two pipes (fd 3 in, fd 4 out); its
// stdout and stderr, which the kernel inherits, are a log kept for error
// messages. The bridge and its kernel live as long as the context: across
// agent sessions, pauses, snapshots and forks (a restored sandbox's agent is
// told so with OpRestored, and every context reseeds its random generators).

//go:embed codebridge.py
var bridgeSource string

// Code operations (Request.Args holds the JSON of the type named).
const (
	// OpCodeRun runs a cell (CodeRunArgs): FrameCodeEvent frames follow,
	// the last of Type "end".
	OpCodeRun = "code.run"
	// OpCodeCreate starts a context (CodeContextArgs); the reply is a
	// CodeContextInfo once its kernel answers.
	OpCodeCreate = "code.create"
	// OpCodeList lists the contexts (CodeContextRef, empty); the reply is
	// a CodeContextList.
	OpCodeList = "code.list"
	// OpCodeRestart starts a context's kernel afresh (CodeContextRef); the
	// reply is its CodeContextInfo.
	OpCodeRestart = "code.restart"
	// OpCodeDelete ends a context (CodeContextRef); the reply is {}.
	OpCodeDelete = "code.delete"
	// OpRestored tells the agent that its sandbox was just restored from
	// a checkpoint (a fork, a snapshot, a resume, a template snapshot):
	// every code context reseeds its random generators before its next
	// cell. The reply is {}.
	OpRestored = "restored"
)

// Frames of OpCodeRun (agent→daemon).
const (
	// FrameCodeEvent carries a JSON CodeEvent.
	FrameCodeEvent byte = 'V'
	// FrameCodeEventPart carries the first bytes of an event whose JSON is
	// longer than MaxFrame; the rest follows, the last piece in a
	// FrameCodeEvent.
	FrameCodeEventPart byte = 'v'
)

// ErrKindContextDead: the context's interpreter died; restart the context.
const ErrKindContextDead = "context_dead"

// LanguagePython is the language of Jupyter's Python kernel, the only one
// code contexts have so far.
const LanguagePython = "python"

// Context states (CodeContextInfo.State).
const (
	CodeStateStarting = "starting"
	CodeStateIdle     = "idle"
	CodeStateBusy     = "busy"
	CodeStateDead     = "dead"
)

// MaxCodeContexts bounds the contexts of one sandbox: each is an
// interpreter of its own.
const MaxCodeContexts = 32

// CodeContextArgs creates a context.
type CodeContextArgs struct {
	Language string `json:"language,omitempty"`
	// Cwd is the kernel's working directory; the user's home when empty.
	Cwd string `json:"cwd,omitempty"`
	// Env (KEY=VALUE) is the context's own environment, over SandboxEnv.
	Env []string `json:"env,omitempty"`
	// SandboxEnv is the sandbox's environment, which its contexts keep in
	// step with (a warm pool member's context was started before the
	// sandbox had an owner and an environment).
	SandboxEnv []string `json:"sandbox_env,omitempty"`
	// User runs the kernel as that user; empty: the agent's own.
	User string `json:"user,omitempty"`
}

// CodeContextRef names a context.
type CodeContextRef struct {
	ID string `json:"id"`
	// Default creates the context as the default context of its language
	// when it does not exist yet (OpCodeRestart).
	Default *CodeContextArgs `json:"default,omitempty"`
}

// CodeContextInfo describes a context.
type CodeContextInfo struct {
	ID       string `json:"id"`
	Language string `json:"language"`
	Cwd      string `json:"cwd"`
	User     string `json:"user"`
	State    string `json:"state"`
	// Error says why a dead context died.
	Error string `json:"error,omitempty"`
}

// CodeContextList is the reply to OpCodeList.
type CodeContextList struct {
	Contexts []CodeContextInfo `json:"contexts"`
}

// CodeRunArgs runs one cell.
type CodeRunArgs struct {
	// Context is the context's id; empty: the default context of Language
	// (whose id is the language), started on first use with Default.
	Context  string `json:"context,omitempty"`
	Language string `json:"language,omitempty"`
	Code     string `json:"code"`
	// Silent runs the cell without results or a place in the history
	// (warm-ups).
	Silent bool `json:"silent,omitempty"`
	// TimeoutMS interrupts the cell that long after it started (0: no
	// timeout); the context keeps its variables. A context that was busy
	// with other cells for that long does not run this one at all.
	TimeoutMS int64 `json:"timeout_ms,omitempty"`
	// MaxOutputBytes caps each of stdout, stderr and the results (their
	// JSON) of the cell; the rest is dropped and the end says truncated.
	MaxOutputBytes int64 `json:"max_output_bytes,omitempty"`
	// SandboxEnv is the sandbox's environment now, which the context is
	// brought in step with before the cell runs.
	SandboxEnv []string `json:"sandbox_env,omitempty"`
	// Default is how a default context that does not exist yet is made.
	Default CodeContextArgs `json:"default"`
}

// CodeEvent is one event of a cell, in order: "started" (it was handed to
// the kernel: its timeout counts from here), "stdout" and "stderr" (Text),
// "result" (Data, a MIME bundle; Main for the cell's own value), "error"
// (Name, Value, Traceback), and last "end".
type CodeEvent struct {
	Type string `json:"type"`
	Text string `json:"text,omitempty"`
	// Data maps MIME types to their values as the kernel gave them
	// (strings, base64 for binary types; JSON for application/json).
	Data map[string]json.RawMessage `json:"data,omitempty"`
	Main bool                       `json:"main,omitempty"`
	// The error of the cell.
	Name      string `json:"name,omitempty"`
	Value     string `json:"value,omitempty"`
	Traceback string `json:"traceback,omitempty"`
	// The end.
	Context        string `json:"context,omitempty"`
	ExecutionCount int    `json:"execution_count,omitempty"`
	TimedOut       bool   `json:"timed_out,omitempty"`
	Truncated      bool   `json:"truncated,omitempty"`
}

// Code event types.
const (
	CodeEventStarted = "started"
	CodeEventStdout  = "stdout"
	CodeEventStderr  = "stderr"
	CodeEventResult  = "result"
	CodeEventError   = "error"
	CodeEventEnd     = "end"
)

// Bounds of a code context's life.
const (
	// CodeStartTimeout bounds a kernel's start (the bridge gives up at
	// 120 s itself).
	CodeStartTimeout = 150 * time.Second
	// CodeInterruptGrace is how long a cell past its timeout has, once
	// interrupted, to stop; one that does not is ended by restarting its
	// context, and its variables are lost.
	CodeInterruptGrace = 10 * time.Second
	// maxBridgeLine bounds one event of the bridge; longer ones (a huge
	// image) are dropped and the cell is truncated.
	maxBridgeLine = 32 << 20
	// bridgeWriteTimeout bounds a request to a bridge that does not read.
	bridgeWriteTimeout = 10 * time.Second
	// bridgeLogBytes is how much of a bridge's log is kept.
	bridgeLogBytes = 8 << 10
)

// reseedCode gives the module-level generators of random and numpy.random
// fresh seeds from the OS (a restored copy of a sandbox would otherwise
// draw what every other copy draws). Generators the cell made itself keep
// their state, as after any fork(2).
const reseedCode = `def __pandastack_reseed():
    import random, sys
    random.seed()
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()
__pandastack_reseed()
del __pandastack_reseed
`

// codeTable holds the sandbox's code contexts; its zero value is ready.
type codeTable struct {
	mu   sync.Mutex
	byID map[string]*codeContext
	// restoredAt counts OpRestored notices, so that a context that was
	// starting when one came reseeds once it is up.
	restored int
}

// codeContext is one live interpreter. Its bridge is replaced by a restart.
type codeContext struct {
	id, language, cwd, user string
	created                 time.Time
	// ownEnv is the context's own environment (KEY=VALUE).
	ownEnv []string

	// turn is held (a value in it) by the cell that runs: cells of a
	// context run one at a time.
	turn chan struct{}

	mu sync.Mutex
	// bridge is the running bridge; nil while starting or when dead.
	bridge *bridge
	// ready is closed when the current start has settled (bridge set, or
	// startErr).
	ready    chan struct{}
	startErr error
	// deadErr says why the context died.
	deadErr string
	// sandboxEnv is the sandbox environment the kernel has.
	sandboxEnv map[string]string
	// reseeds is the table's restored count the kernel has reseeded for.
	reseeds int
	deleted bool
	// everStarted is set once a start succeeded.
	everStarted bool
}

// bridge is one running bridge process and its kernel.
type bridge struct {
	pid    int
	inodes []uint64
	req    *os.File
	wmu    sync.Mutex
	log    *ringLog

	mu sync.Mutex
	// kernelPid is the kernel's pid (and process group), 0 until known.
	kernelPid int
	subs      map[int64]*codeSub
	// current is the id of the cell the bridge last started, to which a
	// dropped (over-long) event is charged.
	current int64
	nextID  int64
	// dead is set once the bridge reported its kernel dead or exited.
	dead string
	// readyc gets the bridge's first word: nil (ready) or why not.
	readyc chan error
	// done is closed when the bridge's events have all been read.
	done chan struct{}
}

// codeSub receives the events of one cell.
type codeSub struct {
	c    chan bridgeEvent
	gone chan struct{}
}

// bridgeEvent is one line of the bridge.
type bridgeEvent struct {
	ID        int64                      `json:"id"`
	Type      string                     `json:"type"`
	Name      string                     `json:"name"`
	Text      string                     `json:"text"`
	Data      map[string]json.RawMessage `json:"data"`
	Main      bool                       `json:"main"`
	EName     string                     `json:"ename"`
	EValue    string                     `json:"evalue"`
	Traceback []string                   `json:"traceback"`
	Status    string                     `json:"status"`
	Count     int                        `json:"execution_count"`
	KernelPID int                        `json:"kernel_pid"`
	Kind      string                     `json:"kind"`
	Message   string                     `json:"message"`
	Signal    int                        `json:"signal"`
}

// Bridge event types beyond the CodeEvent ones it shares.
const (
	bridgeReady   = "ready"
	bridgeStream  = "stream"
	bridgeDead    = "dead"
	bridgeFatal   = "fatal"
	bridgeDropped = "dropped"
)

// handleCode serves the code operations.
func (s *Server) handleCode(ctx context.Context, st *yamux.Stream, req Request) {
	switch req.Op {
	case OpCodeRun:
		var a CodeRunArgs
		if decodeArgs(st, req, &a) {
			s.codeRun(st, a)
		}
	case OpCodeCreate:
		var a CodeContextArgs
		if !decodeArgs(st, req, &a) {
			return
		}
		cc, err := s.code.create(s, "", a)
		if err == nil {
			err = cc.waitStarted(ctx)
		}
		if err != nil {
			writeCodeError(st, err)
			return
		}
		_ = WriteJSON(st, FrameReply, cc.info())
	case OpCodeList:
		_ = WriteJSON(st, FrameReply, CodeContextList{Contexts: s.code.list()})
	case OpCodeRestart:
		var a CodeContextRef
		if !decodeArgs(st, req, &a) {
			return
		}
		cc, err := s.code.restart(s, a)
		if err == nil {
			err = cc.waitStarted(ctx)
		}
		if err != nil {
			writeCodeError(st, err)
			return
		}
		_ = WriteJSON(st, FrameReply, cc.info())
	case OpCodeDelete:
		var a CodeContextRef
		if !decodeArgs(st, req, &a) {
			return
		}
		if err := s.code.remove(s, a.ID); err != nil {
			writeCodeError(st, err)
			return
		}
		_ = WriteJSON(st, FrameReply, struct{}{})
	case OpRestored:
		s.code.restoredNotice()
		_ = WriteJSON(st, FrameReply, struct{}{})
	}
}

// codeError is an error of a code operation with its OpError kind.
type codeError struct {
	kind string
	msg  string
}

func (e *codeError) Error() string { return e.msg }

func codeErr(kind, format string, args ...any) error {
	return &codeError{kind: kind, msg: fmt.Sprintf(format, args...)}
}

func writeCodeError(st *yamux.Stream, err error) {
	kind := ErrKindOther
	var ce *codeError
	if errors.As(err, &ce) {
		kind = ce.kind
	}
	writeOpError(st, kind, "%s", err.Error())
}

// ----- the table -----------------------------------------------------------

func newContextID() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return "ctx-" + hex.EncodeToString(b)
}

// create starts a context with id ("" for a new one) and returns it while
// its kernel starts.
func (t *codeTable) create(s *Server, id string, a CodeContextArgs) (*codeContext, error) {
	if a.Language == "" {
		a.Language = LanguagePython
	}
	if a.Language != LanguagePython {
		return nil, codeErr(ErrKindInvalid, "language %q is not supported; code contexts run %q", a.Language, LanguagePython)
	}
	id0, err := lookupIdentity(a.User)
	if err != nil {
		if errors.As(err, new(errUnknownUser)) {
			return nil, codeErr(ErrKindInvalid, "%v", err)
		}
		return nil, err
	}
	if a.Cwd == "" {
		// The user's home, as for commands.
		a.Cwd = "/"
		if fi, err := os.Stat(id0.home); id0.home != "" && err == nil && fi.IsDir() {
			a.Cwd = id0.home
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.byID == nil {
		t.byID = make(map[string]*codeContext)
	}
	if len(t.byID) >= MaxCodeContexts {
		return nil, codeErr(ErrKindInvalid, "the sandbox has %d code contexts, the most it may have; delete one first", len(t.byID))
	}
	if id == "" {
		id = newContextID()
	}
	if _, ok := t.byID[id]; ok {
		return nil, codeErr(ErrKindExists, "code context %q exists already", id)
	}
	cc := &codeContext{
		id: id, language: a.Language, cwd: a.Cwd, user: a.User, created: time.Now(),
		ownEnv: a.Env, turn: make(chan struct{}, 1), reseeds: t.restored,
	}
	t.byID[id] = cc
	cc.start(s, a.SandboxEnv)
	return cc, nil
}

// get returns the context a cell asks for, starting a default context on
// first use.
func (t *codeTable) get(s *Server, a CodeRunArgs) (*codeContext, error) {
	id := a.Context
	if id == "" {
		lang := a.Language
		if lang == "" {
			lang = LanguagePython
		}
		if lang != LanguagePython {
			return nil, codeErr(ErrKindInvalid, "language %q is not supported; code contexts run %q", lang, LanguagePython)
		}
		id = lang
	}
	t.mu.Lock()
	cc, ok := t.byID[id]
	t.mu.Unlock()
	if ok {
		return cc, nil
	}
	if id != LanguagePython {
		return nil, codeErr(ErrKindNotFound, "code context %q not found", id)
	}
	d := a.Default
	d.Language = LanguagePython
	cc, err := t.create(s, id, d)
	var ce *codeError
	if errors.As(err, &ce) && ce.kind == ErrKindExists {
		// Another cell started it meanwhile.
		t.mu.Lock()
		cc, ok = t.byID[id]
		t.mu.Unlock()
		if ok {
			return cc, nil
		}
	}
	return cc, err
}

func (t *codeTable) lookup(id string) (*codeContext, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	cc, ok := t.byID[id]
	return cc, ok
}

func (t *codeTable) list() []CodeContextInfo {
	t.mu.Lock()
	ccs := make([]*codeContext, 0, len(t.byID))
	for _, cc := range t.byID {
		ccs = append(ccs, cc)
	}
	t.mu.Unlock()
	sort.Slice(ccs, func(i, j int) bool { return ccs[i].created.Before(ccs[j].created) })
	out := make([]CodeContextInfo, 0, len(ccs))
	for _, cc := range ccs {
		out = append(out, cc.info())
	}
	return out
}

// restart replaces the context's kernel with a fresh one: a cell running
// in it ends, its variables are gone.
func (t *codeTable) restart(s *Server, ref CodeContextRef) (*codeContext, error) {
	cc, ok := t.lookup(ref.ID)
	if !ok {
		if ref.Default == nil || ref.ID != LanguagePython {
			return nil, codeErr(ErrKindNotFound, "code context %q not found", ref.ID)
		}
		// The default context, not started yet: starting it is the
		// restart.
		fresh, err := t.create(s, ref.ID, *ref.Default)
		var ce *codeError
		switch {
		case err == nil:
			return fresh, nil
		case errors.As(err, &ce) && ce.kind == ErrKindExists:
			if cc, ok = t.lookup(ref.ID); !ok {
				return nil, err
			}
		default:
			return nil, err
		}
	}
	cc.mu.Lock()
	env := envMapList(cc.sandboxEnv)
	cc.mu.Unlock()
	cc.restart(s, env)
	return cc, nil
}

// remove ends a context and forgets it.
func (t *codeTable) remove(s *Server, id string) error {
	t.mu.Lock()
	cc, ok := t.byID[id]
	delete(t.byID, id)
	t.mu.Unlock()
	if !ok {
		return codeErr(ErrKindNotFound, "code context %q not found", id)
	}
	cc.mu.Lock()
	cc.deleted = true
	b := cc.bridge
	cc.bridge = nil
	cc.mu.Unlock()
	if b != nil {
		b.kill(s)
	}
	return nil
}

// forget drops cc from the table, if it is still there.
func (t *codeTable) forget(cc *codeContext) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.byID[cc.id] == cc {
		delete(t.byID, cc.id)
	}
}

// restoredNotice makes every context reseed before its next cell; ready
// ones are told at once (the kernel runs it before anything sent later).
func (t *codeTable) restoredNotice() {
	t.mu.Lock()
	t.restored++
	n := t.restored
	ccs := make([]*codeContext, 0, len(t.byID))
	for _, cc := range t.byID {
		ccs = append(ccs, cc)
	}
	t.mu.Unlock()
	for _, cc := range ccs {
		cc.reseedIfNeeded(n)
	}
}

func (t *codeTable) restoredCount() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.restored
}

// ----- a context -----------------------------------------------------------

func (cc *codeContext) info() CodeContextInfo {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	in := CodeContextInfo{ID: cc.id, Language: cc.language, Cwd: cc.cwd, User: cc.user}
	switch {
	case cc.deadErr != "":
		in.State, in.Error = CodeStateDead, cc.deadErr
	case cc.bridge == nil:
		in.State = CodeStateStarting
	case len(cc.turn) > 0:
		in.State = CodeStateBusy
	default:
		in.State = CodeStateIdle
	}
	if in.User == "" {
		in.User = "root"
	}
	return in
}

// start starts a bridge for the context in the background; ready is
// closed when it has settled.
func (cc *codeContext) start(s *Server, sandboxEnv []string) {
	ready := make(chan struct{})
	cc.mu.Lock()
	cc.ready = ready
	cc.startErr = nil
	cc.deadErr = ""
	cc.sandboxEnv = envListMap(sandboxEnv)
	cc.mu.Unlock()
	go func() {
		defer close(ready)
		b, err := s.startBridge(cc, sandboxEnv)
		cc.mu.Lock()
		defer cc.mu.Unlock()
		if cc.deleted || cc.ready != ready {
			// Deleted or restarted while starting.
			if b != nil {
				go b.kill(s)
			}
			if err == nil {
				err = codeErr(ErrKindNotFound, "code context %q was deleted or restarted while it started", cc.id)
			}
			cc.startErr = err
			return
		}
		if err != nil {
			cc.startErr = err
			cc.deadErr = err.Error()
			if !cc.everStarted {
				// A context that never started is not kept: its
				// creator (or first cell) is told why.
				go s.code.forget(cc)
			}
			return
		}
		cc.everStarted = true
		cc.bridge = b
		go cc.watch(s, b)
	}()
}

// restart kills the context's bridge (a cell running in it ends) and
// starts another.
func (cc *codeContext) restart(s *Server, sandboxEnv []string) {
	cc.mu.Lock()
	old := cc.bridge
	cc.bridge = nil
	cc.mu.Unlock()
	if old != nil {
		old.markDead("the context was restarted")
		old.kill(s)
	}
	cc.start(s, sandboxEnv)
	s.code.mu.Lock()
	n := s.code.restored
	s.code.mu.Unlock()
	cc.mu.Lock()
	// A fresh kernel seeds itself.
	cc.reseeds = n
	cc.mu.Unlock()
}

// watch notes the death of the context's bridge.
func (cc *codeContext) watch(s *Server, b *bridge) {
	<-b.done
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.bridge == b {
		cc.bridge = nil
		cc.deadErr = b.deathReason()
		go b.kill(s)
	}
}

// waitStarted waits for the context's current start to settle.
func (cc *codeContext) waitStarted(ctx context.Context) error {
	cc.mu.Lock()
	ready := cc.ready
	cc.mu.Unlock()
	select {
	case <-ready:
	case <-ctx.Done():
		return ctx.Err()
	}
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return cc.startErr
}

// current returns the running bridge, or why there is none.
func (cc *codeContext) current() (*bridge, error) {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.bridge != nil {
		return cc.bridge, nil
	}
	if cc.deleted {
		return nil, codeErr(ErrKindNotFound, "code context %q was deleted", cc.id)
	}
	why := cc.deadErr
	if why == "" {
		why = "its interpreter is not running"
	}
	return nil, codeErr(ErrKindContextDead, "code context %q is dead: %s; restart it", cc.id, why)
}

// reseedIfNeeded sends the reseed to a running kernel that has not had it
// for restore n.
func (cc *codeContext) reseedIfNeeded(n int) {
	cc.mu.Lock()
	b := cc.bridge
	need := b != nil && cc.reseeds < n
	if need {
		cc.reseeds = n
	}
	cc.mu.Unlock()
	if need {
		_, _ = b.execute(reseedCode, true, nil)
	}
}

// syncEnv brings the kernel's os.environ in step with the sandbox's
// environment (keys of the context's own env stay as they are).
func (cc *codeContext) syncEnv(b *bridge, sandboxEnv []string) {
	want := envListMap(sandboxEnv)
	for _, kv := range cc.ownEnv {
		k, _, _ := strings.Cut(kv, "=")
		delete(want, k)
	}
	cc.mu.Lock()
	have := maps.Clone(cc.sandboxEnv)
	for _, kv := range cc.ownEnv {
		k, _, _ := strings.Cut(kv, "=")
		delete(have, k)
	}
	if maps.Equal(want, have) {
		cc.mu.Unlock()
		return
	}
	set := map[string]string{}
	var unset []string
	for k, v := range want {
		if hv, ok := have[k]; !ok || hv != v {
			set[k] = v
		}
	}
	for k := range have {
		if _, ok := want[k]; !ok {
			unset = append(unset, k)
		}
	}
	sort.Strings(unset)
	cc.sandboxEnv = envListMap(sandboxEnv)
	cc.mu.Unlock()
	_, _ = b.execute(envSyncCode(set, unset), true, nil)
}

// envSyncCode is Python that sets and unsets environment variables. JSON
// objects and arrays of strings are Python literals.
func envSyncCode(set map[string]string, unset []string) string {
	sj, _ := json.Marshal(set)
	uj, _ := json.Marshal(unset)
	if unset == nil {
		uj = []byte("[]")
	}
	return fmt.Sprintf("import os as __pandastack_os\n__pandastack_os.environ.update(%s)\nfor __pandastack_k in %s:\n    __pandastack_os.environ.pop(__pandastack_k, None)\ndel __pandastack_os\n", sj, uj)
}

// ----- running a cell ------------------------------------------------------

// codeRun runs one cell and streams its events to the daemon.
func (s *Server) codeRun(st *yamux.Stream, a CodeRunArgs) {
	callerGone := make(chan struct{})
	go func() {
		// The daemon sends nothing after the request; a read ends when
		// the stream closes (the caller went away, or the run ended).
		var b [1]byte
		_, _ = st.Read(b[:])
		close(callerGone)
	}()
	cc, err := s.code.get(s, a)
	if err != nil {
		writeCodeError(st, err)
		return
	}
	w := &codeWriter{st: st}
	timeout := time.Duration(a.TimeoutMS) * time.Millisecond
	var busy <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		busy = t.C
	}
	select {
	case cc.turn <- struct{}{}:
	case <-callerGone:
		return
	case <-busy:
		w.send(CodeEvent{Type: CodeEventError, Name: "TimeoutError",
			Value: fmt.Sprintf("code context %q was busy running other cells for the whole timeout", cc.id)})
		w.send(CodeEvent{Type: CodeEventEnd, Context: cc.id, TimedOut: true})
		return
	}
	defer func() { <-cc.turn }()
	// A context that is (re)starting is waited for.
	startCtx, cancel := context.WithTimeout(context.Background(), CodeStartTimeout)
	go func() {
		select {
		case <-callerGone:
			cancel()
		case <-startCtx.Done():
		}
	}()
	err = cc.waitStarted(startCtx)
	cancel()
	switch {
	case errors.Is(err, context.Canceled):
		return
	case errors.Is(err, context.DeadlineExceeded):
		writeCodeError(st, codeErr(ErrKindContextDead, "code context %q did not start within %s", cc.id, CodeStartTimeout))
		return
	case err != nil:
		writeCodeError(st, err)
		return
	}
	b, cerr := cc.current()
	if cerr != nil {
		writeCodeError(st, cerr)
		return
	}
	cc.reseedIfNeeded(s.code.restoredCount())
	cc.syncEnv(b, a.SandboxEnv)
	sub := &codeSub{c: make(chan bridgeEvent, 64), gone: make(chan struct{})}
	rid, err := b.execute(a.Code, a.Silent, sub)
	if err != nil {
		writeCodeError(st, codeErr(ErrKindContextDead, "code context %q is dead: %v; restart it", cc.id, err))
		return
	}
	defer b.unsubscribe(rid)
	s.streamCell(cc, b, sub, w, a, timeout, callerGone)
}

// streamCell forwards a cell's events until its end, enforcing its timeout
// and output caps.
func (s *Server) streamCell(cc *codeContext, b *bridge, sub *codeSub, w *codeWriter, a CodeRunArgs, timeout time.Duration, callerGone <-chan struct{}) {
	var (
		deadline, grace *time.Timer
		deadlineC       <-chan time.Time
		graceC          <-chan time.Time
		timedOut        bool
		// out counts what was sent per kind, for MaxOutputBytes.
		out       = map[string]int64{}
		truncated bool
	)
	defer func() {
		for _, t := range []*time.Timer{deadline, grace} {
			if t != nil {
				t.Stop()
			}
		}
	}()
	interrupt := func() {
		if grace == nil {
			b.interrupt()
			grace = time.NewTimer(CodeInterruptGrace)
			graceC = grace.C
		}
	}
	capped := func(kind string, n int) bool {
		if a.MaxOutputBytes > 0 && out[kind]+int64(n) > a.MaxOutputBytes {
			truncated = true
			return true
		}
		out[kind] += int64(n)
		return false
	}
	end := func(count int) {
		w.send(CodeEvent{Type: CodeEventEnd, Context: cc.id, ExecutionCount: count, TimedOut: timedOut, Truncated: truncated})
	}
	for {
		select {
		case ev := <-sub.c:
			switch ev.Type {
			case CodeEventStarted:
				if timeout > 0 && deadline == nil {
					deadline = time.NewTimer(timeout)
					deadlineC = deadline.C
				}
				w.send(CodeEvent{Type: CodeEventStarted})
			case bridgeStream:
				kind := CodeEventStdout
				if ev.Name == "stderr" {
					kind = CodeEventStderr
				}
				text := ev.Text
				if a.MaxOutputBytes > 0 {
					if room := a.MaxOutputBytes - out[kind]; int64(len(text)) > room {
						text = truncateUTF8(text, int(max(room, 0)))
						truncated = true
					}
				}
				out[kind] += int64(len(text))
				if text != "" {
					w.send(CodeEvent{Type: kind, Text: text})
				}
			case CodeEventResult:
				size := 0
				for _, v := range ev.Data {
					size += len(v)
				}
				if capped(CodeEventResult, size) {
					continue
				}
				w.send(CodeEvent{Type: CodeEventResult, Data: ev.Data, Main: ev.Main})
			case CodeEventError:
				w.send(CodeEvent{Type: CodeEventError, Name: ev.EName, Value: ev.EValue, Traceback: strings.Join(ev.Traceback, "\n")})
			case bridgeDropped:
				truncated = true
			case CodeEventEnd:
				end(ev.Count)
				return
			case bridgeDead:
				why := ev.Message
				if note := s.oomNote(b.kernel()); note != "" {
					why += ": the sandbox reached its memory limit"
				}
				w.send(CodeEvent{Type: CodeEventError, Name: "DeadKernelError",
					Value: fmt.Sprintf("the interpreter of code context %q died: %s; restart the context", cc.id, why)})
				end(0)
				return
			}
		case <-deadlineC:
			deadlineC = nil
			timedOut = true
			interrupt()
		case <-callerGone:
			// Nobody reads the events any more; the cell is interrupted
			// as a command is killed, and the turn is held until it
			// has stopped.
			callerGone = nil
			interrupt()
		case <-graceC:
			// The cell ignored the interrupt: only a new kernel stops it.
			cc.restart(s, a.SandboxEnv)
			w.send(CodeEvent{Type: CodeEventError, Name: "TimeoutError",
				Value: fmt.Sprintf("the cell did not stop when interrupted at its timeout; code context %q was restarted and its variables are lost", cc.id)})
			end(0)
			return
		}
	}
}

// truncateUTF8 cuts s to at most n bytes on a character boundary.
func truncateUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && n < len(s) && s[n]&0xC0 == 0x80 {
		n--
	}
	return s[:n]
}

// codeWriter sends a cell's events to the daemon, splitting long ones.
// Write errors (the caller went away) are dropped: the cell goes on to
// its end so that the context's turn is given back in order.
type codeWriter struct {
	st     io.Writer
	failed bool
}

func (w *codeWriter) send(ev CodeEvent) {
	if w.failed {
		return
	}
	b, err := encodeJSON(ev)
	if err != nil {
		return
	}
	for len(b) > MaxFrame {
		if WriteFrame(w.st, FrameCodeEventPart, b[:MaxFrame]) != nil {
			w.failed = true
			return
		}
		b = b[MaxFrame:]
	}
	if WriteFrame(w.st, FrameCodeEvent, b) != nil {
		w.failed = true
	}
}

// ReadCodeEvent reads the next event of an OpCodeRun stream, joining a long
// one's parts up to max bytes of JSON (0: no limit).
func ReadCodeEvent(st *Stream, limit int) (CodeEvent, error) {
	var buf []byte
	for {
		typ, payload, err := st.ReadFrame()
		if err != nil {
			return CodeEvent{}, err
		}
		switch typ {
		case FrameCodeEventPart, FrameCodeEvent:
		case FrameExit:
			return CodeEvent{}, ErrOpUnsupported
		default:
			return CodeEvent{}, fmt.Errorf("unexpected frame %q in a code run", typ)
		}
		if limit > 0 && len(buf)+len(payload) > limit {
			return CodeEvent{}, fmt.Errorf("code event of more than %d bytes", limit)
		}
		buf = append(buf, payload...)
		if typ == FrameCodeEvent {
			var ev CodeEvent
			if err := json.Unmarshal(buf, &ev); err != nil {
				return CodeEvent{}, fmt.Errorf("decoding code event: %w", err)
			}
			return ev, nil
		}
	}
}

// ----- the bridge process --------------------------------------------------

// startBridge starts the context's bridge and waits for its kernel.
func (s *Server) startBridge(cc *codeContext, sandboxEnv []string) (*bridge, error) {
	id, err := lookupIdentity(cc.user)
	if err != nil {
		if errors.As(err, new(errUnknownUser)) {
			return nil, codeErr(ErrKindInvalid, "%v", err)
		}
		return nil, err
	}
	cwd := cc.cwd
	if fi, err := os.Stat(cwd); err != nil || !fi.IsDir() {
		return nil, codeErr(ErrKindInvalid, "cwd %s of the code context is not a directory", cwd)
	}
	env := mergeEnv(mergeEnv(mergeEnv(os.Environ(), id.env()), sandboxEnv), cc.ownEnv)
	// Figures come back as images through the kernel's inline backend,
	// whatever the sandbox's MPLBACKEND (Agg, for scripts), unless the
	// context asked for another.
	if envValue(cc.ownEnv, "MPLBACKEND") == "" {
		env = mergeEnv(env, []string{"MPLBACKEND=module://matplotlib_inline.backend_inline"})
	}
	env = mergeEnv(env, []string{"PYDEVD_DISABLE_FILE_VALIDATION=1", "PYTHONUNBUFFERED=1"})
	python, err := lookPath("python3", cwd, envValue(env, "PATH"))
	if err != nil {
		return nil, codeErr(ErrKindInvalid, "python3 is not installed in this sandbox: code contexts need python3, python3-ipykernel and python3-jupyter-client (the code-interpreter template has them)")
	}

	var files []*os.File
	closeAll := func() {
		for _, f := range files {
			f.Close()
		}
	}
	pipe := func() (r, w *os.File, err error) {
		r, w, err = os.Pipe()
		if err == nil {
			files = append(files, r, w)
		}
		return r, w, err
	}
	reqR, reqW, err := pipe()
	if err != nil {
		return nil, fmt.Errorf("creating bridge pipe: %w", err)
	}
	evR, evW, err := pipe()
	if err != nil {
		closeAll()
		return nil, fmt.Errorf("creating bridge pipe: %w", err)
	}
	logR, logW, err := pipe()
	if err != nil {
		closeAll()
		return nil, fmt.Errorf("creating bridge pipe: %w", err)
	}
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		closeAll()
		return nil, err
	}
	files = append(files, devnull)

	cmd := exec.Command(python, "-I", "-c", bridgeSource)
	cmd.Args[0] = "python3"
	cmd.Env = env
	cmd.Dir = cwd
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, logW, logW
	cmd.ExtraFiles = []*os.File{reqR, evW} // fd 3 and 4
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: id.credential()}
	exitc := make(chan unix.WaitStatus, 1)
	s.mu.Lock()
	restore := lowerNproc()
	err = cmd.Start()
	restore()
	if err == nil {
		s.waiters[cmd.Process.Pid] = exitc
	}
	s.mu.Unlock()
	reqR.Close()
	evW.Close()
	logW.Close()
	devnull.Close()
	if err != nil {
		reqW.Close()
		evR.Close()
		logR.Close()
		return nil, fmt.Errorf("starting the code context's bridge: %w", err)
	}
	s.reap()
	b := &bridge{
		pid: cmd.Process.Pid, req: reqW, log: &ringLog{max: bridgeLogBytes},
		inodes: pipeInodes(reqW, evR, logR),
		subs:   make(map[int64]*codeSub), readyc: make(chan error, 1), done: make(chan struct{}),
	}
	go b.readLog(logR)
	go b.readEvents(evR, exitc)

	t := time.NewTimer(CodeStartTimeout)
	defer t.Stop()
	select {
	case err := <-b.readyc:
		if err != nil {
			b.kill(s)
			return nil, err
		}
		return b, nil
	case <-t.C:
		b.kill(s)
		return nil, codeErr(ErrKindOther, "the kernel of code context %q did not start within %s", cc.id, CodeStartTimeout)
	}
}

// readEvents routes the bridge's events to the cells they belong to until
// the bridge is gone, then tells every waiting cell so.
func (b *bridge) readEvents(r *os.File, exitc chan unix.WaitStatus) {
	defer close(b.done)
	defer r.Close()
	br := bufio.NewReaderSize(r, 64<<10)
	ready := false
	for {
		line, err := readLine(br, maxBridgeLine)
		if errors.Is(err, errLineTooLong) {
			b.mu.Lock()
			cur := b.current
			b.mu.Unlock()
			b.deliver(bridgeEvent{ID: cur, Type: bridgeDropped})
			continue
		}
		if err != nil {
			break
		}
		var ev bridgeEvent
		if json.Unmarshal(line, &ev) != nil {
			continue
		}
		switch ev.Type {
		case bridgeReady:
			if !ready {
				ready = true
				b.setKernel(ev.KernelPID)
				b.readyc <- nil
			}
		case bridgeFatal, bridgeDead:
			msg := ev.Message
			if msg == "" {
				msg = "the kernel died"
			}
			b.markDead(msg)
			if !ready {
				ready = true
				kind := ErrKindOther
				if ev.Kind == "missing" {
					kind = ErrKindInvalid
				}
				b.readyc <- codeErr(kind, "%s", msg)
			}
		case CodeEventStarted:
			b.mu.Lock()
			b.current = ev.ID
			b.mu.Unlock()
			b.deliver(ev)
		default:
			b.deliver(ev)
		}
	}
	// The bridge has exited (its end of the pipe closed).
	why := "the code context's bridge exited"
	select {
	case ws := <-exitc:
		if ws.Signaled() {
			why = fmt.Sprintf("the code context's bridge was killed by signal %d", ws.Signal())
		}
	case <-time.After(5 * time.Second):
	}
	if tail := b.log.tail(400); tail != "" && !ready {
		why += ": " + tail
	}
	b.markDead(why)
	if !ready {
		b.readyc <- codeErr(ErrKindOther, "the code context did not start: %s", why)
	}
	b.mu.Lock()
	subs := maps.Clone(b.subs)
	reason := b.dead
	b.mu.Unlock()
	for id := range subs {
		b.deliver(bridgeEvent{ID: id, Type: bridgeDead, Message: reason})
	}
}

var errLineTooLong = errors.New("line too long")

// readLine reads one line of at most limit bytes; a longer one is read to
// its end, dropped and reported as errLineTooLong.
func readLine(br *bufio.Reader, limit int) ([]byte, error) {
	var line []byte
	tooLong := false
	for {
		chunk, err := br.ReadSlice('\n')
		if !tooLong {
			if len(line)+len(chunk) > limit {
				tooLong, line = true, nil
			} else {
				line = append(line, chunk...)
			}
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if tooLong {
			return nil, errLineTooLong
		}
		return line, nil
	}
}

// deliver hands an event to its cell, if a cell waits for it.
func (b *bridge) deliver(ev bridgeEvent) {
	b.mu.Lock()
	sub := b.subs[ev.ID]
	b.mu.Unlock()
	if sub == nil {
		return
	}
	select {
	case sub.c <- ev:
	case <-sub.gone:
	}
}

// setKernel records the kernel's pid the bridge reported, if it is the
// bridge's own child: the bridge's pipes can be reached by the context's
// user (through /proc), and a forged pid must not make the agent signal
// another process group (or, with 1 or 0, every process, or its own).
func (b *bridge) setKernel(pid int) {
	if pid <= 1 {
		return
	}
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return
	}
	p, ok := parseStat(st)
	if !ok || p.ppid != b.pid || p.pgid != pid {
		return
	}
	b.mu.Lock()
	b.kernelPid = pid
	b.mu.Unlock()
}

func (b *bridge) kernel() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.kernelPid
}

func (b *bridge) markDead(why string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.dead == "" {
		b.dead = why
	}
}

func (b *bridge) deathReason() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.dead == "" {
		return "its interpreter exited"
	}
	return b.dead
}

// execute asks the bridge to run code; sub, when set, gets its events.
func (b *bridge) execute(code string, silent bool, sub *codeSub) (int64, error) {
	b.mu.Lock()
	b.nextID++
	id := b.nextID
	if sub != nil {
		b.subs[id] = sub
	}
	dead := b.dead
	b.mu.Unlock()
	if dead != "" {
		b.unsubscribe(id)
		return 0, errors.New(dead)
	}
	if err := b.send(map[string]any{"id": id, "op": "execute", "code": code, "silent": silent}); err != nil {
		b.unsubscribe(id)
		return 0, err
	}
	return id, nil
}

func (b *bridge) unsubscribe(id int64) {
	b.mu.Lock()
	sub := b.subs[id]
	delete(b.subs, id)
	b.mu.Unlock()
	if sub != nil {
		close(sub.gone)
	}
}

// interrupt asks the kernel to stop the cell it runs (SIGINT).
func (b *bridge) interrupt() { _ = b.send(map[string]any{"op": "interrupt"}) }

func (b *bridge) send(req any) error {
	line, err := encodeJSON(req)
	if err != nil {
		return err
	}
	line = append(line, '\n')
	b.wmu.Lock()
	defer b.wmu.Unlock()
	_ = b.req.SetWriteDeadline(time.Now().Add(bridgeWriteTimeout))
	_, err = b.req.Write(line)
	return err
}

// kill ends the bridge, its kernel and whatever they started. Safe to call
// more than once.
func (b *bridge) kill(s *Server) {
	b.markDead("the code context was ended")
	b.wmu.Lock()
	b.req.Close()
	b.wmu.Unlock()
	if k := b.kernel(); k > 0 {
		_ = unix.Kill(-k, unix.SIGKILL)
	}
	s.killExec(b.pid, b.inodes)
}

func (b *bridge) readLog(r *os.File) {
	defer r.Close()
	_, _ = io.Copy(b.log, r)
}

// ringLog keeps the last max bytes written to it.
type ringLog struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (l *ringLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf = append(l.buf, p...)
	if len(l.buf) > l.max {
		l.buf = append([]byte(nil), l.buf[len(l.buf)-l.max:]...)
	}
	return len(p), nil
}

// tail returns the last n bytes of the log, trimmed, as valid UTF-8.
func (l *ringLog) tail(n int) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buf
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return strings.ToValidUTF8(strings.TrimSpace(string(b)), "\uFFFD")
}

func envListMap(env []string) map[string]string {
	m := make(map[string]string, len(env))
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	return m
}

func envMapList(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k, v := range m {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}

// ErrOpUnsupported reports an agent that does not know the operation: a
// sandbox started (or restored) with an agent from before it existed.
var ErrOpUnsupported = errors.New("the sandbox's agent does not know this operation")

// CodeCall runs a code operation that answers one FrameReply.
func (c *Client) CodeCall(ctx context.Context, op string, args, reply any) error {
	st, err := c.Open(ctx, op, args)
	if err != nil {
		return err
	}
	defer st.Close()
	typ, payload, err := st.ReadFrame()
	if err != nil {
		return ctxErr(ctx, fmt.Errorf("%s: %w", op, err))
	}
	switch typ {
	case FrameReply:
		return json.Unmarshal(payload, reply)
	case FrameExit:
		return ErrOpUnsupported
	}
	return fmt.Errorf("%s: unexpected frame %q", op, typ)
}
