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

// checkpointTo saves the running sandbox id as the image directory dest.
// The image is written in the tmp directory and renamed into place once
// complete, so dest either does not exist or holds a whole image, even
// across a crash. On error nothing is left.
func (m *Manager) checkpointTo(ctx context.Context, id, dest string, leaveRunning bool) error {
	cp, err := m.checkpointer()
	if err != nil {
		return err
	}
	tmp := filepath.Join(m.tmpDir(), randomID("ckpt-"))
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return fmt.Errorf("creating checkpoint directory: %w", err)
	}
	if err := cp.Checkpoint(ctx, id, tmp, leaveRunning); err != nil {
		os.RemoveAll(tmp)
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dest), 0o700); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("creating image directory: %w", err)
	}
	_ = os.RemoveAll(dest)
	if err := os.Rename(tmp, dest); err != nil {
		os.RemoveAll(tmp)
		return fmt.Errorf("publishing checkpoint image: %w", err)
	}
	return nil
}

// checkpointLocked saves the sandbox, which the caller holds (in.op) and
// which is running, to dest, leaving it running. Kill can cut it short.
func (m *Manager) checkpointLocked(ctx context.Context, in *instance, dest, what string) error {
	opCtx, cancel := withTimeout(ctx, m.cfg.CheckpointTimeout)
	defer cancel()
	in.setCancelOp(cancel)
	defer in.setCancelOp(nil)
	in.mu.Lock()
	in.saving = true
	in.mu.Unlock()
	defer func() {
		in.mu.Lock()
		in.saving = false
		in.mu.Unlock()
	}()
	if err := m.checkpointTo(opCtx, in.id, dest, true); err != nil {
		return checkpointError(err, what)
	}
	return nil
}

// snapshotTTL validates a snapshot's requested life.
func (m *Manager) snapshotTTL(seconds int) (time.Duration, error) {
	if seconds == 0 {
		return m.cfg.SnapshotTTL, nil
	}
	if maxS := int(m.cfg.SnapshotTTL / time.Second); seconds < 1 || seconds > maxS {
		return 0, errdefs.Invalid("ttl_seconds of a snapshot must be between 1 and %d, got %d", maxS, seconds)
	}
	return time.Duration(seconds) * time.Second, nil
}

// Snapshot saves the tenant's sandbox (resuming it first if paused) without
// stopping it. The snapshot is kept for req.TTLSeconds (the server's
// snapshot TTL when zero). It completes even if the client hangs up.
func (m *Manager) Snapshot(ctx context.Context, tenant, id string, req wire.SnapshotRequest) (wire.Snapshot, error) {
	ttl, err := m.snapshotTTL(req.TTLSeconds)
	if err != nil {
		return wire.Snapshot{}, err
	}
	in, err := m.lookup(tenant, id)
	if err != nil {
		return wire.Snapshot{}, err
	}
	if err := in.op.lock(ctx); err != nil {
		return wire.Snapshot{}, err
	}
	defer in.op.unlock()
	if err := m.ensureRunningLocked(ctx, in); err != nil {
		return wire.Snapshot{}, err
	}
	if err := m.checkStored(ctx, tenant, m.imageEstimate(ctx, in), "take a snapshot"); err != nil {
		return wire.Snapshot{}, err
	}
	now := m.now().UTC()
	in.mu.Lock()
	r := in.rec
	in.mu.Unlock()
	sn := store.Snapshot{
		ID: randomID("snap-"), Tenant: tenant, SourceSandbox: id, Template: r.Template,
		CreatedAt: now, ExpiresAt: now.Add(ttl), Env: r.Env, CPU: r.CPU, MemoryMB: r.MemoryMB, DiskMB: r.DiskMB, Pids: r.Pids,
		Layout: r.Layout, TemplateHash: r.TemplateHash, Network: r.Network,
	}
	dir := m.snapshotDir(sn.ID)
	if err := m.checkpointLocked(ctx, in, dir, "take a snapshot"); err != nil {
		return wire.Snapshot{}, err
	}
	sn.SizeBytes = dirSize(dir)
	if err := m.store.CreateSnapshot(context.WithoutCancel(ctx), sn); err != nil {
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
	if m.pins[id] < 0 {
		// Another delete (the reaper's expiry, say) is under way; its
		// mark must stay until it is done.
		m.mu.Unlock()
		return errdefs.NotFound("snapshot %q not found", id)
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
// created or none is: a failed restore, or a client that hangs up before the
// answer, undoes the forks made so far.
func (m *Manager) Fork(ctx context.Context, tenant, id string, req wire.ForkRequest) ([]wire.Sandbox, error) {
	count := req.Count
	if count == 0 {
		count = 1
	}
	if count < 1 || count > MaxForks {
		return nil, errdefs.Invalid("count must be between 1 and %d, got %d", MaxForks, req.Count)
	}
	// Checked now, not after a checkpoint of the whole sandbox.
	if req.TTLSeconds != 0 {
		if _, err := m.ttl(req.TTLSeconds, false); err != nil {
			return nil, err
		}
	}
	in, err := m.lookup(tenant, id)
	if err != nil {
		return nil, err
	}
	if err := in.op.lock(ctx); err != nil {
		return nil, err
	}
	if err := m.ensureRunningLocked(ctx, in); err != nil {
		in.op.unlock()
		return nil, err
	}
	if err := m.disk.check(m.imageEstimate(ctx, in), "fork the sandbox"); err != nil {
		in.op.unlock()
		return nil, err
	}
	in.mu.Lock()
	r := in.rec
	in.mu.Unlock()
	image := filepath.Join(m.tmpDir(), randomID("fork-"))
	err = m.checkpointLocked(ctx, in, image, "fork the sandbox")
	in.op.unlock()
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
		Env: r.Env, Metadata: r.Metadata, OnTimeout: r.OnTimeout, Network: parentNetwork(r),
	})
	if err != nil {
		return nil, err
	}
	p.layout, p.restore, p.templateHash = r.Layout, true, r.TemplateHash
	out := make([]wire.Sandbox, 0, count)
	undo := func() {
		for _, done := range out {
			_ = m.Kill(context.WithoutCancel(ctx), tenant, done.ID)
		}
	}
	for range count {
		sb, err := m.launch(ctx, tenant, p, image)
		if err == nil && ctx.Err() != nil {
			out = append(out, sb)
			err = fmt.Errorf("forking: the client went away: %w", ctx.Err())
		}
		if err != nil {
			undo()
			return nil, err
		}
		out = append(out, sb)
	}
	m.log.Info("sandbox forked", "id", id, "count", count)
	return out, nil
}

func snapshotToWire(sn store.Snapshot) wire.Snapshot {
	return wire.Snapshot{
		ID: sn.ID, SourceSandbox: sn.SourceSandbox, Template: sn.Template, SizeBytes: sn.SizeBytes,
		CreatedAt: sn.CreatedAt, ExpiresAt: sn.ExpiresAt,
		CPU: sn.CPU, MemoryMB: sn.MemoryMB, DiskMB: sn.DiskMB, Pids: sn.Pids,
	}
}

// parentNetwork is the network a fork gets: its parent's.
func parentNetwork(r store.Sandbox) *wire.Network {
	n, _ := decodeNetwork(r.Network)
	return n
}
