// Package sandbox is the lifecycle of sandboxes: the Manager creates them
// from templates through a runtime.Runtime, runs commands in them through
// their agent, extends and enforces their TTL, and destroys them, keeping
// the store in step.
//
// States: creating → running → stopped | expired | failed. Only running
// sandboxes are visible through the API; ended ones stay in the store for
// a day, for audit.
package sandbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/pandastack/pandastack/internal/agent"
	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/runtime"
	"github.com/pandastack/pandastack/internal/store"
	"github.com/pandastack/pandastack/internal/template"
	"github.com/pandastack/pandastack/wire"
)

// Config holds the manager's defaults and maxima. Zero fields take the
// values of DefaultConfig.
type Config struct {
	DefaultTTL, MaxTTL           time.Duration
	DefaultCPU, MaxCPU           float64
	DefaultMemoryMB, MaxMemoryMB int
	// DiskMB is the default cap of a sandbox's writable root layer and
	// MaxDiskMB the largest a create may ask for; TmpMB caps /tmp.
	DiskMB, MaxDiskMB, TmpMB int
	// Pids is the default cap of processes per sandbox and MaxPids the
	// largest a create may ask for.
	Pids, MaxPids int
	// MaxSandboxes caps running sandboxes on this server.
	MaxSandboxes int
	// DefaultExecTimeout and MaxExecTimeout bound one command.
	DefaultExecTimeout, MaxExecTimeout time.Duration
	// ReapInterval is how often expired sandboxes are looked for.
	ReapInterval time.Duration
	// StartTimeout bounds a create, from runtime start to agent answer.
	StartTimeout time.Duration
	// MaxOutputBytes caps each of stdout and stderr of one exec; the rest
	// is dropped inside the sandbox and the result says truncated.
	MaxOutputBytes int
	// TemplateSnapshots makes creates restores of a per-template snapshot
	// taken after the template's warm-up command, instead of cold boots.
	TemplateSnapshots bool
	// PoolSize is how many warm, unclaimed sandboxes to keep per template
	// in PoolTemplates; a create with default limits takes one over.
	PoolSize int
	// PoolTemplates are the templates that get a pool and whose template
	// snapshots are made at start.
	PoolTemplates []string
	// OnShutdown is what a graceful stop does with running sandboxes:
	// "kill" (the default), "pause" (saved to disk, resumed on demand by
	// the next daemon) or "keep" (left running for the next daemon to
	// re-adopt). Paused sandboxes are always kept.
	OnShutdown string
}

// DefaultConfig returns the built-in defaults.
func DefaultConfig() Config {
	return Config{
		DefaultTTL: 300 * time.Second, MaxTTL: 24 * time.Hour,
		DefaultCPU: 1, MaxCPU: 4,
		DefaultMemoryMB: 1024, MaxMemoryMB: 8192,
		DiskMB: 2048, MaxDiskMB: 20480, TmpMB: 512, Pids: 512, MaxPids: 4096,
		MaxSandboxes:       1000,
		MaxOutputBytes:     10 << 20,
		DefaultExecTimeout: 60 * time.Second, MaxExecTimeout: time.Hour,
		ReapInterval: time.Second,
		StartTimeout: 30 * time.Second,
	}
}

func (c Config) withDefaults() Config {
	d := DefaultConfig()
	set := func(v *time.Duration, dv time.Duration) {
		if *v == 0 {
			*v = dv
		}
	}
	set(&c.DefaultTTL, d.DefaultTTL)
	set(&c.MaxTTL, d.MaxTTL)
	set(&c.DefaultExecTimeout, d.DefaultExecTimeout)
	set(&c.MaxExecTimeout, d.MaxExecTimeout)
	set(&c.ReapInterval, d.ReapInterval)
	set(&c.StartTimeout, d.StartTimeout)
	for _, p := range []struct{ v, dv *int }{
		{&c.DefaultMemoryMB, &d.DefaultMemoryMB}, {&c.MaxMemoryMB, &d.MaxMemoryMB},
		{&c.DiskMB, &d.DiskMB}, {&c.TmpMB, &d.TmpMB}, {&c.Pids, &d.Pids}, {&c.MaxSandboxes, &d.MaxSandboxes},
		{&c.MaxDiskMB, &d.MaxDiskMB}, {&c.MaxPids, &d.MaxPids},
		{&c.MaxOutputBytes, &d.MaxOutputBytes},
	} {
		if *p.v == 0 {
			*p.v = *p.dv
		}
	}
	if c.DefaultCPU == 0 {
		c.DefaultCPU = d.DefaultCPU
	}
	if c.MaxCPU == 0 {
		c.MaxCPU = d.MaxCPU
	}
	return c
}

// Templates finds built templates.
type Templates interface {
	Get(name string) (template.Template, error)
}

// Store persists sandbox records.
type Store interface {
	CreateSandbox(ctx context.Context, sb store.Sandbox) error
	GetSandbox(ctx context.Context, tenant, id string) (store.Sandbox, error)
	ListSandboxes(ctx context.Context, tenant string, states ...string) ([]store.Sandbox, error)
	SetSandboxState(ctx context.Context, id, state string, ended bool) error
	SetSandboxExpiry(ctx context.Context, id string, expires time.Time) error
	PruneEnded(ctx context.Context, before time.Time) (int64, error)
	SetSandboxPaused(ctx context.Context, id string, paused bool, bytes int64, expires time.Time) error
	CreateSnapshot(ctx context.Context, sn store.Snapshot) error
	GetSnapshot(ctx context.Context, tenant, id string) (store.Snapshot, error)
	ListSnapshots(ctx context.Context, tenant string) ([]store.Snapshot, error)
	DeleteSnapshot(ctx context.Context, tenant, id string) error
}

// Manager owns every running sandbox of this server. It is safe for
// concurrent use; calls on one sandbox are serialised by its own lock, calls
// on different sandboxes run in parallel.
type Manager struct {
	cfg       Config
	rt        runtime.Runtime
	store     Store
	templates Templates
	agentBin  string
	stateDir  string
	log       *slog.Logger
	now       func() time.Time

	stop     context.CancelFunc
	reaperWG sync.WaitGroup

	mu sync.Mutex
	// live holds the sandboxes that are creating, running or paused.
	live map[string]*instance
	// paused counts the paused ones among them: MaxSandboxes limits the
	// others only, paused sandboxes cost no memory.
	paused int
	// agents maps a template hash to the agent's path inside it.
	agents map[string]string
	// pins counts restores in progress per snapshot id; -1 while the
	// snapshot is being deleted.
	pins map[string]int

	// tplMu serialises the making of template snapshots.
	tplMu sync.Mutex
	// tplFailed records when a template snapshot last failed, by key.
	tplFailed map[string]time.Time

	poolMu sync.Mutex
	// pool holds warm sandboxes per template name.
	pool     map[string][]*pooled
	poolKick chan struct{}
	closed   bool
}

// instance is one live sandbox.
type instance struct {
	id     string
	tenant string

	mu      sync.Mutex
	rec     store.Sandbox
	client  *agent.Client
	ending  bool // set once Kill or expiry started tearing it down
	endedCh chan struct{}
}

// Options wires a Manager.
type Options struct {
	Config    Config
	Runtime   runtime.Runtime
	Store     Store
	Templates Templates
	// AgentBinary is the host path of the agent, copied into templates.
	AgentBinary string
	// StateDir holds snapshots and the saved state of paused sandboxes.
	StateDir string
	Log      *slog.Logger
	// Now is the clock; time.Now when nil.
	Now func() time.Time
}

// NewManager returns a Manager. Call Start before use and Close after.
func NewManager(o Options) *Manager {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Manager{
		cfg: o.Config.withDefaults(), rt: o.Runtime, store: o.Store, templates: o.Templates,
		agentBin: o.AgentBinary, stateDir: o.StateDir, log: o.Log, now: o.Now,
		live: make(map[string]*instance), agents: make(map[string]string), pins: make(map[string]int),
		tplFailed: make(map[string]time.Time), pool: make(map[string][]*pooled), poolKick: make(chan struct{}, 1),
	}
}

// Start reconciles the store with what the runtime still runs, then starts
// the TTL reaper.
//
// Sandboxes an earlier daemon left running are re-adopted when their record
// says running and their agent answers: they keep their id, TTL and state.
// Everything else is cleaned up: half-created sandboxes, runtime leftovers
// without a record, and records whose sandbox is gone (marked failed).
func (m *Manager) Start(ctx context.Context) error {
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
	adopted := make(map[string]bool)
	for _, r := range recs {
		if r.State == wire.StatePaused {
			// Paused sandboxes are kept: their saved state is on disk.
			if _, err := os.Stat(m.pausedDir(r.ID)); err == nil {
				m.mu.Lock()
				m.live[r.ID] = &instance{id: r.ID, tenant: r.Tenant, rec: r, endedCh: make(chan struct{})}
				m.paused++
				m.mu.Unlock()
				continue
			}
			m.log.Warn("paused sandbox lost its saved state", "id", r.ID)
		}
		if r.State == wire.StateRunning && inRuntime[r.ID] {
			err := m.adopt(ctx, r)
			if err == nil {
				adopted[r.ID] = true
				continue
			}
			m.log.Warn("cannot re-adopt sandbox", "id", r.ID, "err", err)
		}
		m.log.Info("sandbox did not survive the restart", "id", r.ID, "state", r.State)
		if inRuntime[r.ID] {
			if err := m.rt.Delete(ctx, r.ID); err != nil {
				m.log.Error("removing sandbox", "id", r.ID, "err", err)
			}
		}
		if err := m.store.SetSandboxState(ctx, r.ID, wire.StateFailed, true); err != nil {
			return err
		}
	}
	known := make(map[string]bool, len(recs))
	for _, r := range recs {
		known[r.ID] = true
	}
	for _, id := range ids {
		if !known[id] {
			m.log.Info("removing sandbox left by an earlier run", "id", id)
			if err := m.rt.Delete(ctx, id); err != nil {
				m.log.Error("removing leftover sandbox", "id", id, "err", err)
			}
		}
	}
	rctx, cancel := context.WithCancel(context.Background())
	m.stop = cancel
	m.reaperWG.Add(1)
	go m.reaper(rctx)
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

// adopt takes over a sandbox an earlier daemon started.
func (m *Manager) adopt(ctx context.Context, r store.Sandbox) error {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	client, err := m.connect(cctx, r.ID)
	if err != nil {
		return err
	}
	in := &instance{id: r.ID, tenant: r.Tenant, rec: r, client: client, endedCh: make(chan struct{})}
	m.mu.Lock()
	m.live[r.ID] = in
	m.mu.Unlock()
	go m.watch(in, client)
	m.log.Info("re-adopted sandbox", "id", r.ID, "tenant", r.Tenant, "expires", r.ExpiresAt)
	return nil
}

// Shutdown actions for running sandboxes (Config.OnShutdown).
const (
	ShutdownKill  = "kill"
	ShutdownPause = "pause"
	ShutdownKeep  = "keep"
)

// Close stops the reaper and the warm pools, then deals with every running
// sandbox as Config.OnShutdown says. Paused sandboxes stay paused: their
// records and saved state are what the next daemon starts from.
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
	m.reaperWG.Wait()
	// detach lets go of a sandbox without ending it.
	detach := func(in *instance) {
		client := in.client
		in.ending = true
		if client != nil {
			client.Close()
		}
	}
	var errs []error
	for _, in := range ins {
		in.mu.Lock()
		paused := in.rec.State == wire.StatePaused
		action := m.cfg.OnShutdown
		if action == ShutdownPause && !paused {
			if err := m.pauseLocked(ctx, in); err != nil {
				m.log.Error("pausing sandbox at shutdown; destroying it", "id", in.id, "err", err)
				action = ShutdownKill
			} else {
				paused = true
			}
		}
		if paused || action == ShutdownKeep {
			detach(in)
			in.mu.Unlock()
			continue
		}
		in.mu.Unlock()
		if err := m.end(ctx, in, wire.StateStopped); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (m *Manager) reaper(ctx context.Context) {
	defer m.reaperWG.Done()
	t := time.NewTicker(m.cfg.ReapInterval)
	defer t.Stop()
	lastPrune := m.now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := m.now()
		// Lock order is instance then manager (a create holds its
		// instance while it registers); never the other way round.
		m.mu.Lock()
		all := make([]*instance, 0, len(m.live))
		for _, in := range m.live {
			all = append(all, in)
		}
		m.mu.Unlock()
		var expired []*instance
		for _, in := range all {
			in.mu.Lock()
			if !in.ending && in.rec.State == wire.StateRunning && !now.Before(in.rec.ExpiresAt) {
				expired = append(expired, in)
			}
			in.mu.Unlock()
		}
		for _, in := range expired {
			if in.rec.OnTimeout == wire.OnTimeoutPause {
				m.log.Info("sandbox timed out: pausing", "id", in.id)
				in.mu.Lock()
				err := m.pauseLocked(ctx, in)
				in.mu.Unlock()
				if err == nil {
					continue
				}
				m.log.Error("pausing timed-out sandbox; destroying it", "id", in.id, "err", err)
			}
			m.log.Info("sandbox expired", "id", in.id)
			if err := m.end(ctx, in, wire.StateExpired); err != nil {
				m.log.Error("destroying expired sandbox", "id", in.id, "err", err)
			}
		}
		if now.Sub(lastPrune) > time.Hour {
			lastPrune = now
			if _, err := m.store.PruneEnded(ctx, now.Add(-24*time.Hour)); err != nil {
				m.log.Error("pruning ended sandboxes", "err", err)
			}
		}
	}
}

var envKey = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

func checkEnv(env map[string]string) error {
	for k, v := range env {
		if !envKey.MatchString(k) {
			return errdefs.Invalid("invalid environment variable name %q", k)
		}
		if strings.ContainsRune(v, 0) {
			return errdefs.Invalid("environment variable %q contains a NUL byte", k)
		}
	}
	return nil
}

func envList(env map[string]string) []string {
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}

// baseEnv is every sandbox's environment before the request's own.
var baseEnv = []string{
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/root",
	"LANG=C.UTF-8",
	"TERM=xterm",
	"PYTHONUNBUFFERED=1",
	"MPLBACKEND=Agg",
}

func newID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return "sb-" + hex.EncodeToString(b)
}

func (m *Manager) forget(in *instance) {
	m.mu.Lock()
	delete(m.live, in.id)
	m.mu.Unlock()
}

// watch notices a sandbox that dies on its own (its agent session closes)
// and cleans it up.
func (m *Manager) watch(in *instance, client *agent.Client) {
	select {
	case <-client.Closed():
	case <-in.endedCh:
		return
	}
	in.mu.Lock()
	// A pause replaces the client on purpose; only the end of the current
	// session of a sandbox nobody is ending is a death.
	ours := in.ending || in.client != client
	in.mu.Unlock()
	if ours {
		return
	}
	m.log.Warn("sandbox died", "id", in.id)
	if err := m.end(context.Background(), in, wire.StateFailed); err != nil {
		m.log.Error("cleaning up dead sandbox", "id", in.id, "err", err)
	}
}

// end tears a live sandbox down and records its final state. Only the first
// call for a sandbox does anything.
func (m *Manager) end(ctx context.Context, in *instance, state string) error {
	in.mu.Lock()
	if in.ending {
		in.mu.Unlock()
		return nil
	}
	in.ending = true
	close(in.endedCh)
	client := in.client
	wasPaused := in.rec.State == wire.StatePaused
	in.mu.Unlock()
	if wasPaused {
		m.mu.Lock()
		m.paused--
		m.mu.Unlock()
	}
	ctx = context.WithoutCancel(ctx)
	// The record changes first, as the API stops showing the sandbox: a
	// crash during the teardown leaves a runtime leftover without a live
	// record, which the next start removes.
	err := m.store.SetSandboxState(ctx, in.id, state, true)
	if client != nil {
		client.Close()
	}
	if derr := m.rt.Delete(ctx, in.id); derr != nil {
		err = errors.Join(err, derr)
	}
	if rerr := os.RemoveAll(m.pausedDir(in.id)); rerr != nil {
		err = errors.Join(err, rerr)
	}
	m.forget(in)
	return err
}

// lookup returns the tenant's live, running sandbox.
func (m *Manager) lookup(tenant, id string) (*instance, error) {
	m.mu.Lock()
	in, ok := m.live[id]
	m.mu.Unlock()
	if !ok || in.tenant != tenant {
		return nil, errdefs.NotFound("sandbox %q not found", id)
	}
	return in, nil
}

// Get returns the tenant's sandbox.
func (m *Manager) Get(ctx context.Context, tenant, id string) (wire.Sandbox, error) {
	in, err := m.lookup(tenant, id)
	if err != nil {
		return wire.Sandbox{}, err
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if !in.visible() {
		return wire.Sandbox{}, errdefs.NotFound("sandbox %q not found", id)
	}
	return toWire(in.rec), nil
}

// visible reports whether the API shows the sandbox; the caller holds in.mu.
func (in *instance) visible() bool {
	return !in.ending && (in.rec.State == wire.StateRunning || in.rec.State == wire.StatePaused)
}

// List returns the tenant's running sandboxes, oldest first.
func (m *Manager) List(ctx context.Context, tenant string) ([]wire.Sandbox, error) {
	m.mu.Lock()
	var ins []*instance
	for _, in := range m.live {
		if in.tenant == tenant {
			ins = append(ins, in)
		}
	}
	m.mu.Unlock()
	out := make([]wire.Sandbox, 0, len(ins))
	for _, in := range ins {
		in.mu.Lock()
		if in.visible() {
			out = append(out, toWire(in.rec))
		}
		in.mu.Unlock()
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].CreatedAt.Equal(out[j].CreatedAt) {
			return out[i].CreatedAt.Before(out[j].CreatedAt)
		}
		return out[i].ID < out[j].ID
	})
	return out, nil
}

// Kill destroys the tenant's sandbox. Killing one that is gone is NotFound.
func (m *Manager) Kill(ctx context.Context, tenant, id string) error {
	in, err := m.lookup(tenant, id)
	if err != nil {
		return err
	}
	in.mu.Lock()
	ending := in.ending
	in.mu.Unlock()
	if ending {
		return errdefs.NotFound("sandbox %q not found", id)
	}
	m.log.Info("sandbox killed", "id", id)
	return m.end(ctx, in, wire.StateStopped)
}

func (m *Manager) ttl(seconds int, allowZero bool) (time.Duration, error) {
	if seconds == 0 && allowZero {
		return m.cfg.DefaultTTL, nil
	}
	// Compare before multiplying: a huge value would overflow Duration.
	if maxS := int(m.cfg.MaxTTL / time.Second); seconds < 1 || seconds > maxS {
		return 0, errdefs.Invalid("ttl_seconds must be between 1 and %d, got %d", maxS, seconds)
	}
	return time.Duration(seconds) * time.Second, nil
}

// SetTimeout makes the sandbox expire ttlSeconds from now.
func (m *Manager) SetTimeout(ctx context.Context, tenant, id string, ttlSeconds int) (wire.Sandbox, error) {
	ttl, err := m.ttl(ttlSeconds, false)
	if err != nil {
		return wire.Sandbox{}, err
	}
	in, err := m.lookup(tenant, id)
	if err != nil {
		return wire.Sandbox{}, err
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if !in.visible() {
		return wire.Sandbox{}, errdefs.NotFound("sandbox %q not found", id)
	}
	exp := m.now().UTC().Add(ttl)
	if err := m.store.SetSandboxExpiry(ctx, id, exp); err != nil {
		return wire.Sandbox{}, err
	}
	in.rec.ExpiresAt = exp
	// A resume restarts the TTL with this value too.
	in.rec.TTLSeconds = ttlSeconds
	return toWire(in.rec), nil
}

func toWire(r store.Sandbox) wire.Sandbox {
	md := make(map[string]string, len(r.Metadata))
	for k, v := range r.Metadata {
		md[k] = v
	}
	return wire.Sandbox{
		ID: r.ID, Template: r.Template, State: r.State, CreatedAt: r.CreatedAt, ExpiresAt: r.ExpiresAt,
		Metadata: md, CPU: r.CPU, MemoryMB: r.MemoryMB, DiskMB: r.DiskMB, Pids: r.Pids, OnTimeout: r.OnTimeout, PausedBytes: r.PausedBytes,
	}
}
