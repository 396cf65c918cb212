package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	pandastack "github.com/pandastack/pandastack/sdk/go"
	"github.com/pandastack/pandastack/wire"
)

// newSandboxCmd returns `pandastack sandbox`, the client commands that
// manage sandboxes one call at a time.
func newSandboxCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "sandbox",
		Aliases: []string{"sb"},
		Short:   "Create, inspect, run commands in and kill sandboxes",
	}
	cmd.AddCommand(
		newSandboxCreateCmd(),
		newSandboxListCmd(),
		newSandboxGetCmd(),
		newSandboxExecCmd(),
		newSandboxKillCmd(),
		newSandboxTimeoutCmd(),
	)
	return cmd
}

func newSandboxCreateCmd() *cobra.Command {
	var (
		opts          pandastack.CreateOptions
		ttl           int
		env, metadata []string
		asJSON        bool
	)
	cmd := &cobra.Command{
		Use:   "create",
		Short: "Create a sandbox and print its id",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var err error
			if opts.Env, err = parseKV("--env", env); err != nil {
				return err
			}
			if opts.Metadata, err = parseKV("--metadata", metadata); err != nil {
				return err
			}
			opts.TTL = time.Duration(ttl) * time.Second
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			sb, err := c.Create(cmd.Context(), opts)
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), sb.Info())
			}
			fmt.Fprintln(cmd.OutOrStdout(), sb.ID())
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&opts.Template, "template", "", `template to start from (server default "base")`)
	f.IntVar(&ttl, "ttl", 0, "seconds until the sandbox is destroyed (0: the server's default, 300)")
	f.StringArrayVar(&env, "env", nil, "environment variable K=V of every command (repeatable)")
	f.StringArrayVar(&metadata, "metadata", nil, "metadata K=V stored with the sandbox (repeatable)")
	f.Float64Var(&opts.CPU, "cpu", 0, "CPUs, fractions allowed (0: the server's default)")
	f.IntVar(&opts.MemoryMB, "memory-mb", 0, "memory limit in MiB (0: the server's default)")
	f.BoolVar(&asJSON, "json", false, "print the sandbox as JSON instead of its id")
	return cmd
}

func newSandboxListCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List running sandboxes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			sbs, err := c.List(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				if sbs == nil {
					sbs = []wire.Sandbox{} // [] rather than null, for jq
				}
				return printJSON(cmd.OutOrStdout(), sbs)
			}
			printSandboxTable(cmd.OutOrStdout(), sbs, time.Now())
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the list as JSON")
	return cmd
}

// printSandboxTable writes sbs, oldest first, with expiry relative to now.
func printSandboxTable(w io.Writer, sbs []wire.Sandbox, now time.Time) {
	sbs = slices.Clone(sbs)
	slices.SortFunc(sbs, func(a, b wire.Sandbox) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	fmt.Fprintln(tw, "ID\tTEMPLATE\tSTATE\tEXPIRES")
	for _, sb := range sbs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", sb.ID, sb.Template, sb.State, expiresIn(sb.ExpiresAt, now))
	}
	tw.Flush()
}

// expiresIn describes an expiry time relative to now, to the second.
func expiresIn(t, now time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := t.Sub(now).Round(time.Second)
	if d <= 0 {
		return "now"
	}
	return "in " + d.String()
}

func newSandboxGetCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "get ID",
		Short: "Print a sandbox as JSON",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			sb, err := c.Connect(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return printJSON(cmd.OutOrStdout(), sb.Info())
		},
	}
}

func newSandboxExecCmd() *cobra.Command {
	var (
		timeout float64
		env     []string
		cwd     string
	)
	cmd := &cobra.Command{
		Use:   "exec ID [flags] -- CMD...",
		Short: "Run a command in a sandbox with live output",
		Long: "Run a command in a sandbox, streaming its output, and exit with its exit code.\n" +
			"One CMD argument is a shell command line (run by /bin/sh -c); several are the\n" +
			"program and its arguments, run without a shell. A command that times out exits 124.",
		Example: "  pandastack sandbox exec sb-123 -- 'ls -l /tmp | wc -l'\n" +
			"  pandastack sandbox exec sb-123 --timeout 600 -- python3 train.py --epochs 3",
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			// The sandbox id must come before "--", or a command word could
			// be taken for it.
			if dash := cmd.ArgsLenAtDash(); dash != -1 && dash != 1 {
				return fmt.Errorf("want exactly one sandbox ID before --, got %d arguments", dash)
			}
			opts, err := execOptions(timeout, env, cwd)
			if err != nil {
				return err
			}
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			// Connect costs a round trip but turns a wrong id into a clear
			// "not found" before anything runs.
			sb, err := c.Connect(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return execute(cmd.Context(), cmd, sb, args[1:], opts)
		},
	}
	addExecFlags(cmd, &timeout, &env, &cwd)
	return cmd
}

// addExecFlags adds the flags shared by `sandbox exec` and `run`.
func addExecFlags(cmd *cobra.Command, timeout *float64, env *[]string, cwd *string) {
	f := cmd.Flags()
	f.Float64Var(timeout, "timeout", 0, "seconds before the command is killed (0: the server's default, 60)")
	f.StringArrayVar(env, "env", nil, "environment variable K=V of the command (repeatable)")
	if cwd != nil {
		f.StringVar(cwd, "cwd", "", "working directory of the command")
	}
}

// execOptions builds the SDK's exec options from flag values.
func execOptions(timeoutSeconds float64, env []string, cwd string) (pandastack.ExecOptions, error) {
	if timeoutSeconds < 0 {
		return pandastack.ExecOptions{}, fmt.Errorf("--timeout must not be negative, got %v", timeoutSeconds)
	}
	vars, err := parseKV("--env", env)
	if err != nil {
		return pandastack.ExecOptions{}, err
	}
	return pandastack.ExecOptions{
		Timeout: time.Duration(timeoutSeconds * float64(time.Second)),
		Env:     vars,
		Cwd:     cwd,
	}, nil
}

// execute runs argv in sb, copying its output live to cmd's stdout and
// stderr, and returns ExitCodeError for a non-zero exit code. One argument is
// a shell command line; several are run without a shell.
func execute(ctx context.Context, cmd *cobra.Command, sb *pandastack.Sandbox, argv []string, opts pandastack.ExecOptions) error {
	stdout, stderr := cmd.OutOrStdout(), cmd.ErrOrStderr()
	// Write errors (a closed pipe) are ignored: the command's exit code
	// matters more than output nobody reads.
	opts.OnStdout = func(s string) { io.WriteString(stdout, s) }
	opts.OnStderr = func(s string) { io.WriteString(stderr, s) }
	var (
		res *wire.ExecResult
		err error
	)
	if len(argv) == 1 {
		res, err = sb.Exec(ctx, argv[0], opts)
	} else {
		res, err = sb.ExecArgv(ctx, argv, opts)
	}
	if err != nil {
		return err
	}
	if res.Truncated {
		fmt.Fprintln(stderr, "pandastack: output was truncated at the server's limit")
	}
	if res.TimedOut {
		limit := "its timeout"
		if opts.Timeout > 0 {
			limit = opts.Timeout.String()
		}
		fmt.Fprintf(stderr, "pandastack: command timed out after %s and was killed\n", limit)
		return ExitCodeError{Code: 124}
	}
	if res.ExitCode != 0 {
		return ExitCodeError{Code: res.ExitCode}
	}
	return nil
}

func newSandboxKillCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "kill ID...",
		Short: "Destroy sandboxes",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			// Kill every sandbox named even if one fails, then report all
			// failures.
			var errs []error
			for _, id := range args {
				sb, err := c.Connect(cmd.Context(), id)
				if err == nil {
					err = sb.Kill(cmd.Context())
				}
				errs = append(errs, err)
			}
			return errors.Join(errs...)
		},
	}
}

func newSandboxTimeoutCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "timeout ID SECONDS",
		Short: "Make a sandbox expire SECONDS from now",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			secs, err := strconv.Atoi(args[1])
			if err != nil {
				return fmt.Errorf("parsing SECONDS %q: %w", args[1], err)
			}
			if secs < 1 {
				return fmt.Errorf("SECONDS must be at least 1, got %d", secs)
			}
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			sb, err := c.Connect(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if err := sb.SetTimeout(cmd.Context(), time.Duration(secs)*time.Second); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s expires at %s\n", sb.ID(), sb.Info().ExpiresAt.Format(time.RFC3339))
			return nil
		},
	}
}

// parseKV parses K=V flag values into a map; nil when there are none.
func parseKV(flag string, kvs []string) (map[string]string, error) {
	if len(kvs) == 0 {
		return nil, nil
	}
	m := make(map[string]string, len(kvs))
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("parsing %s %q: want KEY=VALUE", flag, kv)
		}
		m[k] = v
	}
	return m, nil
}

// printJSON writes v as indented JSON.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return fmt.Errorf("writing JSON: %w", err)
	}
	return nil
}
