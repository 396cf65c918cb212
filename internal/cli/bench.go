package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/sandbox"
	pandastack "github.com/pandastack/pandastack/sdk/go"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
)

// benchFigure is one measured series.
type benchFigure struct {
	Name    string  `json:"name"`
	N       int     `json:"n"`
	P50MS   float64 `json:"p50_ms"`
	P95MS   float64 `json:"p95_ms"`
	MinMS   float64 `json:"min_ms"`
	MaxMS   float64 `json:"max_ms"`
	Comment string  `json:"comment"`
}

func figure(name, comment string, d []time.Duration) benchFigure {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	ms := func(x time.Duration) float64 { return float64(x.Microseconds()) / 1000 }
	q := func(p float64) float64 {
		if len(s) == 0 {
			return 0
		}
		// Nearest rank.
		i := int(p*float64(len(s))+0.999999) - 1
		return ms(s[min(max(i, 0), len(s)-1)])
	}
	f := benchFigure{Name: name, N: len(s), Comment: comment, P50MS: q(0.5), P95MS: q(0.95)}
	if len(s) > 0 {
		f.MinMS, f.MaxMS = ms(s[0]), ms(s[len(s)-1])
	}
	return f
}

type benchOpts struct {
	n, execs, baselineN, forks int
	density, rateN             int
	// codeN is how many creates the code-interpreter figures time (0:
	// none).
	codeN int
	// filesMB is the size of the file the upload and download figures
	// move (0: skip them).
	filesMB                 int
	tmpl, runscPath         string
	self, asJSON, skipLarge bool
	// netN is how many creates each networking create figure times (0:
	// no networking figures); netMB the size of the file downloaded
	// through an exposed port (0: no HTTP figures); networkOnly skips
	// everything but the baseline and the networking figures.
	netN, netMB int
	networkOnly bool
}

func newBenchCmd() *cobra.Command {
	var o benchOpts
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure create, exec, snapshot, fork and resume latencies beside a runsc baseline",
		Long: `bench measures, in one run:
  - baseline: "runsc do /bin/true" (needs root), so figures compare across noisy machines;
  - create → first output: create a sandbox, run "echo ok" streamed, time until its first
    byte arrives (then kill it, untimed), --n times, one at a time;
  - exec round trip: "true" run --execs times in one sandbox;
  - snapshot, resume (after an untimed pause) and fork of a sandbox whose Python process
    holds 200 MB (template code-interpreter);
  - code interpreter: create → first result of a pandas cell (run_code), beside
    "python3 -c 'import pandas'" run in a fresh sandbox, and a trivial cell's round trip
    (1+1) beside an exec of "true" in the same sandbox;
  - networking (--self only): create → first output with and without a network (egress
    "none"), interleaved on one networked server, and HTTP through an exposed port (a file
    downloaded and small requests) beside the same on the host's loopback. That server's
    sandbox traffic leaves from an empty network namespace the bench makes: nothing can
    leave the machine.
By default (--self) it starts its own servers in temporary data directories, sharing the
installed templates, in three configurations: cold boot, template snapshots, and a warm
pool. With --self=false it measures the server at --url as it is configured.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			figs, err := runBench(cmd, o)
			if err != nil {
				return err
			}
			if o.asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(figs)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "FIGURE\tN\tP50 ms\tP95 ms\tMIN ms\tMAX ms\tNOTE")
			for _, f := range figs {
				fmt.Fprintf(tw, "%s\t%d\t%.1f\t%.1f\t%.1f\t%.1f\t%s\n", f.Name, f.N, f.P50MS, f.P95MS, f.MinMS, f.MaxMS, f.Comment)
			}
			return tw.Flush()
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.n, "n", 30, "sandboxes to create per configuration")
	f.IntVar(&o.execs, "execs", 200, "execs for the round-trip figure")
	f.IntVar(&o.baselineN, "baseline", 15, "runs of the runsc baseline")
	f.IntVar(&o.forks, "forks", 5, "snapshots, forks and resumes to time")
	f.StringVar(&o.tmpl, "template", "base", "template to create from")
	f.StringVar(&o.runscPath, "runsc", "", "runsc binary")
	f.BoolVar(&o.self, "self", true, "start own servers (needs root and the installed templates)")
	f.BoolVar(&o.skipLarge, "skip-large", false, "skip the 200 MB fork figures")
	f.IntVar(&o.density, "density", 200, "idle sandboxes to hold at once for the memory-per-sandbox figure (0: skip)")
	f.IntVar(&o.rateN, "rate", 120, "creates by 4 concurrent clients for the sustained-rate figure (0: skip)")
	f.IntVar(&o.codeN, "code-n", 10, "creates timed for each code-interpreter figure (0: skip them)")
	f.IntVar(&o.filesMB, "files-mb", 256, "MB of the file for the upload and download throughput figures (0: skip them)")
	f.IntVar(&o.netN, "net-n", 20, "creates timed with and without a network for the networking figures (0: skip them)")
	f.IntVar(&o.netMB, "net-mb", 256, "MB of the file downloaded through an exposed port (0: skip the HTTP figures)")
	f.BoolVar(&o.networkOnly, "network-only", false, "measure only the baseline and the networking figures")
	f.BoolVar(&o.asJSON, "json", false, "print JSON")
	return cmd
}

func runBench(cmd *cobra.Command, o benchOpts) ([]benchFigure, error) {
	ctx := cmd.Context()
	runsc, err := daemon.FindBinary(o.runscPath, "runsc")
	if err != nil {
		return nil, err
	}
	base, err := benchBaseline(ctx, runsc, o.baselineN)
	if err != nil {
		return nil, err
	}
	figs := []benchFigure{figure("baseline: runsc do /bin/true", "same machine, same run", base)}
	if !o.self {
		c, err := newClient(cmd)
		if err != nil {
			return nil, err
		}
		more, err := benchServer(ctx, c, o, "server at --url", true)
		figs = append(figs, more...)
		relateCodeFigures(figs)
		return figs, err
	}
	configs := []struct {
		name  string
		mut   func(*sandbox.Config)
		rest  bool // also measure exec, snapshot, fork, resume
		label string
	}{
		// The server's default configuration has a warm pool: turned off
		// where the figure is about what a create costs without one.
		{"cold boot", func(c *sandbox.Config) { c.PoolSize = 0 }, true, "no pool, no template snapshot"},
		{"template snapshot", func(c *sandbox.Config) { c.TemplateSnapshots = true; c.PoolSize = 0 }, false, "creates restore the template's snapshot"},
		{"warm pool", func(c *sandbox.Config) { c.TemplateSnapshots = true; c.PoolSize = 4 }, false, "pool of 4, 300 ms between creates"},
	}
	if o.networkOnly {
		configs = nil
	}
	for _, cf := range configs {
		c, stop, err := benchStartServer(ctx, runsc, cf.mut)
		if err != nil {
			return nil, fmt.Errorf("starting %s server: %w", cf.name, err)
		}
		more, err := benchServer(ctx, c, o, cf.name+": "+cf.label, cf.rest)
		stop()
		if err != nil {
			return nil, err
		}
		figs = append(figs, more...)
	}
	if o.netN > 0 {
		more, err := benchNetwork(ctx, runsc, o)
		if err != nil {
			return nil, fmt.Errorf("networking figures: %w", err)
		}
		figs = append(figs, more...)
	}
	relateCodeFigures(figs)
	relateNetworkFigures(figs)
	return figs, nil
}

// benchStartServer runs a daemon in this process on a temporary data
// directory, sharing the installed templates.
func benchStartServer(ctx context.Context, runsc string, mut func(*sandbox.Config)) (*pandastack.Client, func(), error) {
	return benchStartServerWith(ctx, runsc, func(c *daemon.Config) { mut(&c.Sandbox) })
}

// benchStartServerWith is benchStartServer with the whole daemon
// configuration to change.
func benchStartServerWith(ctx context.Context, runsc string, mut func(*daemon.Config)) (*pandastack.Client, func(), error) {
	dir, err := os.MkdirTemp("", "pandastack-bench-")
	if err != nil {
		return nil, nil, err
	}
	cfg := daemon.Config{
		DataDir: dir, Listen: "127.0.0.1:0", Runsc: runsc,
		TemplateDir: filepath.Join(envOr("PANDASTACK_DATA_DIR", daemon.DefaultDataDir), "templates"),
		Sandbox:     sandbox.DefaultConfig(), CgroupParent: "/pandastack-bench",
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	mut(&cfg)
	addrc := make(chan string, 1)
	cfg.Ready = func(a string) { addrc <- a }
	sctx, cancel := context.WithCancel(ctx)
	errc := make(chan error, 1)
	go func() { errc <- daemon.Run(sctx, cfg) }()
	stop := func() {
		cancel()
		<-errc
		_ = unix.Unmount(filepath.Join(dir, "runtime", "runsc", "null-netns"), unix.MNT_DETACH)
		os.RemoveAll(dir)
	}
	select {
	case addr := <-addrc:
		key, err := os.ReadFile(daemon.KeyFile(dir))
		if err != nil {
			stop()
			return nil, nil, err
		}
		c, err := pandastack.NewClient(pandastack.WithURL("http://"+addr), pandastack.WithAPIKey(strings.TrimSpace(string(key))))
		if err != nil {
			stop()
			return nil, nil, err
		}
		return c, stop, nil
	case err := <-errc:
		cancel()
		os.RemoveAll(dir)
		return nil, nil, err
	}
}

// benchServer measures one server.
func benchServer(ctx context.Context, c *pandastack.Client, o benchOpts, label string, rest bool) ([]benchFigure, error) {
	// One untimed create warms the server (template snapshot, pool).
	if err := benchWarm(ctx, c, o.tmpl); err != nil {
		return nil, err
	}
	create, err := benchCreate(ctx, c, o.tmpl, o.n)
	if err != nil {
		return nil, err
	}
	figs := []benchFigure{figure("create → first output", label+"; template "+o.tmpl, create)}
	if o.codeN > 0 {
		code, err := benchCodeFigures(ctx, c, o, label, rest)
		if err != nil {
			return nil, err
		}
		figs = append(figs, code...)
	}
	if !rest {
		return figs, nil
	}
	rt, err := benchExec(ctx, c, o.tmpl, o.execs)
	if err != nil {
		return nil, err
	}
	figs = append(figs, figure("exec round trip (true)", "HTTP API, blocking exec, one sandbox", rt))
	if o.filesMB > 0 {
		ff, err := benchFiles(ctx, c, o.tmpl, o.filesMB)
		if err != nil {
			return nil, err
		}
		figs = append(figs, ff...)
	}
	snap, size, resume, err := benchSnapshotResume(ctx, c, o.tmpl, o.forks)
	if err != nil {
		return nil, err
	}
	figs = append(figs,
		figure("snapshot", fmt.Sprintf("idle %s sandbox; %.1f MB on disk each", o.tmpl, float64(size)/1e6), snap),
		figure("resume after pause", "idle "+o.tmpl+" sandbox; until the resume call returns", resume))
	if o.rateN > 0 {
		lat, rate, err := benchRate(ctx, c, o.tmpl, o.rateN, 4)
		if err != nil {
			return nil, err
		}
		figs = append(figs, figure("create, 4 concurrent clients", fmt.Sprintf("%.1f creates/s sustained", rate), lat))
	}
	if o.density > 0 {
		per, err := benchDensity(ctx, c, o.tmpl, o.density)
		if err != nil {
			return nil, err
		}
		figs = append(figs, benchFigure{Name: "idle sandbox memory", N: o.density,
			Comment: fmt.Sprintf("%.1f MiB of host memory each (MemAvailable drop with %d idle sandboxes)", per, o.density)})
	}
	if !o.skipLarge {
		fork, resume200, size200, err := benchLarge(ctx, c, o.forks)
		if err != nil {
			return nil, err
		}
		figs = append(figs,
			figure("fork of a 200 MB sandbox", fmt.Sprintf("count 1, Python holding 200 MB; snapshot %.0f MB", float64(size200)/1e6), fork),
			figure("resume of a 200 MB sandbox", "after an untimed pause", resume200))
	}
	return figs, nil
}

func benchWarm(ctx context.Context, c *pandastack.Client, tmpl string) error {
	sb, err := c.Create(ctx, pandastack.CreateOptions{Template: tmpl, TTL: time.Minute})
	if err != nil {
		return err
	}
	_, err = sb.Exec(ctx, "true", pandastack.ExecOptions{})
	_ = sb.Kill(context.WithoutCancel(ctx))
	return err
}

func benchBaseline(ctx context.Context, runsc string, n int) ([]time.Duration, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("the runsc baseline needs root")
	}
	root, err := os.MkdirTemp("", "pandastack-bench-")
	if err != nil {
		return nil, err
	}
	defer func() {
		_ = unix.Unmount(filepath.Join(root, "null-netns"), unix.MNT_DETACH)
		os.RemoveAll(root)
	}()
	var out []time.Duration
	for range n {
		start := time.Now()
		c := exec.CommandContext(ctx, runsc, "--root="+root, "--platform=systrap", "--network=none", "do", "/bin/true")
		if b, err := c.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("running baseline runsc do: %w: %s", err, b)
		}
		out = append(out, time.Since(start))
	}
	return out, nil
}

func benchCreate(ctx context.Context, c *pandastack.Client, tmpl string, n int) ([]time.Duration, error) {
	var out []time.Duration
	for range n {
		// Untimed: lets a warm pool refill, as between real requests.
		time.Sleep(300 * time.Millisecond)
		start := time.Now()
		sb, err := c.Create(ctx, pandastack.CreateOptions{Template: tmpl, TTL: 2 * time.Minute})
		if err != nil {
			return nil, err
		}
		var once sync.Once
		var first time.Duration
		_, err = sb.Exec(ctx, "echo ok", pandastack.ExecOptions{OnStdout: func(string) {
			once.Do(func() { first = time.Since(start) })
		}})
		_ = sb.Kill(context.WithoutCancel(ctx))
		if err != nil {
			return nil, err
		}
		out = append(out, first)
	}
	return out, nil
}

func benchExec(ctx context.Context, c *pandastack.Client, tmpl string, n int) ([]time.Duration, error) {
	sb, err := c.Create(ctx, pandastack.CreateOptions{Template: tmpl, TTL: 5 * time.Minute})
	if err != nil {
		return nil, err
	}
	defer sb.Kill(context.WithoutCancel(ctx))
	// One untimed exec loads the binaries: the first exec in a fresh
	// sandbox is ~9 ms slower (docs/BENCHMARKS.md).
	if _, err := sb.ExecArgv(ctx, []string{"true"}, pandastack.ExecOptions{}); err != nil {
		return nil, err
	}
	var out []time.Duration
	for range n {
		start := time.Now()
		res, err := sb.ExecArgv(ctx, []string{"true"}, pandastack.ExecOptions{})
		if err != nil {
			return nil, err
		}
		if res.ExitCode != 0 {
			return nil, fmt.Errorf("true exited %d", res.ExitCode)
		}
		out = append(out, time.Since(start))
	}
	return out, nil
}

// benchSnapshotResume times snapshots of, and resumes after pauses of, one
// idle sandbox.
func benchSnapshotResume(ctx context.Context, c *pandastack.Client, tmpl string, n int) (snap []time.Duration, size int64, resume []time.Duration, err error) {
	sb, err := c.Create(ctx, pandastack.CreateOptions{Template: tmpl, TTL: 5 * time.Minute})
	if err != nil {
		return nil, 0, nil, err
	}
	defer sb.Kill(context.WithoutCancel(ctx))
	if _, err := sb.Exec(ctx, "true", pandastack.ExecOptions{}); err != nil {
		return nil, 0, nil, err
	}
	for range n {
		start := time.Now()
		sn, err := sb.Snapshot(ctx)
		if err != nil {
			return nil, 0, nil, err
		}
		snap = append(snap, time.Since(start))
		size = sn.SizeBytes
		_ = c.DeleteSnapshot(ctx, sn.ID)
	}
	for range n {
		if err := sb.Pause(ctx); err != nil {
			return nil, 0, nil, err
		}
		start := time.Now()
		if err := sb.Resume(ctx); err != nil {
			return nil, 0, nil, err
		}
		resume = append(resume, time.Since(start))
	}
	return snap, size, resume, nil
}

// benchLarge times forks and resumes of a sandbox whose Python process
// holds 200 MB.
func benchLarge(ctx context.Context, c *pandastack.Client, n int) (fork, resume []time.Duration, size int64, err error) {
	sb, err := c.Create(ctx, pandastack.CreateOptions{Template: "code-interpreter", MemoryMB: 2048, TTL: 5 * time.Minute})
	if err != nil {
		return nil, nil, 0, err
	}
	defer sb.Kill(context.WithoutCancel(ctx))
	const hold = `python3 -c 'import os, time
data = bytearray(os.urandom(1 << 20)) * 200
open("/tmp/ready", "w").write("1")
time.sleep(10**6)' >/dev/null 2>&1 &
while [ ! -s /tmp/ready ]; do sleep 0.05; done`
	if res, err := sb.Exec(ctx, hold, pandastack.ExecOptions{Timeout: time.Minute}); err != nil || res.ExitCode != 0 {
		return nil, nil, 0, fmt.Errorf("starting the 200 MB process: %v %+v", err, res)
	}
	for range n {
		start := time.Now()
		kids, err := sb.Fork(ctx, pandastack.ForkOptions{Count: 1, TTL: time.Minute})
		if err != nil {
			return nil, nil, 0, err
		}
		fork = append(fork, time.Since(start))
		for _, k := range kids {
			_ = k.Kill(context.WithoutCancel(ctx))
		}
	}
	sn, err := sb.Snapshot(ctx)
	if err != nil {
		return nil, nil, 0, err
	}
	size = sn.SizeBytes
	_ = c.DeleteSnapshot(ctx, sn.ID)
	for range n {
		if err := sb.Pause(ctx); err != nil {
			return nil, nil, 0, err
		}
		start := time.Now()
		if err := sb.Resume(ctx); err != nil {
			return nil, nil, 0, err
		}
		resume = append(resume, time.Since(start))
	}
	return fork, resume, size, nil
}

// benchRate creates n sandboxes from `clients` concurrent clients, all held
// until the end, and returns each create's latency and the overall rate.
func benchRate(ctx context.Context, c *pandastack.Client, tmpl string, n, clients int) ([]time.Duration, float64, error) {
	var (
		mu   sync.Mutex
		lat  []time.Duration
		sbs  []*pandastack.Sandbox
		errs []error
		wg   sync.WaitGroup
	)
	start := time.Now()
	for w := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += clients {
				t := time.Now()
				sb, err := c.Create(ctx, pandastack.CreateOptions{Template: tmpl, TTL: 5 * time.Minute})
				mu.Lock()
				if err != nil {
					errs = append(errs, err)
				} else {
					lat = append(lat, time.Since(t))
					sbs = append(sbs, sb)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	rate := float64(len(sbs)) / time.Since(start).Seconds()
	for _, sb := range sbs {
		_ = sb.Kill(context.WithoutCancel(ctx))
	}
	if len(errs) > 0 {
		return nil, 0, fmt.Errorf("%d of %d creates failed, first: %w", len(errs), n, errs[0])
	}
	return lat, rate, nil
}

// memAvailableMiB reads MemAvailable from /proc/meminfo.
func memAvailableMiB() (float64, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "MemAvailable:"); ok {
			var kb float64
			if _, err := fmt.Sscan(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), &kb); err != nil {
				return 0, err
			}
			return kb / 1024, nil
		}
	}
	return 0, fmt.Errorf("no MemAvailable in /proc/meminfo")
}

// benchDensity holds n idle sandboxes (each has run one command) and
// returns the host memory each costs.
func benchDensity(ctx context.Context, c *pandastack.Client, tmpl string, n int) (float64, error) {
	before, err := memAvailableMiB()
	if err != nil {
		return 0, err
	}
	var sbs []*pandastack.Sandbox
	defer func() {
		for _, sb := range sbs {
			_ = sb.Kill(context.WithoutCancel(ctx))
		}
	}()
	for range n {
		sb, err := c.Create(ctx, pandastack.CreateOptions{Template: tmpl, TTL: 10 * time.Minute})
		if err != nil {
			return 0, err
		}
		sbs = append(sbs, sb)
		if _, err := sb.ExecArgv(ctx, []string{"true"}, pandastack.ExecOptions{}); err != nil {
			return 0, err
		}
	}
	time.Sleep(2 * time.Second)
	after, err := memAvailableMiB()
	if err != nil {
		return 0, err
	}
	return (before - after) / float64(n), nil
}
