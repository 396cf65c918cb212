package sandbox

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/network"
	"github.com/pandastack/pandastack/internal/runtime"
	"github.com/pandastack/pandastack/wire"
)

// Networks gives sandboxes their network (internal/network).
type Networks interface {
	Acquire(ctx context.Context) (*network.Slot, error)
	Adopt(index int, p network.Policy) (*network.Slot, error)
	Release(s *network.Slot) error
	SetPolicy(s *network.Slot, p network.Policy) error
	RemoveUnused()
	DialSandbox(ctx context.Context, s *network.Slot, port int) (net.Conn, error)
}

// maxNetworkRules bounds the rules of one sandbox's network.
const maxNetworkRules = 256

// parseNetwork validates a requested network and turns it into a policy.
func parseNetwork(n wire.Network) (network.Policy, error) {
	if len(n.Allow)+len(n.Deny) > maxNetworkRules {
		return network.Policy{}, errdefs.Invalid("network has %d rules; at most %d are allowed", len(n.Allow)+len(n.Deny), maxNetworkRules)
	}
	p := network.Policy{Internet: n.Internet}
	for _, list := range []struct {
		name  string
		rules []string
		out   *[]network.Rule
	}{{"allow", n.Allow, &p.Allow}, {"deny", n.Deny, &p.Deny}} {
		for _, s := range list.rules {
			r, err := network.ParseRule(s)
			if err != nil {
				return network.Policy{}, errdefs.Invalid("network %s: %v", list.name, err)
			}
			*list.out = append(*list.out, r)
		}
	}
	return p, nil
}

func encodeNetwork(n *wire.Network) string {
	if n == nil {
		return ""
	}
	b, _ := json.Marshal(n)
	return string(b)
}

func decodeNetwork(s string) (*wire.Network, network.Policy) {
	if s == "" {
		return nil, network.Policy{}
	}
	var n wire.Network
	if err := json.Unmarshal([]byte(s), &n); err != nil {
		return nil, network.Policy{}
	}
	p, _ := parseNetwork(n)
	return &n, p
}

// resolvConf is the resolver configuration of every sandbox with a
// network: its router namespace's address, where DNS reaches the daemon's
// resolver. Mounted read-only; the same for every sandbox, so restores
// match their images.
func (m *Manager) resolvConf() (string, error) {
	p := filepath.Join(m.stateDir, "network", "resolv.conf")
	want := fmt.Sprintf("nameserver %s\nnameserver %s\noptions timeout:2 attempts:2\n", network.RouterIP4, network.RouterIP6)
	if b, err := os.ReadFile(p); err == nil && string(b) == want {
		return p, nil
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return "", fmt.Errorf("creating network state directory: %w", err)
	}
	if err := os.WriteFile(p, []byte(want), 0o644); err != nil {
		return "", fmt.Errorf("writing resolv.conf: %w", err)
	}
	return p, nil
}

// withNetwork adds a sandbox's network to its spec: its slot's namespace
// and the resolver configuration.
func (m *Manager) withNetwork(spec *runtime.Spec, slot *network.Slot) error {
	rc, err := m.resolvConf()
	if err != nil {
		return err
	}
	spec.NetworkNS = slot.SandboxNS
	spec.Binds = append(spec.Binds, runtime.Bind{Source: rc, Destination: "/etc/resolv.conf"})
	return nil
}

// attachNetwork gives a sandbox about to start (or be restored) a slot
// with its policy; the caller releases it on failure.
func (m *Manager) attachNetwork(ctx context.Context, spec *runtime.Spec, p network.Policy) (*network.Slot, error) {
	if m.net == nil {
		return nil, errdefs.Unavailable("networking is not enabled on this server (serve --network)")
	}
	slot, err := m.net.Acquire(ctx)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrUnavailable, err, "no network could be made for the sandbox")
	}
	if err := m.net.SetPolicy(slot, p); err != nil {
		_ = m.net.Release(slot)
		return nil, errdefs.Wrap(errdefs.ErrUnavailable, err, "the sandbox's network policy could not be applied")
	}
	if err := m.withNetwork(spec, slot); err != nil {
		_ = m.net.Release(slot)
		return nil, err
	}
	return slot, nil
}

// releaseNetwork gives back a sandbox's slot once its runtime sandbox is
// gone; the caller holds in.op.
func (m *Manager) releaseNetwork(in *instance) {
	in.mu.Lock()
	slot := in.netSlot
	in.netSlot = nil
	in.mu.Unlock()
	if slot == nil || m.net == nil {
		return
	}
	if err := m.net.Release(slot); err != nil {
		m.log.Error("releasing a sandbox's network", "id", in.id, "err", err)
	}
}

// SetNetwork changes a running or paused sandbox's network policy: new
// connections follow it at once, and existing connections to what it no
// longer allows are cut. Only sandboxes created with a network have one.
func (m *Manager) SetNetwork(ctx context.Context, tenant, id string, req wire.Network) (wire.Sandbox, error) {
	p, err := parseNetwork(req)
	if err != nil {
		return wire.Sandbox{}, err
	}
	in, err := m.lookup(tenant, id)
	if err != nil {
		return wire.Sandbox{}, err
	}
	if err := in.op.lock(ctx); err != nil {
		return wire.Sandbox{}, err
	}
	defer in.op.unlock()
	in.mu.Lock()
	visible, hasNet, slot := in.visibleState() != "", in.rec.Network != "", in.netSlot
	in.mu.Unlock()
	if !visible {
		return wire.Sandbox{}, errGone(in)
	}
	if !hasNet {
		return wire.Sandbox{}, errdefs.Conflict("sandbox %q was created without a network; create it with one (network: \"none\" for none yet)", id)
	}
	if slot != nil {
		if err := m.net.SetPolicy(slot, p); err != nil {
			return wire.Sandbox{}, errdefs.Wrap(errdefs.ErrUnavailable, err, "the network policy could not be applied")
		}
	}
	enc := encodeNetwork(&req)
	index := 0
	if slot != nil {
		index = slot.Index
	}
	if err := m.store.SetSandboxNetwork(ctx, id, enc, index); err != nil {
		return wire.Sandbox{}, err
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	in.rec.Network = enc
	m.log.Info("sandbox network changed", "id", id)
	return in.toWire(), nil
}

// networkToWire is the API's view of a record's network.
func networkToWire(r storeNetwork) *wire.SandboxNetwork {
	n, _ := decodeNetwork(r.network)
	if n == nil {
		return nil
	}
	return &wire.SandboxNetwork{Internet: n.Internet, Allow: n.Allow, Deny: n.Deny, PublicPorts: n.PublicPorts, AccessToken: r.token}
}

type storeNetwork struct{ network, token string }

// PortDialer reaches a port of a sandbox, for the daemon's reverse proxy
// to its exposed ports. Who may: the sandbox's tenant (tenant non-empty,
// from the API key), anyone with its access token, or anyone when its
// ports are public. A paused sandbox is resumed. Ports need a network: a
// sandbox without one answers a conflict.
func (m *Manager) PortDialer(ctx context.Context, tenant, id, token string, port int) (func(context.Context) (net.Conn, error), error) {
	if port < 1 || port > 65535 {
		return nil, errdefs.Invalid("port must be between 1 and 65535, got %d", port)
	}
	m.mu.Lock()
	in, ok := m.live[id]
	m.mu.Unlock()
	if !ok {
		return nil, errdefs.NotFound("sandbox %q not found", id)
	}
	in.mu.Lock()
	rec := in.rec
	in.mu.Unlock()
	n, _ := decodeNetwork(rec.Network)
	switch {
	case tenant != "" && tenant == in.tenant:
	case token != "" && rec.AccessToken != "" && subtle.ConstantTimeCompare([]byte(token), []byte(rec.AccessToken)) == 1:
	case n != nil && n.PublicPorts:
	case tenant != "":
		// Another tenant's key: its sandboxes do not exist for this one.
		return nil, errdefs.NotFound("sandbox %q not found", id)
	default:
		return nil, errdefs.New(errdefs.ErrUnauthorized, "the sandbox's ports need its access token or an API key")
	}
	if n == nil || m.net == nil {
		return nil, errdefs.Conflict("sandbox %q has no network, so no ports; create it with one (network: \"none\" is enough)", id)
	}
	in.mu.Lock()
	running := in.phase == phaseRunning
	in.mu.Unlock()
	if !running {
		if err := in.op.lock(ctx); err != nil {
			return nil, err
		}
		err := m.ensureRunningLocked(ctx, in)
		in.op.unlock()
		if err != nil {
			return nil, err
		}
	}
	in.mu.Lock()
	slot := in.netSlot
	in.mu.Unlock()
	if slot == nil {
		return nil, errdefs.Conflict("sandbox %q is not running; try again", id)
	}
	return func(ctx context.Context) (net.Conn, error) { return m.net.DialSandbox(ctx, slot, port) }, nil
}
