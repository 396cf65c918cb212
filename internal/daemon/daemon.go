// Package daemon wires PandaStack's parts into the server that
// `pandastack serve` runs: store, templates, runtime, sandbox manager and
// HTTP API, plus the first-start API key.
package daemon

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/pandastack/pandastack/internal/api"
	"github.com/pandastack/pandastack/internal/metrics"
	"github.com/pandastack/pandastack/internal/network"
	"github.com/pandastack/pandastack/internal/runtime/gvisor"
	"github.com/pandastack/pandastack/internal/sandbox"
	"github.com/pandastack/pandastack/internal/store"
	"github.com/pandastack/pandastack/internal/template"
)

// Defaults of the installed layout (scripts/install.sh).
const (
	DefaultDataDir = "/var/lib/pandastack"
	DefaultListen  = "127.0.0.1:7423"
	DefaultLibDir  = "/usr/local/lib/pandastack"
)

// Config configures the daemon.
type Config struct {
	DataDir string
	Listen  string
	// Runsc and AgentBinary are paths of the binaries; found by FindBinary
	// when empty.
	Runsc       string
	AgentBinary string
	// TemplateDir holds built templates; DataDir/templates when empty.
	TemplateDir string
	Mirror      string
	// BuildTemplates builds missing templates in the background at start.
	BuildTemplates bool
	// CgroupParent is the cgroup under which sandboxes get theirs;
	// "/pandastack" when empty.
	CgroupParent string
	Sandbox      sandbox.Config
	// Network configures sandbox networking.
	Network        NetworkConfig
	MaxOutputBytes int
	// MaxConcurrentExecs and MaxBufferedOutputBytes bound the commands
	// running at once on the server and the output blocking execs hold in
	// memory (the API's defaults when zero).
	MaxConcurrentExecs     int
	MaxBufferedOutputBytes int64
	Version                string
	Log                    *slog.Logger
	// Out receives the one-time notice that an API key was created (never
	// the key itself).
	Out io.Writer
	// Ready, when set, is called with the listening address once the
	// server accepts requests.
	Ready func(addr string)
	// MetricsListen is where GET /metrics is served (unauthenticated:
	// keep it on loopback or a private network); "" serves none.
	MetricsListen string
	// MetricsReady, when set, is called with the metrics listener's
	// address once it accepts requests.
	MetricsReady func(addr string)
	// MetricsOptional makes a MetricsListen that cannot be opened (the
	// default port held by another server on the machine) a logged error
	// instead of a failed start: set for the default, not for an address
	// the operator chose.
	MetricsOptional bool
}

// NetworkConfig configures sandbox networking.
type NetworkConfig struct {
	// Enabled lets sandboxes that ask for a network have one.
	Enabled bool
	// Namespace is the path of the network namespace sandbox traffic
	// leaves from ("" for the daemon's own); tests give one whose only
	// routes lead to stand-ins.
	Namespace string
	// PoolSize is how many network slots are kept prepared.
	PoolSize int
	// Resolvers are the upstream DNS servers ("ip:port"); the host's
	// /etc/resolv.conf when empty.
	Resolvers []string
	// Domain, when set, serves sandboxes' exposed ports at host names
	// {port}-{id}.{domain} (point a wildcard DNS record at the server).
	Domain string
	// TLSCert and TLSKey, when set, make the server speak HTTPS (for the
	// API and the ports' host names; use a wildcard certificate).
	TLSCert, TLSKey string
}

// FindBinary returns the first of: the explicit path, name in the install
// directory, name beside the running executable, name on PATH.
func FindBinary(explicit, name string) (string, error) {
	if explicit != "" {
		if _, err := os.Stat(explicit); err != nil {
			return "", fmt.Errorf("finding %s: %w", name, err)
		}
		return explicit, nil
	}
	cands := []string{filepath.Join(DefaultLibDir, name)}
	if exe, err := os.Executable(); err == nil {
		cands = append(cands, filepath.Join(filepath.Dir(exe), name))
	}
	for _, c := range cands {
		if _, err := os.Stat(c); err == nil {
			return c, nil
		}
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("finding %s: not in %v nor on PATH (run scripts/install.sh)", name, cands)
}

// Run serves until ctx ends, then shuts down: in-flight requests get a
// grace period, and every sandbox is destroyed.
func Run(ctx context.Context, cfg Config) error {
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.Out == nil {
		cfg.Out = io.Discard
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("pandastack serve must run as root: gVisor needs it to create sandboxes")
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("creating data directory: %w", err)
	}
	runsc, err := FindBinary(cfg.Runsc, "runsc")
	if err != nil {
		return err
	}
	agentBin, err := FindBinary(cfg.AgentBinary, "pandastack-agent")
	if err != nil {
		return err
	}
	st, err := store.Open(ctx, filepath.Join(cfg.DataDir, "state.db"))
	if err != nil {
		return err
	}
	defer st.Close()
	if err := ensureAPIKey(ctx, st, cfg.DataDir, cfg.Out); err != nil {
		return err
	}
	tdir := cfg.TemplateDir
	if tdir == "" {
		tdir = filepath.Join(cfg.DataDir, "templates")
	}
	tpls, err := template.NewStore(tdir, cfg.Mirror, template.Builtin(), log)
	if err != nil {
		return err
	}
	tuneHost(log)
	if cfg.MaxOutputBytes > 0 {
		cfg.Sandbox.MaxOutputBytes = cfg.MaxOutputBytes
	}
	if len(cfg.Sandbox.PoolTemplates) == 0 {
		for _, d := range tpls.Definitions() {
			cfg.Sandbox.PoolTemplates = append(cfg.Sandbox.PoolTemplates, d.Name)
		}
	}
	mx := metrics.New()
	rt, err := gvisor.New(gvisor.Config{Runsc: runsc, StateDir: filepath.Join(cfg.DataDir, "runtime"), CgroupParent: cfg.CgroupParent, Log: log, OnFailure: mx.RunscFailure})
	if err != nil {
		return err
	}
	defer rt.Close()
	var nets sandbox.Networks
	if cfg.Network.Enabled {
		n, err := network.New(network.Config{
			DaemonNS: cfg.Network.Namespace, Instance: cfg.DataDir, PoolSize: cfg.Network.PoolSize,
			Resolvers: cfg.Network.Resolvers, Log: log,
		})
		if err != nil {
			// Sandboxes without a network (the default) do not need it;
			// a create that asks for one is told.
			log.Error("sandbox networking is unavailable", "err", err)
		} else {
			defer n.Close()
			nets = n
		}
	}
	tsvc, err := newTemplates(ctx, cfg, runsc, tpls, st, log)
	if err != nil {
		return err
	}
	defer tsvc.close()
	mgr := sandbox.NewManager(sandbox.Options{
		Config: cfg.Sandbox, Runtime: rt, Store: st, Templates: tpls, AgentBinary: agentBin, Log: log,
		StateDir: cfg.DataDir, Network: nets,
	})
	st.OnFull(mgr.ReleaseDiskReserve)
	mx.RegisterCensus(census(mgr), metrics.Host{DataDir: cfg.DataDir})
	if err := mgr.Start(ctx); err != nil {
		return fmt.Errorf("starting sandbox manager: %w", err)
	}
	bgCtx, bgCancel := context.WithCancel(ctx)
	defer bgCancel()
	if cfg.BuildTemplates {
		go func() {
			for _, d := range tpls.Definitions() {
				if _, err := tpls.Ensure(bgCtx, d.Name); err != nil && bgCtx.Err() == nil {
					log.Error("building template", "name", d.Name, "err", err)
				}
			}
		}()
	}

	srv := &http.Server{
		Handler: api.New(api.Config{
			Sandboxes: mgr, Templates: tsvc, Keys: st, Log: log,
			Version: cfg.Version, Runtime: rt.Name(), MaxOutputBytes: cfg.MaxOutputBytes, Domain: cfg.Network.Domain, Network: nets != nil,
			MaxConcurrentExecs: cfg.MaxConcurrentExecs, MaxBufferedOutputBytes: cfg.MaxBufferedOutputBytes,
			Metrics: mx, Audit: st,
		}),
		// No ReadTimeout or WriteTimeout: an exec stream may rightly last
		// an hour. Request bodies get their own deadline in the API, and
		// a request it rejects unread closes its connection.
		ReadHeaderTimeout: 10 * time.Second,
		// A kept-alive connection with no request must not be held for
		// ever (each is a file descriptor).
		IdleTimeout:    120 * time.Second,
		MaxHeaderBytes: 64 << 10,
		ErrorLog:       slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		_ = mgr.Close(context.Background())
		return fmt.Errorf("listening on %s: %w", cfg.Listen, err)
	}
	if err := serveMetrics(bgCtx, cfg, mx, log); err != nil && cfg.MetricsOptional {
		log.Error("serving without /metrics", "err", err)
	} else if err != nil {
		ln.Close()
		_ = mgr.Close(context.Background())
		return err
	}
	log.Info("pandastack serving", "addr", ln.Addr().String(), "data", cfg.DataDir, "runsc", runsc)
	if cfg.Ready != nil {
		cfg.Ready(ln.Addr().String())
	}
	errc := make(chan error, 1)
	go func() {
		if cfg.Network.TLSCert != "" {
			errc <- srv.ServeTLS(ln, cfg.Network.TLSCert, cfg.Network.TLSKey)
			return
		}
		errc <- srv.Serve(ln)
	}()
	select {
	case err = <-errc:
	case <-ctx.Done():
	}
	log.Info("shutting down")
	// In-flight requests get ShutdownGrace; the sandboxes then get their
	// own time (a pause of each at --on-shutdown pause), never shared with
	// requests that may stream for an hour.
	hctx, hcancel := context.WithTimeout(context.Background(), shutdownGrace)
	if serr := srv.Shutdown(hctx); serr != nil {
		srv.Close()
	}
	hcancel()
	mctx, mcancel := context.WithTimeout(context.Background(), sandboxShutdownTimeout(cfg.Sandbox))
	defer mcancel()
	if cerr := mgr.Close(mctx); cerr != nil {
		log.Error("dealing with sandboxes at shutdown", "err", cerr)
	}
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// shutdownGrace is how long in-flight requests get at a graceful stop.
const shutdownGrace = 10 * time.Second

// sandboxShutdownTimeout bounds what a graceful stop does with sandboxes:
// enough for pauses (a checkpoint each, several at a time) at
// --on-shutdown pause, a minute otherwise.
func sandboxShutdownTimeout(c sandbox.Config) time.Duration {
	if c.OnShutdown == sandbox.ShutdownPause {
		d := c.CheckpointTimeout
		if d == 0 {
			d = sandbox.DefaultConfig().CheckpointTimeout
		}
		return d + time.Minute
	}
	return time.Minute
}

// KeyFile is where the first API key is written, readable by root only.
func KeyFile(dataDir string) string { return filepath.Join(dataDir, "api-key") }

// ensureAPIKey creates the first API key when the store has none: only its
// hash is stored, and the key itself is written to the key file (mode
// 0600). It is never printed: the server's output usually ends up in a log
// file that others can read.
func ensureAPIKey(ctx context.Context, st *store.Store, dataDir string, out io.Writer) error {
	n, err := st.CountAPIKeys(ctx)
	if err != nil {
		return err
	}
	if n > 0 {
		return nil
	}
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return fmt.Errorf("generating api key: %w", err)
	}
	key := "ps_" + base64.RawURLEncoding.EncodeToString(b)
	path := KeyFile(dataDir)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(key+"\n"), 0o600); err != nil {
		return fmt.Errorf("writing api key file: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("writing api key file: %w", err)
	}
	if err := st.AddAPIKey(ctx, api.HashKey(key), "default"); err != nil {
		return err
	}
	fmt.Fprintf(out, "Created an API key in %s (readable by root only).\n", path)
	return nil
}

// tuneHost makes cgroup joins fast: cgroup v1 waits for RCU grace periods
// on every join, which expedited RCU cuts from ~20 ms (measured with runsc
// directly on the development machines).
func tuneHost(log *slog.Logger) {
	const p = "/sys/kernel/rcu_expedited"
	if b, err := os.ReadFile(p); err == nil && len(b) > 0 && b[0] == '0' {
		if err := os.WriteFile(p, []byte("1"), 0o644); err != nil {
			log.Warn("enabling expedited RCU", "err", err)
		} else {
			log.Info("enabled expedited RCU for faster sandbox starts", "path", p)
		}
	}
}
