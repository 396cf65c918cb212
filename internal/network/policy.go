package network

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Policy is what a sandbox may reach.
type Policy struct {
	// Internet allows every public address (the deny rules still apply).
	Internet bool
	// Allow and Deny are the sandbox's rules; Deny wins.
	Allow, Deny []Rule
}

// Empty reports whether the policy allows nothing (egress "none").
func (p Policy) Empty() bool { return !p.Internet && len(p.Allow) == 0 }

// namesHosts reports whether a rule of the policy is a host name: then its
// HTTP and TLS go through the proxy.
func (p Policy) namesHosts() bool {
	for _, rs := range [][]Rule{p.Allow, p.Deny} {
		for _, r := range rs {
			if r.Name != "" {
				return true
			}
		}
	}
	return false
}

// Rule is one allow or deny entry: an address prefix or a host name (with
// "*." for any subdomain), optionally limited to ports and a protocol.
type Rule struct {
	Prefix netip.Prefix
	Name   string
	Ports  []PortRange
	// Proto is "tcp", "udp" or "" for both (and, for prefixes without
	// ports, every protocol).
	Proto string
}

// PortRange is an inclusive range of ports.
type PortRange struct{ From, To uint16 }

// String is the rule's text, as ParseRule reads it.
func (r Rule) String() string {
	var b strings.Builder
	host := r.Name
	if r.Prefix.IsValid() {
		host = r.Prefix.String()
		if r.Prefix.IsSingleIP() {
			host = r.Prefix.Addr().String()
		}
	}
	if len(r.Ports) > 0 && strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	b.WriteString(host)
	for i, p := range r.Ports {
		if i == 0 {
			b.WriteByte(':')
		} else {
			b.WriteByte(',')
		}
		b.WriteString(strconv.Itoa(int(p.From)))
		if p.To != p.From {
			b.WriteString("-" + strconv.Itoa(int(p.To)))
		}
	}
	if r.Proto != "" {
		b.WriteString("/" + r.Proto)
	}
	return b.String()
}

// ParseRule reads HOST[:PORTS][/PROTO]: HOST is an IP address, a CIDR
// prefix, a host name or "*." and a domain (IPv6 addresses and prefixes
// in brackets when ports follow); PORTS is a comma-separated list of
// ports and ranges (8000-8999); PROTO is tcp or udp.
func ParseRule(s string) (Rule, error) {
	orig := s
	var r Rule
	if i := strings.LastIndexByte(s, '/'); i >= 0 {
		if p := s[i+1:]; p == "tcp" || p == "udp" {
			r.Proto, s = p, s[:i]
		}
	}
	host, ports := s, ""
	switch {
	case strings.HasPrefix(s, "["):
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return Rule{}, fmt.Errorf("rule %q: unclosed [", orig)
		}
		host = s[1:end]
		rest := s[end+1:]
		if rest != "" {
			if !strings.HasPrefix(rest, ":") {
				return Rule{}, fmt.Errorf("rule %q: want :PORTS after ]", orig)
			}
			ports = rest[1:]
		}
	case strings.Count(s, ":") == 1:
		host, ports, _ = strings.Cut(s, ":")
	}
	if p, err := netip.ParsePrefix(host); err == nil {
		r.Prefix = p.Masked()
	} else if a, err := netip.ParseAddr(host); err == nil {
		r.Prefix = netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen())
	} else {
		name, err := checkName(host)
		if err != nil {
			return Rule{}, fmt.Errorf("rule %q: %w", orig, err)
		}
		r.Name = name
	}
	if r.Prefix.IsValid() && r.Prefix.Addr().Zone() != "" {
		return Rule{}, fmt.Errorf("rule %q: zoned addresses are not allowed", orig)
	}
	if ports != "" {
		for _, part := range strings.Split(ports, ",") {
			lo, hi, isRange := strings.Cut(part, "-")
			from, err1 := strconv.ParseUint(lo, 10, 16)
			to := from
			var err2 error
			if isRange {
				to, err2 = strconv.ParseUint(hi, 10, 16)
			}
			if err1 != nil || err2 != nil || from == 0 || to < from {
				return Rule{}, fmt.Errorf("rule %q: bad port %q", orig, part)
			}
			r.Ports = append(r.Ports, PortRange{uint16(from), uint16(to)})
		}
	}
	if r.Proto != "" && len(r.Ports) == 0 {
		return Rule{}, fmt.Errorf("rule %q: a protocol needs ports", orig)
	}
	return r, nil
}

// checkName validates and lowercases a host name rule.
func checkName(s string) (string, error) {
	s = strings.ToLower(strings.TrimSuffix(s, "."))
	rest := strings.TrimPrefix(s, "*.")
	if rest == "" || len(s) > 253 {
		return "", fmt.Errorf("empty or too long host name")
	}
	for _, label := range strings.Split(rest, ".") {
		if label == "" || len(label) > 63 {
			return "", fmt.Errorf("bad host name %q", s)
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return "", fmt.Errorf("bad host name %q", s)
			}
		}
	}
	return s, nil
}

// MatchName reports whether a rule's name covers host (lowercase, without
// a trailing dot).
func (r Rule) MatchName(host string) bool {
	if r.Name == "" {
		return false
	}
	if d, ok := strings.CutPrefix(r.Name, "*."); ok {
		return strings.HasSuffix(host, "."+d)
	}
	return host == r.Name
}

// alwaysDenied are the destinations no policy opens: loopback, private
// (RFC 1918), link-local (cloud metadata 169.254.169.254, fd00:ec2::254 in
// unique-local), CGNAT, unique-local, multicast, reserved and special
// ranges, IPv4-mapped and IPv4-embedding IPv6 forms (NAT64, 6to4), and the
// slots' own ranges (other sandboxes). 198.51.100.0/24, 203.0.113.0/24 and
// 2001:db8::/32 (documentation ranges) are left alone: test stand-ins and
// this machine's package registries live there.
var alwaysDenied = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.0.0.0/24"),
	netip.MustParsePrefix("192.0.2.0/24"),
	netip.MustParsePrefix("192.88.99.0/24"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("224.0.0.0/4"),
	netip.MustParsePrefix("240.0.0.0/4"),
	netip.MustParsePrefix("::/127"),
	netip.MustParsePrefix("::ffff:0:0/96"),
	netip.MustParsePrefix("64:ff9b::/96"),
	netip.MustParsePrefix("64:ff9b:1::/48"),
	netip.MustParsePrefix("100::/64"),
	netip.MustParsePrefix("2001::/32"),
	netip.MustParsePrefix("2002::/16"),
	netip.MustParsePrefix("fc00::/7"),
	netip.MustParsePrefix("fe80::/10"),
	netip.MustParsePrefix("ff00::/8"),
}

// Denied reports whether a is a destination no policy opens, given the
// host's own addresses.
func Denied(a netip.Addr, host []netip.Addr) bool {
	a = a.Unmap()
	for _, p := range alwaysDenied {
		if p.Contains(a) {
			return true
		}
	}
	for _, h := range host {
		if h == a {
			return true
		}
	}
	return false
}

// mergeRanges turns prefixes (and single addresses) of one family into
// sorted, non-overlapping [start, end] ranges: interval sets refuse
// overlapping elements.
func mergeRanges(ps []netip.Prefix) [][2]netip.Addr {
	var rs [][2]netip.Addr
	for _, p := range ps {
		p = p.Masked()
		rs = append(rs, [2]netip.Addr{p.Addr(), lastAddr(p)})
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i][0].Less(rs[j][0]) })
	var out [][2]netip.Addr
	for _, r := range rs {
		if n := len(out); n > 0 {
			last := &out[n-1]
			if next := last[1].Next(); !next.IsValid() || !next.Less(r[0]) {
				if last[1].Less(r[1]) {
					last[1] = r[1]
				}
				continue
			}
		}
		out = append(out, r)
	}
	return out
}

func rangeElements(rs [][2]netip.Addr) []nftables.SetElement {
	var els []nftables.SetElement
	for _, r := range rs {
		els = append(els, nftables.SetElement{Key: r[0].AsSlice()})
		if end := r[1].Next(); end.IsValid() {
			els = append(els, nftables.SetElement{Key: end.AsSlice(), IntervalEnd: true})
		}
	}
	return els
}

// splitFamilies splits prefixes by IP version.
func splitFamilies(ps []netip.Prefix) (v4, v6 []netip.Prefix) {
	for _, p := range ps {
		if p.Addr().Is4() {
			v4 = append(v4, p)
		} else {
			v6 = append(v6, p)
		}
	}
	return
}

// routerTable is the name of the table in each router namespace.
const routerTable = "pandastack"

// writeRouterTable (re)writes the slot's router table for policy, in one
// transaction: the sandbox's traffic is never without rules.
//
// Each write is a generation of the slot's rules, with a mark of its own
// (random, so that a daemon restarted over a slot's rules does not repeat
// one): a connection the rules accept is marked with it, and its later
// packets from the sandbox pass at once while the mark is the current
// one. After a policy change, the first packet the sandbox sends on an
// older connection is checked against the new rules: still allowed, it is
// marked anew; no longer allowed, it is refused with a reset (ICMP error
// for other protocols), which ends the connection for the sandbox — also
// a download where the sandbox only acknowledges, since its next
// acknowledgment is refused. Conntrack is not flushed: connections the new
// policy still allows go on. The sandbox's own resets on such a
// connection pass, so the other end learns it ended. old is the policy
// the slot had: the addresses its name rules had opened are carried over
// to the new policy's rules for the same names.
func (n *Network) writeRouterTable(ns netns.NsHandle, s *Slot, p, old Policy) error {
	t := &nftables.Table{Name: routerTable, Family: nftables.TableFamilyINet}
	carried := n.openedNames(ns, t, old)
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return fmt.Errorf("nftables in router namespace: %w", err)
	}
	gen := s.gen
	for gen == 0 || gen == s.gen {
		gen = rand.Uint32()
	}
	// Deleting and re-adding in the same transaction replaces the table
	// atomically. (Deleting a table that does not exist fails the whole
	// transaction, so add it first: adding an existing table is a no-op.)
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)

	// Each set gets its batch ID here: the library would otherwise take
	// it from a package-level counter it increments without a lock (a
	// data race between slots written at once).
	var setID uint32
	nextSetID := func() uint32 { setID++; return setID }

	deny4, deny6 := splitFamilies(append(append([]netip.Prefix{}, alwaysDenied...), n.hostPrefixes()...))
	sets := map[string]*nftables.Set{}
	for _, sd := range []struct {
		name string
		v6   bool
		ps   []netip.Prefix
	}{
		{"deny4", false, deny4}, {"deny6", true, deny6},
	} {
		kt := nftables.TypeIPAddr
		if sd.v6 {
			kt = nftables.TypeIP6Addr
		}
		set := &nftables.Set{Table: t, ID: nextSetID(), Name: sd.name, KeyType: kt, Interval: true}
		if err := c.AddSet(set, rangeElements(mergeRanges(sd.ps))); err != nil {
			return fmt.Errorf("adding set %s: %w", sd.name, err)
		}
		sets[sd.name] = set
	}

	pre := c.AddChain(&nftables.Chain{Name: "pre", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest})
	post := c.AddChain(&nftables.Chain{Name: "post", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
	dropPolicy := nftables.ChainPolicyDrop
	fwd := c.AddChain(&nftables.Chain{Name: "fwd", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &dropPolicy})
	add := func(ch *nftables.Chain, e []expr.Any) { c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: e}) }

	svc4, svc6 := n.serviceAddrs()
	for _, fam := range []struct {
		router, sandbox, uplink, svc netip.Addr
	}{
		{RouterIP4, SandboxIP4, s.Uplink4, svc4},
		{RouterIP6, SandboxIP6, s.Uplink6, svc6},
	} {
		// DNS to the gateway goes to the daemon's resolver.
		for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
			add(pre, rule(iif("in0"), addrIs(fam.router, true, expr.CmpOpEq), l4proto(proto), dport(53),
				natTo(expr.NATTypeDestNAT, fam.svc, n.dnsPort())))
		}
		// Where the policy names hosts, HTTP and TLS go through the
		// daemon's proxy, which reads the name on the wire.
		if p.namesHosts() {
			for _, pp := range [][2]uint16{{80, proxyHTTPPort}, {443, proxyTLSPort}} {
				add(pre, rule(iif("in0"), nfproto(fam.svc.Is6()), l4proto(unix.IPPROTO_TCP), dport(pp[0]),
					natTo(expr.NATTypeDestNAT, fam.svc, pp[1])))
			}
		}
		// The daemon reaches the sandbox's ports at its uplink address.
		add(pre, rule(iif("up0"), addrIs(fam.uplink, true, expr.CmpOpEq), natTo(expr.NATTypeDestNAT, fam.sandbox, 0)))
		// The sandbox's traffic leaves as the slot's uplink address.
		add(post, rule(oif("up0"), addrIs(fam.sandbox, false, expr.CmpOpEq), natTo(expr.NATTypeSourceNAT, fam.uplink, 0)))
	}

	// What the rules above translated on purpose (DNS, the proxy, the
	// daemon's connections to the sandbox's ports), both ways.
	add(fwd, rule(ctDNAT(), accept()))
	// Answers to the sandbox's connections; nothing else comes in.
	add(fwd, rule(iif("up0"), ctEstablished(), accept()))
	add(fwd, rule(iif("up0"), drop()))
	// Nothing leaves from another address.
	add(fwd, rule(iif("in0"), nfproto(false), addrIs(SandboxIP4, false, expr.CmpOpNeq), drop()))
	add(fwd, rule(iif("in0"), nfproto(true), addrIs(SandboxIP6, false, expr.CmpOpNeq), drop()))
	// Connections these rules accepted go on; older ones are checked
	// again below (their resets pass, to end them at the other side).
	add(fwd, rule(iif("in0"), ctEstablished(), ctMarkIs(gen), accept()))
	add(fwd, rule(iif("in0"), ctEstablished(), l4proto(unix.IPPROTO_TCP), tcpRST(), accept()))
	refuse := func(match exprs) {
		add(fwd, rule(match, l4proto(unix.IPPROTO_TCP), rejectTCP()))
		add(fwd, rule(match, l4proto(unix.IPPROTO_UDP), rejectUDP()))
		add(fwd, rule(match, rejectAny()))
	}
	// DNS goes to the daemon's resolver only (translated above): DNS
	// and DNS over TLS to any other server are refused.
	for _, pp := range []struct {
		proto byte
		port  uint16
	}{{unix.IPPROTO_UDP, 53}, {unix.IPPROTO_TCP, 53}, {unix.IPPROTO_TCP, 853}} {
		refuse(rule(iif("in0"), l4proto(pp.proto), dport(pp.port)))
	}
	refuse(rule(iif("in0"), addrIn(sets["deny4"], false, true)))
	refuse(rule(iif("in0"), addrIn(sets["deny6"], true, true)))
	for _, r := range p.Deny {
		for _, m := range ruleMatches(r) {
			refuse(rule(iif("in0"), m))
		}
	}
	if p.Internet {
		add(fwd, rule(iif("in0"), ctMarkSet(gen), accept()))
	}
	for i, r := range p.Allow {
		if r.Name == "" {
			for _, m := range ruleMatches(r) {
				add(fwd, rule(iif("in0"), m, ctMarkSet(gen), accept()))
			}
			continue
		}
		// A name rule opens the addresses the resolver answered for the
		// name (sets with a timeout, filled by the resolver).
		for _, v6 := range []bool{false, true} {
			kt := nftables.TypeIPAddr
			if v6 {
				kt = nftables.TypeIP6Addr
			}
			set := &nftables.Set{Table: t, ID: nextSetID(), Name: nameSet(i, v6), KeyType: kt, HasTimeout: true}
			if err := c.AddSet(set, carried[nameKey{r.Name, v6}]); err != nil {
				return fmt.Errorf("adding set %s: %w", set.Name, err)
			}
			for _, m := range portMatches(r, addrIn(set, v6, true)) {
				add(fwd, rule(iif("in0"), m, ctMarkSet(gen), accept()))
			}
		}
	}
	refuse(iif("in0"))
	if err := c.Flush(); err != nil {
		return fmt.Errorf("writing router rules of slot %d: %w", s.Index, err)
	}
	s.gen = gen
	return nil
}

// nameKey names the addresses a name rule opened, by family.
type nameKey struct {
	name string
	v6   bool
}

// openedNames reads the addresses the resolver opened for the name rules
// of old (the policy of the table now in ns), with the time each has left:
// a new policy that allows the same names keeps them open. A slot without
// a table yet has none.
func (n *Network) openedNames(ns netns.NsHandle, t *nftables.Table, old Policy) map[nameKey][]nftables.SetElement {
	out := map[nameKey][]nftables.SetElement{}
	var c *nftables.Conn
	for i, r := range old.Allow {
		if r.Name == "" {
			continue
		}
		if c == nil {
			var err error
			if c, err = nftables.New(nftables.WithNetNSFd(int(ns))); err != nil {
				return out
			}
		}
		for _, v6 := range []bool{false, true} {
			kt := nftables.TypeIPAddr
			if v6 {
				kt = nftables.TypeIP6Addr
			}
			els, err := c.GetSetElements(&nftables.Set{Table: t, Name: nameSet(i, v6), KeyType: kt, HasTimeout: true})
			if err != nil {
				continue
			}
			k := nameKey{r.Name, v6}
			for _, e := range els {
				if slices.ContainsFunc(out[k], func(o nftables.SetElement) bool { return bytes.Equal(o.Key, e.Key) }) {
					continue
				}
				left := e.Expires
				if left <= 0 {
					left = minDynamicTTL
				}
				out[k] = append(out[k], nftables.SetElement{Key: e.Key, Timeout: left})
			}
		}
	}
	return out
}

// ruleMatches are the matches of an address rule, one per protocol and
// port range; name rules have none here (their addresses come from the
// resolver).
func ruleMatches(r Rule) []exprs {
	if !r.Prefix.IsValid() {
		return nil
	}
	return portMatches(r, inPrefix(r.Prefix, true))
}

// portMatches combines a destination match with the rule's protocols and
// port ranges.
func portMatches(r Rule, base exprs) []exprs {
	if len(r.Ports) == 0 {
		return []exprs{base}
	}
	protos := []byte{unix.IPPROTO_TCP, unix.IPPROTO_UDP}
	switch r.Proto {
	case "tcp":
		protos = protos[:1]
	case "udp":
		protos = protos[1:]
	}
	var out []exprs
	for _, proto := range protos {
		for _, pr := range r.Ports {
			m := rule(base, l4proto(proto))
			if pr.From == pr.To {
				m = rule(m, dport(pr.From))
			} else {
				m = rule(m, dportRange(pr.From, pr.To))
			}
			out = append(out, m)
		}
	}
	return out
}

// lastAddr is the last address of a prefix.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}
