package sandbox

import (
	"context"
	"time"

	"github.com/pandastack/pandastack/wire"
)

// pruneEvery is how often ended sandbox records older than a day are
// deleted from the store.
const pruneEvery = time.Hour

// reaper ends what has reached its end, every ReapInterval: running
// sandboxes at their TTL (destroyed, or paused with on_timeout "pause"),
// paused sandboxes kept PausedTTL, and expired snapshots. It never waits
// on one sandbox: each due sandbox is dealt with by a goroutine of its own.
func (m *Manager) reaper(ctx context.Context) {
	defer m.reaperWG.Done()
	t := time.NewTicker(m.cfg.ReapInterval)
	defer t.Stop()
	lastPrune := m.now()
	var lastAudit time.Time
	auditPruner, _ := m.store.(AuditPruner)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := m.now()
		m.reapSandboxes(ctx, now)
		m.expireSnapshots(ctx, now)
		m.disk.maintain()
		if auditPruner != nil && now.Sub(lastAudit) >= min(m.cfg.AuditRetention/10, time.Minute) {
			lastAudit = now
			if _, err := auditPruner.PruneAudit(ctx, now.Add(-m.cfg.AuditRetention)); err != nil {
				m.log.Error("pruning the audit log", "err", err)
			}
		}
		if now.Sub(lastPrune) > pruneEvery {
			lastPrune = now
			if _, err := m.store.PruneEnded(ctx, now.Add(-24*time.Hour)); err != nil {
				m.log.Error("pruning ended sandboxes", "err", err)
			}
		}
	}
}

// AuditPruner is the optional capability of a Store to delete audit
// entries older than before; the reaper uses it to keep the audit log to
// AuditRetention.
type AuditPruner interface {
	PruneAudit(ctx context.Context, before time.Time) (int64, error)
}

// due reports whether the sandbox has reached the end of its running or
// paused time at now; the caller holds in.mu.
func (in *instance) due(now time.Time) bool {
	return (in.phase == phaseRunning || in.phase == phasePaused) && !now.Before(in.rec.ExpiresAt) && !now.Before(in.retryAt)
}

func (m *Manager) reapSandboxes(ctx context.Context, now time.Time) {
	m.mu.Lock()
	all := make([]*instance, 0, len(m.live))
	for _, in := range m.live {
		all = append(all, in)
	}
	m.mu.Unlock()
	for _, in := range all {
		in.mu.Lock()
		due := !in.reaping && in.due(now)
		if due {
			in.reaping = true
		}
		in.mu.Unlock()
		if due {
			m.opsWG.Add(1)
			go m.reapOne(ctx, in)
		}
	}
}

// reapOne ends (or pauses) one sandbox that was due. It decides again under
// the sandbox's operation lock: a TTL extension or a resume made while it
// waited wins.
func (m *Manager) reapOne(ctx context.Context, in *instance) {
	defer m.opsWG.Done()
	defer func() {
		in.mu.Lock()
		in.reaping = false
		in.mu.Unlock()
	}()
	if err := in.op.lock(ctx); err != nil {
		return // shutting down
	}
	defer in.op.unlock()
	now := m.now()
	in.mu.Lock()
	due := in.due(now)
	p := in.phase
	pause := in.rec.OnTimeout == wire.OnTimeoutPause
	expired := in.rec.ExpiresAt
	in.mu.Unlock()
	if !due {
		return
	}
	if p == phaseRunning && pause {
		m.log.Info("sandbox timed out: pausing", "id", in.id)
		err := m.pauseLocked(ctx, in)
		if err == nil {
			return
		}
		if ctx.Err() != nil {
			// The server is shutting down (which may be what failed the
			// pause): the shutdown deals with the sandbox as OnShutdown
			// says, or the next start does. Destroying it here would
			// lose what the tenant asked to keep.
			m.log.Warn("pausing timed-out sandbox failed at shutdown; leaving it to the shutdown", "id", in.id, "err", err)
			return
		}
		if now.Before(expired.Add(m.cfg.PauseGiveUp)) {
			m.log.Error("pausing timed-out sandbox; trying again later", "id", in.id, "retry_in", m.cfg.PauseRetry, "err", err)
			in.mu.Lock()
			in.retryAt = now.Add(m.cfg.PauseRetry)
			in.mu.Unlock()
			return
		}
		m.log.Error("pausing timed-out sandbox failed for too long; destroying it", "id", in.id, "err", err)
	}
	reason := "it reached its TTL"
	if p == phasePaused {
		reason = "it was kept paused for the longest time allowed"
		m.log.Info("paused sandbox expired", "id", in.id)
	} else {
		m.log.Info("sandbox expired", "id", in.id)
	}
	if err := m.endLocked(ctx, in, wire.StateExpired, reason); err != nil {
		m.log.Error("destroying expired sandbox", "id", in.id, "err", err)
	}
}

// expireSnapshots deletes snapshots past their expiry (not ones being
// restored right now: they go at a later tick).
func (m *Manager) expireSnapshots(ctx context.Context, now time.Time) {
	sns, err := m.store.ListSnapshots(ctx, "")
	if err != nil {
		m.log.Error("listing snapshots for expiry", "err", err)
		return
	}
	for _, sn := range sns {
		if sn.ExpiresAt.IsZero() || now.Before(sn.ExpiresAt) {
			continue
		}
		if err := m.DeleteSnapshot(ctx, sn.Tenant, sn.ID); err != nil {
			continue
		}
		m.log.Info("snapshot expired", "id", sn.ID)
	}
}
