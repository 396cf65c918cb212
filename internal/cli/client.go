package cli

import (
	"github.com/spf13/cobra"

	pandastack "github.com/pandastack/pandastack/sdk/go"
)

// newClient builds an SDK client from the root's --url and --api-key flags.
// Empty flags are ignored by the SDK, which then falls back to the
// environment and the server's key file.
func newClient(cmd *cobra.Command) (*pandastack.Client, error) {
	return pandastack.NewClient(
		pandastack.WithURL(flagString(cmd, "url")),
		pandastack.WithAPIKey(flagString(cmd, "api-key")),
	)
}

// flagString returns the value of the named flag of cmd or of a parent's
// persistent flags, or "" when there is no such flag.
func flagString(cmd *cobra.Command, name string) string {
	f := cmd.Flag(name)
	if f == nil {
		return ""
	}
	return f.Value.String()
}
