package wire

import (
	"bytes"
	"encoding/json"
	"fmt"
)

// Network is a sandbox's network: absent (null) for none at all; "none"
// for a network with no egress (its ports can still be exposed);
// "internet" for any public address; or an object with allow and deny
// rules. Rules are HOST[:PORTS][/PROTO]: an IP address, a CIDR prefix, a
// host name or "*." and a domain; PORTS a comma-separated list of ports
// and ranges; PROTO tcp or udp. Deny wins over allow. Whatever the rules,
// private, link-local (cloud metadata), CGNAT, unique-local, multicast
// and reserved addresses, the host and other sandboxes stay unreachable.
type Network struct {
	// Internet allows every public address (deny rules still apply).
	Internet bool     `json:"internet,omitempty"`
	Allow    []string `json:"allow,omitempty"`
	Deny     []string `json:"deny,omitempty"`
	// PublicPorts makes the sandbox's exposed ports reachable without the
	// API key or the access token: a URL to share.
	PublicPorts bool `json:"public_ports,omitempty"`
}

// Network forms as strings.
const (
	NetworkNone     = "none"
	NetworkInternet = "internet"
)

// UnmarshalJSON accepts the object form and the strings "none" and
// "internet".
func (n *Network) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		switch s {
		case NetworkNone:
			*n = Network{}
		case NetworkInternet:
			*n = Network{Internet: true}
		default:
			return fmt.Errorf("network must be %q, %q or an object with allow and deny, got %q", NetworkNone, NetworkInternet, s)
		}
		return nil
	}
	type plain Network
	var p plain
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		return fmt.Errorf("network: %w", err)
	}
	*n = Network(p)
	return nil
}

// SandboxNetwork is a sandbox's network as the API shows it: its Network
// and the access token of its exposed ports. (Not an embedded Network:
// Network's UnmarshalJSON would take over decoding.)
type SandboxNetwork struct {
	Internet    bool     `json:"internet,omitempty"`
	Allow       []string `json:"allow,omitempty"`
	Deny        []string `json:"deny,omitempty"`
	PublicPorts bool     `json:"public_ports,omitempty"`
	// AccessToken opens the sandbox's exposed ports to whoever has it
	// (header X-Access-Token or query access_token), besides the API key.
	AccessToken string `json:"access_token,omitempty"`
}

// SetNetworkRequest is the body of PUT /v1/sandboxes/{id}/network.
type SetNetworkRequest = Network
