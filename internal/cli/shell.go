package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"

	"github.com/spf13/cobra"

	pandastack "github.com/pandastack/pandastack/sdk/go"
	"github.com/pandastack/pandastack/wire"
)

// exitConnection is the exit code of a session that ended without the
// remote command's exit code (the connection broke, the sandbox was paused
// or died), as ssh's 255.
const exitConnection = 255

// newSandboxShellCmd returns `pandastack sandbox shell ID`: an interactive
// shell in the user's terminal.
func newSandboxShellCmd() *cobra.Command {
	var user string
	cmd := &cobra.Command{
		Use:   "shell ID [-- CMD...]",
		Short: "Open an interactive shell (or run CMD) in a sandbox, as ssh does",
		Long: "Open the user's login shell in a sandbox on a real terminal: your terminal goes into\n" +
			"raw mode, window-size changes follow, and the shell's exit code is this command's.\n" +
			"With stdin not a terminal (a pipe), no terminal is allocated: stdin feeds the shell\n" +
			"(or CMD), stdout and stderr stay apart. One CMD argument is a shell command line;\n" +
			"several are the program and its arguments. The shell gets SIGHUP if the connection\n" +
			"goes away.",
		Example: "  pandastack sandbox shell sb-123\n" +
			"  pandastack sandbox shell sb-123 --user root\n" +
			"  echo 'uname -a' | pandastack sandbox shell sb-123",
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if dash := cmd.ArgsLenAtDash(); dash != -1 && dash != 1 {
				return fmt.Errorf("want exactly one sandbox ID before --, got %d arguments", dash)
			}
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			sb, err := c.Connect(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return interactive(cmd.Context(), cmd, sb, args[1:], user, true)
		},
	}
	cmd.Flags().StringVarP(&user, "user", "u", "", `user to run as: "user" (the default, unprivileged) or "root"`)
	return cmd
}

// interactive runs argv (or, without it, the user's login shell) in sb
// connected to cmd's stdin, stdout and stderr, and returns its exit code as
// an ExitCodeError. With tty and a terminal on stdin it runs on a remote
// pseudo-terminal with the local one in raw mode; otherwise on pipes.
func interactive(ctx context.Context, cmd *cobra.Command, sb *pandastack.Sandbox, argv []string, user string, tty bool) error {
	if f, ok := cmd.InOrStdin().(*os.File); ok && tty && isTerminal(int(f.Fd())) {
		return terminalSession(ctx, cmd, sb, f, argv, user)
	}
	return pipeSession(ctx, cmd, sb, argv, user)
}

// shellLine turns argv into one shell command line: one argument is one
// already, several are quoted.
func shellLine(argv []string) string {
	if len(argv) == 1 {
		return argv[0]
	}
	q := make([]string, len(argv))
	for i, a := range argv {
		q[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	return strings.Join(q, " ")
}

// loginShellLine runs the user's login shell: the one /etc/passwd names,
// /bin/sh without one.
const loginShellLine = `s=$(getent passwd "$(id -un)" | cut -d: -f7); exec "${s:-/bin/sh}" -l`

// terminalSession runs argv (or a login shell) on a remote terminal of the
// local terminal's size, with the local one in raw mode: every key goes to
// the remote terminal, which echoes and interprets it. The local terminal
// is restored on every way out: the remote exit, a broken connection, an
// error, SIGTERM or SIGHUP to this process, a panic.
func terminalSession(ctx context.Context, cmd *cobra.Command, sb *pandastack.Sandbox, in *os.File, argv []string, user string) error {
	fd := int(in.Fd())
	cols, rows := terminalSize(fd)
	opts := pandastack.TerminalOptions{Cols: cols, Rows: rows, User: user}
	if len(argv) > 0 {
		opts.Cmd = shellLine(argv)
	}
	if cols == 0 || rows == 0 {
		opts.Cols, opts.Rows = 0, 0
	}
	t, err := sb.OpenTerminal(ctx, opts)
	if err != nil {
		return err
	}
	defer t.Close()
	restore, err := makeRaw(fd)
	if err != nil {
		return fmt.Errorf("putting the terminal into raw mode: %w", err)
	}
	var once sync.Once
	restoreOnce := func() { once.Do(restore) }
	defer restoreOnce()

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGWINCH, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGINT)
	defer signal.Stop(sigs)

	// Input: until local EOF, then the remote's (^D); the goroutine may
	// outlive the session blocked in a read of stdin, which the process's
	// exit ends.
	go func() {
		if _, err := io.Copy(t, in); err == nil {
			_ = t.CloseInput(context.Background())
		}
	}()
	out := make(chan error, 1)
	go func() {
		_, err := io.Copy(cmd.OutOrStdout(), t)
		out <- err
	}()
	for {
		select {
		case sig := <-sigs:
			if sig == syscall.SIGWINCH {
				if c, r := terminalSize(fd); c > 0 && r > 0 {
					_ = t.Resize(ctx, c, r)
				}
				continue
			}
			restoreOnce()
			fmt.Fprintf(cmd.ErrOrStderr(), "\r\npandastack: %v: closing the session\r\n", sig)
			return ExitCodeError{Code: 128 + int(sig.(syscall.Signal))}
		case err := <-out:
			code, werr := t.Wait(ctx)
			restoreOnce()
			if werr != nil {
				if err == nil {
					err = werr
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "pandastack: %v\n", werr)
				return ExitCodeError{Code: exitConnection}
			}
			return exitCode(code)
		}
	}
}

// pipeSession runs argv (or a login shell) without a terminal: stdin feeds
// it, its stdout and stderr go to ours. SIGINT and SIGTERM are passed on to
// it; a second one ends the session.
func pipeSession(ctx context.Context, cmd *cobra.Command, sb *pandastack.Sandbox, argv []string, user string) error {
	line := loginShellLine
	if len(argv) > 0 {
		line = shellLine(argv)
	}
	p, err := sb.Start(ctx, line, pandastack.StartOptions{User: user, Stdin: true, Tag: "shell"})
	if err != nil {
		return err
	}
	// sctx ends the session's calls: at its end, or at a second signal.
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	out, err := p.Output(sctx, true)
	if err != nil {
		_ = p.Kill(context.WithoutCancel(ctx))
		return err
	}
	defer out.Close()

	// Input until local EOF, then the remote's; the goroutine may outlive
	// the session blocked in a read of stdin, which the process's exit
	// ends.
	go func() {
		buf := make([]byte, 32<<10)
		in := cmd.InOrStdin()
		for {
			n, err := in.Read(buf)
			if n > 0 {
				if p.SendStdin(sctx, buf[:n]) != nil {
					return
				}
			}
			if err != nil {
				_ = p.CloseStdin(sctx)
				return
			}
		}
	}()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	done := make(chan struct{})
	defer close(done)
	go func() {
		for forwarded := 0; ; forwarded++ {
			select {
			case <-done:
				return
			case sig := <-sigs:
				if forwarded > 0 {
					// The command did not end: stop waiting for it.
					_ = p.Kill(context.WithoutCancel(ctx))
					cancel()
					return
				}
				name := "TERM"
				if sig == syscall.SIGINT {
					name = "INT"
				}
				_ = p.Signal(sctx, name)
			}
		}
	}()

	stdout, stderr := cmd.OutOrStdout(), cmd.ErrOrStderr()
	for {
		ev, err := out.Next()
		if err != nil {
			fmt.Fprintf(stderr, "pandastack: %v\n", err)
			return ExitCodeError{Code: exitConnection}
		}
		switch ev.Type {
		case wire.EventStdout:
			io.WriteString(stdout, ev.Data)
		case wire.EventStderr:
			io.WriteString(stderr, ev.Data)
		case wire.EventExit:
			if ev.Process == nil || ev.Process.ExitCode == nil {
				return errors.New("the process ended without an exit code")
			}
			return exitCode(*ev.Process.ExitCode)
		}
	}
}

// exitCode is the error for a remote exit code: nil for 0.
func exitCode(code int) error {
	if code == 0 {
		return nil
	}
	return ExitCodeError{Code: code}
}
