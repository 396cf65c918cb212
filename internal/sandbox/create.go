package sandbox

import (
	"context"
	"fmt"
	"time"

	"github.com/pandastack/pandastack/internal/agent"
	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/runtime"
	"github.com/pandastack/pandastack/internal/store"
	"github.com/pandastack/pandastack/internal/template"
	"github.com/pandastack/pandastack/wire"
)

// Create starts a sandbox for tenant and returns it running.
func (m *Manager) Create(ctx context.Context, tenant string, req wire.CreateSandboxRequest) (wire.Sandbox, error) {
	var snap *store.Snapshot
	if req.SnapshotID != "" {
		sn, err := m.store.GetSnapshot(ctx, tenant, req.SnapshotID)
		if err != nil {
			return wire.Sandbox{}, err
		}
		if req.Template != "" && req.Template != sn.Template {
			return wire.Sandbox{}, errdefs.Invalid("snapshot %s is of template %q, not %q", sn.ID, sn.Template, req.Template)
		}
		req.Template = sn.Template
		if req.CPU == 0 {
			req.CPU = sn.CPU
		}
		if req.MemoryMB == 0 {
			req.MemoryMB = sn.MemoryMB
		}
		req.Env = mergeMaps(sn.Env, req.Env)
		snap = &sn
	}
	p, err := m.params(req)
	if err != nil {
		return wire.Sandbox{}, err
	}
	if snap == nil {
		return m.launch(ctx, tenant, p, "")
	}
	// Pin the snapshot so it cannot be deleted while it is restored.
	if !m.pin(snap.ID) {
		return wire.Sandbox{}, errdefs.NotFound("snapshot %q not found", snap.ID)
	}
	defer m.unpin(snap.ID)
	return m.launch(ctx, tenant, p, m.snapshotDir(snap.ID))
}

// params are the validated settings of a sandbox to launch.
type params struct {
	template  string
	ttl       time.Duration
	cpu       float64
	memMB     int
	diskMB    int
	pids      int
	env       map[string]string
	metadata  map[string]string
	onTimeout string
}

func (m *Manager) params(req wire.CreateSandboxRequest) (params, error) {
	p := params{template: req.Template, cpu: req.CPU, memMB: req.MemoryMB, diskMB: req.DiskMB, pids: req.Pids,
		env: req.Env, metadata: req.Metadata, onTimeout: req.OnTimeout}
	if p.template == "" {
		p.template = "base"
	}
	var err error
	if p.ttl, err = m.ttl(req.TTLSeconds, true); err != nil {
		return params{}, err
	}
	if p.cpu == 0 {
		p.cpu = m.cfg.DefaultCPU
	}
	if p.cpu < 0.05 || p.cpu > m.cfg.MaxCPU {
		return params{}, errdefs.Invalid("cpu must be between 0.05 and %g, got %g", m.cfg.MaxCPU, req.CPU)
	}
	for _, l := range []struct {
		name        string
		v           *int
		def, lo, hi int
	}{
		{"memory_mb", &p.memMB, m.cfg.DefaultMemoryMB, 64, m.cfg.MaxMemoryMB},
		{"disk_mb", &p.diskMB, m.cfg.DiskMB, 64, m.cfg.MaxDiskMB},
		{"pids", &p.pids, m.cfg.Pids, 16, m.cfg.MaxPids},
	} {
		asked := *l.v
		if asked == 0 {
			*l.v = l.def
		}
		if *l.v < l.lo || *l.v > l.hi {
			return params{}, errdefs.Invalid("%s must be between %d and %d, got %d", l.name, l.lo, l.hi, asked)
		}
	}
	if err := checkEnv(p.env); err != nil {
		return params{}, err
	}
	if len(p.metadata) > 64 {
		return params{}, errdefs.Invalid("metadata has %d keys; at most 64 are allowed", len(p.metadata))
	}
	for k, v := range p.metadata {
		if len(k) == 0 || len(k) > 256 || len(v) > 4096 {
			return params{}, errdefs.Invalid("metadata key %q: keys must be 1-256 bytes and values at most 4096", k)
		}
	}
	switch p.onTimeout {
	case "":
		p.onTimeout = wire.OnTimeoutKill
	case wire.OnTimeoutKill, wire.OnTimeoutPause:
	default:
		return params{}, errdefs.Invalid("on_timeout must be %q or %q, got %q", wire.OnTimeoutKill, wire.OnTimeoutPause, p.onTimeout)
	}
	if p.metadata == nil {
		p.metadata = map[string]string{}
	}
	if p.env == nil {
		p.env = map[string]string{}
	}
	return p, nil
}

// launch starts a sandbox for tenant: booted fresh from its template when
// image is empty, restored from the checkpoint image otherwise.
func (m *Manager) launch(ctx context.Context, tenant string, p params, image string) (wire.Sandbox, error) {
	tpl, err := m.templates.Get(p.template)
	if err != nil {
		return wire.Sandbox{}, err
	}
	// A warm pool member is a hand-over; otherwise a restore of the
	// template's snapshot, or a cold boot.
	var warm *pooled
	if image == "" && m.cfg.PoolSize > 0 && p.cpu == m.cfg.DefaultCPU && p.memMB == m.cfg.DefaultMemoryMB &&
		p.diskMB == m.cfg.DiskMB && p.pids == m.cfg.Pids {
		warm = m.takePooled(tpl.Name)
	}
	if warm == nil && image == "" && m.cfg.TemplateSnapshots {
		image, _ = m.templateImage(ctx, tpl)
	}
	now := m.now().UTC()
	in := &instance{
		id: newID(), tenant: tenant, endedCh: make(chan struct{}),
	}
	if warm != nil {
		in.id = warm.id
	}
	in.rec = store.Sandbox{
		ID: in.id, Tenant: tenant, Template: tpl.Name, State: wire.StateCreating,
		CreatedAt: now, ExpiresAt: now.Add(p.ttl), Metadata: p.metadata, CPU: p.cpu, MemoryMB: p.memMB,
		DiskMB: p.diskMB, Pids: p.pids, Env: p.env, OnTimeout: p.onTimeout, TTLSeconds: int(p.ttl / time.Second),
	}
	discardWarm := func() {
		if warm != nil {
			warm.client.Close()
			_ = m.rt.Delete(context.WithoutCancel(ctx), warm.id)
		}
	}
	spec, err := m.spec(in.rec)
	if err != nil {
		discardWarm()
		return wire.Sandbox{}, err
	}
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		discardWarm()
		return wire.Sandbox{}, errdefs.Unavailable("server is shutting down")
	}
	if len(m.live)-m.paused >= m.cfg.MaxSandboxes {
		m.mu.Unlock()
		discardWarm()
		return wire.Sandbox{}, errdefs.New(errdefs.ErrQuota, "server is at its limit of %d sandboxes", m.cfg.MaxSandboxes)
	}
	m.live[in.id] = in
	m.mu.Unlock()
	// The instance lock is held until the sandbox runs, so a concurrent
	// kill of the new id waits for the create to settle.
	in.mu.Lock()
	defer in.mu.Unlock()

	// A create outlives a client that hangs up: it finishes or is undone.
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.cfg.StartTimeout)
	defer cancel()
	if err := m.store.CreateSandbox(cctx, in.rec); err != nil {
		m.forget(in)
		discardWarm()
		return wire.Sandbox{}, err
	}
	var client *agent.Client
	if warm != nil {
		client = warm.client
	} else if client, err = m.boot(cctx, spec, image); err != nil {
		m.forget(in)
		_ = m.store.SetSandboxState(context.WithoutCancel(ctx), in.id, wire.StateFailed, true)
		return wire.Sandbox{}, err
	}
	in.client = client
	in.rec.State = wire.StateRunning
	if err := m.store.SetSandboxState(cctx, in.id, wire.StateRunning, false); err != nil {
		client.Close()
		_ = m.rt.Delete(context.WithoutCancel(ctx), in.id)
		m.forget(in)
		return wire.Sandbox{}, err
	}
	go m.watch(in, client)
	m.log.Info("sandbox created", "id", in.id, "tenant", tenant, "template", tpl.Name, "restored", image != "", "pooled", warm != nil)
	return toWire(in.rec), nil
}

// spec is the runtime spec of a sandbox record.
func (m *Manager) spec(r store.Sandbox) (runtime.Spec, error) {
	tpl, err := m.templates.Get(r.Template)
	if err != nil {
		return runtime.Spec{}, err
	}
	agentPath, err := m.agentIn(tpl)
	if err != nil {
		return runtime.Spec{}, err
	}
	disk, pids := r.DiskMB, r.Pids
	if disk == 0 {
		disk = m.cfg.DiskMB
	}
	if pids == 0 {
		pids = m.cfg.Pids
	}
	return runtime.Spec{
		ID:        r.ID,
		Hostname:  r.ID,
		RootfsDir: tpl.Rootfs,
		Init:      []string{agentPath},
		Env:       append(append([]string{}, baseEnv...), envList(r.Env)...),
		Limits: runtime.Limits{
			CPU:         r.CPU,
			MemoryBytes: int64(r.MemoryMB) << 20,
			Pids:        int64(pids),
			DiskBytes:   int64(disk) << 20,
			// The same for every sandbox: a restore needs the mounts of
			// the image it restores, whatever memory the sandbox has.
			TmpBytes: int64(m.cfg.TmpMB) << 20,
		},
	}, nil
}

func mergeMaps(a, b map[string]string) map[string]string {
	out := make(map[string]string, len(a)+len(b))
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

// boot starts the sandbox (or restores it from image) and waits for its
// agent; on error nothing of it is left.
func (m *Manager) boot(ctx context.Context, spec runtime.Spec, image string) (*agent.Client, error) {
	if image == "" {
		if err := m.rt.Start(ctx, spec); err != nil {
			return nil, errdefs.Unavailable("starting sandbox: %v", err)
		}
	} else {
		cp, err := m.checkpointer()
		if err != nil {
			return nil, err
		}
		if err := cp.Restore(ctx, spec, image); err != nil {
			return nil, errdefs.Unavailable("restoring sandbox: %v", err)
		}
	}
	client, err := m.connect(ctx, spec.ID)
	if err != nil {
		_ = m.rt.Delete(context.WithoutCancel(ctx), spec.ID)
		return nil, errdefs.Unavailable("connecting to the agent of %s: %v", spec.ID, err)
	}
	return client, nil
}

func (m *Manager) connect(ctx context.Context, id string) (*agent.Client, error) {
	conn, err := m.rt.Connect(ctx, id)
	if err != nil {
		return nil, err
	}
	client, err := agent.Dial(ctx, conn)
	if err != nil {
		conn.Close()
		return nil, err
	}
	if _, err := client.Ping(ctx); err != nil {
		client.Close()
		return nil, err
	}
	return client, nil
}

// agentIn returns the agent's path inside the template, installing it on
// first use.
func (m *Manager) agentIn(tpl template.Template) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if p, ok := m.agents[tpl.Hash]; ok {
		return p, nil
	}
	p, err := template.InstallAgent(tpl, m.agentBin)
	if err != nil {
		return "", fmt.Errorf("installing agent into template %q: %w", tpl.Name, err)
	}
	m.agents[tpl.Hash] = p
	return p, nil
}
