package sandbox

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/pandastack/pandastack/internal/agent"
	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/store"
	"github.com/pandastack/pandastack/internal/template"
	"github.com/pandastack/pandastack/wire"
)

// templateImageRetry is how long a failed template snapshot is not tried
// again; creates boot cold meanwhile.
const templateImageRetry = time.Minute

// templateImage returns the checkpoint image that creates of the template
// restore, making it on first use: a fresh sandbox of the template runs the
// template's warm-up command and is saved. The image is keyed by the
// template's content and the agent's, so a rebuilt template or a new agent
// gets a new image.
func (m *Manager) templateImage(ctx context.Context, tpl template.Template) (string, error) {
	agentName, err := m.agentName()
	if err != nil {
		return "", err
	}
	key := tpl.Name + "-" + tpl.Hash + "-" + strings.TrimPrefix(agentName, "agent-") + "-l" + strconv.Itoa(layoutAgentMount)
	dir := filepath.Join(m.stateDir, "template-images", key)
	if _, err := os.Stat(filepath.Join(dir, "ready")); err == nil {
		return dir, nil
	}
	m.tplMu.Lock()
	defer m.tplMu.Unlock()
	if _, err := os.Stat(filepath.Join(dir, "ready")); err == nil {
		return dir, nil
	}
	if t, ok := m.tplFailed[key]; ok && m.now().Sub(t) < templateImageRetry {
		return "", errdefs.Unavailable("template %q snapshot failed recently", tpl.Name)
	}
	start := time.Now()
	if err := m.makeTemplateImage(ctx, tpl, dir); err != nil {
		m.tplFailed[key] = m.now()
		m.log.Error("snapshotting template; creates boot cold", "template", tpl.Name, "err", err)
		return "", err
	}
	delete(m.tplFailed, key)
	m.log.Info("template snapshotted", "template", tpl.Name, "dir", dir, "took", time.Since(start))
	return dir, nil
}

func (m *Manager) makeTemplateImage(ctx context.Context, tpl template.Template, dir string) error {
	if _, err := m.checkpointer(); err != nil {
		return err
	}
	// The image outlives the create that asked for it (others wait for
	// it too), but not the manager: Close cuts it short rather than wait
	// up to the five minutes.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Minute)
	defer cancel()
	stop := context.AfterFunc(m.bgCtx, cancel)
	defer stop()
	id := newID()
	spec, err := m.spec(m.pooledRecord(id, tpl))
	if err != nil {
		return err
	}
	client, err := m.boot(ctx, spec, "")
	if err != nil {
		return err
	}
	defer m.rt.Delete(context.WithoutCancel(ctx), id)
	defer client.Close()
	if tpl.Warm != "" {
		var out strings.Builder
		collect := func(b []byte) error {
			if out.Len() < 4096 {
				out.Write(b)
			}
			return nil
		}
		ex, err := client.Exec(ctx, agent.ExecRequest{Argv: []string{"/bin/sh", "-c", tpl.Warm}, TimeoutMS: 120_000},
			agent.ExecIO{Stdout: collect, Stderr: collect})
		if err != nil || ex.ExitCode != 0 {
			return fmt.Errorf("warming template %q: exit %d, %v: %s", tpl.Name, ex.ExitCode, err, out.String())
		}
	}
	if err := m.warmCode(ctx, client, tpl); err != nil {
		return fmt.Errorf("warming template %q: %w", tpl.Name, err)
	}
	if err := m.checkpointTo(ctx, id, dir, false); err != nil {
		return fmt.Errorf("checkpointing template %q: %w", tpl.Name, err)
	}
	return os.WriteFile(filepath.Join(dir, "ready"), nil, 0o600)
}

// pooledRecord is the record of a sandbox made ahead of any request: the
// server's default limits and no owner yet.
func (m *Manager) pooledRecord(id string, tpl template.Template) store.Sandbox {
	now := m.now().UTC()
	return store.Sandbox{
		ID: id, Template: tpl.Name, State: wire.StateCreating, CreatedAt: now, ExpiresAt: now,
		CPU: m.cfg.DefaultCPU, MemoryMB: m.cfg.DefaultMemoryMB, DiskMB: m.cfg.DiskMB, Pids: m.cfg.Pids,
		Env: map[string]string{}, Metadata: map[string]string{},
		OnTimeout: wire.OnTimeoutKill, Layout: layoutAgentMount, TemplateHash: tpl.Hash,
	}
}

// PoolHits returns how many creates were served from the warm pool.
func (m *Manager) PoolHits() int {
	m.poolMu.Lock()
	defer m.poolMu.Unlock()
	return m.poolHits
}

// poolLen returns how many warm sandboxes of the template are ready.
func (m *Manager) poolLen(tpl string) int {
	m.poolMu.Lock()
	defer m.poolMu.Unlock()
	return len(m.pool[tpl])
}

// pooled is a running sandbox waiting in the warm pool.
type pooled struct {
	id     string
	client *agent.Client
}

// takePooled hands over a warm sandbox of the template, or nil when the
// pool has none ready.
func (m *Manager) takePooled(tpl string) *pooled {
	m.poolMu.Lock()
	defer m.poolMu.Unlock()
	for q := m.pool[tpl]; len(q) > 0; q = m.pool[tpl] {
		p := q[0]
		m.pool[tpl] = q[1:]
		select {
		case <-p.client.Closed():
			// It died while waiting; the refill loop replaces it.
			go m.rt.Delete(context.Background(), p.id)
			continue
		default:
		}
		m.poolWake()
		return p
	}
	return nil
}

func (m *Manager) poolWake() {
	select {
	case m.poolKick <- struct{}{}:
	default:
	}
}

// refillPools keeps PoolSize warm sandboxes per pooled template until ctx
// ends, then destroys what is left in the pools.
func (m *Manager) refillPools(ctx context.Context) {
	defer m.reaperWG.Done()
	defer func() {
		m.poolMu.Lock()
		pools := m.pool
		m.pool = map[string][]*pooled{}
		m.poolMu.Unlock()
		for _, q := range pools {
			for _, p := range q {
				p.client.Close()
				_ = m.rt.Delete(context.Background(), p.id)
			}
		}
	}()
	backoff := time.Second
	for {
		failed := false
		for _, name := range m.cfg.PoolTemplates {
			for ctx.Err() == nil {
				m.poolMu.Lock()
				n := len(m.pool[name])
				m.poolMu.Unlock()
				if n >= m.cfg.PoolSize {
					break
				}
				p, err := m.newPooled(ctx, name)
				if err != nil {
					if ctx.Err() == nil {
						m.log.Warn("filling warm pool", "template", name, "err", err)
					}
					failed = true
					break
				}
				m.poolMu.Lock()
				m.pool[name] = append(m.pool[name], p)
				m.poolMu.Unlock()
			}
		}
		wait := 5 * time.Second
		if failed {
			wait, backoff = backoff, min(backoff*2, time.Minute)
		} else {
			backoff = time.Second
		}
		select {
		case <-ctx.Done():
			return
		case <-m.poolKick:
			// A sandbox was just handed over, and its first commands
			// are about to run: a refill now (a sandbox boot) would take
			// the CPU from under them. Let them go first.
			select {
			case <-ctx.Done():
				return
			case <-time.After(poolRefillDelay):
			}
		case <-time.After(wait):
		}
	}
}

// poolRefillDelay is how long a refill waits after a hand-over.
const poolRefillDelay = 500 * time.Millisecond

// newPooled starts one warm sandbox: created like any other, then given
// one throwaway exec of the shell (what most commands start with) so the
// first real exec does not pay for loading it, and its template's code
// warm-up (warmCode).
func (m *Manager) newPooled(ctx context.Context, name string) (*pooled, error) {
	tpl, err := m.templates.Get(name)
	if err != nil {
		return nil, err
	}
	id := newID()
	spec, err := m.spec(m.pooledRecord(id, tpl))
	if err != nil {
		return nil, err
	}
	image := ""
	if m.cfg.TemplateSnapshots {
		image, _ = m.templateImage(ctx, tpl)
	}
	client, err := m.boot(ctx, spec, image)
	if err != nil {
		return nil, err
	}
	if _, err := client.Exec(ctx, agent.ExecRequest{Argv: []string{"/bin/sh", "-c", "true"}, TimeoutMS: 10_000}, agent.ExecIO{}); err != nil {
		client.Close()
		_ = m.rt.Delete(context.WithoutCancel(ctx), id)
		return nil, err
	}
	// Its default code context too (one restored from a template
	// snapshot has it, and the warm-up code finds its imports done). A
	// member whose warm-up failed is kept without one: its first cell
	// starts the context.
	if err := m.warmCode(ctx, client, tpl); err != nil {
		if ctx.Err() != nil {
			client.Close()
			_ = m.rt.Delete(context.WithoutCancel(ctx), id)
			return nil, ctx.Err()
		}
		m.log.Warn("warming the code context of a pool member", "template", name, "err", err)
		var reply struct{}
		_ = client.CodeCall(ctx, agent.OpCodeDelete, agent.CodeContextRef{ID: wire.LanguagePython}, &reply)
	}
	return &pooled{id: id, client: client}, nil
}
