package network

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The daemon's side: its namespace holds the slots' uplinks and a service
// address (slot 0's gateway, on an interface of its own) where the
// resolver and the proxies listen. Its table keeps sandboxes from each
// other and from everything of the daemon's namespace but those services,
// and masquerades their traffic out.

// dnsPort is where the resolver listens on the service address.
func (n *Network) dnsPort() uint16 { return 53 }

// serviceAddrs are the service address: slot 0's gateway addresses.
func (n *Network) serviceAddrs() (v4, v6 netip.Addr) {
	_, v4, _, v6 = slotAddrs(n.cfg.Prefix4, n.cfg.Prefix6, 0)
	return
}

func (n *Network) serviceIface() string { return n.prefix + "svc" }

func (n *Network) daemonTable() *nftables.Table {
	return &nftables.Table{Name: "pandastack-" + n.prefix, Family: nftables.TableFamilyINet}
}

// hostPrefixes are the daemon namespace's own addresses (the host's, in
// production), which no sandbox may reach; the slots' are in the
// always-denied ranges already.
func (n *Network) hostPrefixes() []netip.Prefix {
	addrs, err := n.dh.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		n.log.Warn("listing the host's addresses", "err", err)
		return nil
	}
	var out []netip.Prefix
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if n.cfg.Prefix4.Contains(ip) || n.cfg.Prefix6.Contains(ip) {
			continue
		}
		out = append(out, netip.PrefixFrom(ip, ip.BitLen()))
	}
	return out
}

// HostAddrs are the daemon namespace's own addresses, for the resolver and
// proxies to refuse.
func (n *Network) HostAddrs() []netip.Addr {
	var out []netip.Addr
	for _, p := range n.hostPrefixes() {
		out = append(out, p.Addr())
	}
	return out
}

// setupDaemon makes the service address, turns forwarding on and installs
// the daemon's table.
func (n *Network) setupDaemon() error {
	svc4, svc6 := n.serviceAddrs()
	if old, err := n.dh.LinkByName(n.serviceIface()); err == nil {
		_ = n.dh.LinkDel(old)
	}
	// A veth pair with both ends here holds the address (the kernels this
	// runs on may lack the dummy device).
	if err := n.dh.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: n.serviceIface()}, PeerName: n.prefix + "svp"}); err != nil {
		return fmt.Errorf("creating the service interface: %w", err)
	}
	if peer, err := n.dh.LinkByName(n.prefix + "svp"); err == nil {
		_ = n.dh.LinkSetUp(peer)
	}
	link, err := n.dh.LinkByName(n.serviceIface())
	if err != nil {
		return fmt.Errorf("finding the service interface: %w", err)
	}
	for _, a := range []netip.Addr{svc4, svc6} {
		if err := addAddr(n.dh, link, a, a.BitLen()); err != nil {
			return err
		}
	}
	if err := n.dh.LinkSetUp(link); err != nil {
		return fmt.Errorf("bringing up the service interface: %w", err)
	}
	if err := sysctl(n.daemon, "net/ipv4/ip_forward", "1"); err != nil {
		return err
	}
	// IPv6 forwarding on a host stops it from taking router
	// advertisements: only in a namespace of the daemon's own.
	if n.cfg.DaemonNS != "" {
		if err := sysctl(n.daemon, "net/ipv6/conf/all/forwarding", "1"); err != nil {
			return err
		}
	}

	c, err := nftables.New(nftables.WithNetNSFd(int(n.daemon)))
	if err != nil {
		return fmt.Errorf("nftables in the daemon's namespace: %w", err)
	}
	t := n.daemonTable()
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	acceptPolicy := nftables.ChainPolicyAccept
	fwd := c.AddChain(&nftables.Chain{Name: "fwd", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &acceptPolicy})
	in := c.AddChain(&nftables.Chain{Name: "in", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &acceptPolicy})
	post := c.AddChain(&nftables.Chain{Name: "post", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
	add := func(ch *nftables.Chain, e []expr.Any) { c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: e}) }
	slots := n.prefix + "h*"

	// Sandboxes never reach each other.
	add(fwd, rule(iif(slots), oif(slots), drop()))
	// Of the daemon's namespace, sandboxes reach the resolver and the
	// proxies on the service address only.
	add(in, rule(iif(slots), ctEstablished(), accept()))
	// Neighbour discovery of the router namespaces (their own, not their
	// sandboxes': those are refused on the router's side).
	for _, typ := range []byte{133, 135, 136} {
		add(in, rule(iif(slots), l4proto(unix.IPPROTO_ICMPV6), icmp6Type(typ), accept()))
	}
	for _, svc := range []netip.Addr{svc4, svc6} {
		for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
			for _, port := range n.servicePorts() {
				add(in, rule(iif(slots), addrIs(svc, true, expr.CmpOpEq), l4proto(proto), dport(port), accept()))
			}
		}
	}
	add(in, rule(iif(slots), drop()))
	// Their traffic leaves as the daemon namespace's own.
	add(post, rule(inPrefix(n.cfg.Prefix4, false), notOif(slots), masquerade()))
	add(post, rule(inPrefix(n.cfg.Prefix6, false), notOif(slots), masquerade()))
	if err := c.Flush(); err != nil {
		return fmt.Errorf("writing the daemon's network rules: %w", err)
	}
	return nil
}

// servicePorts are the ports of the service address sandboxes may reach.
func (n *Network) servicePorts() []uint16 {
	return []uint16{n.dnsPort(), proxyHTTPPort, proxyTLSPort}
}

// teardownDaemon removes the daemon's table and service interface.
func (n *Network) teardownDaemon() {
	if c, err := nftables.New(nftables.WithNetNSFd(int(n.daemon))); err == nil {
		c.DelTable(n.daemonTable())
		_ = c.Flush()
	}
	if link, err := n.dh.LinkByName(n.serviceIface()); err == nil {
		_ = n.dh.LinkDel(link)
	}
}

// flushConntrack forgets the daemon namespace's connections of a slot's
// uplink addresses: a reused slot must not inherit them, and a policy
// change cuts connections to what it no longer allows.
func (n *Network) flushConntrack(addrs ...netip.Addr) {
	for _, a := range addrs {
		f := &netlink.ConntrackFilter{}
		if err := f.AddIP(netlink.ConntrackOrigSrcIP, a.AsSlice()); err != nil {
			continue
		}
		fam := netlink.FAMILY_V4
		if a.Is6() {
			fam = netlink.FAMILY_V6
		}
		if _, err := n.dh.ConntrackDeleteFilters(netlink.ConntrackTable, netlink.InetFamily(fam), f); err != nil &&
			!strings.Contains(err.Error(), "no such file") {
			n.log.Debug("flushing conntrack", "addr", a, "err", err)
		}
	}
}
