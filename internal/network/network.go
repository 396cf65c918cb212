// Package network gives sandboxes a network and enforces what they may
// reach.
//
// A sandbox that asks for a network gets a slot (slot.go): a network
// namespace of its own, which gVisor's netstack takes over
// (`runsc --network=sandbox`), and a router namespace between it and the
// daemon's namespace. Every sandbox has the same address inside; the router
// translates it to the slot's own uplink address. The router is where the
// sandbox's egress policy is enforced, with nftables (policy.go): a fixed
// deny of private, link-local (cloud metadata), CGNAT, unique-local,
// multicast and reserved ranges, the host's own addresses and every other
// sandbox, then the sandbox's own allow and deny rules; what breaks them
// is refused at once (TCP reset, ICMP administratively prohibited). DNS
// goes to the daemon's resolver (dns.go), which answers only names the
// policy allows; HTTP and TLS to names are checked on the wire by the
// daemon's proxy (proxy.go). Slots are prepared ahead of demand in a pool,
// so a create does not wait for them.
package network

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Config configures sandbox networking.
type Config struct {
	// DaemonNS is the path of the network namespace the slots' uplinks
	// live in and the resolver and proxies work from: "" for the daemon's
	// own. Tests give a namespace of their own whose only routes lead to
	// stand-ins.
	DaemonNS string
	// Instance tells this daemon's namespaces and interfaces apart from
	// another's on the same host (the data directory).
	Instance string
	// Prefix4 and Prefix6 hold the slots' uplinks: a /30 and a /64 each.
	// Defaults: 10.201.0.0/16 and fd70:7373:6e64::/48.
	Prefix4, Prefix6 netip.Prefix
	// PoolSize is how many slots are kept prepared; 0: none.
	PoolSize int
	// Resolvers are the upstream DNS servers ("ip:port"); /etc/resolv.conf's
	// when empty.
	Resolvers []string
	Log       *slog.Logger
}

// Network owns the slots of one daemon. It is safe for concurrent use.
type Network struct {
	cfg    Config
	prefix string // of namespace and interface names
	log    *slog.Logger

	daemon   netns.NsHandle
	dh       *netlink.Handle
	resolver *resolver
	proxy    *proxy

	mu sync.Mutex
	// used marks the slot indexes in use or prepared.
	used map[int]bool
	pool []*Slot
	// policies are the policies of the slots in use, by uplink address.
	bySource map[netip.Addr]*Slot
	policies map[int]Policy
	closed   bool
	kick     chan struct{}
	stop     context.CancelFunc
	wg       sync.WaitGroup
}

// maxSlots bounds the slot index: a /16 holds 16384 /30s.
const maxSlots = 16384

// New opens the daemon's namespace, removes what an earlier run left and
// installs the daemon-side rules. Call Close when done.
func New(cfg Config) (*Network, error) {
	if !cfg.Prefix4.IsValid() {
		cfg.Prefix4 = netip.MustParsePrefix("10.201.0.0/16")
	}
	if !cfg.Prefix6.IsValid() {
		cfg.Prefix6 = netip.MustParsePrefix("fd70:7373:6e64::/48")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	h := sha256.Sum256([]byte(cfg.Instance))
	n := &Network{
		cfg: cfg, prefix: "ps" + hex.EncodeToString(h[:2]), log: cfg.Log,
		used: map[int]bool{0: true}, bySource: map[netip.Addr]*Slot{}, policies: map[int]Policy{},
		kick: make(chan struct{}, 1),
	}
	var err error
	if n.daemon, err = openNS(cfg.DaemonNS); err != nil {
		return nil, err
	}
	if n.dh, err = netlink.NewHandleAt(n.daemon); err != nil {
		n.daemon.Close()
		return nil, fmt.Errorf("netlink in the daemon's namespace: %w", err)
	}
	if err := n.setupDaemon(); err != nil {
		n.Close()
		return nil, err
	}
	if err := n.startResolver(); err != nil {
		n.Close()
		return nil, err
	}
	if err := n.startProxy(); err != nil {
		n.Close()
		return nil, err
	}
	return n, nil
}

func (n *Network) nsName(kind string, index int) string {
	return fmt.Sprintf("%s-%s%d", n.prefix, kind, index)
}

func (n *Network) ifName(index int) string { return fmt.Sprintf("%sh%d", n.prefix, index) }

// Adopt takes over slot index, which an earlier run of this daemon made
// for a sandbox that is being re-adopted; its namespaces must still exist.
// Call before RemoveUnused.
func (n *Network) Adopt(index int, p Policy) (*Slot, error) {
	if index <= 0 || index >= maxSlots {
		return nil, fmt.Errorf("network slot %d out of range", index)
	}
	s := &Slot{Index: index, sandboxName: n.nsName("s", index), routerName: n.nsName("r", index), HostIface: n.ifName(index)}
	s.SandboxNS = nsPath(s.sandboxName)
	s.Uplink4, s.Gateway4, s.Uplink6, s.Gateway6 = slotAddrs(n.cfg.Prefix4, n.cfg.Prefix6, index)
	for _, name := range []string{s.sandboxName, s.routerName} {
		if _, err := os.Stat(nsPath(name)); err != nil {
			return nil, fmt.Errorf("network slot %d is gone: %w", index, err)
		}
	}
	n.mu.Lock()
	if n.used[index] {
		n.mu.Unlock()
		return nil, fmt.Errorf("network slot %d is taken", index)
	}
	n.used[index] = true
	n.policies[index] = p
	n.bySource[s.Uplink4] = s
	n.bySource[s.Uplink6] = s
	n.mu.Unlock()
	return s, nil
}

// RemoveUnused deletes the namespaces and host interfaces of this daemon's
// slots that are neither adopted nor in use: what an earlier run left (a
// crash). Call once, after adopting; it then starts preparing the pool.
func (n *Network) RemoveUnused() {
	defer n.startPool()
	n.mu.Lock()
	used := make(map[string]bool, len(n.used))
	for i := range n.used {
		used[n.nsName("s", i)], used[n.nsName("r", i)], used[n.ifName(i)] = true, true, true
	}
	n.mu.Unlock()
	if ents, err := os.ReadDir(nsDir); err == nil {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), n.prefix+"-") && !used[e.Name()] {
				n.log.Info("removing leftover network namespace", "name", e.Name())
				_ = deleteNamedNS(e.Name())
			}
		}
	}
	if links, err := n.dh.LinkList(); err == nil {
		for _, l := range links {
			if name := l.Attrs().Name; strings.HasPrefix(name, n.prefix+"h") && !used[name] {
				_ = n.dh.LinkDel(l)
			}
		}
	}
}

// Acquire returns a slot for a new sandbox, from the pool when one is
// prepared. Its policy is none until SetPolicy.
func (n *Network) Acquire(ctx context.Context) (*Slot, error) {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil, errors.New("network is closed")
	}
	if len(n.pool) > 0 {
		s := n.pool[0]
		n.pool = n.pool[1:]
		n.mu.Unlock()
		n.wake()
		return s, nil
	}
	index, err := n.allocLocked()
	n.mu.Unlock()
	if err != nil {
		return nil, err
	}
	s, err := n.createSlot(index)
	if err != nil {
		n.free(index)
		return nil, err
	}
	n.wake()
	return s, nil
}

func (n *Network) allocLocked() (int, error) {
	for i := 1; i < maxSlots; i++ {
		if !n.used[i] {
			n.used[i] = true
			return i, nil
		}
	}
	return 0, errors.New("no network slot is free")
}

func (n *Network) free(index int) {
	n.mu.Lock()
	delete(n.used, index)
	n.mu.Unlock()
}

// Release destroys a slot whose sandbox has ended.
func (n *Network) Release(s *Slot) error {
	n.mu.Lock()
	delete(n.bySource, s.Uplink4)
	delete(n.bySource, s.Uplink6)
	delete(n.policies, s.Index)
	n.mu.Unlock()
	if n.proxy != nil {
		n.proxy.recheck(s) // it has no policy now: everything goes
	}
	err := n.destroySlot(s)
	n.free(s.Index)
	return err
}

func (n *Network) startPool() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.stop != nil || n.closed || n.cfg.PoolSize <= 0 {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	n.stop = cancel
	n.wg.Add(1)
	go n.refill(ctx)
}

func (n *Network) wake() {
	select {
	case n.kick <- struct{}{}:
	default:
	}
}

// refill keeps PoolSize slots prepared.
func (n *Network) refill(ctx context.Context) {
	defer n.wg.Done()
	for {
		for ctx.Err() == nil {
			n.mu.Lock()
			short := len(n.pool) < n.cfg.PoolSize && !n.closed
			var index int
			var err error
			if short {
				index, err = n.allocLocked()
			}
			n.mu.Unlock()
			if !short || err != nil {
				break
			}
			s, err := n.createSlot(index)
			if err != nil {
				n.free(index)
				n.log.Warn("preparing a network slot", "err", err)
				break
			}
			n.mu.Lock()
			n.pool = append(n.pool, s)
			n.mu.Unlock()
		}
		select {
		case <-ctx.Done():
			return
		case <-n.kick:
		}
	}
}

// Close destroys the prepared slots and the daemon-side rules. Slots in
// use are the sandboxes' to release.
func (n *Network) Close() error {
	n.mu.Lock()
	n.closed = true
	pool := n.pool
	n.pool = nil
	n.mu.Unlock()
	if n.stop != nil {
		n.stop()
	}
	n.wg.Wait()
	for _, s := range pool {
		_ = n.Release(s)
	}
	if n.resolver != nil {
		n.resolver.shutdown()
	}
	if n.proxy != nil {
		n.proxy.close()
	}
	n.teardownDaemon()
	if n.dh != nil {
		n.dh.Close()
	}
	return n.daemon.Close()
}

// SetPolicy applies policy to the slot at once: new connections follow it,
// connections it no longer allows are cut (the sandbox's next packet on
// one is refused with a reset: writeRouterTable; the proxy resets those it
// carries), and connections it still allows go on.
func (n *Network) SetPolicy(s *Slot, p Policy) error {
	rt, err := netns.GetFromPath(nsPath(s.routerName))
	if err != nil {
		return fmt.Errorf("opening router namespace of slot %d: %w", s.Index, err)
	}
	defer rt.Close()
	n.mu.Lock()
	old := n.policies[s.Index]
	n.mu.Unlock()
	if err := n.writeRouterTable(rt, s, p, old); err != nil {
		return err
	}
	n.mu.Lock()
	n.policies[s.Index] = p
	n.bySource[s.Uplink4] = s
	n.bySource[s.Uplink6] = s
	n.mu.Unlock()
	// Connections through the proxy are checked against the new policy
	// too (the router's rules see only the proxy).
	if n.proxy != nil {
		n.proxy.recheck(s)
	}
	return nil
}

// PolicyOf returns the policy of the slot whose uplink address is src, for
// the resolver and proxies; ok is false for an address of no slot.
func (n *Network) PolicyOf(src netip.Addr) (Policy, *Slot, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	s, ok := n.bySource[src.Unmap()]
	if !ok {
		return Policy{}, nil, false
	}
	return n.policies[s.Index], s, true
}

// DialSandbox connects to a port of the slot's sandbox, from the daemon's
// namespace (the router passes the daemon's connections to its uplink
// address on to the sandbox).
func (n *Network) DialSandbox(ctx context.Context, s *Slot, port int) (net.Conn, error) {
	var c net.Conn
	err := inNS(n.daemon, func() error {
		d := net.Dialer{Timeout: 15 * time.Second}
		var err error
		c, err = d.DialContext(ctx, "tcp", net.JoinHostPort(s.Uplink4.String(), strconv.Itoa(port)))
		return err
	})
	return c, err
}
