package cli

import (
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/sandbox"
	"github.com/spf13/cobra"
)

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func newServeCmd() *cobra.Command {
	cfg := daemon.Config{Sandbox: sandbox.DefaultConfig()}
	var debug bool
	var logFormat string
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the PandaStack server",
		Long: `Run the PandaStack server: the HTTP API on 127.0.0.1, state in SQLite under the data
directory, sandboxes in gVisor. On first start it creates an API key and writes it to
<data-dir>/api-key (mode 0600); the key is never printed. SIGINT or SIGTERM stops it
gracefully: in-flight requests get 10 s, then running sandboxes are destroyed, paused or
kept (--on-shutdown); paused sandboxes are always kept.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			level := slog.LevelInfo
			if debug {
				level = slog.LevelDebug
			}
			opts := &slog.HandlerOptions{Level: level}
			switch logFormat {
			case "text":
				cfg.Log = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), opts))
			case "json":
				cfg.Log = slog.New(slog.NewJSONHandler(cmd.ErrOrStderr(), opts))
			default:
				return fmt.Errorf("--log-format must be text or json, got %q", logFormat)
			}
			cfg.Out = cmd.OutOrStdout()
			cfg.Version = Version
			switch cfg.Sandbox.OnShutdown {
			case sandbox.ShutdownKill, sandbox.ShutdownPause, sandbox.ShutdownKeep:
			default:
				return fmt.Errorf("--on-shutdown must be kill, pause or keep, got %q", cfg.Sandbox.OnShutdown)
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			// The default metrics address may be held by another server on
			// this machine: then this one runs without /metrics (logged).
			// An address the operator chose must open.
			_, fromEnv := os.LookupEnv("PANDASTACK_METRICS_LISTEN")
			cfg.MetricsOptional = !cmd.Flags().Changed("metrics-listen") && !fromEnv
			return daemon.Run(ctx, cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.Listen, "listen", envOr("PANDASTACK_LISTEN", daemon.DefaultListen), "address to serve the API on ($PANDASTACK_LISTEN)")
	f.StringVar(&cfg.DataDir, "data-dir", envOr("PANDASTACK_DATA_DIR", daemon.DefaultDataDir), "state, templates and sandboxes ($PANDASTACK_DATA_DIR)")
	f.StringVar(&cfg.TemplateDir, "template-dir", os.Getenv("PANDASTACK_TEMPLATE_DIR"), "built templates (default <data-dir>/templates; $PANDASTACK_TEMPLATE_DIR)")
	f.StringVar(&cfg.Runsc, "runsc", os.Getenv("PANDASTACK_RUNSC"), "runsc binary (default: "+daemon.DefaultLibDir+"/runsc, beside this binary, or PATH)")
	f.StringVar(&cfg.AgentBinary, "agent", os.Getenv("PANDASTACK_AGENT"), "agent binary (default: "+daemon.DefaultLibDir+"/pandastack-agent, beside this binary, or PATH)")
	f.StringVar(&cfg.Mirror, "mirror", "", "Debian mirror for template builds")
	f.BoolVar(&cfg.BuildTemplates, "build-templates", true, "build missing templates in the background")
	f.DurationVar(&cfg.Sandbox.DefaultTTL, "default-ttl", cfg.Sandbox.DefaultTTL, "TTL of a sandbox created without one")
	f.DurationVar(&cfg.Sandbox.MaxTTL, "max-ttl", cfg.Sandbox.MaxTTL, "largest TTL a sandbox may have")
	f.IntVar(&cfg.Sandbox.MaxSandboxes, "max-sandboxes", cfg.Sandbox.MaxSandboxes, "most sandboxes running at once")
	f.Float64Var(&cfg.Sandbox.MaxCPU, "max-cpu", cfg.Sandbox.MaxCPU, "most CPUs a sandbox may ask for")
	f.IntVar(&cfg.Sandbox.MaxMemoryMB, "max-memory-mb", cfg.Sandbox.MaxMemoryMB, "most memory (MiB) a sandbox may ask for")
	f.IntVar(&cfg.Sandbox.DiskMB, "disk-mb", cfg.Sandbox.DiskMB, "default size of a sandbox's writable layer (MiB)")
	f.IntVar(&cfg.Sandbox.MaxDiskMB, "max-disk-mb", cfg.Sandbox.MaxDiskMB, "largest writable layer a sandbox may ask for (MiB)")
	f.IntVar(&cfg.Sandbox.Pids, "pids", cfg.Sandbox.Pids, "default cap of processes per sandbox")
	f.IntVar(&cfg.Sandbox.MaxPids, "max-pids", cfg.Sandbox.MaxPids, "largest process cap a sandbox may ask for")
	f.DurationVar(&cfg.Sandbox.ReapInterval, "reap-interval", time.Second, "how often expired sandboxes are destroyed")
	f.BoolVar(&cfg.Sandbox.TemplateSnapshots, "template-snapshots", false, "create sandboxes by restoring a per-template snapshot taken after the template's warm-up (measured no faster here: docs/BENCHMARKS.md)")
	f.IntVar(&cfg.Sandbox.PoolSize, "warm-pool", cfg.Sandbox.PoolSize, "warm, unclaimed sandboxes kept per template; a create with default limits takes one over (0: none)")
	f.StringSliceVar(&cfg.Sandbox.PoolTemplates, "warm-pool-templates", nil, "templates that get a warm pool (default: all)")
	f.StringVar(&cfg.Sandbox.OnShutdown, "on-shutdown", sandbox.ShutdownKill, "what SIGTERM does with running sandboxes: kill, pause (saved, resumed on demand by the next server) or keep (left running for the next server to re-adopt); paused ones are always kept")
	f.DurationVar(&cfg.Sandbox.PausedTTL, "paused-ttl", cfg.Sandbox.PausedTTL, "how long a paused sandbox is kept before it is deleted")
	f.DurationVar(&cfg.Sandbox.SnapshotTTL, "snapshot-ttl", cfg.Sandbox.SnapshotTTL, "default and longest life of a snapshot")
	f.IntVar(&cfg.Sandbox.MaxStoredMB, "max-stored-mb", cfg.Sandbox.MaxStoredMB, "most disk (MiB) one tenant's snapshots and paused sandboxes may use")
	f.IntVar(&cfg.Sandbox.MinFreeDiskMB, "min-free-disk-mb", cfg.Sandbox.MinFreeDiskMB, "free space (MiB) on the data disk that creates, pauses, snapshots and forks never use")
	f.IntVar(&cfg.Sandbox.MaxExecsPerSandbox, "max-execs-per-sandbox", cfg.Sandbox.MaxExecsPerSandbox, "most commands running at once in one sandbox")
	f.DurationVar(&cfg.Sandbox.CheckpointTimeout, "checkpoint-timeout", cfg.Sandbox.CheckpointTimeout, "longest one pause, snapshot or fork may take to save a sandbox")
	f.IntVar(&cfg.MaxOutputBytes, "max-output-bytes", 10<<20, "cap on each of stdout and stderr of one exec (the rest is dropped, the result says truncated)")
	f.IntVar(&cfg.MaxConcurrentExecs, "max-concurrent-execs", 1024, "most commands running at once on the server; more are refused with 429")
	f.Int64Var(&cfg.MaxBufferedOutputBytes, "max-buffered-output-bytes", 256<<20, "output all blocking execs together may hold in memory; past it their output is truncated (streamed execs are not limited)")
	f.BoolVar(&cfg.Network.Enabled, "network", true, "let sandboxes that ask for a network have one (a network namespace each, nftables rules on the host, IPv4 forwarding on)")
	f.StringVar(&cfg.Network.Namespace, "network-namespace", "", "network namespace (path) sandbox traffic leaves from (default: the server's own)")
	f.IntVar(&cfg.Network.PoolSize, "network-pool", 2, "network slots kept prepared, so creates with a network do not wait for one")
	f.StringVar(&cfg.Network.Domain, "domain", "", "serve sandboxes' ports at {port}-{id}.DOMAIN too (a wildcard DNS record must point at this server)")
	f.StringVar(&cfg.Network.TLSCert, "tls-cert", "", "certificate (PEM) to serve HTTPS with (a wildcard one for --domain)")
	f.StringVar(&cfg.Network.TLSKey, "tls-key", "", "key (PEM) of --tls-cert")
	f.StringSliceVar(&cfg.Network.Resolvers, "dns", nil, "upstream DNS servers (ip:port) for sandboxes (default: the host's /etc/resolv.conf)")
	f.BoolVar(&debug, "debug", false, "log every request")
	f.StringVar(&logFormat, "log-format", "text", "log format: text or json (one JSON object per line; request lines carry request_id, also sent in X-Request-Id)")
	f.StringVar(&cfg.MetricsListen, "metrics-listen", envOr("PANDASTACK_METRICS_LISTEN", daemon.DefaultMetricsListen), "address to serve Prometheus /metrics on, unauthenticated (it names tenants: keep it on loopback or a private network; \"\" turns it off; $PANDASTACK_METRICS_LISTEN)")
	f.DurationVar(&cfg.Sandbox.MetricsInterval, "metrics-interval", cfg.Sandbox.MetricsInterval, "how often each running sandbox's CPU, memory, disk and processes are sampled (GET /v1/sandboxes/{id}/metrics)")
	f.IntVar(&cfg.Sandbox.MetricsSamples, "metrics-samples", cfg.Sandbox.MetricsSamples, "samples kept per sandbox")
	f.DurationVar(&cfg.Sandbox.AuditRetention, "audit-retention", cfg.Sandbox.AuditRetention, "how long audit log entries are kept (older ones are deleted by the reaper)")
	return cmd
}
