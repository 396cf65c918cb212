// Package sandbox is the lifecycle of sandboxes: the Manager creates them
// from templates through a runtime.Runtime, runs commands in them through
// their agent, pauses, resumes, snapshots and forks them, extends and
// enforces their TTL, and destroys them, keeping the store in step.
//
// Every sandbox moves through the checked lifecycle in lifecycle.go. Every
// wait on a sandbox is bounded (runsc calls, the agent's handshake and
// answers, checkpoints); operations on one sandbox are serialised by its own
// lock, and nothing global (list, reaper, shutdown) waits on that lock.
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
	// MaxDiskMB the largest a create may ask for; TmpMB caps /tmp (and a
	// sandbox's /tmp is never more than half its memory: it lives there).
	DiskMB, MaxDiskMB, TmpMB int
	// Pids is the default cap of processes per sandbox and MaxPids the
	// largest a create may ask for.
	Pids, MaxPids int
	// MaxSandboxes caps sandboxes that hold processes on this server
	// (running ones, and ones being created or resumed).
	MaxSandboxes int
	// DefaultExecTimeout and MaxExecTimeout bound one command.
	DefaultExecTimeout, MaxExecTimeout time.Duration
	// ExecGrace is how long past a command's timeout the daemon waits for
	// the agent to report it; then the agent counts as not answering.
	ExecGrace time.Duration
	// MaxExecsPerSandbox caps the commands running at once in one sandbox.
	MaxExecsPerSandbox int
	// MaxArchiveEntries caps the entries of one archive uploaded into a
	// sandbox; 0: the agent's default (100,000).
	MaxArchiveEntries int
	// ReapInterval is how often expired sandboxes are looked for.
	ReapInterval time.Duration
	// StartTimeout bounds a create or resume, from runtime start to agent
	// answer.
	StartTimeout time.Duration
	// AgentTimeout bounds the agent's answer to a handshake or ping; an
	// agent that does not answer in time has its sandbox ended as failed.
	AgentTimeout time.Duration
	// CheckpointTimeout bounds one pause, snapshot or fork checkpoint.
	CheckpointTimeout time.Duration
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
	// PausedTTL is how long a paused sandbox is kept before it is
	// deleted; SnapshotTTL is the default and longest life of a snapshot.
	PausedTTL, SnapshotTTL time.Duration
	// PauseRetry is how long the reaper waits before it tries again to
	// pause a sandbox whose pause at its TTL failed (full disk, quota);
	// after PauseGiveUp past its TTL the sandbox is destroyed instead.
	PauseRetry, PauseGiveUp time.Duration
	// MaxStoredMB caps what one tenant keeps on disk in snapshots and
	// paused sandboxes.
	MaxStoredMB int
	// MinFreeDiskMB is the free space on the data disk that pauses,
	// snapshots, forks and creates leave untouched: below it they are
	// refused, so the store always has room to write.
	MinFreeDiskMB int
	// MetricsInterval is how often each running sandbox's usage is
	// sampled; MetricsSamples how many samples are kept per sandbox.
	MetricsInterval time.Duration
	MetricsSamples  int
	// AuditRetention is how long audit entries are kept; the reaper
	// deletes older ones. Zero keeps them 30 days.
	AuditRetention time.Duration
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
		ExecGrace:          10 * time.Second,
		MaxExecsPerSandbox: 256,
		ReapInterval:       time.Second,
		StartTimeout:       60 * time.Second,
		AgentTimeout:       10 * time.Second,
		CheckpointTimeout:  10 * time.Minute,
		PausedTTL:          7 * 24 * time.Hour,
		SnapshotTTL:        7 * 24 * time.Hour,
		PauseRetry:         30 * time.Second,
		PauseGiveUp:        10 * time.Minute,
		MaxStoredMB:        50 << 10,
		MinFreeDiskMB:      1024,
		MetricsInterval:    5 * time.Second,
		MetricsSamples:     120,
		AuditRetention:     30 * 24 * time.Hour,
		// Not filled in by withDefaults: zero means no pool.
		PoolSize: 2,
	}
}

func (c Config) withDefaults() Config {
	d := DefaultConfig()
	for _, p := range []struct{ v, dv *time.Duration }{
		{&c.DefaultTTL, &d.DefaultTTL}, {&c.MaxTTL, &d.MaxTTL},
		{&c.DefaultExecTimeout, &d.DefaultExecTimeout}, {&c.MaxExecTimeout, &d.MaxExecTimeout},
		{&c.ExecGrace, &d.ExecGrace}, {&c.ReapInterval, &d.ReapInterval},
		{&c.StartTimeout, &d.StartTimeout}, {&c.AgentTimeout, &d.AgentTimeout},
		{&c.CheckpointTimeout, &d.CheckpointTimeout},
		{&c.PausedTTL, &d.PausedTTL}, {&c.SnapshotTTL, &d.SnapshotTTL},
		{&c.PauseRetry, &d.PauseRetry}, {&c.PauseGiveUp, &d.PauseGiveUp},
		{&c.MetricsInterval, &d.MetricsInterval}, {&c.AuditRetention, &d.AuditRetention},
	} {
		if *p.v == 0 {
			*p.v = *p.dv
		}
	}
	for _, p := range []struct{ v, dv *int }{
		{&c.DefaultMemoryMB, &d.DefaultMemoryMB}, {&c.MaxMemoryMB, &d.MaxMemoryMB},
		{&c.DiskMB, &d.DiskMB}, {&c.TmpMB, &d.TmpMB}, {&c.Pids, &d.Pids}, {&c.MaxSandboxes, &d.MaxSandboxes},
		{&c.MaxDiskMB, &d.MaxDiskMB}, {&c.MaxPids, &d.MaxPids},
		{&c.MaxOutputBytes, &d.MaxOutputBytes}, {&c.MaxExecsPerSandbox, &d.MaxExecsPerSandbox},
		{&c.MaxStoredMB, &d.MaxStoredMB}, {&c.MinFreeDiskMB, &d.MinFreeDiskMB},
		{&c.MetricsSamples, &d.MetricsSamples},
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
	// Get returns the current build of a template.
	Get(name string) (template.Template, error)
	// GetBuild returns a given build of a template ("" for the legacy
	// one): restores need the build their image was made from.
	GetBuild(name, hash string) (template.Template, error)
	// Resolve returns the current build of the template a tenant's
	// reference names: a built-in template, or the tenant's own built one
	// (another tenant's is not found).
	Resolve(tenant, ref string) (template.Template, error)
	// Defaults returns what a template build sets for commands in its
	// sandboxes (environment, working directory, user).
	Defaults(name, hash string) template.Defaults
}

// Store persists sandbox and snapshot records.
type Store interface {
	CreateSandbox(ctx context.Context, sb store.Sandbox) error
	GetSandbox(ctx context.Context, tenant, id string) (store.Sandbox, error)
	ListSandboxes(ctx context.Context, tenant string, states ...string) ([]store.Sandbox, error)
	SetSandboxState(ctx context.Context, id, state string, ended bool) error
	SetSandboxExpiry(ctx context.Context, id string, expires time.Time, ttlSeconds int) error
	PruneEnded(ctx context.Context, before time.Time) (int64, error)
	SetSandboxPaused(ctx context.Context, id string, paused bool, bytes int64, expires time.Time) error
	CreateSnapshot(ctx context.Context, sn store.Snapshot) error
	GetSnapshot(ctx context.Context, tenant, id string) (store.Snapshot, error)
	ListSnapshots(ctx context.Context, tenant string) ([]store.Snapshot, error)
	DeleteSnapshot(ctx context.Context, tenant, id string) error
	StoredBytes(ctx context.Context, tenant string) (int64, error)
	SetSandboxNetwork(ctx context.Context, id, network string, slot int) error
}

// Manager owns every sandbox of this server. It is safe for concurrent use.
type Manager struct {
	cfg       Config
	rt        runtime.Runtime
	store     Store
	templates Templates
	agentBin  string
	stateDir  string
	log       *slog.Logger
	now       func() time.Time
	disk      *diskGuard
	// net gives sandboxes networks; nil when networking is off.
	net Networks

	stop     context.CancelFunc
	bgCtx    context.Context
	reaperWG sync.WaitGroup
	// opsWG counts background operations (reaper actions) that Close
	// waits for.
	opsWG sync.WaitGroup

	mu sync.Mutex
	// live holds the sandboxes from the start of their create until they
	// have ended.
	live map[string]*instance
	// slots counts the sandboxes that hold (or are about to hold) runtime
	// processes: MaxSandboxes bounds it. Paused sandboxes hold none.
	slots int
	// agents maps a template hash to the agent's path inside it.
	agents map[string]string
	// pins counts restores in progress per snapshot id; -1 while the
	// snapshot is being deleted.
	pins   map[string]int
	closed bool

	// tplMu serialises the making of template snapshots.
	tplMu sync.Mutex
	// tplFailed records when a template snapshot last failed, by key.
	tplFailed map[string]time.Time

	poolMu sync.Mutex
	// pool holds warm sandboxes per template name.
	pool     map[string][]*pooled
	poolKick chan struct{}
	// poolHits counts creates served from the warm pool; poolMisses
	// creates that could have been and found none ready.
	poolHits   int
	poolMisses int
}

// Options wires a Manager.
type Options struct {
	Config    Config
	Runtime   runtime.Runtime
	Store     Store
	Templates Templates
	// AgentBinary is the host path of the agent, copied into templates.
	AgentBinary string
	// StateDir holds snapshots, the saved state of paused sandboxes and
	// checkpoints in progress (its tmp directory).
	StateDir string
	Log      *slog.Logger
	// Now is the clock; time.Now when nil.
	Now func() time.Time
	// Network gives sandboxes that ask for one a network; nil: none can.
	Network Networks
}

// NewManager returns a Manager. Call Start before use and Close after.
func NewManager(o Options) *Manager {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	cfg := o.Config.withDefaults()
	return &Manager{
		cfg: cfg, rt: o.Runtime, store: o.Store, templates: o.Templates,
		agentBin: o.AgentBinary, stateDir: o.StateDir, log: o.Log, now: o.Now,
		disk: newDiskGuard(o.StateDir, int64(cfg.MinFreeDiskMB)<<20),
		live: make(map[string]*instance), agents: make(map[string]string), pins: make(map[string]int),
		tplFailed: make(map[string]time.Time), pool: make(map[string][]*pooled), poolKick: make(chan struct{}, 1),
		bgCtx: context.Background(), net: o.Network,
	}
}

var envKey = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// Sizes of what a command is made of. Linux (and gVisor) refuse a single
// argument or environment string over 128 KiB at execve; the agent's frames
// hold at most agent.MaxFrame.
const (
	maxArgBytes = 128<<10 - 1
	maxEnvBytes = 256 << 10
	maxCmdBytes = 512 << 10
)

func checkEnv(env map[string]string) error {
	total := 0
	for k, v := range env {
		if !envKey.MatchString(k) || len(k) > 256 {
			return errdefs.Invalid("invalid environment variable name %q", truncate(k, 64))
		}
		if strings.ContainsRune(v, 0) {
			return errdefs.Invalid("environment variable %q contains a NUL byte", k)
		}
		if len(k)+1+len(v) > maxArgBytes {
			return errdefs.Invalid("environment variable %q is %d bytes; at most %d are allowed per variable", k, len(v), maxArgBytes-len(k)-1)
		}
		total += len(k) + 1 + len(v)
	}
	if total > maxEnvBytes {
		return errdefs.Invalid("environment is %d bytes; at most %d are allowed", total, maxEnvBytes)
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
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

// reserveSlot takes one of MaxSandboxes for a sandbox about to start or
// resume; the caller later gives it back with releaseSlot or keeps it. A
// new sandbox (register, nil for a resume) joins the live set in the same
// step: Close, which lists the live set once it refuses slots, then sees
// every sandbox that got one.
func (m *Manager) reserveSlot(register *instance) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errdefs.Unavailable("server is shutting down")
	}
	if m.slots >= m.cfg.MaxSandboxes {
		return errdefs.Quota("server is at its limit of %d running sandboxes", m.cfg.MaxSandboxes)
	}
	m.slots++
	if register != nil {
		m.live[register.id] = register
	}
	return nil
}

func (m *Manager) releaseSlot() {
	m.mu.Lock()
	m.slots--
	m.mu.Unlock()
}

// end destroys a sandbox and records its final state (stopped, expired or
// failed) with the reason its commands are told. It takes the sandbox's
// operation lock itself, cutting short an operation in progress where it
// can. Only the first call for a sandbox does anything.
func (m *Manager) end(ctx context.Context, in *instance, state, reason string) error {
	in.mu.Lock()
	if in.phase >= phaseStopping {
		in.mu.Unlock()
		return nil
	}
	in.ending = true
	if in.cancelOp != nil {
		in.cancelOp()
	}
	in.mu.Unlock()
	// Every operation is bounded, and the one in progress was just told to
	// stop, so this wait is bounded too.
	_ = in.op.lock(context.Background())
	defer in.op.unlock()
	return m.endLocked(ctx, in, state, reason)
}

// endLocked is end for a caller that holds in.op.
func (m *Manager) endLocked(ctx context.Context, in *instance, state, reason string) error {
	in.mu.Lock()
	if in.phase >= phaseStopping {
		in.mu.Unlock()
		return nil
	}
	if err := in.setPhase(phaseStopping); err != nil {
		in.mu.Unlock()
		return err
	}
	client := in.client
	in.client = nil
	if in.endReason == "" || state != wire.StateFailed {
		in.endReason = reason
	}
	slot := in.slot
	in.slot = false
	in.mu.Unlock()

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
	m.releaseNetwork(in)
	if rerr := os.RemoveAll(m.pausedDir(in.id)); rerr != nil {
		err = errors.Join(err, rerr)
	}
	m.mu.Lock()
	delete(m.live, in.id)
	if slot {
		m.slots--
	}
	m.mu.Unlock()
	in.mu.Lock()
	_ = in.setPhase(phaseEnded)
	in.mu.Unlock()
	return err
}

// fail ends a sandbox as failed, in the background: the caller may hold
// nothing of it, and must not wait.
func (m *Manager) fail(in *instance, reason string) {
	m.log.Warn("sandbox failed", "id", in.id, "reason", reason)
	go func() {
		if err := m.end(context.Background(), in, wire.StateFailed, reason); err != nil {
			m.log.Error("cleaning up failed sandbox", "id", in.id, "err", err)
		}
	}()
}

// lookup returns the tenant's live sandbox.
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
	if in.visibleState() == "" {
		return wire.Sandbox{}, errdefs.NotFound("sandbox %q not found", id)
	}
	return in.toWire(), nil
}

// List returns the tenant's running and paused sandboxes, oldest first.
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
		if in.visibleState() != "" {
			out = append(out, in.toWire())
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

// Kill destroys the tenant's sandbox, cutting short a pause, snapshot or
// resume in progress. Killing one that is gone is NotFound.
func (m *Manager) Kill(ctx context.Context, tenant, id string) error {
	in, err := m.lookup(tenant, id)
	if err != nil {
		return err
	}
	in.mu.Lock()
	gone := in.phase >= phaseStopping
	in.mu.Unlock()
	if gone {
		return errdefs.NotFound("sandbox %q not found", id)
	}
	m.log.Info("sandbox killed", "id", id)
	return m.end(ctx, in, wire.StateStopped, "it was killed")
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

// SetTimeout makes a running sandbox expire ttlSeconds from now. For a
// paused sandbox it sets the TTL it gets when it resumes; how long it is
// kept while paused does not change.
func (m *Manager) SetTimeout(ctx context.Context, tenant, id string, ttlSeconds int) (wire.Sandbox, error) {
	ttl, err := m.ttl(ttlSeconds, false)
	if err != nil {
		return wire.Sandbox{}, err
	}
	in, err := m.lookup(tenant, id)
	if err != nil {
		return wire.Sandbox{}, err
	}
	// in.mu is held across the store write so that the reaper, which
	// decides under it, sees either the old expiry or the new one.
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.visibleState() == "" {
		return wire.Sandbox{}, errdefs.NotFound("sandbox %q not found", id)
	}
	exp := in.rec.ExpiresAt
	if in.visibleState() == wire.StateRunning {
		exp = m.now().UTC().Add(ttl)
	}
	if err := m.store.SetSandboxExpiry(ctx, id, exp, ttlSeconds); err != nil {
		return wire.Sandbox{}, err
	}
	in.rec.ExpiresAt = exp
	in.rec.TTLSeconds = ttlSeconds
	return in.toWire(), nil
}

// toWire is the API's view of the sandbox; the caller holds in.mu.
func (in *instance) toWire() wire.Sandbox {
	r := in.rec
	md := make(map[string]string, len(r.Metadata))
	for k, v := range r.Metadata {
		md[k] = v
	}
	return wire.Sandbox{
		ID: r.ID, Template: r.Template, State: in.visibleState(), CreatedAt: r.CreatedAt, ExpiresAt: r.ExpiresAt,
		Metadata: md, CPU: r.CPU, MemoryMB: r.MemoryMB, DiskMB: r.DiskMB, Pids: r.Pids, OnTimeout: r.OnTimeout, PausedBytes: r.PausedBytes,
		Network: networkToWire(storeNetwork{r.Network, r.AccessToken}),
	}
}

// errGone is the error for a sandbox that ended while the caller waited.
func errGone(in *instance) error {
	return errdefs.NotFound("sandbox %q not found", in.id)
}

// describeEnd turns an end reason into the error a command in flight gets.
func (in *instance) sessionEndedError() error {
	in.mu.Lock()
	reason := in.endReason
	in.mu.Unlock()
	if reason == "" {
		reason = "its agent session ended"
	}
	return errdefs.Conflict("sandbox %q: the command's stream ended because %s", in.id, reason)
}

// withTimeout is context.WithTimeout on a context that outlives the
// client's request: operations that must finish or be undone as a whole
// (a checkpoint, a restore) are never cut off by a client hanging up.
func withTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), d)
}

var _ = fmt.Sprintf
