package cli

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"text/tabwriter"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/template"
	"github.com/spf13/cobra"
)

func newTemplateCmd() *cobra.Command {
	var dir, mirror string
	cmd := &cobra.Command{
		Use:   "template",
		Short: "Build and list the templates sandboxes start from",
	}
	cmd.PersistentFlags().StringVar(&dir, "template-dir", os.Getenv("PANDASTACK_TEMPLATE_DIR"), "built templates (default <data-dir>/templates)")
	cmd.PersistentFlags().StringVar(&mirror, "mirror", "", "Debian mirror")
	open := func(cmd *cobra.Command) (*template.Store, error) {
		d := dir
		if d == "" {
			d = filepath.Join(envOr("PANDASTACK_DATA_DIR", daemon.DefaultDataDir), "templates")
		}
		log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
		return template.NewStore(d, mirror, template.Builtin(), log)
	}
	build := &cobra.Command{
		Use:   "build [NAME...]",
		Short: "Build templates (all when no name is given); cached ones are kept",
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := open(cmd)
			if err != nil {
				return err
			}
			if len(args) == 0 {
				for _, d := range s.Definitions() {
					args = append(args, d.Name)
				}
			}
			for _, name := range args {
				t, err := s.Ensure(cmd.Context(), name)
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s\t%s\n", t.Name, t.Rootfs)
			}
			return nil
		},
	}
	list := &cobra.Command{
		Use:   "list",
		Short: "List templates and whether they are built",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := open(cmd)
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tBUILT\tDESCRIPTION")
			for _, d := range s.Definitions() {
				_, err := s.Get(d.Name)
				fmt.Fprintf(tw, "%s\t%v\t%s\n", d.Name, err == nil, d.Description)
			}
			return tw.Flush()
		},
	}
	cmd.AddCommand(build, list)
	return cmd
}
