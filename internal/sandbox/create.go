package sandbox

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/pandastack/pandastack/internal/agent"
	"github.com/pandastack/pandastack/internal/cleanup"
	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/network"
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
		if err := m.snapshotLimits(&req, sn); err != nil {
			return wire.Sandbox{}, err
		}
		req.Env = mergeMaps(sn.Env, req.Env)
		if req.Network == nil {
			req.Network, _ = decodeNetwork(sn.Network)
		} else if sn.Network == "" {
			return wire.Sandbox{}, errdefs.Invalid("snapshot %s was taken of a sandbox without a network; a sandbox created from it cannot have one", sn.ID)
		}
		snap = &sn
	}
	p, err := m.params(req)
	if err != nil {
		return wire.Sandbox{}, err
	}
	if snap == nil {
		return m.launch(ctx, tenant, p, "")
	}
	p.layout, p.restore, p.templateHash = snap.Layout, true, snap.TemplateHash
	// Pin the snapshot so it cannot be deleted while it is restored.
	if !m.pin(snap.ID) {
		return wire.Sandbox{}, errdefs.NotFound("snapshot %q not found", snap.ID)
	}
	defer m.unpin(snap.ID)
	// A delete may have completed between the read above and the pin.
	if _, err := m.store.GetSnapshot(ctx, tenant, snap.ID); err != nil {
		return wire.Sandbox{}, err
	}
	return m.launch(ctx, tenant, p, m.snapshotDir(snap.ID))
}

// snapshotLimits fills the request's limits from the snapshot, which fixes
// them: its processes' memory, its disk layer and its process limits are in
// the image, and a restore with others fails or misbehaves. A request that
// asks for other values is refused, naming them.
func (m *Manager) snapshotLimits(req *wire.CreateSandboxRequest, sn store.Snapshot) error {
	disk, pids := sn.DiskMB, sn.Pids
	if disk == 0 {
		disk = m.cfg.DiskMB
	}
	if pids == 0 {
		pids = m.cfg.Pids
	}
	var diff []string
	if req.CPU != 0 && req.CPU != sn.CPU {
		diff = append(diff, fmt.Sprintf("cpu %g (the snapshot's is %g)", req.CPU, sn.CPU))
	}
	if req.MemoryMB != 0 && req.MemoryMB != sn.MemoryMB {
		diff = append(diff, fmt.Sprintf("memory_mb %d (the snapshot's is %d)", req.MemoryMB, sn.MemoryMB))
	}
	if req.DiskMB != 0 && req.DiskMB != disk {
		diff = append(diff, fmt.Sprintf("disk_mb %d (the snapshot's is %d)", req.DiskMB, disk))
	}
	if req.Pids != 0 && req.Pids != pids {
		diff = append(diff, fmt.Sprintf("pids %d (the snapshot's is %d)", req.Pids, pids))
	}
	if len(diff) > 0 {
		return errdefs.Invalid("a sandbox created from a snapshot has the snapshot's limits; omit them or give the same values, not %s", strings.Join(diff, ", "))
	}
	req.CPU, req.MemoryMB, req.DiskMB, req.Pids = sn.CPU, sn.MemoryMB, disk, pids
	return nil
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
	// layout is the file system layout (layoutAgentMount for new
	// sandboxes; a restore keeps its image's).
	layout int
	// restore marks a restore of an image, which needs the template build
	// templateHash it was made from ("" for the legacy build).
	restore      bool
	templateHash string
	// network is the sandbox's network (nil: none) and policy its rules.
	network *wire.Network
	policy  network.Policy
}

// Sandbox layouts (store.Sandbox.Layout). A restore must use its image's.
const (
	// layoutAgentInTemplate: the agent is a file in the template's root
	// file system, which root inside the sandbox could overwrite (in its
	// own overlay), killing its agent.
	layoutAgentInTemplate = 1
	// layoutAgentMount: the agent comes from a read-only mount of the
	// data directory's agents/ at /.pandastack.
	layoutAgentMount = 2
)

func (m *Manager) params(req wire.CreateSandboxRequest) (params, error) {
	p := params{template: req.Template, cpu: req.CPU, memMB: req.MemoryMB, diskMB: req.DiskMB, pids: req.Pids,
		env: req.Env, metadata: req.Metadata, onTimeout: req.OnTimeout, network: req.Network}
	if p.network != nil {
		var err error
		if p.policy, err = parseNetwork(*p.network); err != nil {
			return params{}, err
		}
	}
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
// image is empty, restored from the checkpoint image otherwise. A client
// that hangs up before the sandbox runs gets nothing: the sandbox is undone,
// since nobody would know its id.
func (m *Manager) launch(ctx context.Context, tenant string, p params, image string) (wire.Sandbox, error) {
	tpl, err := m.templates.Resolve(tenant, p.template)
	if p.restore {
		tpl, err = m.templates.GetBuild(p.template, p.templateHash)
	}
	if err != nil {
		return wire.Sandbox{}, err
	}
	if err := m.disk.check(int64(p.diskMB)<<20, fmt.Sprintf("create a sandbox with disk_mb %d", p.diskMB)); err != nil {
		return wire.Sandbox{}, err
	}
	// A warm pool member is a hand-over; otherwise a restore of the
	// template's snapshot, or a cold boot.
	// Pool members and template images have no network.
	defaults := p.cpu == m.cfg.DefaultCPU && p.memMB == m.cfg.DefaultMemoryMB && p.diskMB == m.cfg.DiskMB && p.pids == m.cfg.Pids &&
		p.network == nil
	var warm *pooled
	if image == "" && m.cfg.PoolSize > 0 && defaults {
		warm = m.takePooled(tpl.Name)
		if warm == nil && slices.Contains(m.cfg.PoolTemplates, tpl.Name) {
			m.poolMu.Lock()
			m.poolMisses++
			m.poolMu.Unlock()
		}
	}
	if warm == nil && image == "" && m.cfg.TemplateSnapshots && defaults {
		image, _ = m.templateImage(ctx, tpl)
	}
	discardWarm := func() {
		if warm != nil {
			warm.client.Close()
			_ = m.rt.Delete(context.WithoutCancel(ctx), warm.id)
		}
	}
	now := m.now().UTC()
	id := newID()
	if warm != nil {
		id = warm.id
	}
	rec := store.Sandbox{
		ID: id, Tenant: tenant, Template: tpl.Name, State: wire.StateCreating,
		CreatedAt: now, ExpiresAt: now.Add(p.ttl), Metadata: p.metadata, CPU: p.cpu, MemoryMB: p.memMB,
		DiskMB: p.diskMB, Pids: p.pids, Env: p.env, OnTimeout: p.onTimeout, TTLSeconds: int(p.ttl / time.Second),
		Layout: p.layout, TemplateHash: tpl.Hash, Network: encodeNetwork(p.network),
	}
	if p.network != nil {
		rec.AccessToken = randomID("")
	}
	if rec.Layout == 0 {
		rec.Layout = layoutAgentMount
	}
	spec, err := m.spec(rec)
	if err != nil {
		discardWarm()
		return wire.Sandbox{}, err
	}
	in := newInstance(id, tenant, rec, phaseCreating)
	in.slot = true
	// The operation lock is held until the sandbox runs, so a concurrent
	// kill of the new id waits for the create to settle.
	_ = in.op.lock(context.Background())
	defer in.op.unlock()
	if err := m.reserveSlot(in); err != nil {
		discardWarm()
		return wire.Sandbox{}, err
	}
	// Undo, newest first: runtime, record, registration and slot.
	cu := cleanup.Make(func() {
		in.mu.Lock()
		_ = in.setPhase(phaseStopping)
		_ = in.setPhase(phaseEnded)
		in.slot = false
		in.mu.Unlock()
		m.mu.Lock()
		delete(m.live, id)
		m.slots--
		m.mu.Unlock()
	})
	defer cu.Clean()

	if p.network != nil {
		slot, err := m.attachNetwork(ctx, &spec, p.policy)
		if err != nil {
			return wire.Sandbox{}, err
		}
		in.mu.Lock()
		in.netSlot = slot
		in.rec.NetSlot = slot.Index
		in.mu.Unlock()
		rec.NetSlot = slot.Index
		cu.Add(func() { m.releaseNetwork(in) })
	}

	// The create itself outlives a client that hangs up (runsc is never cut
	// off half-way); it is undone afterwards. StartTimeout bounds the start;
	// the store's writes are not part of it.
	sctx := context.WithoutCancel(ctx)
	if err := m.store.CreateSandbox(sctx, rec); err != nil {
		discardWarm()
		return wire.Sandbox{}, err
	}
	cu.Add(func() {
		if err := m.store.SetSandboxState(context.WithoutCancel(ctx), id, wire.StateFailed, true); err != nil {
			m.log.Error("recording failed create", "id", id, "err", err)
		}
	})
	var client *agent.Client
	if warm != nil {
		client = warm.client
	} else {
		cctx, cancel := withTimeout(ctx, m.cfg.StartTimeout)
		client, err = m.boot(cctx, spec, image)
		cancel()
	}
	if err != nil {
		return wire.Sandbox{}, errdefs.Wrap(errdefs.ErrUnavailable, err, "the sandbox could not be started")
	}
	cu.Add(func() {
		client.Close()
		if err := m.rt.Delete(context.WithoutCancel(ctx), id); err != nil {
			m.log.Error("undoing create", "id", id, "err", err)
		}
	})
	if err := m.store.SetSandboxState(sctx, id, wire.StateRunning, false); err != nil {
		return wire.Sandbox{}, err
	}
	if err := ctx.Err(); err != nil {
		m.log.Info("client went away during create; undoing it", "id", id)
		return wire.Sandbox{}, fmt.Errorf("creating sandbox: the client went away: %w", err)
	}
	in.mu.Lock()
	in.client = client
	in.rec.State = wire.StateRunning
	_ = in.setPhase(phaseRunning)
	sb := in.toWire()
	in.mu.Unlock()
	cu.Release()
	if warm != nil {
		m.poolMu.Lock()
		m.poolHits++
		m.poolMu.Unlock()
	}
	go m.watch(in, client)
	m.guard(in, client)
	m.log.Info("sandbox created", "id", id, "tenant", tenant, "template", tpl.Name, "restored", image != "", "pooled", warm != nil)
	return sb, nil
}

// spec is the runtime spec of a sandbox record.
func (m *Manager) spec(r store.Sandbox) (runtime.Spec, error) {
	tpl, err := m.templates.GetBuild(r.Template, r.TemplateHash)
	if err != nil {
		return runtime.Spec{}, err
	}
	var (
		agentPath string
		binds     []runtime.Bind
	)
	if r.Layout == layoutAgentInTemplate {
		agentPath, err = m.agentIn(tpl)
	} else {
		var name string
		name, err = m.agentName()
		agentPath = "/.pandastack/" + name
		binds = []runtime.Bind{{Source: m.agentsDir(), Destination: "/.pandastack"}}
	}
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
	// /tmp and /dev/shm live in the sandbox's memory: at most half and a
	// quarter of it (layoutAgentMount on), so that full ones leave room to
	// run. A restore needs the mounts of its image, and a restore always
	// has its image's memory and layout.
	tmp, shm := int64(m.cfg.TmpMB)<<20, int64(64<<20)
	if r.Layout >= layoutAgentMount {
		tmp = min(tmp, int64(r.MemoryMB)<<20/2)
		shm = min(shm, int64(r.MemoryMB)<<20/4)
	}
	return runtime.Spec{
		ID:        r.ID,
		Hostname:  r.ID,
		RootfsDir: tpl.Rootfs,
		Init:      []string{agentPath},
		Binds:     binds,
		Env:       mergeEnvList(baseEnv, tpl.Defaults.Env, envList(r.Env)),
		Limits: runtime.Limits{
			CPU: r.CPU,
			// The hard limit sits above the promised one: at memory_mb
			// the guard (guard.go) kills the largest process inside,
			// where the host would kill the whole sandbox.
			MemoryBytes: HardMemoryLimit(r.MemoryMB),
			Pids:        int64(pids),
			DiskBytes:   int64(disk) << 20,
			TmpBytes:    tmp,
			ShmBytes:    shm,
		},
	}, nil
}

// mergeEnvList merges KEY=VALUE lists, later lists winning, keeping the
// order keys were first met.
func mergeEnvList(lists ...[]string) []string {
	var out []string
	at := map[string]int{}
	for _, l := range lists {
		for _, kv := range l {
			k, _, _ := strings.Cut(kv, "=")
			if i, ok := at[k]; ok {
				out[i] = kv
				continue
			}
			at[k] = len(out)
			out = append(out, kv)
		}
	}
	return out
}

// envMap turns a KEY=VALUE list into a map.
func envMap(l []string) map[string]string {
	out := make(map[string]string, len(l))
	for _, kv := range l {
		k, v, _ := strings.Cut(kv, "=")
		out[k] = v
	}
	return out
}

// commandDefaults are what a call in the sandbox runs with when it does not
// say: the environment (its template's under the sandbox's own, under the
// call's), the working directory and the user. The caller holds in.mu.
func (m *Manager) commandDefaults(in *instance, env map[string]string, cwd, user string) (map[string]string, string, string) {
	d := m.templates.Defaults(in.rec.Template, in.rec.TemplateHash)
	e := mergeMaps(envMap(d.Env), mergeMaps(in.rec.Env, env))
	if cwd == "" {
		cwd = d.WorkingDir
	}
	if user == "" && d.User != "" && userName.MatchString(d.User) {
		user = d.User
	}
	return e, cwd, in.user(user)
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

// errAgentUnresponsive reports a sandbox that started but whose agent did
// not answer.
var errAgentUnresponsive = errors.New("the sandbox's agent did not answer")

// boot starts the sandbox (or restores it from image) and waits for its
// agent; on error nothing of it is left.
func (m *Manager) boot(ctx context.Context, spec runtime.Spec, image string) (*agent.Client, error) {
	if image == "" {
		if err := m.rt.Start(ctx, spec); err != nil {
			return nil, fmt.Errorf("starting sandbox: %w", err)
		}
	} else {
		cp, err := m.checkpointer()
		if err != nil {
			return nil, err
		}
		if err := cp.Restore(ctx, spec, image); err != nil {
			return nil, fmt.Errorf("restoring sandbox: %w", err)
		}
	}
	client, err := m.connect(ctx, spec.ID)
	if err != nil {
		_ = m.rt.Delete(context.WithoutCancel(ctx), spec.ID)
		return nil, fmt.Errorf("%w: %w", errAgentUnresponsive, err)
	}
	if image != "" {
		m.notifyRestored(ctx, client)
	}
	return client, nil
}

func (m *Manager) agentsDir() string { return filepath.Join(m.stateDir, "agents") }

// agentName returns the name of the agent in the agents directory,
// installing it on first use.
func (m *Manager) agentName() (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if name, ok := m.agents[""]; ok {
		return name, nil
	}
	name, err := template.InstallAgentIn(m.agentsDir(), m.agentBin)
	if err != nil {
		return "", fmt.Errorf("installing agent: %w", err)
	}
	m.agents[""] = name
	return name, nil
}

// agentIn returns the agent's path inside the template, installing it on
// first use (layoutAgentInTemplate).
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
