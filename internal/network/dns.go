package network

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/miekg/dns"
	"github.com/vishvananda/netns"
)

// The resolver. Every sandbox's DNS goes to it (the router translates
// queries to its gateway into queries to the service address); DNS to any
// other server is refused by the sandbox's rules like any other traffic.
// It answers only names the sandbox's policy allows — NXDOMAIN otherwise —
// and drops answers that point at addresses no policy opens (a public name
// resolving to a private address: DNS rebinding). For names an allow rule
// opens, the addresses it answers become the rule's addresses in the
// sandbox's router for as long as the answer lives, so connections on the
// rule's ports go through.

// resolver serves DNS on the service address.
type resolver struct {
	n        *Network
	upstream []string
	servers  []*dns.Server
}

// minDynamicTTL is the shortest time an allowed name's address stays
// open: a program may connect a little after it resolved.
const minDynamicTTL = 5 * time.Minute

func (n *Network) startResolver() error {
	up := n.cfg.Resolvers
	if len(up) == 0 {
		up = systemResolvers()
	}
	r := &resolver{n: n, upstream: up}
	svc4, svc6 := n.serviceAddrs()
	for _, a := range []netip.Addr{svc4, svc6} {
		addr := net.JoinHostPort(a.String(), fmt.Sprint(n.dnsPort()))
		var pc net.PacketConn
		var ln net.Listener
		err := inNS(n.daemon, func() error {
			var err error
			if pc, err = net.ListenPacket("udp", addr); err != nil {
				return err
			}
			ln, err = net.Listen("tcp", addr)
			return err
		})
		if err != nil {
			r.shutdown()
			return fmt.Errorf("listening for DNS on %s: %w", addr, err)
		}
		for _, s := range []*dns.Server{{PacketConn: pc, Handler: r}, {Listener: ln, Handler: r}} {
			r.servers = append(r.servers, s)
			go func(s *dns.Server) { _ = s.ActivateAndServe() }(s)
		}
	}
	n.resolver = r
	return nil
}

func (r *resolver) shutdown() {
	for _, s := range r.servers {
		_ = s.Shutdown()
	}
}

// systemResolvers are the nameservers of the host's /etc/resolv.conf.
func systemResolvers() []string {
	f, err := os.Open("/etc/resolv.conf")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "nameserver" {
			if a, err := netip.ParseAddr(fields[1]); err == nil {
				out = append(out, net.JoinHostPort(a.String(), "53"))
			}
		}
	}
	return out
}

// verdict is what a policy says of a name: denied, allowed by the internet
// setting, or allowed by allow rule i.
type verdict struct {
	allowed bool
	rule    int // index into Policy.Allow, -1 for none
}

// nameVerdict decides a name (lowercase, no trailing dot).
func nameVerdict(p Policy, name string) verdict {
	for _, r := range p.Deny {
		if r.MatchName(name) {
			return verdict{rule: -1}
		}
	}
	for i, r := range p.Allow {
		if r.MatchName(name) {
			return verdict{allowed: true, rule: i}
		}
	}
	if p.Internet {
		return verdict{allowed: true, rule: -1}
	}
	return verdict{rule: -1}
}

// ServeDNS implements dns.Handler.
func (r *resolver) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	src, _ := netip.ParseAddrPort(w.RemoteAddr().String())
	p, slot, ok := r.n.PolicyOf(src.Addr())
	m := new(dns.Msg)
	m.SetReply(req)
	if !ok || len(req.Question) != 1 {
		m.Rcode = dns.RcodeRefused
		_ = w.WriteMsg(m)
		return
	}
	q := req.Question[0]
	name := strings.ToLower(strings.TrimSuffix(q.Name, "."))
	v := nameVerdict(p, name)
	if !v.allowed {
		m.Rcode = dns.RcodeNameError
		_ = w.WriteMsg(m)
		return
	}
	resp, err := r.forward(req)
	if err != nil {
		m.Rcode = dns.RcodeServerFailure
		_ = w.WriteMsg(m)
		return
	}
	resp.Id = req.Id
	host := r.n.HostAddrs()
	var kept []dns.RR
	var addrs []netip.Addr
	var ttl uint32
	for _, rr := range resp.Answer {
		var a netip.Addr
		switch rec := rr.(type) {
		case *dns.A:
			a, _ = netip.AddrFromSlice(rec.A)
		case *dns.AAAA:
			a, _ = netip.AddrFromSlice(rec.AAAA)
		default:
			kept = append(kept, rr)
			continue
		}
		if Denied(a, host) {
			continue
		}
		kept = append(kept, rr)
		addrs = append(addrs, a.Unmap())
		if h := rr.Header().Ttl; ttl == 0 || h < ttl {
			ttl = h
		}
	}
	resp.Answer = kept
	if v.rule >= 0 && len(addrs) > 0 {
		if err := r.n.openAddrs(slot, v.rule, addrs, max(time.Duration(ttl)*time.Second, minDynamicTTL)); err != nil {
			r.n.log.Warn("opening resolved addresses", "slot", slot.Index, "err", err)
		}
	}
	_ = w.WriteMsg(resp)
}

// forward asks the upstream resolvers, from the daemon's namespace.
func (r *resolver) forward(req *dns.Msg) (*dns.Msg, error) {
	var lastErr error = fmt.Errorf("no upstream resolver")
	for _, up := range r.upstream {
		var resp *dns.Msg
		err := inNS(r.n.daemon, func() error {
			c := &dns.Client{Timeout: 5 * time.Second}
			conn, err := c.Dial(up)
			if err != nil {
				return err
			}
			defer conn.Close()
			resp, _, err = c.ExchangeWithConn(req.Copy(), conn)
			return err
		})
		if err == nil && resp != nil {
			return resp, nil
		}
		lastErr = err
	}
	return nil, lastErr
}

// openAddrs adds addresses an allow rule's name resolved to to the
// rule's sets in the slot's router, with a timeout.
func (n *Network) openAddrs(s *Slot, rule int, addrs []netip.Addr, ttl time.Duration) error {
	rt, err := netns.GetFromPath(nsPath(s.routerName))
	if err != nil {
		return err
	}
	defer rt.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(rt)))
	if err != nil {
		return err
	}
	t := &nftables.Table{Name: routerTable, Family: nftables.TableFamilyINet}
	for _, a := range addrs {
		set := &nftables.Set{Table: t, Name: nameSet(rule, a.Is6())}
		if a.Is6() {
			set.KeyType = nftables.TypeIP6Addr
		} else {
			set.KeyType = nftables.TypeIPAddr
		}
		if err := c.SetAddElements(set, []nftables.SetElement{{Key: a.AsSlice(), Timeout: ttl}}); err != nil {
			return err
		}
	}
	return c.Flush()
}

// nameSet is the set of the addresses allow rule i's name resolved to.
func nameSet(rule int, v6 bool) string {
	if v6 {
		return fmt.Sprintf("name%d_6", rule)
	}
	return fmt.Sprintf("name%d_4", rule)
}
