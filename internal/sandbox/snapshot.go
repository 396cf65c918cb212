package sandbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/runtime"
	"github.com/pandastack/pandastack/internal/store"
	"github.com/pandastack/pandastack/wire"
)

// MaxForks bounds one fork request.
const MaxForks = 16

func (m *Manager) checkpointer() (runtime.Checkpointer, error) {
	cp, ok := m.rt.(runtime.Checkpointer)
	if !ok {
		return nil, errdefs.Unavailable("the %s runtime cannot snapshot sandboxes", m.rt.Name())
	}
	return cp, nil
}

func (m *Manager) snapshotDir(id string) string { return filepath.Join(m.stateDir, "snapshots", id) }
func (m *Manager) pausedDir(id string) string   { return filepath.Join(m.stateDir, "paused", id) }

// pin marks a snapshot in use by a restore; it reports false when the
// snapshot is being deleted.
func (m *Manager) pin(id string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.pins[id] < 0 {
		return false
	}
	m.pins[id]++
	return true
}

func (m *Manager) unpin(id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.pins[id]--; m.pins[id] == 0 {
		delete(m.pins, id)
	}
}

// dirSize is the bytes used by the files under dir.
func dirSize(dir string) int64 {
	var n int64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

func randomID(prefix string) string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// checkpointTo saves the running sandbox id into a new directory dir; on
// error nothing of dir is left.
func (m *Manager) checkpointTo(ctx context.Context, id, dir string, leaveRunning bool) error {
	cp, err := m.checkpointer()
	if err != nil {
		return err
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("clearing checkpoint directory: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating checkpoint directory: %w", err)
	}
	if err := cp.Checkpoint(ctx, id, dir, leaveRunning); err != nil {
		os.RemoveAll(dir)
		return errdefs.Unavailable("saving sandbox %s: %v", id, err)
	}
	return nil
}

// Snapshot saves the tenant's sandbox (resuming it first if paused) without
// stopping it.
func (m *Manager) Snapshot(ctx context.Context, tenant, id string) (wire.Snapshot, error) {
	in, err := m.lookup(tenant, id)
	if err != nil {
		return wire.Snapshot{}, err
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if err := m.ensureRunning(ctx, in); err != nil {
		return wire.Snapshot{}, err
	}
	sn := store.Snapshot{
		ID: randomID("snap-"), Tenant: tenant, SourceSandbox: id, Template: in.rec.Template,
		CreatedAt: m.now().UTC(), Env: in.rec.Env, CPU: in.rec.CPU, MemoryMB: in.rec.MemoryMB,
	}
	dir := m.snapshotDir(sn.ID)
	tmp := dir + ".saving"
	if err := m.checkpointTo(ctx, in.id, tmp, true); err != nil {
		return wire.Snapshot{}, err
	}
	if err := os.Rename(tmp, dir); err != nil {
		os.RemoveAll(tmp)
		return wire.Snapshot{}, fmt.Errorf("publishing snapshot: %w", err)
	}
	sn.SizeBytes = dirSize(dir)
	if err := m.store.CreateSnapshot(ctx, sn); err != nil {
		os.RemoveAll(dir)
		return wire.Snapshot{}, err
	}
	m.log.Info("snapshot taken", "id", sn.ID, "sandbox", id, "bytes", sn.SizeBytes)
	return snapshotToWire(sn), nil
}

// GetSnapshot returns the tenant's snapshot.
func (m *Manager) GetSnapshot(ctx context.Context, tenant, id string) (wire.Snapshot, error) {
	sn, err := m.store.GetSnapshot(ctx, tenant, id)
	if err != nil {
		return wire.Snapshot{}, err
	}
	return snapshotToWire(sn), nil
}

// ListSnapshots returns the tenant's snapshots, oldest first.
func (m *Manager) ListSnapshots(ctx context.Context, tenant string) ([]wire.Snapshot, error) {
	l, err := m.store.ListSnapshots(ctx, tenant)
	if err != nil {
		return nil, err
	}
	out := make([]wire.Snapshot, 0, len(l))
	for _, sn := range l {
		out = append(out, snapshotToWire(sn))
	}
	return out, nil
}

// DeleteSnapshot deletes the tenant's snapshot and frees its files. A
// snapshot that a create is restoring right now is a conflict.
func (m *Manager) DeleteSnapshot(ctx context.Context, tenant, id string) error {
	if _, err := m.store.GetSnapshot(ctx, tenant, id); err != nil {
		return err
	}
	m.mu.Lock()
	if m.pins[id] > 0 {
		m.mu.Unlock()
		return errdefs.Conflict("snapshot %q is being restored; try again when the create finishes", id)
	}
	m.pins[id] = -1 // no new pins while deleting
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.pins, id)
		m.mu.Unlock()
	}()
	if err := m.store.DeleteSnapshot(ctx, tenant, id); err != nil {
		return err
	}
	if err := os.RemoveAll(m.snapshotDir(id)); err != nil {
		return fmt.Errorf("removing snapshot files: %w", err)
	}
	m.log.Info("snapshot deleted", "id", id)
	return nil
}

// Fork creates req.Count sandboxes that continue from the tenant's sandbox
// as it is now; the sandbox itself keeps running. Either every fork is
// created or none is.
func (m *Manager) Fork(ctx context.Context, tenant, id string, req wire.ForkRequest) ([]wire.Sandbox, error) {
	count := req.Count
	if count == 0 {
		count = 1
	}
	if count < 1 || count > MaxForks {
		return nil, errdefs.Invalid("count must be between 1 and %d, got %d", MaxForks, req.Count)
	}
	in, err := m.lookup(tenant, id)
	if err != nil {
		return nil, err
	}
	in.mu.Lock()
	if err := m.ensureRunning(ctx, in); err != nil {
		in.mu.Unlock()
		return nil, err
	}
	r := in.rec
	image := filepath.Join(m.stateDir, "snapshots", randomID(".fork-"))
	err = m.checkpointTo(ctx, in.id, image, true)
	in.mu.Unlock()
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(image)
	ttl := req.TTLSeconds
	if ttl == 0 {
		ttl = r.TTLSeconds
	}
	p, err := m.params(wire.CreateSandboxRequest{
		Template: r.Template, TTLSeconds: ttl, CPU: r.CPU, MemoryMB: r.MemoryMB, DiskMB: r.DiskMB, Pids: r.Pids,
		Env: r.Env, Metadata: r.Metadata, OnTimeout: r.OnTimeout,
	})
	if err != nil {
		return nil, err
	}
	out := make([]wire.Sandbox, 0, count)
	for range count {
		sb, err := m.launch(ctx, tenant, p, image)
		if err != nil {
			for _, done := range out {
				_ = m.Kill(context.WithoutCancel(ctx), tenant, done.ID)
			}
			return nil, err
		}
		out = append(out, sb)
	}
	m.log.Info("sandbox forked", "id", id, "count", count)
	return out, nil
}

// Pause saves the tenant's sandbox to disk and stops it: no process or
// memory of it remains. Pausing a paused sandbox does nothing.
func (m *Manager) Pause(ctx context.Context, tenant, id string) (wire.Sandbox, error) {
	in, err := m.lookup(tenant, id)
	if err != nil {
		return wire.Sandbox{}, err
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.ending {
		return wire.Sandbox{}, errdefs.NotFound("sandbox %q not found", id)
	}
	if err := m.pauseLocked(ctx, in); err != nil {
		return wire.Sandbox{}, err
	}
	return toWire(in.rec), nil
}

// Resume brings the tenant's paused sandbox back; resuming a running one
// does nothing.
func (m *Manager) Resume(ctx context.Context, tenant, id string) (wire.Sandbox, error) {
	in, err := m.lookup(tenant, id)
	if err != nil {
		return wire.Sandbox{}, err
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if err := m.ensureRunning(ctx, in); err != nil {
		return wire.Sandbox{}, err
	}
	return toWire(in.rec), nil
}

// pauseLocked pauses a running sandbox; the caller holds in.mu.
func (m *Manager) pauseLocked(ctx context.Context, in *instance) error {
	if in.rec.State == wire.StatePaused {
		return nil
	}
	if in.rec.State != wire.StateRunning {
		return errdefs.Conflict("sandbox %q is %s", in.id, in.rec.State)
	}
	dir := m.pausedDir(in.id)
	if err := m.checkpointTo(ctx, in.id, dir, false); err != nil {
		return err
	}
	// Drop the client first: the watch then knows the session's end is
	// ours, not a death.
	client := in.client
	in.client = nil
	client.Close()
	if err := m.rt.Delete(context.WithoutCancel(ctx), in.id); err != nil {
		m.log.Error("removing paused sandbox's runtime state", "id", in.id, "err", err)
	}
	size := dirSize(dir)
	if err := m.store.SetSandboxPaused(context.WithoutCancel(ctx), in.id, true, size, in.rec.ExpiresAt); err != nil {
		return err
	}
	in.rec.State = wire.StatePaused
	in.rec.PausedBytes = size
	m.mu.Lock()
	m.paused++
	m.mu.Unlock()
	m.log.Info("sandbox paused", "id", in.id, "bytes", size)
	return nil
}

// ensureRunning resumes a paused sandbox; the caller holds in.mu.
func (m *Manager) ensureRunning(ctx context.Context, in *instance) error {
	if in.ending {
		return errdefs.NotFound("sandbox %q not found", in.id)
	}
	switch in.rec.State {
	case wire.StateRunning:
		return nil
	case wire.StatePaused:
	default:
		return errdefs.Conflict("sandbox %q is %s", in.id, in.rec.State)
	}
	m.mu.Lock()
	full := len(m.live)-m.paused >= m.cfg.MaxSandboxes
	m.mu.Unlock()
	if full {
		return errdefs.New(errdefs.ErrQuota, "server is at its limit of %d running sandboxes; sandbox %q stays paused", m.cfg.MaxSandboxes, in.id)
	}
	spec, err := m.spec(in.rec)
	if err != nil {
		return err
	}
	dir := m.pausedDir(in.id)
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.cfg.StartTimeout)
	defer cancel()
	// On failure the saved state stays, and the sandbox stays paused.
	client, err := m.boot(cctx, spec, dir)
	if err != nil {
		return err
	}
	exp := m.now().UTC().Add(time.Duration(in.rec.TTLSeconds) * time.Second)
	if err := m.store.SetSandboxPaused(cctx, in.id, false, 0, exp); err != nil {
		client.Close()
		_ = m.rt.Delete(cctx, in.id)
		return err
	}
	in.client = client
	in.rec.State = wire.StateRunning
	in.rec.PausedBytes = 0
	in.rec.ExpiresAt = exp
	m.mu.Lock()
	m.paused--
	m.mu.Unlock()
	go m.watch(in, client)
	if err := os.RemoveAll(dir); err != nil {
		m.log.Error("removing resumed sandbox's saved state", "id", in.id, "err", err)
	}
	m.log.Info("sandbox resumed", "id", in.id)
	return nil
}

func snapshotToWire(sn store.Snapshot) wire.Snapshot {
	return wire.Snapshot{ID: sn.ID, SourceSandbox: sn.SourceSandbox, Template: sn.Template, SizeBytes: sn.SizeBytes, CreatedAt: sn.CreatedAt}
}
