package sandbox

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/runtime"
	"github.com/pandastack/pandastack/wire"
)

// Regression tests for issue 7's lifecycle defects, on the fake runtime
// (fake_test.go). Each names the defect it reproduces. Commands run as
// root: the fake's agent runs on the host, which has no sandbox user.

const tenant = "t"

func (e *lifecycleEnv) create(t *testing.T, req wire.CreateSandboxRequest) wire.Sandbox {
	t.Helper()
	sb, err := e.m.Create(context.Background(), tenant, req)
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	return sb
}

func (e *lifecycleEnv) exec(ctx context.Context, id, cmd string) (wire.ExecResult, string, error) {
	var mu sync.Mutex
	var out strings.Builder
	res, err := e.m.Exec(ctx, tenant, id, wire.ExecRequest{User: wire.UserRoot, Cmd: cmd}, func(_ string, b []byte) error {
		mu.Lock()
		out.Write(b)
		mu.Unlock()
		return nil
	})
	mu.Lock()
	defer mu.Unlock()
	return res, out.String(), err
}

// crash makes the manager stop as a killed daemon would: its reaper and
// agent sessions end, its sandboxes and files stay as they are.
func (e *lifecycleEnv) crash() {
	m := e.m
	m.mu.Lock()
	m.closed = true
	ins := make([]*instance, 0, len(m.live))
	for _, in := range m.live {
		ins = append(ins, in)
	}
	m.live = map[string]*instance{}
	m.mu.Unlock()
	m.stop()
	m.reaperWG.Wait()
	for _, in := range ins {
		m.detach(in)
	}
}

// holdCheckpoints makes every checkpoint wait until release is called (or
// its context ends) and reports when one has started.
func (e *lifecycleEnv) holdCheckpoints() (started <-chan string, release func()) {
	st := make(chan string, 16)
	rel := make(chan struct{})
	var once sync.Once
	e.rt.mu.Lock()
	e.rt.checkpoint = func(ctx context.Context, id string) error {
		st <- id
		select {
		case <-rel:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	e.rt.mu.Unlock()
	return st, func() { once.Do(func() { close(rel) }) }
}

// B1/C9: nothing global waits on one sandbox's slow operation: while a
// checkpoint of one sandbox is in progress, List, Get, SetTimeout, Kill of
// another and exec in another all answer.
func TestCheckpointBlocksNobodyElse(t *testing.T) {
	e := newLifecycleEnv(t, nil)
	busy := e.create(t, wire.CreateSandboxRequest{})
	other := e.create(t, wire.CreateSandboxRequest{})
	third := e.create(t, wire.CreateSandboxRequest{})
	started, release := e.holdCheckpoints()
	defer release()
	snapDone := make(chan error, 1)
	go func() {
		_, err := e.m.Snapshot(context.Background(), tenant, busy.ID, wire.SnapshotRequest{})
		snapDone <- err
	}()
	<-started
	ctx := context.Background()
	if l, err := e.m.List(ctx, tenant); err != nil || len(l) != 3 {
		t.Errorf("List during a checkpoint: got %d, %v, want 3 sandboxes", len(l), err)
	}
	if sb, err := e.m.Get(ctx, tenant, busy.ID); err != nil || sb.State != wire.StateRunning {
		t.Errorf("Get of the sandbox being saved: got %+v, %v, want running", sb, err)
	}
	if _, err := e.m.SetTimeout(ctx, tenant, busy.ID, 600); err != nil {
		t.Errorf("SetTimeout of the sandbox being saved: %v", err)
	}
	if res, out, err := e.exec(ctx, other.ID, "echo hi"); err != nil || out != "hi\n" || res.ExitCode != 0 {
		t.Errorf("exec in another sandbox: got %q, %+v, %v", out, res, err)
	}
	if err := e.m.Kill(ctx, tenant, third.ID); err != nil {
		t.Errorf("Kill of another sandbox: %v", err)
	}
	select {
	case err := <-snapDone:
		t.Fatalf("snapshot finished while held: %v", err)
	default:
	}
	release()
	if err := <-snapDone; err != nil {
		t.Errorf("snapshot: %v", err)
	}
}

// C9: the reaper decides again once it holds the sandbox: a TTL extension
// made while it waited for a checkpoint to finish wins.
func TestReaperRechecksExpiryAfterWaiting(t *testing.T) {
	e := newLifecycleEnv(t, nil)
	sb := e.create(t, wire.CreateSandboxRequest{TTLSeconds: 1})
	in := e.instance(sb.ID)
	started, release := e.holdCheckpoints()
	defer release()
	snapDone := make(chan error, 1)
	go func() {
		_, err := e.m.Snapshot(context.Background(), tenant, sb.ID, wire.SnapshotRequest{})
		snapDone <- err
	}()
	<-started
	waitFor(t, "the reaper to take up the expired sandbox", func() bool {
		in.mu.Lock()
		defer in.mu.Unlock()
		return in.reaping
	})
	if _, err := e.m.SetTimeout(context.Background(), tenant, sb.ID, 600); err != nil {
		t.Fatal(err)
	}
	release()
	if err := <-snapDone; err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the reaper to let go", func() bool {
		in.mu.Lock()
		defer in.mu.Unlock()
		return !in.reaping
	})
	if got, err := e.m.Get(context.Background(), tenant, sb.ID); err != nil || got.State != wire.StateRunning {
		t.Errorf("after a TTL extension during the wait: got %+v, %v, want running", got, err)
	}
}

// B3: a failed pause leaves the sandbox running, with its processes, and
// says why: a full disk is 507.
func TestFailedPauseLeavesSandboxRunning(t *testing.T) {
	for _, tc := range []struct {
		name    string
		err     error
		wantErr error
	}{
		{"disk full", runtime.ErrNoSpace, errdefs.ErrInsufficientStorage},
		{"runsc failed", errors.New("runsc exploded"), errdefs.ErrUnavailable},
		{"too slow", context.DeadlineExceeded, errdefs.ErrTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newLifecycleEnv(t, nil)
			sb := e.create(t, wire.CreateSandboxRequest{})
			e.rt.checkpoint = func(context.Context, string) error { return tc.err }
			_, err := e.m.Pause(context.Background(), tenant, sb.ID)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("pause: got %v, want %v", err, tc.wantErr)
			}
			if msg, _ := errdefs.Public(err); strings.Contains(msg, "runsc exploded") {
				t.Errorf("public message carries the internal cause: %q", msg)
			}
			got, err := e.m.Get(context.Background(), tenant, sb.ID)
			if err != nil || got.State != wire.StateRunning {
				t.Fatalf("after a failed pause: got %+v, %v, want running", got, err)
			}
			if _, out, err := e.exec(context.Background(), sb.ID, "echo alive"); err != nil || out != "alive\n" {
				t.Errorf("exec after a failed pause: got %q, %v", out, err)
			}
			if _, err := os.Stat(e.m.pausedDir(sb.ID)); !os.IsNotExist(err) {
				t.Errorf("pause image left: %v", err)
			}
			if ents, _ := os.ReadDir(e.m.tmpDir()); len(ents) != 0 {
				t.Errorf("checkpoint leftovers in tmp: %v", ents)
			}
			e.rt.checkpoint = nil
			if _, err := e.m.Pause(context.Background(), tenant, sb.ID); err != nil {
				t.Errorf("pause once the cause is gone: %v", err)
			}
		})
	}
}

// B3: a pause is not tied to the client's connection: a client that hangs
// up half-way does not abort it (before, the sandbox was destroyed).
func TestPauseOutlivesItsClient(t *testing.T) {
	e := newLifecycleEnv(t, nil)
	sb := e.create(t, wire.CreateSandboxRequest{})
	started, release := e.holdCheckpoints()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := e.m.Pause(ctx, tenant, sb.ID)
		done <- err
	}()
	<-started
	cancel()
	release()
	if err := <-done; err != nil {
		t.Fatalf("pause whose client went away: %v", err)
	}
	if got, err := e.m.Get(context.Background(), tenant, sb.ID); err != nil || got.State != wire.StatePaused {
		t.Fatalf("got %+v, %v, want paused", got, err)
	}
	if _, out, err := e.exec(context.Background(), sb.ID, "echo back"); err != nil || out != "back\n" {
		t.Errorf("exec (resumes): got %q, %v", out, err)
	}
}

// Kill does not wait for a long checkpoint: it cuts it short.
func TestKillCutsCheckpointShort(t *testing.T) {
	e := newLifecycleEnv(t, nil)
	sb := e.create(t, wire.CreateSandboxRequest{})
	started, release := e.holdCheckpoints()
	defer release() // never released before the kill: only the kill ends it
	done := make(chan error, 1)
	go func() {
		_, err := e.m.Pause(context.Background(), tenant, sb.ID)
		done <- err
	}()
	<-started
	if err := e.m.Kill(context.Background(), tenant, sb.ID); err != nil {
		t.Fatalf("kill during a pause: %v", err)
	}
	if err := <-done; err == nil {
		t.Error("pause cut short by a kill: got no error")
	}
	if _, err := e.m.Get(context.Background(), tenant, sb.ID); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("after kill: got %v, want NotFound", err)
	}
	if e.rt.box(sb.ID) != nil {
		t.Error("runtime sandbox left after kill")
	}
}

// C10: concurrent resumes never take more than MaxSandboxes: the slot is
// reserved atomically (limit 3, 3 concurrent resumes gave 5 running).
func TestConcurrentResumesRespectTheLimit(t *testing.T) {
	e := newLifecycleEnv(t, func(c *Config) { c.MaxSandboxes = 3 })
	ctx := context.Background()
	var paused []string
	for range 3 {
		sb := e.create(t, wire.CreateSandboxRequest{})
		if _, err := e.m.Pause(ctx, tenant, sb.ID); err != nil {
			t.Fatal(err)
		}
		paused = append(paused, sb.ID)
	}
	e.create(t, wire.CreateSandboxRequest{})
	e.create(t, wire.CreateSandboxRequest{})
	var wg sync.WaitGroup
	errs := make([]error, len(paused))
	for i, id := range paused {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = e.m.Resume(ctx, tenant, id)
		}()
	}
	wg.Wait()
	ok, quota := 0, 0
	for _, err := range errs {
		switch {
		case err == nil:
			ok++
		case errors.Is(err, errdefs.ErrQuota):
			quota++
		default:
			t.Errorf("resume: %v", err)
		}
	}
	if ok != 1 || quota != 2 {
		t.Errorf("resumes: got %d ok and %d refused, want 1 and 2", ok, quota)
	}
	l, _ := e.m.List(ctx, tenant)
	running := 0
	for _, sb := range l {
		if sb.State == wire.StateRunning {
			running++
		}
	}
	if running != 3 {
		t.Errorf("running: got %d, want 3", running)
	}
	if _, err := e.m.Create(ctx, tenant, wire.CreateSandboxRequest{}); !errors.Is(err, errdefs.ErrQuota) {
		t.Errorf("create at the limit: got %v, want ErrQuota", err)
	}
}

// B1/C6: an agent that stops answering (kill -STOP 1) cannot hang an exec
// past its timeout, nor anything else: the exec answers, naming the cause,
// and the sandbox is ended as failed.
func TestStoppedAgentEndsItsSandbox(t *testing.T) {
	e := newLifecycleEnv(t, func(c *Config) {
		c.ExecGrace = 100 * time.Millisecond
		c.AgentTimeout = 500 * time.Millisecond
	})
	sb := e.create(t, wire.CreateSandboxRequest{})
	other := e.create(t, wire.CreateSandboxRequest{})
	e.rt.stop(sb.ID)
	ctx := context.Background()
	errc := make(chan error, 1)
	go func() {
		_, err := e.m.Exec(ctx, tenant, sb.ID, wire.ExecRequest{User: wire.UserRoot, Cmd: "true", TimeoutSeconds: 0.2}, func(string, []byte) error { return nil })
		errc <- err
	}()
	// Meanwhile nothing else waits on it.
	if l, err := e.m.List(ctx, tenant); err != nil || len(l) != 2 {
		t.Errorf("List while an agent is stopped: got %d, %v", len(l), err)
	}
	if _, out, err := e.exec(ctx, other.ID, "echo hi"); err != nil || out != "hi\n" {
		t.Errorf("exec in another sandbox: got %q, %v", out, err)
	}
	err := <-errc
	if !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("exec in a stopped sandbox: got %v, want ErrUnavailable", err)
	}
	if msg, _ := errdefs.Public(err); !strings.Contains(msg, "stopped answering") {
		t.Errorf("message: got %q, want it to say the agent stopped answering", msg)
	}
	waitFor(t, "the stopped sandbox to end", func() bool {
		_, err := e.m.Get(ctx, tenant, sb.ID)
		return errors.Is(err, errdefs.ErrNotFound)
	})
	// The API stops showing it first; the record and teardown follow.
	waitFor(t, "the record to say failed", func() bool {
		rec, err := e.st.GetSandbox(ctx, tenant, sb.ID)
		return err == nil && rec.State == wire.StateFailed
	})
}

// B1: a paused sandbox whose agent was stopped cannot hang a resume: the
// resume answers within AgentTimeout and the sandbox is ended.
func TestResumeOfStoppedAgentIsBounded(t *testing.T) {
	e := newLifecycleEnv(t, func(c *Config) { c.AgentTimeout = 300 * time.Millisecond })
	sb := e.create(t, wire.CreateSandboxRequest{})
	ctx := context.Background()
	if _, err := e.m.Pause(ctx, tenant, sb.ID); err != nil {
		t.Fatal(err)
	}
	// The restored agent is stopped (it was stopped when saved).
	e.rt.restoreStopped = true
	_, err := e.m.Resume(ctx, tenant, sb.ID)
	if !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("resume: got %v, want ErrUnavailable", err)
	}
	if _, err := e.m.Get(ctx, tenant, sb.ID); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("after a resume whose agent did not answer: got %v, want NotFound", err)
	}
}

// D16: a command cut off by a pause says so, not "stopped".
func TestExecCutByPauseSaysPaused(t *testing.T) {
	e := newLifecycleEnv(t, nil)
	sb := e.create(t, wire.CreateSandboxRequest{})
	ctx := context.Background()
	started := make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		var once sync.Once
		_, err := e.m.Exec(ctx, tenant, sb.ID, wire.ExecRequest{User: wire.UserRoot, Cmd: "echo go; sleep 30"}, func(string, []byte) error {
			once.Do(func() { close(started) })
			return nil
		})
		errc <- err
	}()
	<-started
	if _, err := e.m.Pause(ctx, tenant, sb.ID); err != nil {
		t.Fatal(err)
	}
	err := <-errc
	msg, _ := errdefs.Public(err)
	if !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(msg, "paused") {
		t.Errorf("exec cut by a pause: got %v, want a conflict saying the sandbox was paused", err)
	}
}

// C11: commands per sandbox are capped with a clear 429.
func TestExecsPerSandboxAreCapped(t *testing.T) {
	e := newLifecycleEnv(t, func(c *Config) { c.MaxExecsPerSandbox = 2 })
	sb := e.create(t, wire.CreateSandboxRequest{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _, _ = e.exec(ctx, sb.ID, "sleep 30")
		}()
	}
	in := e.instance(sb.ID)
	waitFor(t, "two commands to run", func() bool {
		in.mu.Lock()
		defer in.mu.Unlock()
		return in.execs == 2
	})
	if _, _, err := e.exec(context.Background(), sb.ID, "true"); !errors.Is(err, errdefs.ErrQuota) {
		t.Errorf("third command: got %v, want ErrQuota", err)
	}
	cancel()
	wg.Wait()
	if _, out, err := e.exec(context.Background(), sb.ID, "echo again"); err != nil || out != "again\n" {
		t.Errorf("after the others ended: got %q, %v", out, err)
	}
}

// C13: snapshots and paused sandboxes count against the tenant's stored
// quota (429 before anything is written), and both expire.
func TestStoredQuotaAndExpiry(t *testing.T) {
	e := newLifecycleEnv(t, func(c *Config) {
		c.MaxStoredMB = 3
		c.PausedTTL = 300 * time.Millisecond
	})
	e.rt.memory = 2 << 20 // each image is estimated at 2 MiB
	ctx := context.Background()
	a := e.create(t, wire.CreateSandboxRequest{})
	sn, err := e.m.Snapshot(ctx, tenant, a.ID, wire.SnapshotRequest{TTLSeconds: 1})
	if err != nil {
		t.Fatal(err)
	}
	// The fake image is a few bytes; say it is 2 MiB, as a real one of
	// this sandbox would be.
	if _, err := e.st.StoredBytes(ctx, tenant); err != nil {
		t.Fatal(err)
	}
	if _, err := e.m.Pause(ctx, tenant, a.ID); err != nil {
		t.Fatalf("pause within the quota: %v", err)
	}
	b := e.create(t, wire.CreateSandboxRequest{})
	e.rt.memory = 4 << 20
	if _, err := e.m.Snapshot(ctx, tenant, b.ID, wire.SnapshotRequest{}); !errors.Is(err, errdefs.ErrQuota) {
		t.Errorf("snapshot past the quota: got %v, want ErrQuota", err)
	}
	if _, err := e.m.Pause(ctx, tenant, b.ID); !errors.Is(err, errdefs.ErrQuota) {
		t.Errorf("pause past the quota: got %v, want ErrQuota", err)
	}
	if got, _ := e.m.Get(ctx, tenant, b.ID); got.State != wire.StateRunning {
		t.Errorf("sandbox refused a pause: got %s, want running", got.State)
	}
	if _, err := e.m.Snapshot(ctx, tenant, b.ID, wire.SnapshotRequest{TTLSeconds: int(DefaultConfig().SnapshotTTL/time.Second) + 1}); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("snapshot TTL over the maximum: got %v, want ErrInvalid", err)
	}
	waitFor(t, "the paused sandbox to expire", func() bool {
		_, err := e.m.Get(ctx, tenant, a.ID)
		return errors.Is(err, errdefs.ErrNotFound)
	})
	waitFor(t, "the expired paused sandbox's image to go", func() bool {
		_, err := os.Stat(e.m.pausedDir(a.ID))
		return os.IsNotExist(err)
	})
	waitFor(t, "the snapshot to expire", func() bool {
		_, err := e.m.GetSnapshot(ctx, tenant, sn.ID)
		return errors.Is(err, errdefs.ErrNotFound)
	})
	// The record goes first, then the files (a crash between leaves
	// files without a record, which the next start removes).
	waitFor(t, "the expired snapshot's files to go", func() bool {
		_, err := os.Stat(e.m.snapshotDir(sn.ID))
		return os.IsNotExist(err)
	})
}

// D14: a sandbox created from a snapshot has the snapshot's limits; asking
// for others is a 400 that names them.
func TestCreateFromSnapshotKeepsItsLimits(t *testing.T) {
	e := newLifecycleEnv(t, nil)
	ctx := context.Background()
	src := e.create(t, wire.CreateSandboxRequest{MemoryMB: 256, DiskMB: 64, Pids: 32, CPU: 0.5})
	sn, err := e.m.Snapshot(ctx, tenant, src.ID, wire.SnapshotRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		req     wire.CreateSandboxRequest
		wantErr string
	}{
		{"same", wire.CreateSandboxRequest{MemoryMB: 256, DiskMB: 64, Pids: 32, CPU: 0.5}, ""},
		{"omitted", wire.CreateSandboxRequest{}, ""},
		{"memory", wire.CreateSandboxRequest{MemoryMB: 128}, "memory_mb 128"},
		{"disk", wire.CreateSandboxRequest{DiskMB: 2048}, "disk_mb 2048"},
		{"pids", wire.CreateSandboxRequest{Pids: 16}, "pids 16"},
		{"cpu", wire.CreateSandboxRequest{CPU: 0.05}, "cpu 0.05"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.req.SnapshotID = sn.ID
			sb, err := e.m.Create(ctx, tenant, tc.req)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("got %v", err)
				}
				if sb.MemoryMB != 256 || sb.DiskMB != 64 || sb.Pids != 32 || sb.CPU != 0.5 {
					t.Errorf("limits: got %+v, want the snapshot's", sb)
				}
				return
			}
			msg, _ := errdefs.Public(err)
			if !errors.Is(err, errdefs.ErrInvalid) || !strings.Contains(msg, tc.wantErr) {
				t.Errorf("got %v, want ErrInvalid naming %q", err, tc.wantErr)
			}
		})
	}
}

// D16: a fork whose client hangs up before the answer is undone: nobody
// would ever learn the forks' ids.
func TestForkUndoneWhenClientLeaves(t *testing.T) {
	e := newLifecycleEnv(t, nil)
	src := e.create(t, wire.CreateSandboxRequest{})
	ctx, cancel := context.WithCancel(context.Background())
	var once sync.Once
	e.rt.restore = func(context.Context, string) error {
		once.Do(cancel) // the client hangs up during the first restore
		return nil
	}
	if _, err := e.m.Fork(ctx, tenant, src.ID, wire.ForkRequest{Count: 3}); err == nil {
		t.Fatal("fork whose client left: got no error")
	}
	l, _ := e.m.List(context.Background(), tenant)
	if len(l) != 1 || l[0].ID != src.ID {
		t.Errorf("sandboxes after an abandoned fork: got %v, want only the source", l)
	}
	e.m.mu.Lock()
	slots := e.m.slots
	e.m.mu.Unlock()
	if slots != 1 {
		t.Errorf("slots: got %d, want 1", slots)
	}
}

// B4: start-up reconciles what a crash left: a sandbox recorded running
// whose pause image completed is kept paused; unfinished checkpoints,
// snapshot files without a record and records without files are removed.
func TestStartReconcilesCrashLeftovers(t *testing.T) {
	e := newLifecycleEnv(t, nil)
	ctx := context.Background()
	a := e.create(t, wire.CreateSandboxRequest{})
	b := e.create(t, wire.CreateSandboxRequest{})
	snA, err := e.m.Snapshot(ctx, tenant, a.ID, wire.SnapshotRequest{})
	if err != nil {
		t.Fatal(err)
	}
	snB, err := e.m.Snapshot(ctx, tenant, b.ID, wire.SnapshotRequest{})
	if err != nil {
		t.Fatal(err)
	}
	// The crash: the daemon's sessions and goroutines are gone, its
	// sandboxes run on. a's pause image is complete but its record says
	// running, and its runtime sandbox is gone; a checkpoint was in
	// progress; a snapshot's files lost their record and another's record
	// its files.
	e.crash()
	if err := e.m.checkpointTo(ctx, a.ID, e.m.pausedDir(a.ID), false); err != nil {
		t.Fatal(err)
	}
	unfinished := filepath.Join(e.m.tmpDir(), "ckpt-unfinished")
	stray := e.m.snapshotDir("snap-stray")
	for _, d := range []string{unfinished, stray} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.RemoveAll(e.m.snapshotDir(snB.ID)); err != nil {
		t.Fatal(err)
	}
	// A new manager on the same state, as after a restart.
	m2 := NewManager(Options{Config: e.m.cfg, Runtime: e.rt, Store: e.st, StateDir: e.dir,
		Templates: e.m.templates, AgentBinary: e.m.agentBin})
	if err := m2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer m2.Close(ctx)
	if got, err := m2.Get(ctx, tenant, a.ID); err != nil || got.State != wire.StatePaused {
		t.Errorf("sandbox whose pause image completed: got %+v, %v, want paused", got, err)
	}
	if got, err := m2.Get(ctx, tenant, b.ID); err != nil || got.State != wire.StateRunning {
		t.Errorf("running sandbox: got %+v, %v, want running (re-adopted)", got, err)
	}
	for _, p := range []string{unfinished, stray, e.m.snapshotDir(snB.ID)} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s left after start: %v", p, err)
		}
	}
	if _, err := m2.GetSnapshot(ctx, tenant, snB.ID); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("snapshot record without files: got %v, want it removed", err)
	}
	if _, err := m2.GetSnapshot(ctx, tenant, snA.ID); err != nil {
		t.Errorf("intact snapshot: %v", err)
	}
	if _, out, err := func() (wire.ExecResult, string, error) {
		var sb strings.Builder
		r, err := m2.Exec(ctx, tenant, a.ID, wire.ExecRequest{User: wire.UserRoot, Cmd: "echo resumed"}, func(_ string, b []byte) error { sb.Write(b); return nil })
		return r, sb.String(), err
	}(); err != nil || out != "resumed\n" {
		t.Errorf("exec in the kept-paused sandbox: got %q, %v", out, err)
	}
}

// C7: a sandbox that dies says why to the commands it was running: killed
// for memory by the host, or its agent gone.
func TestDeathCauseIsNamed(t *testing.T) {
	for _, tc := range []struct {
		name, cause, want string
	}{
		{"out of memory", runtime.CauseOutOfMemory, "ran out of memory (its limit is 128 MiB)"},
		{"agent gone", "", "init process"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newLifecycleEnv(t, nil)
			e.rt.deathCause = tc.cause
			sb := e.create(t, wire.CreateSandboxRequest{MemoryMB: 128})
			started := make(chan struct{})
			errc := make(chan error, 1)
			go func() {
				var once sync.Once
				_, err := e.m.Exec(context.Background(), tenant, sb.ID, wire.ExecRequest{User: wire.UserRoot, Cmd: "echo go; sleep 30"}, func(string, []byte) error {
					once.Do(func() { close(started) })
					return nil
				})
				errc <- err
			}()
			<-started
			e.rt.kill(sb.ID)
			err := <-errc
			msg, _ := errdefs.Public(err)
			if !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(msg, tc.want) {
				t.Errorf("exec in a sandbox that died: got %v, want a conflict naming %q", err, tc.want)
			}
			waitFor(t, "the record to say failed", func() bool {
				rec, err := e.st.GetSandbox(context.Background(), tenant, sb.ID)
				return err == nil && rec.State == wire.StateFailed
			})
		})
	}
}
