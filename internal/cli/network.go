package cli

import (
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	pandastack "github.com/pandastack/pandastack/sdk/go"
	"github.com/pandastack/pandastack/wire"
)

// networkFlags are the flags that give a sandbox its network policy:
// sandbox create and run (creating one), sandbox network (changing it).
type networkFlags struct {
	allow, deny []string
	internet    bool
	// none is --no-egress at create (a network, no egress) and --none at
	// sandbox network (drop every rule).
	none        bool
	publicPorts bool
}

const ruleHelp = "HOST[:PORTS][/PROTO]: an IP, a CIDR, a host name or *.domain; PORTS like 443 or 8000-8100,8443; PROTO tcp or udp"

func (n *networkFlags) add(f *pflag.FlagSet, noneFlag, noneHelp string) {
	f.StringArrayVar(&n.allow, "allow", nil, "let the sandbox connect to RULE (repeatable; "+ruleHelp+")")
	f.StringArrayVar(&n.deny, "deny", nil, "never let it connect to RULE, even if allowed (repeatable)")
	f.BoolVar(&n.internet, "internet", false, "let it connect to any public address (private, link-local/metadata, the host and other sandboxes stay closed)")
	f.BoolVar(&n.none, noneFlag, false, noneHelp)
	f.BoolVar(&n.publicPorts, "public-ports", false, "let anyone reach its ports (sandbox url) without the API key or its access token")
}

// addCreateNetworkFlags adds the flags of commands that create sandboxes.
func (n *networkFlags) addCreate(f *pflag.FlagSet) {
	n.add(f, "no-egress", "give it a network with no egress: nothing out, but its ports can be reached (sandbox url)")
}

// network returns the policy the flags describe; nil when none was given
// at create (then the sandbox has no network at all). noneFlag names the
// flag that asks for no egress, for errors.
func (n *networkFlags) network(noneFlag string, always bool) (*wire.Network, error) {
	if n.none && (len(n.allow) > 0 || len(n.deny) > 0 || n.internet) {
		return nil, fmt.Errorf("--%s does not go with --allow, --deny or --internet", noneFlag)
	}
	if !always && !n.none && !n.internet && !n.publicPorts && len(n.allow) == 0 && len(n.deny) == 0 {
		return nil, nil
	}
	return &wire.Network{Internet: n.internet, Allow: n.allow, Deny: n.deny, PublicPorts: n.publicPorts}, nil
}

// newSandboxNetworkCmd returns `pandastack sandbox network`: print or
// change a sandbox's network policy.
func newSandboxNetworkCmd() *cobra.Command {
	var flags networkFlags
	cmd := &cobra.Command{
		Use:   "network ID [--allow RULE]... [--deny RULE]... [--internet | --none] [--public-ports]",
		Short: "Print or change a sandbox's network policy",
		Long: "Without flags, print the sandbox's network (its policy and the access token of its\n" +
			"ports) as JSON. With flags, replace the policy with the one they describe, at once:\n" +
			"new connections follow it and existing connections to what it no longer allows are\n" +
			"cut. The whole policy is replaced: --public-ports too is off unless given. Only a\n" +
			"sandbox created with a network (sandbox create --no-egress, --allow or --internet)\n" +
			"has one to change.",
		Example: "  pandastack sandbox network sb-123 --allow '*.pypi.org:443' --allow files.pythonhosted.org:443\n" +
			"  pandastack sandbox network sb-123 --internet --deny 198.51.100.0/24\n" +
			"  pandastack sandbox network sb-123 --none",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			set := false
			for _, name := range []string{"allow", "deny", "internet", "none", "public-ports"} {
				set = set || cmd.Flags().Changed(name)
			}
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			sb, err := c.Get(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if set {
				n, err := flags.network("none", true)
				if err != nil {
					return err
				}
				if err := sb.SetNetwork(cmd.Context(), *n); err != nil {
					return err
				}
			}
			n := sb.Network()
			if n == nil {
				return fmt.Errorf("sandbox %q was created without a network (sandbox create --no-egress gives one with no egress)", args[0])
			}
			return printJSON(cmd.OutOrStdout(), n)
		},
	}
	flags.add(cmd.Flags(), "none", "drop every rule: no egress (its ports can still be reached)")
	return cmd
}

// newSandboxURLCmd returns `pandastack sandbox url`: the URL of a port.
func newSandboxURLCmd() *cobra.Command {
	var noToken bool
	cmd := &cobra.Command{
		Use:   "url ID PORT [PATH]",
		Short: "Print a URL that reaches a port of a sandbox through the server",
		Long: "Print a URL for a browser or curl that reaches PORT of the sandbox through the\n" +
			"server: {port}-{id}.{domain} when the server has a domain (serve --domain), else\n" +
			"{server}/v1/sandboxes/{id}/ports/{port}/. It carries the sandbox's access token (the\n" +
			"server then sets a cookie for the port, so the page's own requests need none) unless\n" +
			"the ports are public or --no-token is given. The sandbox needs a network; one with\n" +
			"no egress is enough (sandbox create --no-egress).",
		Example: "  pandastack sandbox url sb-123 8000\n" +
			"  curl \"$(pandastack sandbox url sb-123 8000 /api/health)\"",
		Args: cobra.RangeArgs(2, 3),
		RunE: func(cmd *cobra.Command, args []string) error {
			port, err := strconv.Atoi(args[1])
			if err != nil || port < 1 || port > 65535 {
				return fmt.Errorf("PORT must be a number from 1 to 65535, got %q", args[1])
			}
			path := "/"
			if len(args) == 3 {
				path = args[2]
			}
			c, err := newClient(cmd)
			if err != nil {
				return err
			}
			sb, err := c.Get(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			u, err := sb.URL(cmd.Context(), port, path)
			if errors.Is(err, pandastack.ErrConflict) && sb.Network() == nil {
				return fmt.Errorf("sandbox %q was created without a network, so its ports cannot be reached; create it with one (sandbox create --no-egress)", args[0])
			}
			if err != nil {
				return err
			}
			if noToken && sb.AccessToken() != "" {
				u = withoutToken(u)
			}
			fmt.Fprintln(cmd.OutOrStdout(), u)
			return nil
		},
	}
	cmd.Flags().BoolVar(&noToken, "no-token", false, "leave the access token out of the URL")
	return cmd
}

// withoutToken drops the access_token parameter from u's query, leaving
// the rest as it was.
func withoutToken(u string) string {
	parsed, err := url.Parse(u)
	if err != nil {
		return u
	}
	var keep []string
	for _, p := range strings.Split(parsed.RawQuery, "&") {
		if p != "" && !strings.HasPrefix(p, "access_token=") {
			keep = append(keep, p)
		}
	}
	parsed.RawQuery = strings.Join(keep, "&")
	return parsed.String()
}
