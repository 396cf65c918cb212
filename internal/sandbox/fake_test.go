package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/agent"
	"github.com/pandastack/pandastack/internal/runtime"
	"github.com/pandastack/pandastack/internal/store"
	"github.com/pandastack/pandastack/internal/template"
	"golang.org/x/sys/unix"
)

// The lifecycle tests in this package isolate the manager's own logic —
// locking, bounded waits, the order of a pause's steps, start-up
// reconciliation — from gVisor, whose behaviour the daemon's tests cover
// with real sandboxes. fakeRuntime runs each "sandbox" as a real agent
// Server in the test process, on real FIFOs like the gVisor runtime's, so
// the manager talks to a real agent; what a test needs to control (a
// checkpoint that takes long or fails, an agent that stops answering, a
// sandbox that dies) it controls through hooks.
//
// agent.NewServer makes the test process a subreaper that reaps every
// child: one fakeRuntime at a time, no t.Parallel.

type fakeRuntime struct {
	dir string
	srv *agent.Server

	mu    sync.Mutex
	boxes map[string]*fakeBox
	// checkpoint, when set, runs before a checkpoint is written; its
	// error fails the checkpoint.
	checkpoint func(ctx context.Context, id string) error
	// restore, when set, runs before a restore; its error fails it.
	restore func(ctx context.Context, id string) error
	// restoreStopped makes restored sandboxes start with their agent
	// stopped, as a sandbox saved after kill -STOP 1 would.
	restoreStopped bool
	memory         int64
	deletes        []string
	// deathCause is what ExitCause reports.
	deathCause string
}

var (
	_ runtime.Runtime      = (*fakeRuntime)(nil)
	_ runtime.Checkpointer = (*fakeRuntime)(nil)
	_ runtime.Inspector    = (*fakeRuntime)(nil)
)

// fakeBox is one running sandbox: an agent session server on two FIFOs.
type fakeBox struct {
	in, out *os.File // the agent's ends, opened read-write as runsc does
	gate    *gate
	cancel  context.CancelFunc
	done    chan struct{}
}

// gate blocks reads and writes while closed: an agent that was sent
// SIGSTOP.
type gate struct {
	mu     sync.Mutex
	cond   *sync.Cond
	closed bool
}

func newGate() *gate { g := &gate{}; g.cond = sync.NewCond(&g.mu); return g }

func (g *gate) wait() {
	g.mu.Lock()
	for g.closed {
		g.cond.Wait()
	}
	g.mu.Unlock()
}

func (g *gate) set(closed bool) {
	g.mu.Lock()
	g.closed = closed
	g.cond.Broadcast()
	g.mu.Unlock()
}

type gatedReader struct {
	r io.Reader
	g *gate
}

func (r gatedReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	r.g.wait()
	return n, err
}

type gatedWriter struct {
	w io.Writer
	g *gate
}

func (w gatedWriter) Write(p []byte) (int, error) {
	w.g.wait()
	return w.w.Write(p)
}

func newFakeRuntime(t *testing.T) *fakeRuntime {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	f := &fakeRuntime{dir: t.TempDir(), srv: agent.NewServer(ctx, slog.New(slog.DiscardHandler)), boxes: map[string]*fakeBox{}, memory: 1 << 20}
	t.Cleanup(func() {
		f.mu.Lock()
		ids := make([]string, 0, len(f.boxes))
		for id := range f.boxes {
			ids = append(ids, id)
		}
		f.mu.Unlock()
		for _, id := range ids {
			_ = f.Delete(context.Background(), id)
		}
		cancel()
	})
	return f
}

func (f *fakeRuntime) Name() string { return "fake" }

func (f *fakeRuntime) boxDir(id string) string { return filepath.Join(f.dir, id) }

func (f *fakeRuntime) Start(ctx context.Context, spec runtime.Spec) error {
	dir := f.boxDir(spec.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for _, name := range []string{"in", "out"} {
		_ = os.Remove(filepath.Join(dir, name))
		if err := unix.Mkfifo(filepath.Join(dir, name), 0o600); err != nil {
			return err
		}
	}
	in, err := os.OpenFile(filepath.Join(dir, "in"), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	out, err := os.OpenFile(filepath.Join(dir, "out"), os.O_RDWR, 0)
	if err != nil {
		in.Close()
		return err
	}
	bctx, cancel := context.WithCancel(context.Background())
	b := &fakeBox{in: in, out: out, gate: newGate(), cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(b.done)
		_ = f.srv.ServeStdio(bctx, gatedReader{in, b.gate}, gatedWriter{out, b.gate})
	}()
	f.mu.Lock()
	f.boxes[spec.ID] = b
	f.mu.Unlock()
	return nil
}

func (f *fakeRuntime) box(id string) *fakeBox {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.boxes[id]
}

// fifoConn is the daemon's end, like the gVisor runtime's.
type fifoConn struct{ w, r *os.File }

func (c *fifoConn) Read(p []byte) (int, error)         { return c.r.Read(p) }
func (c *fifoConn) Write(p []byte) (int, error)        { return c.w.Write(p) }
func (c *fifoConn) Close() error                       { return errors.Join(c.w.Close(), c.r.Close()) }
func (c *fifoConn) SetReadDeadline(t time.Time) error  { return c.r.SetReadDeadline(t) }
func (c *fifoConn) SetWriteDeadline(t time.Time) error { return c.w.SetWriteDeadline(t) }

func (f *fakeRuntime) Connect(ctx context.Context, id string) (io.ReadWriteCloser, error) {
	if f.box(id) == nil {
		return nil, fmt.Errorf("no sandbox %s", id)
	}
	w, err := os.OpenFile(filepath.Join(f.boxDir(id), "in"), os.O_WRONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	r, err := os.OpenFile(filepath.Join(f.boxDir(id), "out"), os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		w.Close()
		return nil, err
	}
	return &fifoConn{w: w, r: r}, nil
}

// kill ends a sandbox as if it died: its agent's ends close, so the
// daemon reads EOF.
func (f *fakeRuntime) kill(id string) {
	f.mu.Lock()
	b := f.boxes[id]
	delete(f.boxes, id)
	f.mu.Unlock()
	if b == nil {
		return
	}
	b.gate.set(false)
	b.cancel()
	b.in.Close()
	b.out.Close()
	<-b.done
}

// stop and cont freeze and thaw a sandbox's agent (SIGSTOP, SIGCONT).
func (f *fakeRuntime) stop(id string) { f.box(id).gate.set(true) }

func (f *fakeRuntime) Delete(ctx context.Context, id string) error {
	f.mu.Lock()
	f.deletes = append(f.deletes, id)
	f.mu.Unlock()
	f.kill(id)
	return os.RemoveAll(f.boxDir(id))
}

func (f *fakeRuntime) List(ctx context.Context) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var ids []string
	for id := range f.boxes {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids, nil
}

func (f *fakeRuntime) Checkpoint(ctx context.Context, id, dir string, leaveRunning bool) error {
	f.mu.Lock()
	hook := f.checkpoint
	f.mu.Unlock()
	if hook != nil {
		if err := hook(ctx, id); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if f.box(id) == nil {
		return fmt.Errorf("no sandbox %s", id)
	}
	if err := os.WriteFile(filepath.Join(dir, "image"), []byte(id), 0o600); err != nil {
		return err
	}
	if !leaveRunning {
		f.kill(id)
	}
	return nil
}

func (f *fakeRuntime) Restore(ctx context.Context, spec runtime.Spec, dir string) error {
	f.mu.Lock()
	hook := f.restore
	f.mu.Unlock()
	if hook != nil {
		if err := hook(ctx, spec.ID); err != nil {
			return err
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "image")); err != nil {
		return fmt.Errorf("no image in %s: %w", dir, err)
	}
	if err := f.Start(ctx, spec); err != nil {
		return err
	}
	f.mu.Lock()
	stopped := f.restoreStopped
	f.mu.Unlock()
	if stopped {
		f.stop(spec.ID)
	}
	return nil
}

func (f *fakeRuntime) MemoryUsage(ctx context.Context, id string) (int64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.memory, nil
}

func (f *fakeRuntime) ExitCause(ctx context.Context, id string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.deathCause
}

// fakeTemplates serves one template whose root file system is an empty
// directory: the fake runtime does not look at it.
type fakeTemplates struct{ tpl template.Template }

func (f fakeTemplates) GetBuild(name, hash string) (template.Template, error) { return f.Get(name) }

func (f fakeTemplates) Resolve(tenant, name string) (template.Template, error) { return f.Get(name) }

func (f fakeTemplates) Defaults(name, hash string) template.Defaults { return f.tpl.Defaults }

func (f fakeTemplates) Get(name string) (template.Template, error) {
	if name != f.tpl.Name {
		return template.Template{}, fmt.Errorf("template %q: %w", name, os.ErrNotExist)
	}
	return f.tpl, nil
}

// lifecycleEnv is a Manager over the fake runtime, a real SQLite store and
// a state directory of its own.
type lifecycleEnv struct {
	m   *Manager
	rt  *fakeRuntime
	st  *store.Store
	dir string
}

func newLifecycleEnv(t *testing.T, mut func(*Config)) *lifecycleEnv {
	t.Helper()
	rt := newFakeRuntime(t)
	dir := t.TempDir()
	st, err := store.Open(context.Background(), filepath.Join(dir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{ReapInterval: 20 * time.Millisecond, PoolSize: 0, MinFreeDiskMB: 1}
	if mut != nil {
		mut(&cfg)
	}
	e := &lifecycleEnv{rt: rt, st: st, dir: dir}
	e.m = NewManager(Options{
		Config: cfg, Runtime: rt, Store: st, StateDir: dir,
		Templates:   fakeTemplates{template.Template{Definition: template.Definition{Name: "base"}, Hash: "h", Rootfs: t.TempDir()}},
		AgentBinary: exe, // any file: the fake runtime does not run it
	})
	if err := e.m.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.m.Close(context.Background()) })
	return e
}

// instance returns the manager's live instance of id, or nil.
func (e *lifecycleEnv) instance(id string) *instance {
	e.m.mu.Lock()
	defer e.m.mu.Unlock()
	return e.m.live[id]
}

// waitFor polls cond until it holds, failing the test after a generous
// deadline; the tests never assume how fast anything happens.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
