package cli

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/pandastack/pandastack/wire"
)

// newSnapshotCmd returns `pandastack snapshot`, the client commands that
// manage saved snapshots; `sandbox snapshot` makes them and
// `sandbox create --snapshot` starts sandboxes from them.
func newSnapshotCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:     "snapshot",
		Aliases: []string{"snap"},
		Short:   "List, inspect and delete sandbox snapshots",
	}
	cmd.AddCommand(
		newSnapshotListCmd(),
		newSnapshotGetCmd(),
		newSnapshotDeleteCmd(),
	)
	return cmd
}

func newSnapshotListCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List snapshots",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			snaps, err := c.Snapshots(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				if snaps == nil {
					snaps = []wire.Snapshot{} // [] rather than null, for jq
				}
				return printJSON(cmd.OutOrStdout(), snaps)
			}
			printSnapshotTable(cmd.OutOrStdout(), snaps)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the list as JSON")
	return cmd
}

// printSnapshotTable writes snaps, oldest first.
func printSnapshotTable(w io.Writer, snaps []wire.Snapshot) {
	snaps = slices.Clone(snaps)
	slices.SortFunc(snaps, func(a, b wire.Snapshot) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	fmt.Fprintln(tw, "ID\tSOURCE\tTEMPLATE\tSIZE\tCREATED")
	for _, s := range snaps {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", s.ID, s.SourceSandbox, s.Template,
			formatBytes(s.SizeBytes), s.CreatedAt.Format(time.RFC3339))
	}
	tw.Flush()
}

func newSnapshotGetCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "get ID",
		Short: "Print a snapshot as JSON",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			snap, err := c.Snapshot(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return printJSON(cmd.OutOrStdout(), snap)
		},
	}
}

func newSnapshotDeleteCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "delete ID...",
		Aliases: []string{"rm"},
		Short:   "Delete snapshots",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			// Delete every snapshot named even if one fails, then report
			// all failures.
			var errs []error
			for _, id := range args {
				errs = append(errs, c.DeleteSnapshot(cmd.Context(), id))
			}
			return errors.Join(errs...)
		},
	}
}
