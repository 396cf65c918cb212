package cli

import (
	"fmt"
	"io"
	"strconv"
	"text/tabwriter"
	"time"

	pandastack "github.com/pandastack/pandastack/sdk/go"
	"github.com/pandastack/pandastack/wire"
	"github.com/spf13/cobra"
)

func newAuditCmd() *cobra.Command {
	var (
		o      pandastack.AuditOptions
		since  time.Duration
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Show your audit log: who created, exec'd, paused, forked, snapshotted or killed what, and when",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			if since > 0 {
				o.Since = time.Now().Add(-since)
			}
			l, err := c.Audit(cmd.Context(), o)
			if err != nil {
				return err
			}
			if asJSON {
				if l == nil {
					l = []wire.AuditEntry{}
				}
				return printJSON(cmd.OutOrStdout(), l)
			}
			printAuditTable(cmd.OutOrStdout(), l)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.SandboxID, "sandbox", "", "only entries of this sandbox")
	f.StringVar(&o.Action, "action", "", "only this action: create, exec, process, kill, pause, resume, fork, snapshot, delete_snapshot, timeout")
	f.DurationVar(&since, "since", 0, "only entries of the last DURATION (e.g. 1h)")
	f.IntVar(&o.Limit, "limit", 0, "at most this many entries (1–1000; default 100)")
	f.BoolVar(&asJSON, "json", false, "print the entries as JSON")
	return cmd
}

// printAuditTable prints entries newest first, as the server sends them.
func printAuditTable(w io.Writer, l []wire.AuditEntry) {
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	fmt.Fprintln(tw, "TIME\tKEY\tACTION\tSANDBOX\tTARGET\tEXIT\tDURATION\tOUTCOME\tCOMMAND")
	for _, e := range l {
		exit := "-"
		if e.ExitCode != nil {
			exit = strconv.Itoa(*e.ExitCode)
		}
		cmd := e.Command
		if len(cmd) > 60 {
			cmd = cmd[:60] + "…"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%q\n", e.Time.Local().Format(time.RFC3339), e.KeyID, e.Action, e.SandboxID, e.Target,
			exit, (time.Duration(e.DurationMS) * time.Millisecond).String(), e.Outcome, cmd)
	}
	tw.Flush()
}
