package network

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// The proxy. A host-name rule cannot be enforced by addresses alone — one
// address serves many names — so where a policy names hosts, the router
// sends the sandbox's HTTP (port 80) and TLS (port 443) connections to the
// daemon's proxy instead, which reads the name where it is on the wire: the
// Host header of each HTTP request, the server name (SNI) of the TLS
// handshake. An allowed name is connected to at the addresses the name
// resolves to (not at the address the sandbox dialled: a sandbox cannot
// send an allowed name to another server); an address an address rule
// allows is connected to as dialled; anything else is reset at once.

const (
	proxyHTTPPort = 10080
	proxyTLSPort  = 10443
)

type proxy struct {
	n   *Network
	lns []net.Listener
	wg  sync.WaitGroup

	mu sync.Mutex
	// live are the connections being passed on, by slot: a policy change
	// checks them again (recheck).
	live map[*Slot]map[*liveConn]struct{}
}

// liveConn is a connection the proxy passes on and the name it was let
// through for (an HTTP connection's latest request's).
type liveConn struct {
	px   proxied
	mu   sync.Mutex
	host string
	// cut resets the sandbox's side and closes the other.
	cut func()
}

func (lc *liveConn) setHost(h string) {
	lc.mu.Lock()
	lc.host = h
	lc.mu.Unlock()
}

// track registers a connection until the returned func is called.
func (p *proxy) track(lc *liveConn) (untrack func()) {
	p.mu.Lock()
	if p.live == nil {
		p.live = map[*Slot]map[*liveConn]struct{}{}
	}
	m := p.live[lc.px.slot]
	if m == nil {
		m = map[*liveConn]struct{}{}
		p.live[lc.px.slot] = m
	}
	m[lc] = struct{}{}
	p.mu.Unlock()
	return func() {
		p.mu.Lock()
		// lc is in the slot's current map: a map goes only when empty.
		if m := p.live[lc.px.slot]; m != nil {
			delete(m, lc)
			if len(m) == 0 {
				delete(p.live, lc.px.slot)
			}
		}
		p.mu.Unlock()
	}
}

// recheck cuts the slot's connections its policy (now) no longer allows;
// a released slot's all.
func (p *proxy) recheck(s *Slot) {
	p.mu.Lock()
	var lcs []*liveConn
	for lc := range p.live[s] {
		lcs = append(lcs, lc)
	}
	p.mu.Unlock()
	for _, lc := range lcs {
		lc.mu.Lock()
		host := lc.host
		lc.mu.Unlock()
		if _, ok := p.allowed(lc.px, host); !ok {
			lc.cut()
		}
	}
}

// allowed is target under the slot's current policy: a connection taken
// under an older one follows the new (none, once the slot is released).
func (p *proxy) allowed(px proxied, host string) ([]netip.AddrPort, bool) {
	policy, slot, ok := p.n.PolicyOf(px.slot.Uplink4)
	if !ok || slot != px.slot {
		return nil, false
	}
	px.policy = policy
	return p.target(px, host)
}

func (n *Network) startProxy() error {
	p := &proxy{n: n}
	svc4, svc6 := n.serviceAddrs()
	for _, a := range []netip.Addr{svc4, svc6} {
		for _, port := range []int{proxyHTTPPort, proxyTLSPort} {
			addr := net.JoinHostPort(a.String(), strconv.Itoa(port))
			var ln net.Listener
			if err := inNS(n.daemon, func() error {
				var err error
				ln, err = net.Listen("tcp", addr)
				return err
			}); err != nil {
				p.close()
				return fmt.Errorf("listening for the proxy on %s: %w", addr, err)
			}
			p.lns = append(p.lns, ln)
			p.wg.Add(1)
			go p.serve(ln, port == proxyTLSPort)
		}
	}
	n.proxy = p
	return nil
}

func (p *proxy) close() {
	for _, ln := range p.lns {
		ln.Close()
	}
	p.wg.Wait()
}

func (p *proxy) serve(ln net.Listener, isTLS bool) {
	defer p.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go p.handle(c.(*net.TCPConn), isTLS)
	}
}

// reset closes a connection with a TCP reset: refused at once.
func reset(c *net.TCPConn) {
	_ = c.SetLinger(0)
	c.Close()
}

// proxied is one connection the proxy took: who sent it and where to.
type proxied struct {
	policy Policy
	slot   *Slot
	// orig is the address the sandbox dialled.
	orig netip.AddrPort
}

func (p *proxy) handle(c *net.TCPConn, isTLS bool) {
	src, _ := netip.ParseAddrPort(c.RemoteAddr().String())
	policy, slot, ok := p.n.PolicyOf(src.Addr())
	if !ok {
		reset(c)
		return
	}
	orig, err := p.n.originalDest(slot, src.Port())
	if err != nil {
		p.n.log.Warn("proxy: finding where a sandbox connection was going", "slot", slot.Index, "err", err)
		reset(c)
		return
	}
	px := proxied{policy: policy, slot: slot, orig: orig}
	if isTLS {
		p.handleTLS(c, px)
		return
	}
	p.handleHTTP(c, px)
}

// originalDest finds, in the slot's router, where the connection from the
// slot's uplink port srcPort to the proxy was dialled.
func (n *Network) originalDest(s *Slot, srcPort uint16) (netip.AddrPort, error) {
	rt, err := netns.GetFromPath(nsPath(s.routerName))
	if err != nil {
		return netip.AddrPort{}, err
	}
	defer rt.Close()
	h, err := netlink.NewHandleAt(rt)
	if err != nil {
		return netip.AddrPort{}, err
	}
	defer h.Close()
	for _, fam := range []netlink.InetFamily{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		flows, err := h.ConntrackTableList(netlink.ConntrackTable, fam)
		if err != nil {
			return netip.AddrPort{}, err
		}
		for _, f := range flows {
			if f.Forward.Protocol != 6 || f.Reverse.DstPort != srcPort {
				continue
			}
			if rp := f.Reverse.SrcPort; rp != proxyHTTPPort && rp != proxyTLSPort {
				continue
			}
			a, ok := netip.AddrFromSlice(f.Forward.DstIP)
			if ok {
				return netip.AddrPortFrom(a.Unmap(), f.Forward.DstPort), nil
			}
		}
	}
	return netip.AddrPort{}, errors.New("no tracked connection")
}

// addrAllowed reports whether an address rule of the policy (and no deny
// rule) allows a TCP connection to ap.
func addrAllowed(p Policy, ap netip.AddrPort) bool {
	match := func(r Rule) bool {
		if !r.Prefix.IsValid() || !r.Prefix.Contains(ap.Addr()) || r.Proto == "udp" {
			return false
		}
		return portIn(r.Ports, ap.Port())
	}
	for _, r := range p.Deny {
		if match(r) {
			return false
		}
	}
	if p.Internet {
		return true
	}
	for _, r := range p.Allow {
		if match(r) {
			return true
		}
	}
	return false
}

func portIn(ps []PortRange, port uint16) bool {
	if len(ps) == 0 {
		return true
	}
	for _, r := range ps {
		if port >= r.From && port <= r.To {
			return true
		}
	}
	return false
}

// target decides where a connection for host (from SNI or Host; "" when
// the client sent none) may go: the address it dialled, when an address
// rule allows that, or an address host resolves to, when a name rule
// allows host on this port. ok is false when nothing allows it.
func (p *proxy) target(px proxied, host string) (addrs []netip.AddrPort, ok bool) {
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	port := px.orig.Port()
	hostAddrs := p.n.HostAddrs()
	// A name the policy denies is refused whatever the address.
	if host != "" {
		for _, r := range px.policy.Deny {
			if r.MatchName(host) && portIn(r.Ports, port) {
				return nil, false
			}
		}
	}
	if !Denied(px.orig.Addr(), hostAddrs) && addrAllowed(px.policy, px.orig) && (!px.policy.Internet || host == "" || nameVerdict(px.policy, host).allowed) {
		return []netip.AddrPort{px.orig}, true
	}
	if host == "" {
		return nil, false
	}
	if a, err := netip.ParseAddr(host); err == nil {
		// A literal address as the name: the address rules decide.
		ap := netip.AddrPortFrom(a.Unmap(), port)
		if !Denied(ap.Addr(), hostAddrs) && addrAllowed(px.policy, ap) {
			return []netip.AddrPort{ap}, true
		}
		return nil, false
	}
	allowed := px.policy.Internet && nameVerdict(px.policy, host).allowed
	for _, r := range px.policy.Allow {
		if r.MatchName(host) && portIn(r.Ports, port) && r.Proto != "udp" {
			allowed = true
		}
	}
	if !allowed {
		return nil, false
	}
	for _, a := range p.resolve(host) {
		if !Denied(a, hostAddrs) {
			addrs = append(addrs, netip.AddrPortFrom(a, port))
		}
	}
	return addrs, len(addrs) > 0
}

// resolve asks the upstream resolvers for host's addresses.
func (p *proxy) resolve(host string) []netip.Addr {
	if p.n.resolver == nil {
		return nil
	}
	var out []netip.Addr
	for _, qt := range []uint16{dns.TypeA, dns.TypeAAAA} {
		m := new(dns.Msg)
		m.SetQuestion(dns.Fqdn(host), qt)
		resp, err := p.n.resolver.forward(m)
		if err != nil {
			continue
		}
		for _, rr := range resp.Answer {
			switch r := rr.(type) {
			case *dns.A:
				if a, ok := netip.AddrFromSlice(r.A); ok {
					out = append(out, a.Unmap())
				}
			case *dns.AAAA:
				if a, ok := netip.AddrFromSlice(r.AAAA); ok {
					out = append(out, a)
				}
			}
		}
	}
	return out
}

// dial connects to the first of addrs that answers, from the daemon's
// namespace.
func (p *proxy) dial(ctx context.Context, addrs []netip.AddrPort) (net.Conn, error) {
	var lastErr error
	for _, a := range addrs {
		var c net.Conn
		err := inNS(p.n.daemon, func() error {
			d := net.Dialer{Timeout: 15 * time.Second}
			var err error
			c, err = d.DialContext(ctx, "tcp", a.String())
			return err
		})
		if err == nil {
			return c, nil
		}
		lastErr = err
	}
	if lastErr == nil {
		lastErr = errors.New("no address")
	}
	return nil, lastErr
}

// handleTLS reads the ClientHello's server name, then splices the
// connection to where it may go.
func (p *proxy) handleTLS(c *net.TCPConn, px proxied) {
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	var hello bytes.Buffer
	sni, err := readServerName(io.TeeReader(c, &hello))
	if err != nil {
		reset(c)
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	addrs, ok := p.allowed(px, sni)
	if !ok {
		reset(c)
		return
	}
	up, err := p.dial(context.Background(), addrs)
	if err != nil {
		reset(c)
		return
	}
	lc := &liveConn{px: px, host: sni, cut: func() { reset(c); up.Close() }}
	defer p.track(lc)()
	// A policy change between the check and the tracking is not missed.
	if _, ok := p.allowed(px, sni); !ok {
		up.Close()
		reset(c)
		return
	}
	if _, err := up.Write(hello.Bytes()); err != nil {
		up.Close()
		reset(c)
		return
	}
	splice(c, up)
}

// readServerName reads a TLS ClientHello from r and returns its server
// name ("" when it has none). It lets crypto/tls parse the hello and stops
// the handshake right after.
func readServerName(r io.Reader) (string, error) {
	var name string
	errStop := errors.New("stop")
	conn := tls.Server(readOnlyConn{r: r}, &tls.Config{
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			name = h.ServerName
			return nil, errStop
		},
	})
	err := conn.Handshake()
	if errors.Is(err, errStop) || name != "" {
		return name, nil
	}
	return "", err
}

// readOnlyConn lets crypto/tls read a ClientHello; its writes go nowhere.
type readOnlyConn struct {
	r io.Reader
	net.Conn
}

func (c readOnlyConn) Read(p []byte) (int, error)     { return c.r.Read(p) }
func (readOnlyConn) Write(p []byte) (int, error)      { return len(p), nil }
func (readOnlyConn) Close() error                     { return nil }
func (readOnlyConn) SetDeadline(time.Time) error      { return nil }
func (readOnlyConn) SetReadDeadline(time.Time) error  { return nil }
func (readOnlyConn) SetWriteDeadline(time.Time) error { return nil }
func (readOnlyConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (readOnlyConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }

// splice copies both ways until either side ends.
func splice(a *net.TCPConn, b net.Conn) {
	done := make(chan struct{}, 2)
	cp := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		done <- struct{}{}
	}
	go cp(a, b)
	go cp(b, a)
	<-done
	<-done
	a.Close()
	b.Close()
}

// handleHTTP serves the connection's requests one by one, checking each
// request's Host: a keep-alive connection cannot switch to a name it may
// not reach.
func (p *proxy) handleHTTP(c *net.TCPConn, px proxied) {
	br := bufio.NewReader(c)
	first, err := http.ReadRequest(br)
	if err != nil {
		reset(c)
		return
	}
	if _, ok := p.allowed(px, hostOnly(first.Host)); !ok {
		reset(c)
		return
	}
	lc := &liveConn{px: px, host: hostOnly(first.Host), cut: func() { reset(c) }}
	defer p.track(lc)()
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.Out.URL.Scheme = "http"
			r.Out.URL.Host = r.In.Host
			r.Out.Host = r.In.Host
		},
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
				host, _, _ := net.SplitHostPort(addr)
				addrs, ok := p.allowed(px, host)
				if !ok {
					return nil, fmt.Errorf("%s is not allowed", host)
				}
				return p.dial(ctx, addrs)
			},
			DisableKeepAlives: true,
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			w.WriteHeader(http.StatusForbidden)
		},
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		lc.setHost(hostOnly(r.Host))
		if _, ok := p.allowed(px, hostOnly(r.Host)); !ok {
			// A later request on the connection for a name it may not
			// reach: the connection ends here.
			hj, ok := w.(http.Hijacker)
			if ok {
				if conn, _, err := hj.Hijack(); err == nil {
					if tc, ok := conn.(*net.TCPConn); ok {
						reset(tc)
						return
					}
					conn.Close()
					return
				}
			}
			w.WriteHeader(http.StatusForbidden)
			return
		}
		rp.ServeHTTP(w, r)
	})
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 30 * time.Second}
	ln := &oneConnListener{c: &prefixConn{TCPConn: c, r: io.MultiReader(bytes.NewReader(requestBytes(first)), br)}}
	_ = srv.Serve(ln)
}

func hostOnly(h string) string {
	if host, _, err := net.SplitHostPort(h); err == nil {
		return host
	}
	return strings.Trim(h, "[]")
}

// requestBytes re-serialises a request read to decide on it, so the
// server that then serves the connection reads it again.
func requestBytes(r *http.Request) []byte {
	var b bytes.Buffer
	_ = r.Write(&b)
	return b.Bytes()
}

// prefixConn is a connection whose first bytes come from r.
type prefixConn struct {
	*net.TCPConn
	r io.Reader
}

func (c *prefixConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// oneConnListener hands one connection to http.Server, then reports
// closed once it is done with it.
type oneConnListener struct {
	mu   sync.Mutex
	c    net.Conn
	done chan struct{}
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	c := l.c
	l.c = nil
	if l.done == nil {
		l.done = make(chan struct{})
	}
	done := l.done
	l.mu.Unlock()
	if c != nil {
		return &closeNotify{Conn: c, done: done}, nil
	}
	<-done
	return nil, net.ErrClosed
}

func (l *oneConnListener) Close() error { return nil }
func (l *oneConnListener) Addr() net.Addr {
	return &net.TCPAddr{}
}

type closeNotify struct {
	net.Conn
	once sync.Once
	done chan struct{}
}

func (c *closeNotify) Close() error {
	c.once.Do(func() { close(c.done) })
	return c.Conn.Close()
}
