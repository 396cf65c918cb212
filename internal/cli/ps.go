package cli

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/pandastack/pandastack/wire"
)

// newSandboxPsCmd returns `pandastack sandbox ps ID`: the sandbox's
// background processes.
func newSandboxPsCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "ps ID",
		Short: "List a sandbox's background processes (and terminals)",
		Long: "List the background processes of a sandbox: those started through the API (and\n" +
			"the shells of `sandbox shell`), running or exited in the last 10 minutes.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			sb, err := c.Connect(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			l, err := sb.Processes().List(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				if l == nil {
					l = []wire.Process{}
				}
				return printJSON(cmd.OutOrStdout(), l)
			}
			printProcessTable(cmd.OutOrStdout(), l, time.Now())
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the processes as JSON")
	return cmd
}

// printProcessTable writes processes as a table, oldest first (as the
// server lists them).
func printProcessTable(w io.Writer, l []wire.Process, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	fmt.Fprintln(tw, "PID\tTAG\tUSER\tSTATUS\tSTARTED\tCOMMAND")
	for _, p := range l {
		status := "running"
		if p.State == wire.ProcessExited && p.ExitCode != nil {
			status = "exited " + strconv.Itoa(*p.ExitCode)
			if p.TimedOut {
				status += " (timeout)"
			}
		}
		if p.PTY {
			status += ", tty"
		}
		tag := p.Tag
		if tag == "" {
			tag = "-"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", p.PID, tag, p.User, status, ago(p.StartedAt, now), commandLine(p.Argv))
	}
	tw.Flush()
}

// ago describes t relative to now, to the second.
func ago(t, now time.Time) string {
	d := now.Sub(t).Round(time.Second)
	if d <= 0 {
		return "now"
	}
	return d.String() + " ago"
}

// commandLine shows argv on one line: a shell command line as itself.
func commandLine(argv []string) string {
	if len(argv) == 3 && argv[0] == "/bin/sh" && argv[1] == "-c" {
		argv = argv[2:]
	}
	s := strings.Join(argv, " ")
	s = strings.NewReplacer("\n", "\\n", "\t", " ").Replace(s)
	if len(s) > 80 {
		s = s[:77] + "..."
	}
	return s
}
