package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/template"
	pandastack "github.com/pandastack/pandastack/sdk/go"
	"github.com/pandastack/pandastack/wire"
)

func newTemplateCmd() *cobra.Command {
	var dir, mirror string
	cmd := &cobra.Command{
		Use:   "template",
		Short: "Build, list and delete the templates sandboxes start from",
	}
	cmd.PersistentFlags().StringVar(&dir, "template-dir", os.Getenv("PANDASTACK_TEMPLATE_DIR"), "built-in templates built on this machine (default <data-dir>/templates)")
	cmd.PersistentFlags().StringVar(&mirror, "mirror", "", "Debian mirror for building the built-in templates")
	open := func(cmd *cobra.Command) (*template.Store, error) {
		d := dir
		if d == "" {
			d = filepath.Join(envOr("PANDASTACK_DATA_DIR", daemon.DefaultDataDir), "templates")
		}
		log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
		return template.NewStore(d, mirror, template.Builtin(), log)
	}
	cmd.AddCommand(
		newTemplateBuildCmd(open),
		newTemplateListCmd(open),
		newTemplateGetCmd(),
		newTemplateDeleteCmd(),
	)
	return cmd
}

// buildBuiltins builds the built-in templates on this machine (all when no
// name is given); cached ones are kept.
func buildBuiltins(cmd *cobra.Command, open func(*cobra.Command) (*template.Store, error), names []string) error {
	s, err := open(cmd)
	if err != nil {
		return err
	}
	if len(names) == 0 {
		for _, d := range s.Definitions() {
			names = append(names, d.Name)
		}
	}
	for _, name := range names {
		t, err := s.Ensure(cmd.Context(), name)
		if err != nil {
			return err
		}
		fmt.Fprintf(cmd.OutOrStdout(), "%s\t%s\n", t.Name, t.Rootfs)
	}
	return nil
}

func newTemplateBuildCmd(open func(*cobra.Command) (*template.Store, error)) *cobra.Command {
	var (
		name, dockerfile string
		buildArgs        []string
		noCache, quiet   bool
	)
	cmd := &cobra.Command{
		Use:   "build -t NAME[:TAG] [-f Dockerfile] [--build-arg K=V]... CONTEXT | build [BUILTIN...]",
		Short: "Build a template on the server from a Dockerfile; without -t, build the built-in templates on this machine",
		Long: `With -t, sends the directory CONTEXT (less what its .dockerignore excludes;
symbolic links are sent as links) and the Dockerfile (-f, by default
CONTEXT/Dockerfile) to the server, which builds the template NAME:TAG
("latest" when no tag is given), and prints the build's log as it runs.
Sandboxes start from it with: pandastack sandbox create --template NAME:TAG.
Ctrl-C cancels the build.

Without -t, builds the built-in templates (all when none is named) into
--template-dir on this machine, as the server does at start; cached ones
are kept.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if name == "" {
				if dockerfile != "" || len(buildArgs) > 0 || noCache {
					return errors.New("-f, --build-arg and --no-cache need -t NAME[:TAG] (a build on the server)")
				}
				return buildBuiltins(cmd, open, args)
			}
			if len(args) != 1 {
				return fmt.Errorf("template build -t %s takes one build context directory, got %d arguments", name, len(args))
			}
			opts := pandastack.BuildTemplateOptions{Name: name, ContextDir: args[0], NoCache: noCache}
			if dockerfile != "" {
				// Like docker build: -f is relative to the working directory.
				abs, err := filepath.Abs(dockerfile)
				if err != nil {
					return err
				}
				opts.Dockerfile = abs
			}
			if len(buildArgs) > 0 {
				opts.BuildArgs = map[string]string{}
				for _, a := range buildArgs {
					k, v, ok := strings.Cut(a, "=")
					if !ok {
						// As docker does: KEY alone takes the value from the environment.
						v, ok = os.LookupEnv(k)
						if !ok {
							continue
						}
					}
					if k == "" {
						return fmt.Errorf("--build-arg %q: want KEY=VALUE", a)
					}
					opts.BuildArgs[k] = v
				}
			}
			return buildOnServer(cmd, opts, quiet)
		},
	}
	f := cmd.Flags()
	f.StringVarP(&name, "tag", "t", "", "build on the server under NAME[:TAG]")
	f.StringVarP(&dockerfile, "file", "f", "", "the Dockerfile (default CONTEXT/Dockerfile)")
	f.StringArrayVar(&buildArgs, "build-arg", nil, "a build argument KEY=VALUE (repeatable)")
	f.BoolVar(&noCache, "no-cache", false, "run every step again instead of using cached results")
	f.BoolVarP(&quiet, "quiet", "q", false, "print only the template's reference once built")
	return cmd
}

// buildOnServer runs a build on the server, printing its log as it comes;
// SIGINT or SIGTERM cancels it (the request is closed, which cancels the
// build on the server).
func buildOnServer(cmd *cobra.Command, opts pandastack.BuildTemplateOptions, quiet bool) error {
	c, err := newClient(cmd)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	out := cmd.OutOrStdout()
	p := &buildPrinter{w: out}
	if !quiet {
		opts.OnLog = p.event
	}
	t, err := c.BuildTemplate(ctx, opts)
	p.endLine()
	if err != nil {
		if interrupted(ctx, cmd.Context()) {
			fmt.Fprintf(cmd.ErrOrStderr(), "pandastack: %v: build cancelled\n", context.Cause(ctx))
			return ExitCodeError{Code: exitInterrupted}
		}
		return err
	}
	if quiet {
		fmt.Fprintln(out, t.Ref)
		return nil
	}
	fmt.Fprintf(out, "Built %s (%s, %s)\n", t.Ref, shortHash(t.Hash), formatBytes(t.SizeBytes))
	return nil
}

// buildPrinter writes a build's log: a line per step, CACHED or the time it
// took, and RUN output as it comes.
type buildPrinter struct {
	w io.Writer
	// midLine: the last output did not end a line.
	midLine bool
	// cached: the current step's result came from the cache.
	cached bool
}

func (p *buildPrinter) endLine() {
	if p.midLine {
		fmt.Fprintln(p.w)
		p.midLine = false
	}
}

func (p *buildPrinter) event(e wire.TemplateBuildEvent) {
	switch e.Type {
	case wire.BuildEventStep:
		p.endLine()
		p.cached = false
		fmt.Fprintf(p.w, "Step %d/%d: %s\n", e.Step, e.Steps, e.Instruction)
	case wire.BuildEventCached:
		p.endLine()
		p.cached = true
		fmt.Fprintln(p.w, " ---> CACHED")
	case wire.BuildEventOutput:
		io.WriteString(p.w, e.Text)
		p.midLine = e.Text != "" && !strings.HasSuffix(e.Text, "\n")
	case wire.BuildEventDone:
		p.endLine()
		// Steps that only set metadata take no time worth a line.
		if d := time.Duration(e.ElapsedMS * float64(time.Millisecond)).Round(10 * time.Millisecond); d > 0 && !p.cached {
			fmt.Fprintf(p.w, " ---> done in %s\n", d)
		}
	}
}

func shortHash(h string) string {
	if len(h) > 12 {
		return h[:12]
	}
	return h
}

func newTemplateListCmd(open func(*cobra.Command) (*template.Store, error)) *cobra.Command {
	var asJSON, local bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the server's templates: built-in ones and your own",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if local {
				return listLocal(cmd, open)
			}
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			l, err := c.ListTemplates(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				if l == nil {
					l = []wire.Template{}
				}
				return printJSON(cmd.OutOrStdout(), l)
			}
			printTemplateTable(cmd.OutOrStdout(), l)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the list as JSON")
	cmd.Flags().BoolVar(&local, "local", false, "list the built-in templates built on this machine (--template-dir) instead")
	return cmd
}

// listLocal lists the built-in templates and whether they are built in
// --template-dir.
func listLocal(cmd *cobra.Command, open func(*cobra.Command) (*template.Store, error)) error {
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
}

// printTemplateTable writes the built-in templates first, then the
// tenant's by reference.
func printTemplateTable(w io.Writer, l []wire.Template) {
	l = slices.Clone(l)
	slices.SortStableFunc(l, func(a, b wire.Template) int {
		if a.Builtin != b.Builtin {
			if a.Builtin {
				return -1
			}
			return 1
		}
		return strings.Compare(a.Ref, b.Ref)
	})
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)
	fmt.Fprintln(tw, "REF\tBASE\tSIZE\tBUILT\tREADY")
	for _, t := range l {
		base, size, built := "-", "-", "-"
		if t.Builtin {
			base = "(built-in)"
		} else if t.Base != "" {
			base = t.Base
		}
		if t.SizeBytes > 0 {
			size = formatBytes(t.SizeBytes)
		}
		if t.BuiltAt != nil {
			built = t.BuiltAt.Local().Format(time.RFC3339)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%v\n", t.Ref, base, size, built, t.Ready)
	}
	tw.Flush()
}

func newTemplateGetCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "get NAME[:TAG]",
		Short: "Print a template as JSON",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			t, err := c.GetTemplate(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return printJSON(cmd.OutOrStdout(), t)
		},
	}
}

func newTemplateDeleteCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "delete NAME[:TAG]...",
		Aliases: []string{"rm"},
		Short:   "Delete your templates (refused while a sandbox or snapshot uses one)",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			var errs []error
			for _, ref := range args {
				errs = append(errs, c.DeleteTemplate(cmd.Context(), ref))
			}
			return errors.Join(errs...)
		},
	}
}
