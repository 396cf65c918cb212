package network

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/pandastack/pandastack/internal/cleanup"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// The inside of every sandbox is the same: its gVisor netstack has
// SandboxIP4/6 on eth0, with the router namespace's in0 (RouterIP4/6) as
// its gateway and DNS server. A checkpoint keeps that configuration, so a
// fork or resume restored into a fresh slot works without rewriting it.
// The router namespace translates it to the slot's own uplink address,
// which is how the daemon's side tells sandboxes apart.
var (
	SandboxIP4 = netip.MustParseAddr("10.255.255.2")
	RouterIP4  = netip.MustParseAddr("10.255.255.1")
	SandboxIP6 = netip.MustParseAddr("fd70:7373:6e65::2")
	RouterIP6  = netip.MustParseAddr("fd70:7373:6e65::1")
)

const (
	insideBits4 = 30
	insideBits6 = 64
	uplinkBits4 = 30
	uplinkBits6 = 64
)

// Slot is the network of one sandbox: its own namespace (taken over by its
// netstack), the router namespace behind it, and the uplink into the
// daemon's namespace. Slot 0 is never handed out: its gateway address is
// the daemon's service address (resolver, proxies).
type Slot struct {
	Index int
	// SandboxNS is the path of the sandbox's namespace, for its spec.
	SandboxNS               string
	sandboxName, routerName string
	// HostIface is the uplink's end in the daemon's namespace.
	HostIface string
	// Uplink is the sandbox's address as the daemon's side sees it (its
	// traffic is translated to it); Gateway is the daemon side's.
	Uplink4, Gateway4, Uplink6, Gateway6 netip.Addr
	// gen is the connection mark of its router rules' generation
	// (writeRouterTable); written by whoever writes its rules, one at a
	// time.
	gen uint32
}

// slotAddrs computes a slot's uplink addresses: the index-th /30 of the
// IPv4 prefix and /64 of the IPv6 one.
func slotAddrs(p4, p6 netip.Prefix, index int) (up4, gw4, up6, gw6 netip.Addr) {
	b4 := p4.Addr().As4()
	v := uint32(b4[0])<<24 | uint32(b4[1])<<16 | uint32(b4[2])<<8 | uint32(b4[3])
	v += uint32(index) * 4
	base := netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	gw4 = base.Next()
	up4 = gw4.Next()
	b6 := p6.Addr().As16()
	b6[6], b6[7] = byte(index>>8), byte(index)
	gw6 = netip.AddrFrom16(b6).Next()
	up6 = gw6.Next()
	return
}

func ipNet(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, a.BitLen())}
}

func addAddr(h *netlink.Handle, link netlink.Link, a netip.Addr, bits int) error {
	addr := &netlink.Addr{IPNet: ipNet(a, bits)}
	if a.Is6() {
		// No duplicate address detection: these links are point to point
		// and known, and DAD would hold the address back for a second.
		addr.Flags = unix.IFA_F_NODAD
	}
	if err := h.AddrAdd(link, addr); err != nil {
		return fmt.Errorf("adding %s to %s: %w", a, link.Attrs().Name, err)
	}
	return nil
}

// createSlot builds slot index's namespaces, links, addresses, routes and
// forwarding; daemon is the daemon's namespace. On error nothing is left.
func (n *Network) createSlot(index int) (_ *Slot, err error) {
	s := &Slot{Index: index, sandboxName: n.nsName("s", index), routerName: n.nsName("r", index), HostIface: n.ifName(index)}
	s.SandboxNS = nsPath(s.sandboxName)
	s.Uplink4, s.Gateway4, s.Uplink6, s.Gateway6 = slotAddrs(n.cfg.Prefix4, n.cfg.Prefix6, index)
	cu := cleanup.Make(func() { _ = n.destroySlot(s) })
	defer cu.Clean()

	for _, name := range []string{s.sandboxName, s.routerName} {
		_ = deleteNamedNS(name) // a leftover of a crash
		if err := createNamedNS(name); err != nil {
			return nil, err
		}
	}
	sbNS, err := netns.GetFromPath(nsPath(s.sandboxName))
	if err != nil {
		return nil, fmt.Errorf("opening sandbox namespace: %w", err)
	}
	defer sbNS.Close()
	rtNS, err := netns.GetFromPath(nsPath(s.routerName))
	if err != nil {
		return nil, fmt.Errorf("opening router namespace: %w", err)
	}
	defer rtNS.Close()
	hs, err := netlink.NewHandleAt(sbNS)
	if err != nil {
		return nil, fmt.Errorf("netlink in sandbox namespace: %w", err)
	}
	defer hs.Close()
	hr, err := netlink.NewHandleAt(rtNS)
	if err != nil {
		return nil, fmt.Errorf("netlink in router namespace: %w", err)
	}
	defer hr.Close()

	// The two veth pairs: in0 (router) ↔ eth0 (sandbox), up0 (router) ↔
	// the host interface (daemon).
	if err := hr.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "in0"}, PeerName: "eth0", PeerNamespace: netlink.NsFd(sbNS)}); err != nil {
		return nil, fmt.Errorf("creating the sandbox's veth: %w", err)
	}
	if err := hr.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "up0"}, PeerName: s.HostIface, PeerNamespace: netlink.NsFd(n.daemon)}); err != nil {
		return nil, fmt.Errorf("creating the uplink veth: %w", err)
	}
	for _, step := range []struct {
		h    *netlink.Handle
		link string
		addr []netip.Addr
		bits []int
	}{
		{hs, "eth0", []netip.Addr{SandboxIP4, SandboxIP6}, []int{insideBits4, insideBits6}},
		{hr, "in0", []netip.Addr{RouterIP4, RouterIP6}, []int{insideBits4, insideBits6}},
		{hr, "up0", []netip.Addr{s.Uplink4, s.Uplink6}, []int{uplinkBits4, uplinkBits6}},
		{n.dh, s.HostIface, []netip.Addr{s.Gateway4, s.Gateway6}, []int{uplinkBits4, uplinkBits6}},
		{hs, "lo", nil, nil},
		{hr, "lo", nil, nil},
	} {
		link, err := step.h.LinkByName(step.link)
		if err != nil {
			return nil, fmt.Errorf("finding %s: %w", step.link, err)
		}
		for i, a := range step.addr {
			if err := addAddr(step.h, link, a, step.bits[i]); err != nil {
				return nil, err
			}
		}
		if err := step.h.LinkSetUp(link); err != nil {
			return nil, fmt.Errorf("bringing up %s: %w", step.link, err)
		}
	}
	for _, r := range []struct {
		h  *netlink.Handle
		gw netip.Addr
	}{
		{hs, RouterIP4}, {hs, RouterIP6}, {hr, s.Gateway4}, {hr, s.Gateway6},
	} {
		if err := r.h.RouteAdd(&netlink.Route{Gw: r.gw.AsSlice()}); err != nil {
			return nil, fmt.Errorf("adding a default route via %s: %w", r.gw, err)
		}
	}
	for _, kv := range [][2]string{
		{"net/ipv4/ip_forward", "1"},
		{"net/ipv6/conf/all/forwarding", "1"},
	} {
		if err := sysctl(rtNS, kv[0], kv[1]); err != nil {
			return nil, err
		}
	}
	if err := n.writeRouterTable(rtNS, s, Policy{}, Policy{}); err != nil {
		return nil, err
	}
	cu.Release()
	return s, nil
}

// destroySlot removes everything of a slot: its namespaces (their links go
// with them, the host end of the uplink too) and conntrack entries of its
// uplink addresses in the daemon's namespace.
func (n *Network) destroySlot(s *Slot) error {
	var errs []error
	for _, name := range []string{s.sandboxName, s.routerName} {
		if err := deleteNamedNS(name); err != nil {
			errs = append(errs, err)
		}
	}
	// The host end normally goes with its peer; a half-made slot may have
	// left it.
	if link, err := n.dh.LinkByName(s.HostIface); err == nil {
		_ = n.dh.LinkDel(link)
	}
	n.flushConntrack(s.Uplink4, s.Uplink6)
	if len(errs) > 0 {
		return fmt.Errorf("destroying network slot %d: %v", s.Index, errs)
	}
	return nil
}
