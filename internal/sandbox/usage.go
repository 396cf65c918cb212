package sandbox

import (
	"context"
	"strconv"
	"time"

	"github.com/pandastack/pandastack/internal/agent"
	"github.com/pandastack/pandastack/internal/runtime"
	"github.com/pandastack/pandastack/wire"
)

// CensusEntry is one sandbox as the metrics see it.
type CensusEntry struct {
	Tenant, Template, State string
	CPU                     float64
	MemoryMB                int
}

// Census lists every tenant's running and paused sandboxes, the warm pool's
// ready sandboxes per template and its hit and miss counts, for metrics.
func (m *Manager) Census() (sbs []CensusEntry, pool map[string]int, hits, misses int) {
	m.mu.Lock()
	ins := make([]*instance, 0, len(m.live))
	for _, in := range m.live {
		ins = append(ins, in)
	}
	m.mu.Unlock()
	for _, in := range ins {
		in.mu.Lock()
		if st := in.visibleState(); st != "" {
			sbs = append(sbs, CensusEntry{Tenant: in.tenant, Template: in.rec.Template, State: st, CPU: in.rec.CPU, MemoryMB: in.rec.MemoryMB})
		}
		in.mu.Unlock()
	}
	m.poolMu.Lock()
	defer m.poolMu.Unlock()
	pool = make(map[string]int, len(m.pool))
	for _, t := range m.cfg.PoolTemplates {
		pool[t] = len(m.pool[t])
	}
	return sbs, pool, m.poolHits, m.poolMisses
}

// Metrics returns the tenant's sandbox's recent usage samples.
func (m *Manager) Metrics(ctx context.Context, tenant, id string) (wire.SandboxMetrics, error) {
	in, err := m.lookup(tenant, id)
	if err != nil {
		return wire.SandboxMetrics{}, err
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.visibleState() == "" {
		return wire.SandboxMetrics{}, errGone(in)
	}
	return wire.SandboxMetrics{
		SandboxID: id, IntervalSeconds: m.cfg.MetricsInterval.Seconds(),
		Samples: append(make([]wire.MetricsSample, 0, len(in.samples)), in.samples...),
	}, nil
}

// sampleTimeout bounds the agent's answer to one sample's process count.
const sampleTimeout = 2 * time.Second

// sampler samples every running sandbox's usage each MetricsInterval. It
// takes no operation lock: a sandbox being paused, snapshotted or ended is
// skipped, and the sample of one slow sandbox never delays the others'
// for more than sampleTimeout.
func (m *Manager) sampler(ctx context.Context) {
	defer m.reaperWG.Done()
	ur, ok := m.rt.(runtime.UsageReader)
	if !ok {
		return
	}
	t := time.NewTicker(m.cfg.MetricsInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		m.mu.Lock()
		ins := make([]*instance, 0, len(m.live))
		for _, in := range m.live {
			ins = append(ins, in)
		}
		m.mu.Unlock()
		for _, in := range ins {
			m.sampleOne(ctx, ur, in)
		}
	}
}

func (m *Manager) sampleOne(ctx context.Context, ur runtime.UsageReader, in *instance) {
	in.mu.Lock()
	client := in.client
	ok := in.phase == phaseRunning && !in.saving && client != nil
	in.mu.Unlock()
	if !ok {
		return
	}
	u, err := ur.Usage(ctx, in.id)
	if err != nil {
		return // ended meanwhile
	}
	s := wire.MetricsSample{
		Time: m.now().UTC(), CPUSeconds: u.CPUSeconds, MemoryBytes: u.MemoryBytes, DiskBytes: u.DiskBytes,
		Processes: countProcesses(ctx, client),
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.phase != phaseRunning {
		return
	}
	if n := len(in.samples); n > 0 {
		prev := in.samples[n-1]
		if dt := s.Time.Sub(prev.Time).Seconds(); dt > 0 && s.CPUSeconds >= prev.CPUSeconds {
			s.CPUPercent = (s.CPUSeconds - prev.CPUSeconds) / dt * 100
		}
	}
	in.samples = append(in.samples, s)
	if over := len(in.samples) - m.cfg.MetricsSamples; over > 0 {
		in.samples = append(in.samples[:0], in.samples[over:]...)
	}
}

// countProcesses counts the processes inside a sandbox (the numeric
// entries of its /proc, listed by the agent as root); -1 when the agent
// does not answer in time.
func countProcesses(ctx context.Context, client *agent.Client) int {
	cctx, cancel := context.WithTimeout(ctx, sampleTimeout)
	defer cancel()
	l, _, err := client.ListFiles(cctx, agent.FileArgs{Path: "/proc", User: wire.UserRoot, Depth: 1, MaxEntries: maxListEntries}, maxListEntries)
	if err != nil {
		return -1
	}
	n := 0
	for _, fi := range l {
		if _, err := strconv.Atoi(fi.Name); err == nil {
			n++
		}
	}
	return n
}
