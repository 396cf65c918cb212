// Package cli holds the pandastack command line: one file per subcommand,
// each thin over the Go SDK (client commands) or the daemon packages (serve).
package cli

import (
	"github.com/spf13/cobra"
)

// Version is the build's version, set by the linker.
var Version = "dev"

// NewRoot returns the pandastack root command with every subcommand.
func NewRoot() *cobra.Command {
	root := &cobra.Command{
		Use:           "pandastack",
		Short:         "Run untrusted code in throwaway gVisor sandboxes",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       Version,
	}
	root.PersistentFlags().String("url", "", "server URL (default $PANDASTACK_URL or http://127.0.0.1:7423)")
	root.PersistentFlags().String("api-key", "", "API key (default $PANDASTACK_API_KEY or the server's key file)")
	root.AddCommand(
		newServeCmd(),
		newSandboxCmd(),
		newSnapshotCmd(),
		newRunCmd(),
		newTemplateCmd(),
		newBenchCmd(),
		newAuditCmd(),
	)
	return root
}
