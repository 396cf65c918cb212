package cli

import (
	"context"
	"fmt"
	"strings"
	"time"

	pandastack "github.com/pandastack/pandastack/sdk/go"
)

// The code-interpreter figures of `pandastack bench`: how soon a new
// sandbox answers its first cell, beside the cost of importing pandas in a
// fresh process, and a trivial cell's round trip beside an exec's.

// benchPandasCell is the first cell timed: it needs pandas imported.
const benchPandasCell = "import pandas as pd; pd.DataFrame({'a':[1,2]}).sum()"

// benchCodeGap is the untimed pause before each timed create: it lets a
// warm pool refill (a code-interpreter member is restored or booted, then
// its kernel warmed), as between real requests.
const benchCodeGap = 2 * time.Second

// Names of the code figures, which runBench relates to each other.
const (
	benchImportPandas = "baseline: python3 -c 'import pandas' in a fresh sandbox"
	benchFirstResult  = "create → first result (pandas cell)"
)

// benchImportBaseline times `python3 -c 'import pandas'`, the first command
// of a freshly created code-interpreter sandbox, n times.
func benchImportBaseline(ctx context.Context, c *pandastack.Client, n int) ([]time.Duration, error) {
	var out []time.Duration
	for range n {
		sb, err := c.Create(ctx, pandastack.CreateOptions{Template: "code-interpreter", TTL: 2 * time.Minute})
		if err != nil {
			return nil, err
		}
		start := time.Now()
		res, err := sb.ExecArgv(ctx, []string{"python3", "-c", "import pandas"}, pandastack.ExecOptions{Timeout: 5 * time.Minute})
		d := time.Since(start)
		_ = sb.Kill(context.WithoutCancel(ctx))
		if err != nil {
			return nil, err
		}
		if res.ExitCode != 0 {
			return nil, fmt.Errorf("python3 -c 'import pandas' exited %d: %s", res.ExitCode, res.Stderr)
		}
		out = append(out, d)
	}
	return out, nil
}

// benchFirstCell times create → the answer of benchPandasCell in a new
// code-interpreter sandbox, n times, one at a time.
func benchFirstCell(ctx context.Context, c *pandastack.Client, n int) ([]time.Duration, error) {
	// Untimed: the template's snapshot is made on first use, and a pool
	// fills.
	sb, err := c.Create(ctx, pandastack.CreateOptions{Template: "code-interpreter", TTL: 2 * time.Minute})
	if err != nil {
		return nil, err
	}
	_, err = sb.RunCode(ctx, "1", pandastack.RunCodeOptions{Timeout: 5 * time.Minute})
	_ = sb.Kill(context.WithoutCancel(ctx))
	if err != nil {
		return nil, err
	}
	var out []time.Duration
	for range n {
		time.Sleep(benchCodeGap)
		start := time.Now()
		sb, err := c.Create(ctx, pandastack.CreateOptions{Template: "code-interpreter", TTL: 2 * time.Minute})
		if err != nil {
			return nil, err
		}
		exe, err := sb.RunCode(ctx, benchPandasCell, pandastack.RunCodeOptions{Timeout: 5 * time.Minute})
		d := time.Since(start)
		_ = sb.Kill(context.WithoutCancel(ctx))
		if err != nil {
			return nil, err
		}
		if exe.Error != nil || !strings.Contains(exe.Text(), "a    3") {
			return nil, fmt.Errorf("the pandas cell answered %q (error %+v)", exe.Text(), exe.Error)
		}
		out = append(out, d)
	}
	return out, nil
}

// benchCellRoundTrip times n trivial cells (1+1) and n execs of `true`,
// alternately, in one code-interpreter sandbox whose kernel is up.
func benchCellRoundTrip(ctx context.Context, c *pandastack.Client, n int) (cells, execs []time.Duration, err error) {
	sb, err := c.Create(ctx, pandastack.CreateOptions{Template: "code-interpreter", TTL: 10 * time.Minute})
	if err != nil {
		return nil, nil, err
	}
	defer sb.Kill(context.WithoutCancel(ctx))
	// Untimed: the first cell starts the kernel, the first exec loads the
	// binaries.
	if _, err := sb.RunCode(ctx, "1+1", pandastack.RunCodeOptions{Timeout: 5 * time.Minute}); err != nil {
		return nil, nil, err
	}
	if _, err := sb.ExecArgv(ctx, []string{"true"}, pandastack.ExecOptions{}); err != nil {
		return nil, nil, err
	}
	for range n {
		start := time.Now()
		exe, err := sb.RunCode(ctx, "1+1", pandastack.RunCodeOptions{})
		if err != nil {
			return nil, nil, err
		}
		if exe.Text() != "2" {
			return nil, nil, fmt.Errorf("1+1 answered %q", exe.Text())
		}
		cells = append(cells, time.Since(start))
		start = time.Now()
		res, err := sb.ExecArgv(ctx, []string{"true"}, pandastack.ExecOptions{})
		if err != nil {
			return nil, nil, err
		}
		if res.ExitCode != 0 {
			return nil, nil, fmt.Errorf("true exited %d", res.ExitCode)
		}
		execs = append(execs, time.Since(start))
	}
	return cells, execs, nil
}

// benchCodeFigures measures the code figures of one server: the baseline
// and round trips where rest is set (the cold-boot server), the first
// result everywhere.
func benchCodeFigures(ctx context.Context, c *pandastack.Client, o benchOpts, label string, rest bool) ([]benchFigure, error) {
	var figs []benchFigure
	if rest {
		base, err := benchImportBaseline(ctx, c, o.codeN)
		if err != nil {
			return nil, fmt.Errorf("import baseline: %w", err)
		}
		figs = append(figs, figure(benchImportPandas, "exec time of the first command of a new code-interpreter sandbox", base))
	}
	first, err := benchFirstCell(ctx, c, o.codeN)
	if err != nil {
		return nil, fmt.Errorf("first result: %w", err)
	}
	figs = append(figs, figure(benchFirstResult, label+"; blocking run_code of "+benchPandasCell, first))
	if rest {
		cells, execs, err := benchCellRoundTrip(ctx, c, o.execs)
		if err != nil {
			return nil, fmt.Errorf("cell round trip: %w", err)
		}
		figs = append(figs,
			figure("cell round trip (1+1)", "HTTP API, blocking run_code, default context, code-interpreter sandbox", cells),
			figure("exec round trip (true), same sandbox", "alternating with the cells above", execs))
	}
	return figs, nil
}

// relateCodeFigures notes each first-result figure's ratio to the import
// baseline of the same run.
func relateCodeFigures(figs []benchFigure) {
	var base float64
	for _, f := range figs {
		if f.Name == benchImportPandas {
			base = f.P50MS
		}
	}
	if base == 0 {
		return
	}
	for i, f := range figs {
		if f.Name == benchFirstResult {
			figs[i].Comment += fmt.Sprintf("; p50 %.2f× the import baseline", f.P50MS/base)
		}
	}
}
