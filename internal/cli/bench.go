package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/pandastack/pandastack/internal/daemon"
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
		i := int(p*float64(len(s)) + 0.5)
		if i >= len(s) {
			i = len(s) - 1
		}
		if i > 0 && p == 0.5 && len(s)%2 == 0 {
			return (ms(s[i-1]) + ms(s[i])) / 2
		}
		return ms(s[i])
	}
	f := benchFigure{Name: name, N: len(s), Comment: comment, P50MS: q(0.5), P95MS: q(0.95)}
	if len(s) > 0 {
		f.MinMS, f.MaxMS = ms(s[0]), ms(s[len(s)-1])
	}
	return f
}

func newBenchCmd() *cobra.Command {
	var (
		n, execs, baselineN int
		tmpl, runscPath     string
		asJSON              bool
	)
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure create→first output and exec round trip against a running server",
		Long: `bench measures, in one run and against the server at --url:
  - create → first output: create a sandbox, run "echo ok" with streamed output, and time
    until its first byte arrives (then kill it, untimed), --n times, one at a time;
  - exec round trip: "true" run --execs times in one running sandbox;
  - baseline: "runsc do /bin/true" run --baseline times on this machine (needs root),
    so the figures can be compared across noisy machines.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			if _, err := c.Health(ctx); err != nil {
				return fmt.Errorf("reaching the server: %w", err)
			}
			var figs []benchFigure

			runsc, err := daemon.FindBinary(runscPath, "runsc")
			if err != nil {
				return err
			}
			base, err := benchBaseline(ctx, runsc, baselineN)
			if err != nil {
				return err
			}
			figs = append(figs, figure("baseline: runsc do /bin/true", "same machine, same run", base))

			create, err := benchCreate(ctx, c, tmpl, n)
			if err != nil {
				return err
			}
			figs = append(figs, figure("create → first output", "template "+tmpl+", sequential, no pool", create))

			rt, err := benchExec(ctx, c, tmpl, execs)
			if err != nil {
				return err
			}
			figs = append(figs, figure("exec round trip (true)", "HTTP API, blocking exec, one sandbox", rt))

			if asJSON {
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
	f.IntVar(&n, "n", 30, "sandboxes to create")
	f.IntVar(&execs, "execs", 200, "execs for the round-trip figure")
	f.IntVar(&baselineN, "baseline", 15, "runs of the runsc baseline")
	f.StringVar(&tmpl, "template", "base", "template to create from")
	f.StringVar(&runscPath, "runsc", "", "runsc binary for the baseline")
	f.BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
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
	// One untimed exec loads the binaries (see DESIGN.md).
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
