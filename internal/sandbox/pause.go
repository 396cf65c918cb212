package sandbox

import (
	"context"
	"errors"
	"os"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/wire"
)

// Pause saves the tenant's sandbox to disk and stops it: no process or
// memory of it remains. Pausing a paused sandbox does nothing. The pause is
// not tied to the client's connection: it completes (or fails, leaving the
// sandbox running) whatever the client does.
func (m *Manager) Pause(ctx context.Context, tenant, id string) (wire.Sandbox, error) {
	in, err := m.lookup(tenant, id)
	if err != nil {
		return wire.Sandbox{}, err
	}
	if err := in.op.lock(ctx); err != nil {
		return wire.Sandbox{}, err
	}
	defer in.op.unlock()
	if err := m.pauseLocked(context.WithoutCancel(ctx), in); err != nil {
		return wire.Sandbox{}, err
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.toWire(), nil
}

// Resume brings the tenant's paused sandbox back; resuming a running one
// does nothing.
func (m *Manager) Resume(ctx context.Context, tenant, id string) (wire.Sandbox, error) {
	in, err := m.lookup(tenant, id)
	if err != nil {
		return wire.Sandbox{}, err
	}
	if err := in.op.lock(ctx); err != nil {
		return wire.Sandbox{}, err
	}
	defer in.op.unlock()
	if err := m.ensureRunningLocked(ctx, in); err != nil {
		return wire.Sandbox{}, err
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.toWire(), nil
}

// pauseLocked pauses a running sandbox; the caller holds in.op.
//
// The checkpoint leaves the sandbox running and it is destroyed only once
// its image is complete and recorded, so a pause that fails (full disk,
// timeout, a kill) leaves it running as it was. Steps, and what a crash
// after each leaves for the next start to settle: checkpoint into the tmp
// directory (removed at start) → rename to paused/<id> (record running +
// image: re-adopted if it runs, else kept paused) → record paused (record
// paused + runtime leftover: leftover removed) → runtime deleted.
func (m *Manager) pauseLocked(ctx context.Context, in *instance) error {
	in.mu.Lock()
	switch in.phase {
	case phasePaused:
		in.mu.Unlock()
		return nil
	case phaseRunning:
	case phaseStopping, phaseEnded:
		in.mu.Unlock()
		return errGone(in)
	default:
		defer in.mu.Unlock()
		return errdefs.Conflict("sandbox %q is %s", in.id, in.phase)
	}
	if err := in.setPhase(phasePausing); err != nil {
		in.mu.Unlock()
		return err
	}
	tenant := in.tenant
	in.mu.Unlock()
	backToRunning := func() {
		in.mu.Lock()
		if in.phase == phasePausing {
			_ = in.setPhase(phaseRunning)
		}
		in.mu.Unlock()
	}

	if err := m.checkStored(ctx, tenant, m.imageEstimate(ctx, in), "pause the sandbox"); err != nil {
		backToRunning()
		return err
	}
	dir := m.pausedDir(in.id)
	if err := m.checkpointLocked(ctx, in, dir, "pause the sandbox"); err != nil {
		backToRunning()
		return err
	}
	size := dirSize(dir)
	// The record and the state here change together, under in.mu, as in
	// SetTimeout: a SetTimeout in between would otherwise write the
	// running expiry over the paused one in the store.
	in.mu.Lock()
	exp := m.now().UTC().Add(m.cfg.PausedTTL)
	if err := m.store.SetSandboxPaused(context.WithoutCancel(ctx), in.id, true, size, exp); err != nil {
		in.mu.Unlock()
		os.RemoveAll(dir)
		backToRunning()
		return err
	}
	client := in.client
	in.client = nil
	in.endReason = "the sandbox was paused (the command keeps its state and continues after a resume, but this stream ended)"
	_ = in.setPhase(phasePaused)
	in.rec.State = wire.StatePaused
	in.rec.PausedBytes = size
	in.rec.ExpiresAt = exp
	slot := in.slot
	in.slot = false
	in.mu.Unlock()
	if slot {
		m.releaseSlot()
	}
	// The client goes first: its watch then knows the session's end is
	// ours, not a death.
	if client != nil {
		client.Close()
	}
	if err := m.rt.Delete(context.WithoutCancel(ctx), in.id); err != nil {
		m.log.Error("removing paused sandbox's runtime state", "id", in.id, "err", err)
	}
	// A paused sandbox holds no network; a resume gets a fresh slot (the
	// inside of every slot is the same).
	in.mu.Lock()
	hadNet, netw := in.netSlot != nil, in.rec.Network
	in.mu.Unlock()
	if hadNet {
		m.releaseNetwork(in)
		if err := m.store.SetSandboxNetwork(context.WithoutCancel(ctx), in.id, netw, 0); err != nil {
			m.log.Error("recording a paused sandbox's network", "id", in.id, "err", err)
		}
	}
	m.log.Info("sandbox paused", "id", in.id, "bytes", size)
	return nil
}

// ensureRunningLocked resumes a paused sandbox; the caller holds in.op. A
// resume that fails leaves the sandbox paused with its image, except when
// the restored agent does not answer: such a sandbox can never be used
// again, and is ended as failed.
func (m *Manager) ensureRunningLocked(ctx context.Context, in *instance) error {
	in.mu.Lock()
	switch in.phase {
	case phaseRunning:
		in.mu.Unlock()
		return nil
	case phasePaused:
	case phaseStopping, phaseEnded:
		in.mu.Unlock()
		return errGone(in)
	default:
		defer in.mu.Unlock()
		return errdefs.Conflict("sandbox %q is %s", in.id, in.phase)
	}
	in.mu.Unlock()
	if err := m.reserveSlot(nil); err != nil {
		if errors.Is(err, errdefs.ErrQuota) {
			return errdefs.Quota("server is at its limit of %d running sandboxes; sandbox %q stays paused", m.cfg.MaxSandboxes, in.id)
		}
		return err
	}
	in.mu.Lock()
	if err := in.setPhase(phaseResuming); err != nil {
		in.mu.Unlock()
		m.releaseSlot()
		return err
	}
	in.slot = true
	rec := in.rec
	in.mu.Unlock()
	backToPaused := func() {
		in.mu.Lock()
		_ = in.setPhase(phasePaused)
		in.slot = false
		in.mu.Unlock()
		m.releaseSlot()
	}

	spec, err := m.spec(rec)
	if err != nil {
		backToPaused()
		return err
	}
	if _, policy := decodeNetwork(rec.Network); rec.Network != "" {
		slot, err := m.attachNetwork(ctx, &spec, policy)
		if err != nil {
			backToPaused()
			return err
		}
		in.mu.Lock()
		in.netSlot = slot
		in.rec.NetSlot = slot.Index
		in.mu.Unlock()
		prev := backToPaused
		backToPaused = func() {
			m.releaseNetwork(in)
			prev()
		}
		if err := m.store.SetSandboxNetwork(context.WithoutCancel(ctx), in.id, rec.Network, slot.Index); err != nil {
			backToPaused()
			return err
		}
	}
	dir := m.pausedDir(in.id)
	opCtx, cancel := withTimeout(ctx, m.cfg.StartTimeout)
	defer cancel()
	in.setCancelOp(cancel)
	defer in.setCancelOp(nil)
	client, err := m.boot(opCtx, spec, dir)
	// A Kill cancels opCtx: an agent cut off by it is no failed agent, and
	// the kill ends the sandbox once this returns.
	if errors.Is(err, errAgentUnresponsive) && !errors.Is(opCtx.Err(), context.Canceled) {
		backToPaused()
		reason := "its agent did not answer after the resume (it may have been stopped from inside the sandbox)"
		m.log.Warn("resumed sandbox does not answer; ending it", "id", in.id, "err", err)
		if eerr := m.endLocked(ctx, in, wire.StateFailed, reason); eerr != nil {
			m.log.Error("ending sandbox", "id", in.id, "err", eerr)
		}
		return errdefs.Wrap(errdefs.ErrUnavailable, err, "sandbox %q was ended: %s", in.id, reason)
	}
	if err != nil {
		backToPaused()
		return err
	}
	// As in pauseLocked, the record and the state here change together.
	// The TTL is the one set last, also while this resume ran; the record
	// outlives a Kill or StartTimeout that ends opCtx now.
	in.mu.Lock()
	exp := m.now().UTC().Add(time.Duration(in.rec.TTLSeconds) * time.Second)
	if err := m.store.SetSandboxPaused(context.WithoutCancel(ctx), in.id, false, 0, exp); err != nil {
		in.mu.Unlock()
		client.Close()
		_ = m.rt.Delete(context.WithoutCancel(ctx), in.id)
		backToPaused()
		return err
	}
	in.client = client
	_ = in.setPhase(phaseRunning)
	in.rec.State = wire.StateRunning
	in.rec.PausedBytes = 0
	in.rec.ExpiresAt = exp
	in.endReason = ""
	in.mu.Unlock()
	go m.watch(in, client)
	m.guard(in, client)
	if err := os.RemoveAll(dir); err != nil {
		m.log.Error("removing resumed sandbox's saved state", "id", in.id, "err", err)
	}
	m.log.Info("sandbox resumed", "id", in.id)
	return nil
}
