package sandbox

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/runtime"
	"github.com/pandastack/pandastack/internal/store"
	"github.com/pandastack/pandastack/internal/template"
	"github.com/pandastack/pandastack/wire"
)

// Regression tests for lifecycle defects found in review, on the fake
// runtime (fake_test.go).

// hookStore is the real store with hooks around the writes the lifecycle
// tests need to interleave with.
type hookStore struct {
	*store.Store
	mu sync.Mutex
	// afterPaused runs after a SetSandboxPaused write has been made.
	afterPaused func(id string, paused bool)
	// storedBytes runs before StoredBytes reads.
	storedBytes func()
	// gotSnapshot runs after GetSnapshot has read.
	gotSnapshot func(id string)
	// listed runs after ListSandboxes has read.
	listed func()
}

func (s *hookStore) ListSandboxes(ctx context.Context, tenant string, states ...string) ([]store.Sandbox, error) {
	l, err := s.Store.ListSandboxes(ctx, tenant, states...)
	s.mu.Lock()
	hook := s.listed
	s.mu.Unlock()
	if hook != nil {
		hook()
	}
	return l, err
}

func (s *hookStore) GetSnapshot(ctx context.Context, tenant, id string) (store.Snapshot, error) {
	sn, err := s.Store.GetSnapshot(ctx, tenant, id)
	s.mu.Lock()
	hook := s.gotSnapshot
	s.mu.Unlock()
	if err == nil && hook != nil {
		hook(id)
	}
	return sn, err
}

func (s *hookStore) SetSandboxPaused(ctx context.Context, id string, paused bool, bytes int64, expires time.Time) error {
	err := s.Store.SetSandboxPaused(ctx, id, paused, bytes, expires)
	s.mu.Lock()
	hook := s.afterPaused
	s.mu.Unlock()
	if err == nil && hook != nil {
		hook(id, paused)
	}
	return err
}

func (s *hookStore) StoredBytes(ctx context.Context, tenant string) (int64, error) {
	s.mu.Lock()
	hook := s.storedBytes
	s.mu.Unlock()
	if hook != nil {
		hook()
	}
	return s.Store.StoredBytes(ctx, tenant)
}

// newHookedEnv is newLifecycleEnv with the manager's store wrapped in a
// hookStore.
func newHookedEnv(t *testing.T, mut func(*Config)) (*lifecycleEnv, *hookStore) {
	t.Helper()
	return newHookedEnvWith(t, mut, nil)
}

// newHookedEnvWith is newHookedEnv whose runtime is set up by before
// before the manager starts.
func newHookedEnvWith(t *testing.T, mut func(*Config), before func(*fakeRuntime)) (*lifecycleEnv, *hookStore) {
	t.Helper()
	rt := newFakeRuntime(t)
	if before != nil {
		before(rt)
	}
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
	hs := &hookStore{Store: st}
	e := &lifecycleEnv{rt: rt, st: st, dir: dir}
	e.m = NewManager(Options{
		Config: cfg, Runtime: rt, Store: hs, StateDir: dir,
		Templates:   fakeTemplates{template.Template{Definition: template.Definition{Name: "base"}, Hash: "h", Rootfs: t.TempDir()}},
		AgentBinary: exe,
	})
	if err := e.m.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.m.Close(context.Background()) })
	return e, hs
}

func (f *fakeRuntime) setCheckpoint(fn func(ctx context.Context, id string) error) {
	f.mu.Lock()
	f.checkpoint = fn
	f.mu.Unlock()
}

func (f *fakeRuntime) setRestore(fn func(ctx context.Context, id string) error) {
	f.mu.Lock()
	f.restore = fn
	f.mu.Unlock()
}

// A pause at the TTL (on_timeout "pause") that fails while the server shuts
// down must leave the sandbox to the shutdown (here: kept for the next
// daemon), not destroy it as if the pause had failed for too long.
func TestTimeoutPauseFailingAtShutdownKeepsSandbox(t *testing.T) {
	e := newLifecycleEnv(t, func(c *Config) { c.OnShutdown = ShutdownKeep })
	started := make(chan struct{})
	fail := make(chan struct{})
	var once sync.Once
	e.rt.setCheckpoint(func(ctx context.Context, id string) error {
		once.Do(func() { close(started) })
		<-fail
		return runtime.ErrNoSpace
	})
	sb := e.create(t, wire.CreateSandboxRequest{TTLSeconds: 1, OnTimeout: wire.OnTimeoutPause})
	<-started // the reaper is pausing it
	closed := make(chan error, 1)
	go func() { closed <- e.m.Close(context.Background()) }()
	<-e.m.bgCtx.Done() // the shutdown has begun
	close(fail)
	if err := <-closed; err != nil {
		t.Fatalf("close: %v", err)
	}
	rec, err := e.st.GetSandbox(context.Background(), tenant, sb.ID)
	if err != nil {
		t.Fatal(err)
	}
	if rec.State != wire.StateRunning {
		t.Errorf("record after a shutdown with on-shutdown keep: got %s, want running (kept for the next start)", rec.State)
	}
	if e.rt.box(sb.ID) == nil {
		t.Error("the sandbox was destroyed at shutdown")
	}
}

// recordMatches fails the test when the store's expiry of the sandbox is
// not the one the manager shows: a restart would go by the store's.
func recordMatches(t *testing.T, e *lifecycleEnv, id string) wire.Sandbox {
	t.Helper()
	got, err := e.m.Get(context.Background(), tenant, id)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := e.st.GetSandbox(context.Background(), tenant, id)
	if err != nil {
		t.Fatal(err)
	}
	if rec.State != got.State || !rec.ExpiresAt.Equal(got.ExpiresAt) {
		t.Errorf("store says %s until %v, the manager %s until %v", rec.State, rec.ExpiresAt, got.State, got.ExpiresAt)
	}
	return got
}

// A TTL set while a resume is in progress is the TTL the resume gives the
// sandbox (the API shows it paused, and SetTimeout on a paused sandbox
// sets the TTL of its next resume).
func TestSetTimeoutDuringResume(t *testing.T) {
	e := newLifecycleEnv(t, nil)
	ctx := context.Background()
	sb := e.create(t, wire.CreateSandboxRequest{TTLSeconds: 60})
	if _, err := e.m.Pause(ctx, tenant, sb.ID); err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{})
	release := make(chan struct{})
	e.rt.setRestore(func(context.Context, string) error {
		close(started)
		<-release
		return nil
	})
	done := make(chan error, 1)
	go func() {
		_, err := e.m.Resume(ctx, tenant, sb.ID)
		done <- err
	}()
	<-started
	if _, err := e.m.SetTimeout(ctx, tenant, sb.ID, 3600); err != nil {
		t.Fatal(err)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	got := recordMatches(t, e, sb.ID)
	if left := time.Until(got.ExpiresAt); left < 1800*time.Second {
		t.Errorf("after SetTimeout(3600) during the resume: expires in %v, want about an hour", left)
	}
}

// SetTimeout racing with the end of a pause or a resume never leaves the
// store with an expiry other than the manager's: the paused sandbox would
// be deleted at the running TTL after a restart, or a resumed one kept
// for the paused TTL.
func TestSetTimeoutRacingPauseAndResumeRecords(t *testing.T) {
	e, hs := newHookedEnv(t, nil)
	ctx := context.Background()
	sb := e.create(t, wire.CreateSandboxRequest{TTLSeconds: 60})
	var wg sync.WaitGroup
	hs.mu.Lock()
	hs.afterPaused = func(id string, paused bool) {
		// Between the record and the manager's own state: a SetTimeout
		// that lands here must not undo the record.
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _ = e.m.SetTimeout(ctx, tenant, id, 120)
		}()
		time.Sleep(50 * time.Millisecond)
	}
	hs.mu.Unlock()
	if _, err := e.m.Pause(ctx, tenant, sb.ID); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if got := recordMatches(t, e, sb.ID); got.State != wire.StatePaused {
		t.Fatalf("got %s, want paused", got.State)
	}
	if _, err := e.m.Resume(ctx, tenant, sb.ID); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if got := recordMatches(t, e, sb.ID); got.State != wire.StateRunning {
		t.Fatalf("got %s, want running", got.State)
	}
}

// A Kill that comes while a pause has begun but its checkpoint has not yet
// (it checks the quota first) still cuts the checkpoint short: it does not
// wait for a checkpoint of gigabytes, up to CheckpointTimeout.
func TestKillBeforeCheckpointStartsCutsItShort(t *testing.T) {
	e, hs := newHookedEnv(t, nil)
	ctx := context.Background()
	sb := e.create(t, wire.CreateSandboxRequest{})
	checking := make(chan struct{})
	goOn := make(chan struct{})
	var once sync.Once
	hs.mu.Lock()
	hs.storedBytes = func() {
		once.Do(func() {
			close(checking)
			<-goOn
		})
	}
	hs.mu.Unlock()
	started, release := e.holdCheckpoints()
	defer release() // only the kill may end the checkpoint
	paused := make(chan error, 1)
	go func() {
		_, err := e.m.Pause(ctx, tenant, sb.ID)
		paused <- err
	}()
	<-checking
	killed := make(chan error, 1)
	go func() { killed <- e.m.Kill(ctx, tenant, sb.ID) }()
	// Let the kill find the pause before its checkpoint can be cut.
	time.Sleep(50 * time.Millisecond)
	close(goOn)
	<-started
	select {
	case err := <-killed:
		if err != nil {
			t.Fatalf("kill: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("kill waited for the whole checkpoint")
	}
	if err := <-paused; err == nil {
		t.Error("pause cut short by a kill: got no error")
	}
	if e.rt.box(sb.ID) != nil {
		t.Error("runtime sandbox left after kill")
	}
}

// A Kill during a resume ends the sandbox as stopped, as any kill: the
// resume it cut short does not count as an agent that did not answer.
func TestKillDuringResumeIsAKill(t *testing.T) {
	e := newLifecycleEnv(t, nil)
	ctx := context.Background()
	sb := e.create(t, wire.CreateSandboxRequest{})
	if _, err := e.m.Pause(ctx, tenant, sb.ID); err != nil {
		t.Fatal(err)
	}
	in := e.instance(sb.ID)
	started := make(chan struct{})
	e.rt.setRestore(func(rctx context.Context, id string) error {
		close(started)
		// The restore itself completes (runsc is never cut off half-way);
		// the kill is noticed afterwards.
		<-rctx.Done()
		return nil
	})
	resumed := make(chan error, 1)
	go func() {
		_, err := e.m.Resume(ctx, tenant, sb.ID)
		resumed <- err
	}()
	<-started
	if err := e.m.Kill(ctx, tenant, sb.ID); err != nil {
		t.Fatalf("kill: %v", err)
	}
	if err := <-resumed; err == nil {
		t.Error("resume cut short by a kill: got no error")
	}
	<-in.ended
	rec, err := e.st.GetSandbox(ctx, tenant, sb.ID)
	if err != nil {
		t.Fatal(err)
	}
	if rec.State != wire.StateStopped {
		t.Errorf("record of a sandbox killed during its resume: got %s, want %s", rec.State, wire.StateStopped)
	}
	if e.rt.box(sb.ID) != nil {
		t.Error("runtime sandbox left after kill")
	}
	e.m.mu.Lock()
	slots := e.m.slots
	e.m.mu.Unlock()
	if slots != 0 {
		t.Errorf("slots: got %d, want 0", slots)
	}
}

// Close does not wait for a template snapshot in progress to finish (up to
// five minutes): the shutdown cuts it short.
func TestCloseCutsTemplateSnapshotShort(t *testing.T) {
	started := make(chan struct{})
	var once sync.Once
	e, _ := newHookedEnvWith(t, func(c *Config) {
		c.TemplateSnapshots = true
		c.PoolTemplates = []string{"base"}
	}, func(rt *fakeRuntime) {
		rt.checkpoint = func(ctx context.Context, id string) error {
			once.Do(func() { close(started) })
			<-ctx.Done()
			return ctx.Err()
		}
	})
	<-started
	closed := make(chan error, 1)
	go func() { closed <- e.m.Close(context.Background()) }()
	select {
	case <-closed:
	case <-time.After(30 * time.Second):
		t.Fatal("Close waited for the template snapshot")
	}
	if ids, _ := e.rt.List(context.Background()); len(ids) != 0 {
		t.Errorf("sandboxes left after Close: %v", ids)
	}
}

// A create from a snapshot that is deleted between the create's read of it
// and its pin answers NotFound, as a create after the delete would, not a
// failed restore of a missing image.
func TestCreateFromSnapshotDeletedMeanwhile(t *testing.T) {
	e, hs := newHookedEnv(t, nil)
	ctx := context.Background()
	src := e.create(t, wire.CreateSandboxRequest{})
	sn, err := e.m.Snapshot(ctx, tenant, src.ID, wire.SnapshotRequest{})
	if err != nil {
		t.Fatal(err)
	}
	hs.mu.Lock()
	hs.gotSnapshot = func(id string) {
		hs.mu.Lock()
		hs.gotSnapshot = nil // the delete reads it too
		hs.mu.Unlock()
		if err := e.m.DeleteSnapshot(ctx, tenant, id); err != nil {
			t.Errorf("delete: %v", err)
		}
	}
	hs.mu.Unlock()
	if _, err := e.m.Create(ctx, tenant, wire.CreateSandboxRequest{SnapshotID: sn.ID}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("create from a snapshot deleted meanwhile: got %v, want ErrNotFound", err)
	}
	e.m.mu.Lock()
	slots, pins := e.m.slots, len(e.m.pins)
	e.m.mu.Unlock()
	if slots != 1 || pins != 0 {
		t.Errorf("slots, pins: got %d, %d, want 1, 0", slots, pins)
	}
}

// A start cut short by the daemon's own stop (SIGTERM while it re-adopts)
// loses no sandbox: one it did not get to settle is left for the next
// start, which re-adopts it.
func TestStartCutShortLosesNothing(t *testing.T) {
	e := newLifecycleEnv(t, nil)
	ctx := context.Background()
	sb := e.create(t, wire.CreateSandboxRequest{})
	e.crash()

	sctx, stop := context.WithCancel(ctx)
	hs := &hookStore{Store: e.st}
	hs.listed = stop // the stop comes once the records are read
	m2 := NewManager(Options{Config: e.m.cfg, Runtime: e.rt, Store: hs, StateDir: e.dir,
		Templates: e.m.templates, AgentBinary: e.m.agentBin})
	if err := m2.Start(sctx); err == nil {
		(&lifecycleEnv{m: m2}).crash()
	} else {
		// Stopped before its reaper started: only its sessions to drop.
		for _, in := range m2.live {
			m2.detach(in)
		}
	}

	m3 := NewManager(Options{Config: e.m.cfg, Runtime: e.rt, Store: e.st, StateDir: e.dir,
		Templates: e.m.templates, AgentBinary: e.m.agentBin})
	if err := m3.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer m3.Close(ctx)
	if got, err := m3.Get(ctx, tenant, sb.ID); err != nil || got.State != wire.StateRunning {
		t.Errorf("sandbox after a start cut short: got %+v, %v, want running", got, err)
	}
}

// Close keeps to its context: a pause at the TTL that the reaper has under
// way (a checkpoint of up to CheckpointTimeout) does not hold it past it.
func TestCloseKeepsToItsContext(t *testing.T) {
	e := newLifecycleEnv(t, func(c *Config) { c.OnShutdown = ShutdownKeep })
	started, release := e.holdCheckpoints()
	defer release()
	e.create(t, wire.CreateSandboxRequest{TTLSeconds: 1, OnTimeout: wire.OnTimeoutPause})
	<-started // the reaper is pausing it
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	closed := make(chan error, 1)
	go func() { closed <- e.m.Close(ctx) }()
	select {
	case <-closed:
	case <-time.After(30 * time.Second):
		t.Fatal("Close waited past its context for the reaper's pause")
	}
	release()
	e.m.opsWG.Wait()
}

// A checkpoint stops the whole sandbox while it saves it: a command whose
// timeout passes meanwhile finds its agent frozen, not dead, and the
// sandbox (and the snapshot) live on.
func TestCommandTimingOutDuringCheckpoint(t *testing.T) {
	e := newLifecycleEnv(t, func(c *Config) {
		c.ExecGrace = 100 * time.Millisecond
		c.AgentTimeout = 300 * time.Millisecond
	})
	ctx := context.Background()
	sb := e.create(t, wire.CreateSandboxRequest{})
	running := make(chan struct{})
	execDone := make(chan error, 1)
	go func() {
		var once sync.Once
		_, err := e.m.Exec(ctx, tenant, sb.ID, wire.ExecRequest{User: wire.UserRoot, Cmd: "echo go; sleep 30", TimeoutSeconds: 0.5}, func(string, []byte) error {
			once.Do(func() { close(running) })
			return nil
		})
		execDone <- err
	}()
	<-running
	e.rt.setCheckpoint(func(ctx context.Context, id string) error {
		// Saving: the sandbox, its agent with it, is stopped until the
		// exec's timeout, grace and ping have all passed.
		b := e.rt.box(id)
		b.gate.set(true)
		defer b.gate.set(false)
		select {
		case err := <-execDone:
			execDone <- err
		case <-ctx.Done():
			return ctx.Err()
		}
		return nil
	})
	if _, err := e.m.Snapshot(ctx, tenant, sb.ID, wire.SnapshotRequest{}); err != nil {
		t.Errorf("snapshot: %v", err)
	}
	if err := <-execDone; !errors.Is(err, errdefs.ErrTimeout) {
		t.Errorf("command timing out during the checkpoint: got %v, want ErrTimeout", err)
	}
	if got, err := e.m.Get(ctx, tenant, sb.ID); err != nil || got.State != wire.StateRunning {
		t.Errorf("after the checkpoint: got %+v, %v, want running", got, err)
	}
}

// A fork with an invalid TTL is refused before anything is saved: a
// checkpoint of the whole sandbox is not the price of a 400.
func TestForkValidatesBeforeCheckpoint(t *testing.T) {
	e := newLifecycleEnv(t, nil)
	src := e.create(t, wire.CreateSandboxRequest{})
	checkpoints := 0
	e.rt.setCheckpoint(func(context.Context, string) error {
		checkpoints++
		return nil
	})
	_, err := e.m.Fork(context.Background(), tenant, src.ID, wire.ForkRequest{TTLSeconds: -1})
	if !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("fork with ttl_seconds -1: got %v, want ErrInvalid", err)
	}
	if checkpoints != 0 {
		t.Errorf("checkpoints before the refusal: got %d, want 0", checkpoints)
	}
}
