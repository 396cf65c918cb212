package sandbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/pandastack/pandastack/internal/agent"
	"github.com/pandastack/pandastack/internal/runtime"
	"github.com/pandastack/pandastack/internal/store"
	"github.com/pandastack/pandastack/wire"
)

// adoptParallel bounds the sandboxes re-adopted at once at start: each
// waits up to AgentTimeout for its agent, and a server with many stuck
// sandboxes must still come up promptly.
const adoptParallel = 16

// Start reconciles the store, the runtime and the disk, then starts the TTL
// reaper and the warm pools.
//
// What an earlier daemon left is settled so that nothing is lost or leaked:
//   - a sandbox recorded running whose agent answers is re-adopted with its
//     id, TTL and processes (a pause image left beside it by a pause or
//     resume cut short is removed: the sandbox runs);
//   - a sandbox recorded running that cannot be adopted but has a complete
//     pause image is paused (the crash came after its checkpoint);
//   - a paused sandbox keeps its image (a runtime leftover of a resume cut
//     short is removed);
//   - everything else recorded live is marked failed, and runtime leftovers
//     without a live record, checkpoints in progress (the tmp directory),
//     pause images and snapshot directories without a record, and snapshot
//     records without files are removed.
func (m *Manager) Start(ctx context.Context) error {
	if err := m.resetTmp(); err != nil {
		return err
	}
	ids, err := m.rt.List(ctx)
	if err != nil {
		return fmt.Errorf("listing leftover sandboxes: %w", err)
	}
	inRuntime := make(map[string]bool, len(ids))
	for _, id := range ids {
		inRuntime[id] = true
	}
	recs, err := m.store.ListSandboxes(ctx, "", wire.StateCreating, wire.StateRunning, wire.StatePaused)
	if err != nil {
		return err
	}

	var (
		wg  sync.WaitGroup
		sem = make(chan struct{}, adoptParallel)
	)
	for _, r := range recs {
		hasImage := m.hasPauseImage(r.ID)
		switch {
		case r.State == wire.StatePaused && hasImage:
			if inRuntime[r.ID] {
				m.deleteLeftover(ctx, r.ID, "runtime leftover of a paused sandbox")
			}
			m.register(newInstance(r.ID, r.Tenant, r, phasePaused), false)
		case r.State == wire.StateRunning && inRuntime[r.ID]:
			wg.Add(1)
			sem <- struct{}{}
			go func(r store.Sandbox) {
				defer wg.Done()
				defer func() { <-sem }()
				m.settleRunning(ctx, r, hasImage)
			}(r)
		case r.State == wire.StateRunning && hasImage:
			m.keepPaused(ctx, r)
		default:
			m.log.Info("sandbox did not survive the restart", "id", r.ID, "state", r.State)
			if inRuntime[r.ID] {
				m.deleteLeftover(ctx, r.ID, "runtime leftover of a lost sandbox")
			}
			_ = os.RemoveAll(m.pausedDir(r.ID))
			if err := m.store.SetSandboxState(ctx, r.ID, wire.StateFailed, true); err != nil {
				wg.Wait()
				return err
			}
		}
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		// Stopped half-way: what is left over may belong to a sandbox
		// that was not settled, and is the next start's to judge.
		return fmt.Errorf("reconciling sandboxes: %w", err)
	}

	known := make(map[string]bool, len(recs))
	for _, r := range recs {
		known[r.ID] = true
	}
	for _, id := range ids {
		// Template builds' RUN jobs (package build) are not sandboxes:
		// a build in progress owns them, and the daemon gives builds a
		// runtime of their own; never delete one found here.
		if !known[id] && !strings.HasPrefix(id, runtime.BuildJobPrefix) {
			m.deleteLeftover(ctx, id, "sandbox left by an earlier run")
		}
	}
	m.removeStrayPauseImages()
	if m.net != nil {
		// The slots of the sandboxes re-adopted above are kept; the others
		// an earlier run left go.
		m.net.RemoveUnused()
	}
	if err := m.reconcileSnapshots(ctx); err != nil {
		return err
	}

	rctx, cancel := context.WithCancel(context.Background())
	m.stop = cancel
	m.bgCtx = rctx
	m.reaperWG.Add(1)
	go m.reaper(rctx)
	m.reaperWG.Add(1)
	go m.sampler(rctx)
	if m.cfg.PoolSize > 0 {
		m.reaperWG.Add(1)
		go m.refillPools(rctx)
	} else if m.cfg.TemplateSnapshots {
		// Make the template snapshots now rather than in the first create.
		m.reaperWG.Add(1)
		go func() {
			defer m.reaperWG.Done()
			for _, name := range m.cfg.PoolTemplates {
				if tpl, err := m.templates.Get(name); err == nil {
					_, _ = m.templateImage(rctx, tpl)
				}
			}
		}()
	}
	return nil
}

// tmpDir holds checkpoints in progress; they are renamed into place when
// complete, so what is here at start is a crash's leftover.
func (m *Manager) tmpDir() string { return filepath.Join(m.stateDir, "tmp") }

func (m *Manager) resetTmp() error {
	if err := os.RemoveAll(m.tmpDir()); err != nil {
		return fmt.Errorf("removing unfinished checkpoints: %w", err)
	}
	if err := os.MkdirAll(m.tmpDir(), 0o700); err != nil {
		return fmt.Errorf("creating checkpoint directory: %w", err)
	}
	return nil
}

func (m *Manager) hasPauseImage(id string) bool {
	st, err := os.Stat(m.pausedDir(id))
	return err == nil && st.IsDir()
}

func (m *Manager) deleteLeftover(ctx context.Context, id, what string) {
	m.log.Info("removing "+what, "id", id)
	if err := m.rt.Delete(ctx, id); err != nil {
		m.log.Error("removing "+what, "id", id, "err", err)
	}
}

// register adds a sandbox to the live set; slot reports whether it counts
// against MaxSandboxes.
func (m *Manager) register(in *instance, slot bool) {
	in.slot = slot
	m.mu.Lock()
	m.live[in.id] = in
	if slot {
		m.slots++
	}
	m.mu.Unlock()
}

// settleRunning re-adopts a sandbox recorded running that the runtime still
// has, or, when its agent does not answer, keeps it paused (if a complete
// pause image exists) or marks it failed.
func (m *Manager) settleRunning(ctx context.Context, r store.Sandbox, hasImage bool) {
	client, err := m.connect(ctx, r.ID)
	if err == nil {
		in := newInstance(r.ID, r.Tenant, r, phaseRunning)
		in.client = client
		if r.Network != "" && r.NetSlot > 0 && m.net != nil {
			_, policy := decodeNetwork(r.Network)
			slot, err := m.net.Adopt(r.NetSlot, policy)
			if err != nil {
				m.log.Warn("re-adopted sandbox lost its network", "id", r.ID, "err", err)
			}
			in.netSlot = slot
		}
		m.register(in, true)
		go m.watch(in, client)
		m.guard(in, client)
		if hasImage {
			// A pause cut short after its checkpoint, or a resume before
			// it removed the image: the sandbox runs, the image is stale.
			_ = os.RemoveAll(m.pausedDir(r.ID))
		}
		m.log.Info("re-adopted sandbox", "id", r.ID, "tenant", r.Tenant, "expires", r.ExpiresAt)
		return
	}
	if ctx.Err() != nil {
		// The start was stopped (the daemon's own SIGTERM), not the
		// agent: the sandbox is left as it is for the next start.
		m.log.Warn("start stopped before the sandbox was re-adopted; leaving it for the next start", "id", r.ID)
		return
	}
	m.log.Warn("cannot re-adopt sandbox", "id", r.ID, "err", err)
	m.deleteLeftover(ctx, r.ID, "sandbox that cannot be re-adopted")
	if hasImage {
		m.keepPaused(ctx, r)
		return
	}
	if err := m.store.SetSandboxState(ctx, r.ID, wire.StateFailed, true); err != nil {
		m.log.Error("recording lost sandbox", "id", r.ID, "err", err)
	}
}

// keepPaused records as paused a sandbox whose pause image is complete but
// whose record still says running: the daemon stopped between the two.
func (m *Manager) keepPaused(ctx context.Context, r store.Sandbox) {
	size := dirSize(m.pausedDir(r.ID))
	exp := m.now().UTC().Add(m.cfg.PausedTTL)
	if err := m.store.SetSandboxPaused(ctx, r.ID, true, size, exp); err != nil {
		m.log.Error("recording paused sandbox", "id", r.ID, "err", err)
		return
	}
	r.State, r.PausedBytes, r.ExpiresAt = wire.StatePaused, size, exp
	m.register(newInstance(r.ID, r.Tenant, r, phasePaused), false)
	m.log.Info("kept sandbox paused from its completed pause image", "id", r.ID, "bytes", size)
}

// removeStrayPauseImages removes pause images no live paused sandbox owns.
func (m *Manager) removeStrayPauseImages() {
	ents, err := os.ReadDir(filepath.Join(m.stateDir, "paused"))
	if err != nil {
		return
	}
	for _, e := range ents {
		m.mu.Lock()
		in, ok := m.live[e.Name()]
		m.mu.Unlock()
		// The phase under in.mu, never taken inside m.mu (the lock
		// order): re-adopted sandboxes are watched already, and one that
		// died is ending now.
		if ok {
			in.mu.Lock()
			paused := in.phase == phasePaused
			in.mu.Unlock()
			if paused {
				continue
			}
		}
		m.log.Info("removing stray pause image", "name", e.Name())
		_ = os.RemoveAll(filepath.Join(m.stateDir, "paused", e.Name()))
	}
}

// reconcileSnapshots makes snapshot files and records agree: directories
// without a record (a crash between checkpoint and record, or names of an
// older layout) are removed, and so are records whose files are gone.
func (m *Manager) reconcileSnapshots(ctx context.Context) error {
	recs, err := m.store.ListSnapshots(ctx, "")
	if err != nil {
		return err
	}
	known := make(map[string]store.Snapshot, len(recs))
	for _, sn := range recs {
		known[sn.ID] = sn
	}
	dir := filepath.Join(m.stateDir, "snapshots")
	ents, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("reading snapshot directory: %w", err)
	}
	onDisk := make(map[string]bool, len(ents))
	for _, e := range ents {
		if _, ok := known[e.Name()]; ok && e.IsDir() {
			onDisk[e.Name()] = true
			continue
		}
		m.log.Info("removing snapshot files without a record", "name", e.Name())
		_ = os.RemoveAll(filepath.Join(dir, e.Name()))
	}
	for _, sn := range recs {
		if !onDisk[sn.ID] {
			m.log.Warn("snapshot files are gone; removing its record", "id", sn.ID)
			if err := m.store.DeleteSnapshot(ctx, sn.Tenant, sn.ID); err != nil {
				return err
			}
		}
	}
	// Template images in progress from an older layout.
	if ents, err := os.ReadDir(filepath.Join(m.stateDir, "template-images")); err == nil {
		for _, e := range ents {
			if strings.HasSuffix(e.Name(), ".saving") {
				_ = os.RemoveAll(filepath.Join(m.stateDir, "template-images", e.Name()))
			}
		}
	}
	return nil
}

// watch notices the end of a sandbox's agent session that nobody asked for.
// A session can end while the sandbox lives on (the transport was
// disturbed): then a new session is tried. Otherwise the sandbox died; it is
// ended as failed, with the cause the runtime can tell.
func (m *Manager) watch(in *instance, client *agent.Client) {
	select {
	case <-client.Closed():
	case <-in.ended:
		return
	}
	if !m.currentClient(in, client) {
		return
	}
	reason := "its init process (the PandaStack agent) exited or was killed"
	oom := false
	if insp, ok := m.rt.(runtime.Inspector); ok {
		oom = insp.ExitCause(context.Background(), in.id) == runtime.CauseOutOfMemory
	}
	if oom {
		in.mu.Lock()
		reason = fmt.Sprintf("it ran out of memory (its limit is %d MiB)", in.rec.MemoryMB)
		in.mu.Unlock()
	}
	// Take the operation lock: an operation in progress (a pause) may be
	// what closed the session, and settles it first.
	_ = in.op.lock(context.Background())
	defer in.op.unlock()
	if !m.currentClient(in, client) {
		return
	}
	if !oom {
		nc, err := m.connect(context.Background(), in.id)
		if err == nil {
			in.mu.Lock()
			in.client = nc
			in.endReason = "its agent session was interrupted"
			in.mu.Unlock()
			m.log.Warn("agent session ended unexpectedly; reconnected", "id", in.id)
			go m.watch(in, nc)
			m.guard(in, nc)
			return
		}
	}
	in.mu.Lock()
	in.endReason = reason
	in.mu.Unlock()
	m.log.Warn("sandbox died", "id", in.id, "reason", reason)
	if err := m.endLocked(context.Background(), in, wire.StateFailed, reason); err != nil {
		m.log.Error("cleaning up dead sandbox", "id", in.id, "err", err)
	}
}

// currentClient reports whether client is still the sandbox's session and
// nobody is ending it.
func (m *Manager) currentClient(in *instance, client *agent.Client) bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.client == client && in.phase < phaseStopping
}

// Shutdown actions for running sandboxes (Config.OnShutdown).
const (
	ShutdownKill  = "kill"
	ShutdownPause = "pause"
	ShutdownKeep  = "keep"
)

// shutdownParallel bounds the sandboxes dealt with at once at shutdown.
const shutdownParallel = 8

// Close stops the reaper and the warm pools, then deals with every running
// sandbox as Config.OnShutdown says, several at a time. Paused sandboxes
// stay paused. ctx bounds the whole: a sandbox whose turn cannot come in
// time (an operation holds it) is left as it is, for the next daemon's
// start to settle.
func (m *Manager) Close(ctx context.Context) error {
	m.mu.Lock()
	m.closed = true
	ins := make([]*instance, 0, len(m.live))
	for _, in := range m.live {
		ins = append(ins, in)
	}
	m.mu.Unlock()
	if m.stop != nil {
		m.stop()
	}
	// The reaper and pool refills end soon after the stop (a refill's
	// boot is bounded by runsc's minute); the reaper adds to opsWG, which
	// must not happen once it is waited for below.
	m.reaperWG.Wait()

	var (
		wg   sync.WaitGroup
		sem  = make(chan struct{}, shutdownParallel)
		emu  sync.Mutex
		errs []error
	)
	for _, in := range ins {
		wg.Add(1)
		sem <- struct{}{}
		go func(in *instance) {
			defer wg.Done()
			defer func() { <-sem }()
			if err := m.shutdownOne(ctx, in); err != nil {
				emu.Lock()
				errs = append(errs, err)
				emu.Unlock()
			}
		}(in)
	}
	wg.Wait()
	if !waitWithin(ctx, &m.opsWG) {
		m.log.Warn("reaper actions still in progress at shutdown; leaving them for the next start")
	}
	return errors.Join(errs...)
}

// waitWithin waits for wg as long as ctx allows and reports whether it was
// done. What Close stops waiting for (the reaper's pause of a sandbox: a
// checkpoint of up to CheckpointTimeout) is cut off by the exit and settled
// by the next start, as after a crash.
func waitWithin(ctx context.Context, wg *sync.WaitGroup) bool {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-ctx.Done():
		return false
	}
}

func (m *Manager) shutdownOne(ctx context.Context, in *instance) error {
	if err := in.op.lock(ctx); err != nil {
		m.log.Warn("sandbox busy at shutdown; leaving it for the next start", "id", in.id)
		m.detach(in)
		return nil
	}
	defer in.op.unlock()
	in.mu.Lock()
	p := in.phase
	in.mu.Unlock()
	if p >= phaseStopping {
		return nil
	}
	action := m.cfg.OnShutdown
	if p == phasePaused {
		action = ShutdownKeep
	}
	if action == ShutdownPause {
		// Paused, or, if the pause failed, left running: either way the
		// next daemon finds it (it re-adopts a running one).
		if err := m.pauseLocked(ctx, in); err != nil {
			m.log.Error("pausing sandbox at shutdown failed; leaving it running for the next start", "id", in.id, "err", err)
		}
		action = ShutdownKeep
	}
	if action == ShutdownKeep {
		m.detach(in)
		return nil
	}
	return m.endLocked(ctx, in, wire.StateStopped, "the server stopped")
}

// detach lets go of a sandbox without ending it: its record and runtime
// state are what the next daemon starts from.
func (m *Manager) detach(in *instance) {
	in.mu.Lock()
	client := in.client
	in.client = nil
	in.endReason = "the server stopped"
	in.mu.Unlock()
	if client != nil {
		client.Close()
	}
}

// connect starts an agent session with a running sandbox, bounded by
// AgentTimeout (and ctx).
func (m *Manager) connect(ctx context.Context, id string) (*agent.Client, error) {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.AgentTimeout)
	defer cancel()
	conn, err := m.rt.Connect(ctx, id)
	if err != nil {
		return nil, err
	}
	client, err := agent.Dial(ctx, conn)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("agent did not answer within %s: %w", m.cfg.AgentTimeout, err)
	}
	if _, err := client.Ping(ctx); err != nil {
		client.Close()
		return nil, fmt.Errorf("agent did not answer a ping within %s: %w", m.cfg.AgentTimeout, err)
	}
	return client, nil
}
