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
		Short:   "Create, inspect, run commands in, snapshot, fork, pause and kill sandboxes",
	}
	cmd.AddCommand(
		newSandboxCreateCmd(),
		newSandboxListCmd(),
		newSandboxGetCmd(),
		newSandboxExecCmd(),
		newSandboxKillCmd(),
		newSandboxTimeoutCmd(),
		newSandboxSnapshotCmd(),
		newSandboxForkCmd(),
		newSandboxPauseCmd(),
		newSandboxResumeCmd(),
		newSandboxPsCmd(),
		newSandboxShellCmd(),
		newSandboxCpCmd(),
		newSandboxRunCodeCmd(),
		newSandboxNetworkCmd(),
		newSandboxURLCmd(),
	)
	return cmd
}

func newSandboxCreateCmd() *cobra.Command {
	var (
		opts          pandastack.CreateOptions
		ttl           int
		env, metadata []string
		asJSON        bool
		network       networkFlags
	)
	cmd := &cobra.Command{
		Use:   "create",
		Short: "Create a sandbox and print its id",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch opts.OnTimeout {
			case "", wire.OnTimeoutKill, wire.OnTimeoutPause:
			default:
				return fmt.Errorf("--on-timeout must be %q or %q, got %q", wire.OnTimeoutKill, wire.OnTimeoutPause, opts.OnTimeout)
			}
			var err error
			if opts.Env, err = parseKV("--env", env); err != nil {
				return err
			}
			if opts.Metadata, err = parseKV("--metadata", metadata); err != nil {
				return err
			}
			opts.TTL = time.Duration(ttl) * time.Second
			if opts.Network, err = network.network("no-egress", false); err != nil {
				return err
			}
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
	f.StringVar(&opts.Template, "template", "", `template to start from (server default "base"; with --snapshot, the snapshot's)`)
	f.StringVar(&opts.SnapshotID, "snapshot", "", "snapshot to start from: its processes continue where they were")
	f.StringVar(&opts.OnTimeout, "on-timeout", "", `what the TTL does: "kill" (the server's default) or "pause"`)
	f.IntVar(&ttl, "ttl", 0, "seconds until the sandbox is destroyed or paused (0: the server's default, 300)")
	f.StringArrayVar(&env, "env", nil, "environment variable K=V of every command (repeatable)")
	f.StringArrayVar(&metadata, "metadata", nil, "metadata K=V stored with the sandbox (repeatable)")
	f.Float64Var(&opts.CPU, "cpu", 0, "CPUs, fractions allowed (0: the server's default)")
	f.IntVar(&opts.MemoryMB, "memory-mb", 0, "memory limit in MiB (0: the server's default)")
	f.IntVar(&opts.DiskMB, "disk-mb", 0, "writable root layer in MiB (0: the server's default)")
	f.IntVar(&opts.Pids, "pids", 0, "cap of processes inside (0: the server's default)")
	f.BoolVar(&asJSON, "json", false, "print the sandbox as JSON instead of its id")
	network.addCreate(f)
	return cmd
}

func newSandboxListCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List running and paused sandboxes",
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
// A paused sandbox has no expiry: its TTL stops while it is paused.
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
		expires := expiresIn(sb.ExpiresAt, now)
		if sb.State == wire.StatePaused {
			expires = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", sb.ID, sb.Template, sb.State, expires)
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
			sb, err := c.Get(cmd.Context(), args[0])
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
		user    string
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
			opts, err := execOptions(timeout, env, cwd, user)
			if err != nil {
				return err
			}
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			// Connect costs a round trip but turns a wrong id into a clear
			// "not found" before anything runs, and resumes a paused
			// sandbox (as the exec itself would).
			sb, err := c.Connect(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return execute(cmd.Context(), cmd, sb, args[1:], opts)
		},
	}
	addExecFlags(cmd, &timeout, &env, &cwd, &user)
	return cmd
}

// addExecFlags adds the flags shared by `sandbox exec` and `run`.
func addExecFlags(cmd *cobra.Command, timeout *float64, env *[]string, cwd *string, user *string) {
	f := cmd.Flags()
	f.StringVarP(user, "user", "u", "", `user to run as: "user" (the default, unprivileged) or "root"`)
	f.Float64Var(timeout, "timeout", 0, "seconds before the command is killed (0: the server's default, 60)")
	f.StringArrayVar(env, "env", nil, "environment variable K=V of the command (repeatable)")
	if cwd != nil {
		f.StringVar(cwd, "cwd", "", "working directory of the command")
	}
}

// execOptions builds the SDK's exec options from flag values.
func execOptions(timeoutSeconds float64, env []string, cwd, user string) (pandastack.ExecOptions, error) {
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
		User:    user,
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
				// Get, not Connect: a paused sandbox is killed as it is.
				sb, err := c.Get(cmd.Context(), id)
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
			sb, err := c.Get(cmd.Context(), args[0])
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

func newSandboxSnapshotCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "snapshot ID",
		Short: "Save a sandbox's memory and files as a snapshot and print its id",
		Long: "Save a sandbox's processes, memory and writable files as a snapshot; the sandbox\n" +
			"keeps running. `sandbox create --snapshot SNAP` starts new sandboxes from it.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			sb, err := getSandbox(cmd, args[0])
			if err != nil {
				return err
			}
			snap, err := sb.Snapshot(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), snap)
			}
			fmt.Fprintln(cmd.OutOrStdout(), snap.ID)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the snapshot as JSON instead of its id")
	return cmd
}

func newSandboxForkCmd() *cobra.Command {
	var (
		count, ttl int
		asJSON     bool
	)
	cmd := &cobra.Command{
		Use:   "fork ID",
		Short: "Copy a running sandbox and print the copies' ids, one a line",
		Long: "Copy a running sandbox: each fork starts with the parent's processes, memory and\n" +
			"files as they are now, but has its own id, TTL, writable layer and fresh\n" +
			"randomness. The parent keeps running.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if count < 1 {
				return fmt.Errorf("--count must be at least 1, got %d", count)
			}
			if ttl < 0 {
				return fmt.Errorf("--ttl must not be negative, got %d", ttl)
			}
			sb, err := getSandbox(cmd, args[0])
			if err != nil {
				return err
			}
			forks, err := sb.Fork(cmd.Context(), pandastack.ForkOptions{Count: count, TTL: time.Duration(ttl) * time.Second})
			if err != nil {
				return err
			}
			if asJSON {
				infos := make([]wire.Sandbox, 0, len(forks))
				for _, f := range forks {
					infos = append(infos, f.Info())
				}
				return printJSON(cmd.OutOrStdout(), infos)
			}
			for _, f := range forks {
				fmt.Fprintln(cmd.OutOrStdout(), f.ID())
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&count, "count", 1, "how many forks to make (1 to 16)")
	f.IntVar(&ttl, "ttl", 0, "seconds each fork lives (0: the parent's TTL setting)")
	f.BoolVar(&asJSON, "json", false, "print the forks as a JSON array instead of their ids")
	return cmd
}

func newSandboxPauseCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "pause ID",
		Short: "Save a sandbox to disk and stop it until it is resumed",
		Long: "Save a sandbox's processes and memory to disk and stop them, freeing their memory;\n" +
			"its TTL stops counting. `sandbox resume`, `sandbox exec` and connecting SDKs resume it.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			sb, err := getSandbox(cmd, args[0])
			if err != nil {
				return err
			}
			if err := sb.Pause(cmd.Context()); err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), sb.Info())
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s paused (%s saved)\n", sb.ID(), formatBytes(sb.Info().PausedBytes))
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the sandbox as JSON")
	return cmd
}

func newSandboxResumeCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "resume ID",
		Short: "Resume a paused sandbox where it stopped; its TTL starts again",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			sb, err := getSandbox(cmd, args[0])
			if err != nil {
				return err
			}
			if err := sb.Resume(cmd.Context()); err != nil {
				return err
			}
			if asJSON {
				return printJSON(cmd.OutOrStdout(), sb.Info())
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s resumed, expires at %s\n", sb.ID(), sb.Info().ExpiresAt.Format(time.RFC3339))
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the sandbox as JSON")
	return cmd
}

// getSandbox returns a handle on sandbox id without resuming it if paused.
// The lookup costs a round trip but turns a wrong id into a clear
// "not found" before anything is done.
func getSandbox(cmd *cobra.Command, id string) (*pandastack.Sandbox, error) {
	c, err := newClient(cmd)
	if err != nil {
		return nil, err
	}
	return c.Get(cmd.Context(), id)
}

// formatBytes writes n in binary units, e.g. "1.5 MiB".
func formatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
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
