package cli

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	pandastack "github.com/pandastack/pandastack/sdk/go"
)

// exitInterrupted is the exit code of a run stopped by SIGINT or SIGTERM,
// as a shell reports a child killed by SIGINT (128+2).
const exitInterrupted = 130

// newRunCmd returns `pandastack run`: a throwaway sandbox for one command.
func newRunCmd() *cobra.Command {
	var (
		template string
		ttl      int
		timeout  float64
		env      []string
		user     string
		// interactive and tty are -i and -t: stdin to the command, and a
		// terminal for it (as docker run -it).
		interactiveIn, tty bool
		network            networkFlags
	)
	cmd := &cobra.Command{
		Use:   "run [flags] [--] CMD...",
		Short: "Run one command in a fresh sandbox, then destroy it",
		Long: "Create a sandbox, run a command in it with live output, destroy the sandbox (also\n" +
			"on Ctrl-C) and exit with the command's exit code. One CMD argument is a shell\n" +
			"command line (run by /bin/sh -c); several are the program and its arguments.",
		Example: "  pandastack run -- 'uname -a; id'\n" +
			"  pandastack run --template code-interpreter --timeout 30 python3 -c 'print(6*7)'\n" +
			"  pandastack run -it                          # a login shell, as ssh gives one\n" +
			"  pandastack run -it --template code-interpreter -- python3",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 && !interactiveIn && !tty {
				return fmt.Errorf("requires a command (or -it for a shell)")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			netw, err := network.network("no-egress", false)
			if err != nil {
				return err
			}
			if interactiveIn || tty {
				if timeout != 0 || len(env) > 0 {
					return fmt.Errorf("--timeout and --env do not apply to -i or -t")
				}
				c, err := newClient(cmd)
				if err != nil {
					return err
				}
				return runInteractive(cmd, c, pandastack.CreateOptions{Template: template, TTL: time.Duration(ttl) * time.Second, Network: netw}, args, user, tty)
			}
			opts, err := execOptions(timeout, env, "", user)
			if err != nil {
				return err
			}
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			return runOnce(cmd, c, pandastack.CreateOptions{
				Template: template,
				TTL:      time.Duration(ttl) * time.Second,
				Network:  netw,
			}, args, opts)
		},
	}
	// Flags end at the first word of the command, so that its own flags
	// need no "--": `pandastack run ls -l`.
	cmd.Flags().SetInterspersed(false)
	cmd.Flags().StringVar(&template, "template", "", `template to start from (server default "base")`)
	cmd.Flags().IntVar(&ttl, "ttl", 0, "seconds the sandbox lives at most, should cleanup fail (0: the server's default, 300)")
	cmd.Flags().BoolVarP(&interactiveIn, "interactive", "i", false, "pass stdin to the command (with -t and a terminal: an interactive session, as ssh)")
	cmd.Flags().BoolVarP(&tty, "tty", "t", false, "run the command (by default a login shell) on a terminal when stdin is one: raw mode, window size, exit code")
	addExecFlags(cmd, &timeout, &env, nil, &user)
	network.addCreate(cmd.Flags())
	return cmd
}

// runOnce creates a sandbox, runs argv in it and kills it, whatever happens
// in between, including SIGINT and SIGTERM.
func runOnce(cmd *cobra.Command, c *pandastack.Client, create pandastack.CreateOptions, argv []string, opts pandastack.ExecOptions) error {
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	sb, err := c.Create(ctx, create)
	if err != nil {
		if interrupted(ctx, cmd.Context()) {
			// The server may have created it anyway; its TTL bounds the leak.
			fmt.Fprintf(cmd.ErrOrStderr(), "pandastack: %v while creating the sandbox\n", context.Cause(ctx))
			return ExitCodeError{Code: exitInterrupted}
		}
		return err
	}
	defer func() {
		// Restore the default signal behavior first, so that a second
		// Ctrl-C during the kill ends the process at once.
		stop()
		if err := sb.Close(); err != nil {
			fmt.Fprintf(cmd.ErrOrStderr(), "pandastack: %v; it will expire at %s\n",
				err, sb.Info().ExpiresAt.Format(time.RFC3339))
		}
	}()

	err = execute(ctx, cmd, sb, argv, opts)
	if err != nil && interrupted(ctx, cmd.Context()) {
		fmt.Fprintf(cmd.ErrOrStderr(), "pandastack: %v; killing sandbox %s\n", context.Cause(ctx), sb.ID())
		return ExitCodeError{Code: exitInterrupted}
	}
	return err
}

// interrupted reports whether ctx, made by signal.NotifyContext from parent,
// was cancelled by a signal rather than by parent (before stop is called,
// nothing else cancels it).
func interrupted(ctx, parent context.Context) bool {
	return ctx.Err() != nil && parent.Err() == nil
}

// runInteractive creates a sandbox, runs argv (or a login shell) in it
// connected to this terminal or stdin (see interactive), and kills the
// sandbox, however the session ends.
func runInteractive(cmd *cobra.Command, c *pandastack.Client, create pandastack.CreateOptions, argv []string, user string, tty bool) error {
	// Ctrl-C while the sandbox is made kills it; during the session the
	// keys go to the remote terminal.
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	sb, err := c.Create(ctx, create)
	interruptedCreate := interrupted(ctx, cmd.Context())
	stop()
	if err != nil {
		if interruptedCreate {
			fmt.Fprintf(cmd.ErrOrStderr(), "pandastack: %v while creating the sandbox\n", context.Cause(ctx))
			return ExitCodeError{Code: exitInterrupted}
		}
		return err
	}
	defer func() {
		if err := sb.Close(); err != nil {
			fmt.Fprintf(cmd.ErrOrStderr(), "pandastack: %v; it will expire at %s\n",
				err, sb.Info().ExpiresAt.Format(time.RFC3339))
		}
	}()
	return interactive(cmd.Context(), cmd, sb, argv, user, tty)
}
