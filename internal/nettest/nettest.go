// Package nettest builds a tiny internet for network tests, entirely inside
// network namespaces the test creates: a "daemon" namespace (where a
// daemon's sandbox uplinks live, standing in for the host) whose only
// routes lead to an "internet" namespace holding stand-ins — a public web
// server at 198.51.100.10 (HTTP and HTTPS, reached by two names, one of
// them usually allowed), a private service at 10.0.0.5, cloud metadata at
// 169.254.169.254, an IPv6 server at 2001:db8::10, and a DNS server of the
// test's own at 198.51.100.53. The web server answers plain HTTP on ports
// 80 and 8080 and HTTPS on 443 (path /stream: a long-lived streaming
// response); 198.51.100.53:853 (where DNS over TLS would be) accepts TCP
// too, so a test can tell a refused connection from an absent server. The
// daemon namespace itself serves HTTP on port 80 (the host's own service). No packet can leave through the machine's
// real interface: nothing here routes to it. (This machine's real interface
// uses 192.0.2.0/24 and fd00::/64, and its package registries are reached
// in 203.0.113.0/24: none of those ranges is used.)
package nettest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/vishvananda/netns"
)

// Stand-in addresses.
var (
	PublicIP   = netip.MustParseAddr("198.51.100.10")
	PrivateIP  = netip.MustParseAddr("10.0.0.5")
	MetadataIP = netip.MustParseAddr("169.254.169.254")
	PublicIP6  = netip.MustParseAddr("2001:db8::10")
	DNSIP      = netip.MustParseAddr("198.51.100.53")
	// DaemonIP is the daemon namespace's own address towards the
	// internet: a "host address" sandboxes must never reach.
	DaemonIP  = netip.MustParseAddr("198.51.100.1")
	DaemonIP6 = netip.MustParseAddr("2001:db8::1")
)

// Names the test DNS server answers.
const (
	AllowedName = "allowed.test" // → PublicIP, PublicIP6
	OtherName   = "other.test"   // → PublicIP (same server, another name)
	PrivateName = "private.test" // → PrivateIP
	MetaName    = "meta.test"    // → MetadataIP
	HostName    = "host.test"    // → DaemonIP, DaemonIP6 (the host's own)
)

// Internet is one test's tiny internet.
type Internet struct {
	// DaemonNS and InetNS are the namespaces' paths.
	DaemonNS, InetNS string
	// DNS is the test resolver's address, "ip:53".
	DNS string
	// TLS is the certificate the HTTPS server presents (for the test
	// names, self-signed): clients trust it with Pool.
	Pool *x509.CertPool

	mu      sync.Mutex
	hits    []string
	queries []string
}

func run(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%v: %v: %s", args, err, out)
	}
}

// New builds a tiny internet; it is torn down when the test ends. It needs
// root and the ip command; without them the test is skipped (or fails with
// PANDASTACK_REQUIRE_SANDBOX=1).
func New(t testing.TB) *Internet {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("PANDASTACK_REQUIRE_SANDBOX") == "1" {
			t.Fatal("network tests need root")
		}
		t.Skip("network tests need root")
	}
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	tag := hex.EncodeToString(b)
	in := &Internet{DaemonNS: "/var/run/netns/pst" + tag + "d", InetNS: "/var/run/netns/pst" + tag + "i", DNS: DNSIP.String() + ":53"}
	d, i := filepath.Base(in.DaemonNS), filepath.Base(in.InetNS)
	run(t, "ip", "netns", "add", d)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", d).Run() })
	run(t, "ip", "netns", "add", i)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", i).Run() })
	di, ii := "pst"+tag+"a", "pst"+tag+"b"
	run(t, "ip", "link", "add", di, "netns", d, "type", "veth", "peer", "name", ii, "netns", i)
	for _, c := range [][]string{
		{"ip", "-n", d, "link", "set", "lo", "up"},
		{"ip", "-n", i, "link", "set", "lo", "up"},
		{"ip", "-n", d, "addr", "add", DaemonIP.String() + "/24", "dev", di},
		{"ip", "-n", d, "addr", "add", DaemonIP6.String() + "/64", "dev", di, "nodad"},
		{"ip", "-n", d, "link", "set", di, "up"},
		{"ip", "-n", i, "addr", "add", PublicIP.String() + "/24", "dev", ii},
		{"ip", "-n", i, "addr", "add", DNSIP.String() + "/32", "dev", ii},
		{"ip", "-n", i, "addr", "add", PrivateIP.String() + "/32", "dev", ii},
		{"ip", "-n", i, "addr", "add", MetadataIP.String() + "/32", "dev", ii},
		{"ip", "-n", i, "addr", "add", PublicIP6.String() + "/64", "dev", ii, "nodad"},
		{"ip", "-n", i, "link", "set", ii, "up"},
		// The daemon namespace's only way out is the internet namespace.
		{"ip", "-n", d, "route", "add", "default", "via", PublicIP.String()},
		{"ip", "-n", d, "-6", "route", "add", "default", "via", PublicIP6.String()},
		// The internet answers the daemon namespace's (masqueraded) traffic.
		{"ip", "-n", i, "route", "add", "default", "via", DaemonIP.String()},
	} {
		run(t, c...)
	}
	in.serve(t)
	in.serveHost(t)
	return in
}

// serveHost runs an HTTP server in the daemon namespace on port 80 of all
// its addresses (198.51.100.1, 2001:db8::1, and whatever a daemon adds):
// the host's own services, which sandboxes must never reach. It answers
// "hello from the host".
func (in *Internet) serveHost(t testing.TB) {
	t.Helper()
	var ln net.Listener
	if err := InNS(in.DaemonNS, func() error {
		var err error
		ln, err = net.Listen("tcp", ":80")
		return err
	}); err != nil {
		t.Fatalf("listening in the daemon namespace: %v", err)
	}
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		in.mu.Lock()
		in.hits = append(in.hits, fmt.Sprintf("%s %s %s", r.Host, r.RemoteAddr, r.Context().Value(http.LocalAddrContextKey)))
		in.mu.Unlock()
		fmt.Fprintf(w, "hello from the host at %v\n", r.Context().Value(http.LocalAddrContextKey))
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	})
}

// InNS runs fn on a thread in the namespace at path (sockets fn makes stay
// there).
func InNS(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread goes with the goroutine
		h, err := netns.GetFromPath(path)
		if err != nil {
			errc <- err
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// Queries returns the names the test DNS server was asked for (lowercase,
// without the trailing dot).
func (in *Internet) Queries() []string {
	in.mu.Lock()
	defer in.mu.Unlock()
	return append([]string(nil), in.queries...)
}

// Hits returns what the web servers saw: "host remote-ip local-addr" lines.
func (in *Internet) Hits() []string {
	in.mu.Lock()
	defer in.mu.Unlock()
	return append([]string(nil), in.hits...)
}

func (in *Internet) serve(t testing.TB) {
	t.Helper()
	cert, pool := selfSigned(t, AllowedName, OtherName)
	in.Pool = pool
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		in.mu.Lock()
		in.hits = append(in.hits, fmt.Sprintf("%s %s %s", r.Host, r.RemoteAddr, r.Context().Value(http.LocalAddrContextKey)))
		in.mu.Unlock()
		if r.URL.Path == "/stream" {
			stream(w, r)
			return
		}
		fmt.Fprintf(w, "hello from %v for %s\n", r.Context().Value(http.LocalAddrContextKey), r.Host)
	})
	var lns []net.Listener
	err := InNS(in.InetNS, func() error {
		for _, a := range []string{":80", ":443", ":8080", DNSIP.String() + ":853"} {
			ln, err := net.Listen("tcp", a)
			if err != nil {
				return err
			}
			lns = append(lns, ln)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("listening in the internet namespace: %v", err)
	}
	plain := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	secure := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}}
	go func() { _ = plain.Serve(lns[0]) }()
	go func() { _ = secure.ServeTLS(lns[1], "", "") }()
	go func() { _ = plain.Serve(lns[2]) }()
	go func() { _ = plain.Serve(lns[3]) }()

	var udp net.PacketConn
	var tcp net.Listener
	err = InNS(in.InetNS, func() error {
		var err error
		if udp, err = net.ListenPacket("udp", in.DNS); err != nil {
			return err
		}
		tcp, err = net.Listen("tcp", in.DNS)
		return err
	})
	if err != nil {
		t.Fatalf("listening for DNS: %v", err)
	}
	mux := dns.NewServeMux()
	mux.HandleFunc(".", func(w dns.ResponseWriter, req *dns.Msg) {
		in.mu.Lock()
		for _, q := range req.Question {
			in.queries = append(in.queries, strings.ToLower(strings.TrimSuffix(q.Name, ".")))
		}
		in.mu.Unlock()
		answer(w, req)
	})
	us := &dns.Server{PacketConn: udp, Handler: mux}
	ts := &dns.Server{Listener: tcp, Handler: mux}
	go func() { _ = us.ActivateAndServe() }()
	go func() { _ = ts.ActivateAndServe() }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = plain.Shutdown(ctx)
		_ = secure.Shutdown(ctx)
		_ = us.Shutdown()
		_ = ts.Shutdown()
	})
}

// StreamFor is how long a /stream response lasts at most.
const StreamFor = 3 * time.Minute

// stream answers a long-lived download: a line every 50 ms until the
// client goes or StreamFor passes.
func stream(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain")
	f, _ := w.(http.Flusher)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	end := time.After(StreamFor)
	for i := 0; ; i++ {
		if _, err := fmt.Fprintf(w, "tick %d\n", i); err != nil {
			return
		}
		if f != nil {
			f.Flush()
		}
		select {
		case <-r.Context().Done():
			return
		case <-end:
			return
		case <-tick.C:
		}
	}
}

// Get fetches url from the daemon namespace (not through any sandbox's
// rules): a control showing a stand-in is there to be refused.
func (in *Internet) Get(url string) (string, error) {
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := InNS(in.DaemonNS, func() error {
			var err error
			c, err = (&net.Dialer{Timeout: 10 * time.Second}).DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
	c := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{
		DialContext: dial, TLSClientConfig: &tls.Config{RootCAs: in.Pool}, DisableKeepAlives: true}}
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// answer is the test DNS server: the stand-in names, NXDOMAIN otherwise.
func answer(w dns.ResponseWriter, req *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(req)
	records := map[string][]string{
		AllowedName + ".": {"A " + PublicIP.String(), "AAAA " + PublicIP6.String()},
		OtherName + ".":   {"A " + PublicIP.String()},
		PrivateName + ".": {"A " + PrivateIP.String()},
		MetaName + ".":    {"A " + MetadataIP.String()},
		HostName + ".":    {"A " + DaemonIP.String(), "AAAA " + DaemonIP6.String()},
	}
	for _, q := range req.Question {
		rs, ok := records[strings.ToLower(q.Name)]
		if !ok {
			m.Rcode = dns.RcodeNameError
			continue
		}
		for _, r := range rs {
			typ, addr, _ := strings.Cut(r, " ")
			if dns.TypeToString[q.Qtype] != typ {
				continue
			}
			rr, err := dns.NewRR(fmt.Sprintf("%s 60 IN %s %s", q.Name, typ, addr))
			if err == nil {
				m.Answer = append(m.Answer, rr)
			}
		}
	}
	_ = w.WriteMsg(m)
}

func selfSigned(t testing.TB, names ...string) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: names[0]}, DNSNames: names,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(c)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pool
}
