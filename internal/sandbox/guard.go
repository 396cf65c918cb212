package sandbox

import (
	"context"

	"github.com/pandastack/pandastack/internal/agent"
	"github.com/pandastack/pandastack/internal/runtime"
)

// The memory guard. gVisor has no OOM killer of its own: a sandbox over its
// host cgroup's memory limit loses its sentry, and with it every process
// and all its state. So the host limit sits memoryHeadroom above the
// sandbox's memory_mb, and a guard per running sandbox watches its memory
// (runtime.MemoryWatcher); at memory_mb it asks the agent to kill the
// process using the most, as Linux's OOM killer would, and the command it
// belonged to is told why. A sandbox that allocates faster than the guard
// can react still reaches the hard limit and ends, "out of memory".

// HardMemoryLimit is the host's limit for a sandbox of memoryMB: a quarter
// more, at least 64 MiB more.
func HardMemoryLimit(memoryMB int) int64 {
	return int64(memoryMB)<<20 + max(int64(memoryMB)<<20/4, 64<<20)
}

// guard watches the sandbox's memory for as long as client is its session.
func (m *Manager) guard(in *instance, client *agent.Client) {
	w, ok := m.rt.(runtime.MemoryWatcher)
	if !ok {
		return
	}
	in.mu.Lock()
	limitMB := in.rec.MemoryMB
	in.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		select {
		case <-client.Closed():
		case <-in.ended:
		}
		cancel()
	}()
	go func() {
		err := w.WatchMemory(ctx, in.id, int64(limitMB)<<20, func() {
			rctx, rcancel := context.WithTimeout(ctx, m.cfg.AgentTimeout)
			defer rcancel()
			r, err := client.Reclaim(rctx, limitMB)
			if err != nil {
				m.log.Warn("freeing memory in sandbox", "id", in.id, "err", err)
				return
			}
			m.log.Info("sandbox at its memory limit: killed its largest process", "id", in.id,
				"pid", r.PID, "comm", r.Comm, "rss", r.RSSBytes, "limit_mb", limitMB)
		})
		if err != nil {
			m.log.Warn("watching sandbox memory", "id", in.id, "err", err)
		}
	}()
}
