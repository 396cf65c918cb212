package network

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/pandastack/pandastack/internal/nettest"
	"github.com/vishvananda/netlink"
)

// These tests run the slots' plumbing and rules in a tiny internet of the
// test's own (internal/nettest), dialing from the sandbox's namespace with
// the host kernel's stack: it sees the same addresses, routes and rules a
// gVisor netstack in that namespace would. Real sandboxes are tested in
// internal/daemon.

func newTestNetwork(t *testing.T) (*Network, *nettest.Internet) {
	t.Helper()
	in := nettest.New(t)
	n, err := New(Config{DaemonNS: in.DaemonNS, Instance: t.Name()})
	if err != nil {
		t.Fatal(err)
	}
	n.RemoveUnused()
	t.Cleanup(func() { _ = n.Close() })
	return n, in
}

// dial connects from the slot's sandbox namespace; it returns "ok",
// "refused" (a reset or an ICMP error: refused at once) or the error.
func dial(t *testing.T, s *Slot, network, addr string) string {
	t.Helper()
	var got string
	err := nettest.InNS(s.SandboxNS, func() error {
		d := net.Dialer{Timeout: 10 * time.Second}
		c, err := d.Dial(network, addr)
		if err != nil {
			switch {
			case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.EHOSTUNREACH),
				errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.EACCES):
				got = "refused"
			default:
				got = err.Error()
			}
			return nil
		}
		defer c.Close()
		if !strings.HasSuffix(addr, ":443") {
			fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: x\r\n\r\n")
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			b := make([]byte, 64)
			n, _ := c.Read(b)
			if !strings.HasPrefix(string(b[:n]), "HTTP/1.0 200") {
				got = fmt.Sprintf("no answer: %q", b[:n])
				return nil
			}
		}
		got = "ok"
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func mustRules(t *testing.T, ss ...string) []Rule {
	t.Helper()
	var out []Rule
	for _, s := range ss {
		r, err := ParseRule(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

func TestEgressPolicies(t *testing.T) {
	n, _ := newTestNetwork(t)
	s, err := n.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer n.Release(s)
	neighbour, err := n.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer n.Release(neighbour)
	if err := n.SetPolicy(neighbour, Policy{Internet: true}); err != nil {
		t.Fatal(err)
	}
	pub := nettest.PublicIP.String()
	pub6 := "[" + nettest.PublicIP6.String() + "]"
	targets := map[string]string{
		"public:80":    pub + ":80",
		"public:443":   pub + ":443",
		"public6:80":   pub6 + ":80",
		"private":      nettest.PrivateIP.String() + ":80",
		"metadata":     nettest.MetadataIP.String() + ":80",
		"host":         nettest.DaemonIP.String() + ":80",
		"host6":        "[" + nettest.DaemonIP6.String() + "]:80",
		"mapped":       "[::ffff:" + nettest.PrivateIP.String() + "]:80",
		"neighbour":    neighbour.Uplink4.String() + ":80",
		"gateway":      s.Gateway4.String() + ":80",
		"service":      mustService(n) + ":80",
		"loopback-ish": "127.0.0.1:80",
	}
	for _, tc := range []struct {
		name   string
		policy Policy
		open   []string // the targets that must answer; all others are refused
	}{
		{"none", Policy{}, nil},
		{"internet", Policy{Internet: true}, []string{"public:80", "public:443", "public6:80"}},
		{"allow a port", Policy{Allow: mustRules(t, pub+":80")}, []string{"public:80"}},
		{"allow a prefix", Policy{Allow: mustRules(t, "198.51.100.0/24", "2001:db8::/32")}, []string{"public:80", "public:443", "public6:80"}},
		{"allow cannot open private", Policy{Allow: mustRules(t, "0.0.0.0/0", "::/0")}, []string{"public:80", "public:443", "public6:80"}},
		{"deny wins", Policy{Internet: true, Deny: mustRules(t, pub+":443")}, []string{"public:80", "public6:80"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := n.SetPolicy(s, tc.policy); err != nil {
				t.Fatal(err)
			}
			open := map[string]bool{}
			for _, o := range tc.open {
				open[o] = true
			}
			for name, addr := range targets {
				want := "refused"
				if open[name] {
					want = "ok"
				}
				if got := dial(t, s, "tcp", addr); got != want {
					t.Errorf("%s (%s): got %s, want %s", name, addr, got, want)
				}
			}
		})
	}
}

func mustService(n *Network) string {
	v4, _ := n.serviceAddrs()
	return v4.String()
}

// A policy change cuts connections to what it no longer allows, and
// leaves those it still allows alone.
func TestPolicyChangeCutsConnections(t *testing.T) {
	n, _ := newTestNetwork(t)
	s, err := n.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer n.Release(s)
	if err := n.SetPolicy(s, Policy{Internet: true}); err != nil {
		t.Fatal(err)
	}
	var denied, kept net.Conn
	err = nettest.InNS(s.SandboxNS, func() error {
		var err error
		if denied, err = net.DialTimeout("tcp", nettest.PublicIP.String()+":80", 10*time.Second); err != nil {
			return err
		}
		kept, err = net.DialTimeout("tcp", "["+nettest.PublicIP6.String()+"]:80", 10*time.Second)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer denied.Close()
	defer kept.Close()
	if err := n.SetPolicy(s, Policy{Internet: true, Deny: mustRules(t, nettest.PublicIP.String())}); err != nil {
		t.Fatal(err)
	}
	ask := func(c net.Conn) (string, error) {
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		fmt.Fprintf(c, "GET / HTTP/1.0\r\nHost: x\r\n\r\n")
		b := make([]byte, 64)
		nr, err := c.Read(b)
		return string(b[:nr]), err
	}
	if got, err := ask(denied); err == nil && strings.HasPrefix(got, "HTTP/1.0 200") {
		t.Errorf("a connection the new policy denies still answers: %q", got)
	} else if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("a connection the new policy denies: got %q, %v; want a reset", got, err)
	}
	if got, err := ask(kept); err != nil || !strings.HasPrefix(got, "HTTP/1.0 200") {
		t.Errorf("a connection the new policy still allows: got %q, %v; want an answer", got, err)
	}
}

// Nothing of a slot is left after it is released: namespaces, interfaces,
// addresses, routes, rules, conntrack entries. 200 cycles.
func TestReleaseLeavesNothing(t *testing.T) {
	n, _ := newTestNetwork(t)
	before := n.census(t)
	cycles := 200
	if testing.Short() {
		cycles = 20
	}
	for i := range cycles {
		s, err := n.Acquire(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if err := n.SetPolicy(s, Policy{Internet: true}); err != nil {
			t.Fatal(err)
		}
		if i%20 == 0 {
			_ = dial(t, s, "tcp", nettest.PublicIP.String()+":80")
		}
		if err := n.Release(s); err != nil {
			t.Fatal(err)
		}
	}
	if after := n.census(t); after != before {
		t.Errorf("after %d cycles: got %s, want %s", cycles, after, before)
	}
}

// census counts what the network has made: namespaces with its prefix,
// links, addresses and routes in the daemon's namespace, its nftables
// rules there, and conntrack entries of its uplink range.
func (n *Network) census(t *testing.T) string {
	t.Helper()
	nss := 0
	if ents, err := os.ReadDir(nsDir); err == nil {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), n.prefix+"-") {
				nss++
			}
		}
	}
	links, _ := n.dh.LinkList()
	addrs, _ := n.dh.AddrList(nil, 0)
	routes, _ := n.dh.RouteList(nil, 0)
	out, _ := exec.Command("ip", "netns", "exec", baseName(n.cfg.DaemonNS), "nft", "list", "ruleset").CombinedOutput()
	ct := 0
	if flows, err := n.dh.ConntrackTableList(netlink.ConntrackTable, netlink.InetFamily(netlink.FAMILY_V4)); err == nil {
		for _, f := range flows {
			if a, ok := netip.AddrFromSlice(f.Forward.SrcIP); ok && n.cfg.Prefix4.Contains(a.Unmap()) {
				ct++
			}
		}
	}
	return fmt.Sprintf("%d namespaces, %d links, %d addresses, %d routes, %d ruleset lines, %d conntrack entries",
		nss, len(links), len(addrs), len(routes), strings.Count(string(out), "\n"), ct)
}

func baseName(p string) string { return p[strings.LastIndexByte(p, '/')+1:] }

func TestParseRule(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		wantErr  bool
	}{
		{in: "10.1.2.3/32", want: "10.1.2.3"},
		{in: "10.1.2.0/24:443", want: "10.1.2.0/24:443"},
		{in: "198.51.100.10:80,443/tcp", want: "198.51.100.10:80,443/tcp"},
		{in: "*.Example.COM:443", want: "*.example.com:443"},
		{in: "pypi.org", want: "pypi.org"},
		{in: "[2001:db8::/32]:443", want: "[2001:db8::/32]:443"},
		{in: "2001:db8::1", want: "2001:db8::1"},
		{in: "host:8000-9000/udp", want: "host:8000-9000/udp"},
		{in: "::ffff:10.0.0.5", want: "10.0.0.5"},
		{in: "", wantErr: true},
		{in: "bad_host!", wantErr: true},
		{in: "host:0", wantErr: true},
		{in: "host:99999", wantErr: true},
		{in: "host:9-1", wantErr: true},
		{in: "host/tcp", wantErr: true},
		{in: "[2001:db8::1", wantErr: true},
		{in: "*.", wantErr: true},
	} {
		r, err := ParseRule(tc.in)
		if tc.wantErr {
			if err == nil {
				t.Errorf("ParseRule(%q): got %v, want an error", tc.in, r)
			}
			continue
		}
		if err != nil || r.String() != tc.want {
			t.Errorf("ParseRule(%q): got %q, %v, want %q", tc.in, r.String(), err, tc.want)
		}
	}
}

func TestMergeRanges(t *testing.T) {
	got := mergeRanges([]netip.Prefix{
		netip.MustParsePrefix("169.254.0.0/16"), netip.MustParsePrefix("169.254.169.254/32"),
		netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("11.0.0.0/8"), netip.MustParsePrefix("240.0.0.0/4"),
	})
	want := "[[10.0.0.0 11.255.255.255] [169.254.0.0 169.254.255.255] [240.0.0.0 255.255.255.255]]"
	if fmt.Sprint(got) != want {
		t.Errorf("got %v, want %s", got, want)
	}
}

// lookup resolves name (A and AAAA) from the slot's sandbox namespace
// through its router: the resolver a sandbox's resolv.conf names.
func lookup(t *testing.T, s *Slot, name string) ([]string, error) {
	t.Helper()
	var addrs []string
	var lerr error
	err := nettest.InNS(s.SandboxNS, func() error {
		for _, qt := range []uint16{dns.TypeA, dns.TypeAAAA} {
			m := new(dns.Msg)
			m.SetQuestion(dns.Fqdn(name), qt)
			r, _, err := (&dns.Client{Timeout: 10 * time.Second}).Exchange(m, net.JoinHostPort(RouterIP4.String(), "53"))
			if err != nil {
				lerr = err
				return nil
			}
			if r.Rcode != dns.RcodeSuccess {
				lerr = fmt.Errorf("%s: %s", name, dns.RcodeToString[r.Rcode])
				return nil
			}
			for _, rr := range r.Answer {
				switch a := rr.(type) {
				case *dns.A:
					addrs = append(addrs, a.A.String())
				case *dns.AAAA:
					addrs = append(addrs, a.AAAA.String())
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return addrs, lerr
}

// DNS answers only names the policy allows, drops answers that point at
// private addresses, and opens an allowed name's addresses on its ports.
func TestResolverFollowsThePolicy(t *testing.T) {
	in := nettest.New(t)
	n, err := New(Config{DaemonNS: in.DaemonNS, Instance: t.Name(), Resolvers: []string{in.DNS}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	n.RemoveUnused()
	s, err := n.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer n.Release(s)
	// Port 8080: name rules open addresses there (80 and 443 go through
	// the proxy, TestNamesOnTheWire).
	pub := nettest.PublicIP.String() + ":8080"
	for _, tc := range []struct {
		name    string
		policy  Policy
		lookups map[string]bool // name → resolves
		open    bool            // PublicIP:8080 reachable after the lookups
	}{
		{"none", Policy{}, map[string]bool{nettest.AllowedName: false, nettest.OtherName: false}, false},
		{"internet", Policy{Internet: true}, map[string]bool{nettest.AllowedName: true, nettest.OtherName: true, nettest.PrivateName: false, nettest.MetaName: false}, true},
		{"internet, a name denied", Policy{Internet: true, Deny: mustRules(t, "other.test")}, map[string]bool{nettest.AllowedName: true, nettest.OtherName: false}, true},
		{"allow a name's port", Policy{Allow: mustRules(t, "allowed.test:8080")}, map[string]bool{nettest.AllowedName: true, nettest.OtherName: false}, true},
		{"allow a wildcard", Policy{Allow: mustRules(t, "*.test:8080")}, map[string]bool{nettest.AllowedName: true, nettest.OtherName: true, nettest.PrivateName: false}, true},
		{"allow another port", Policy{Allow: mustRules(t, "allowed.test:9090")}, map[string]bool{nettest.AllowedName: true}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := n.SetPolicy(s, tc.policy); err != nil {
				t.Fatal(err)
			}
			for name, want := range tc.lookups {
				addrs, err := lookup(t, s, name)
				if got := err == nil && len(addrs) > 0; got != want {
					t.Errorf("lookup %s: got %v, %v; want resolved: %v", name, addrs, err, want)
				}
			}
			want := "refused"
			if tc.open {
				want = "ok"
			}
			if got := dial(t, s, "tcp", pub); got != want {
				t.Errorf("dial %s after the lookups: got %s, want %s", pub, got, want)
			}
			// Another resolver is never reachable, whatever the policy.
			if got := dial(t, s, "tcp", in.DNS); got != "refused" {
				t.Errorf("DNS over TCP to another resolver: got %s, want refused", got)
			}
		})
	}
}

// fetch sends one HTTP request (or, with sni set, one HTTPS request) for
// host to addr from the slot's sandbox namespace; it returns the status
// line or "refused"/"reset" or the error.
func fetch(t *testing.T, in *nettest.Internet, s *Slot, addr, host string, useTLS bool, sni string) string {
	t.Helper()
	var got string
	_ = nettest.InNS(s.SandboxNS, func() error {
		c, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			got = "refused"
			return nil
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		var rw net.Conn = c
		if useTLS {
			tc := tls.Client(c, &tls.Config{ServerName: sni, RootCAs: in.Pool, InsecureSkipVerify: sni == ""})
			if err := tc.Handshake(); err != nil {
				got = "reset"
				return nil
			}
			rw = tc
		}
		fmt.Fprintf(rw, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", host)
		resp, err := http.ReadResponse(bufio.NewReader(rw), nil)
		if err != nil {
			got = "reset"
			return nil
		}
		resp.Body.Close()
		got = resp.Status
		return nil
	})
	return got
}

// Host-name rules are enforced where the name is on the wire: the Host
// header and the TLS server name, through the proxy; an allowed name is
// connected to at its own addresses, a name resolving to a private address
// never.
func TestNamesOnTheWire(t *testing.T) {
	in := nettest.New(t)
	n, err := New(Config{DaemonNS: in.DaemonNS, Instance: t.Name(), Resolvers: []string{in.DNS}})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	n.RemoveUnused()
	s, err := n.Acquire(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer n.Release(s)
	http80 := nettest.PublicIP.String() + ":80"
	https := nettest.PublicIP.String() + ":443"
	for _, tc := range []struct {
		name   string
		policy Policy
		checks []struct {
			addr, host string
			tls        bool
			sni, want  string
		}
	}{
		{"allow a name", Policy{Allow: mustRules(t, "allowed.test:80,443", "private.test")}, []struct {
			addr, host string
			tls        bool
			sni, want  string
		}{
			{http80, "allowed.test", false, "", "200 OK"},
			{http80, "other.test", false, "", "reset"},
			{http80, nettest.PublicIP.String(), false, "", "reset"},
			{https, "allowed.test", true, "allowed.test", "200 OK"},
			{https, "other.test", true, "other.test", "reset"},
			{https, "x", true, "", "reset"},
			{nettest.PrivateIP.String() + ":80", "private.test", false, "", "reset"},
		}},
		{"internet, a name denied", Policy{Internet: true, Deny: mustRules(t, "other.test")}, []struct {
			addr, host string
			tls        bool
			sni, want  string
		}{
			{http80, "allowed.test", false, "", "200 OK"},
			{http80, "other.test", false, "", "reset"},
			{https, "allowed.test", true, "allowed.test", "200 OK"},
			{https, "other.test", true, "other.test", "reset"},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := n.SetPolicy(s, tc.policy); err != nil {
				t.Fatal(err)
			}
			for _, c := range tc.checks {
				if got := fetch(t, in, s, c.addr, c.host, c.tls, c.sni); got != c.want {
					t.Errorf("%s Host %s SNI %q: got %s, want %s", c.addr, c.host, c.sni, got, c.want)
				}
			}
		})
	}
}
