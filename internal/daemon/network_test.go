package daemon_test

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/internal/nettest"
	"github.com/pandastack/pandastack/wire"
)

// Network tests run real sandboxes in a tiny internet of their own
// (internal/nettest): the daemon's sandbox traffic leaves from a test
// namespace whose only routes lead to stand-ins, so no packet can leave
// through the machine's real interface.

func startNetworked(t *testing.T) (*daemontest.Server, *nettest.Internet) {
	t.Helper()
	in := nettest.New(t)
	s := daemontest.Start(t, func(c *daemon.Config) {
		noPool(c)
		c.Network = daemon.NetworkConfig{Enabled: true, Namespace: in.DaemonNS, PoolSize: 1, Resolvers: []string{in.DNS}}
	})
	return s, in
}

// createNetT creates a sandbox of template ("" for base) with network
// (nil: none at all).
func createNetT(t *testing.T, s *daemontest.Server, template string, network any) wire.Sandbox {
	t.Helper()
	body := map[string]any{"network": network}
	if network == nil {
		body = map[string]any{}
	}
	if template != "" {
		body["template"] = template
	}
	resp, b := s.Do(t, "POST", "/v1/sandboxes", body)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("create with network %v: %d %s", network, resp.StatusCode, b)
	}
	var sb wire.Sandbox
	_ = json.Unmarshal(b, &sb)
	t.Cleanup(func() { s.Do(t, "DELETE", "/v1/sandboxes/"+sb.ID, nil) })
	return sb
}

// dnsQuery is a DNS client in Python's standard library: it sends one
// query for NAME (type A or AAAA) to SERVER over UDP (or TCP with "tcp")
// and prints what came back: "answer=ADDR,..." , "noanswer", "nxdomain",
// "rcodeN", "timeout" or "error:ERRNO".
const dnsQuery = `
import errno, random, socket, struct, sys
server, name, qtype = sys.argv[1], sys.argv[2], sys.argv[3]
tcp = len(sys.argv) > 4 and sys.argv[4] == "tcp"
q = struct.pack(">HHHHHH", random.randrange(65536), 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0"
q += struct.pack(">HH", {"A": 1, "AAAA": 28}[qtype], 1)
fam = socket.AF_INET6 if ":" in server else socket.AF_INET
def recvall(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise OSError(errno.ECONNRESET, "closed")
        b += c
    return b
try:
    if tcp:
        s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(5); s.connect((server, 53))
        s.sendall(struct.pack(">H", len(q)) + q)
        r = recvall(s, struct.unpack(">H", recvall(s, 2))[0])
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(5); s.connect((server, 53))
        s.send(q); r = s.recv(4096)
except socket.timeout:
    print("timeout"); sys.exit()
except OSError as e:
    print("error:" + errno.errorcode.get(e.errno, str(e.errno))); sys.exit()
def skip(off):
    while True:
        l = r[off]
        if l == 0: return off + 1
        if l & 0xc0 == 0xc0: return off + 2
        off += l + 1
off = skip(12) + 4
addrs = []
for _ in range(struct.unpack(">H", r[6:8])[0]):
    off = skip(off)
    typ, _, _, n = struct.unpack(">HHIH", r[off:off + 10]); off += 10
    if typ == 1: addrs.append(socket.inet_ntop(socket.AF_INET, r[off:off + 4]))
    if typ == 28: addrs.append(socket.inet_ntop(socket.AF_INET6, r[off:off + 16]))
    off += n
rcode = r[3] & 15
if rcode == 0:
    print("answer=" + ",".join(addrs) if addrs else "noanswer")
else:
    print("nxdomain" if rcode == 3 else "rcode%d" % rcode)
`

// installDNSQuery puts dnsQuery at /tmp/dnsq.py in a sandbox with python3.
func installDNSQuery(t *testing.T, s *daemontest.Server, id string) {
	t.Helper()
	res := s.Exec(t, id, wire.ExecRequest{Cmd: "cat > /tmp/dnsq.py <<'EOF'\n" + dnsQuery + "\nEOF\n"})
	if res.ExitCode != 0 {
		t.Fatalf("installing the DNS probe: %+v", res)
	}
}

// A probe is one attempt from inside a sandbox, and the outcomes that pass.
// Outcomes: for curl, "ok" (exit 0 with a stand-in's answer), "refused"
// (exit 7: a reset or an ICMP error answered the connect), "reset" (35, 52,
// 56: the connection was taken, then reset — the proxy refusing a name),
// "unresolved" (6), "timeout" (28: never acceptable for a refusal, which
// must come at once); for dns, "answer", "noanswer", "nxdomain", "timeout",
// "error"; for getent, "resolved" or "unresolved".
type probe struct {
	name string
	kind string // "curl", "dns" (python3 /tmp/dnsq.py ARGS), "getent" (getent ahosts ARGS)
	args string
	want []string
	// body, when set, must be in an "ok" answer.
	body string
}

func curlP(name, args string, want ...string) probe {
	return probe{name: name, kind: "curl", args: args, want: want}
}

func dnsP(name, args string, want ...string) probe {
	return probe{name: name, kind: "dns", args: args, want: want}
}

// blocked are the outcomes of a connection refused at once: by the
// sandbox's router (a reset or ICMP error: curl exit 7) or, where the
// policy names hosts and ports 80 and 443 go through the proxy, by the
// proxy resetting the connection.
var blocked = []string{"refused", "reset"}

func curlWant(name, args string, want []string) probe {
	return probe{name: name, kind: "curl", args: args, want: want}
}

// runProbes runs probes in one exec in the sandbox and checks each
// outcome; it logs every outcome as "outcome: CASE: PROBE: RESULT".
func runProbes(t *testing.T, s *daemontest.Server, id string, ps []probe) {
	t.Helper()
	var script strings.Builder
	script.WriteString(`p() { i=$1; shift; t0=$(date +%s%N); out=$("$@" 2>&1); rc=$?; t1=$(date +%s%N); printf '@@%s %s %s %s\n' "$i" "$rc" "$(( (t1 - t0) / 1000000 ))ms" "$(printf %s "$out" | tr '\n' ' ' | cut -c1-300)"; }` + "\n")
	for i, p := range ps {
		switch p.kind {
		case "curl":
			fmt.Fprintf(&script, "p %d curl -sS -k --max-time 20 %s\n", i, p.args)
		case "dns":
			fmt.Fprintf(&script, "p %d python3 /tmp/dnsq.py %s\n", i, p.args)
		case "getent":
			fmt.Fprintf(&script, "p %d getent ahosts %s\n", i, p.args)
		}
	}
	res := s.Exec(t, id, wire.ExecRequest{Cmd: script.String(), TimeoutSeconds: 600})
	got := map[int][3]string{}
	for _, line := range strings.Split(res.Stdout, "\n") {
		rest, ok := strings.CutPrefix(line, "@@")
		if !ok {
			continue
		}
		f := strings.SplitN(rest, " ", 4)
		if len(f) < 3 {
			continue
		}
		i, _ := strconv.Atoi(f[0])
		rc, _ := strconv.Atoi(f[1])
		out := ""
		if len(f) == 4 {
			out = strings.TrimSpace(f[3])
		}
		if i < 0 || i >= len(ps) {
			continue
		}
		got[i] = [3]string{classify(ps[i].kind, rc, out), out, f[2]}
	}
	for i, p := range ps {
		r, ok := got[i]
		if !ok {
			t.Errorf("%s: no outcome (exec: %+v)", p.name, res)
			continue
		}
		class, out := r[0], r[1]
		t.Logf("outcome: %s: %s: %s in %s (%s)", t.Name(), p.name, class, r[2], out)
		if !slices.Contains(p.want, strings.SplitN(class, "=", 2)[0]) {
			t.Errorf("%s (%s %s): got %s (%s), want %v", p.name, p.kind, p.args, class, out, p.want)
			continue
		}
		if class == "ok" && p.body != "" && !strings.Contains(out, p.body) {
			t.Errorf("%s: answered %q, want it from %q", p.name, out, p.body)
		}
	}
}

func classify(kind string, rc int, out string) string {
	switch kind {
	case "curl":
		switch {
		case rc == 0 && strings.Contains(out, "hello from"):
			return "ok"
		case rc == 7:
			return "refused"
		case rc == 35 || rc == 52 || rc == 56:
			return "reset"
		case rc == 6:
			return "unresolved"
		case rc == 28:
			return "timeout"
		}
	case "dns":
		switch {
		case strings.HasPrefix(out, "answer="):
			return out
		case strings.HasPrefix(out, "error:"):
			return "error"
		case out == "noanswer" || out == "nxdomain" || out == "timeout":
			return out
		}
	case "getent":
		switch rc {
		case 0:
			return "resolved"
		case 2:
			return "unresolved"
		}
	}
	return fmt.Sprintf("rc%d", rc)
}

// Addresses and URLs of the stand-ins, and the forbidden ones written in
// the forms a URL parser or resolver turns back into them.
var (
	pubURL     = "http://" + nettest.PublicIP.String() + "/"
	pubTLSURL  = "https://" + nettest.PublicIP.String() + "/"
	pub8080URL = "http://" + nettest.PublicIP.String() + ":8080/"
	pub6URL    = "http://[" + nettest.PublicIP6.String() + "]/"
	pub6TLSURL = "https://[" + nettest.PublicIP6.String() + "]/"
)

// forbidden are the destinations no policy opens, each by address and in
// other spellings: decimal, octal, hexadecimal, IPv4-mapped IPv6 (a
// dual-stack socket sends IPv4), NAT64 and 6to4 embeddings.
func forbidden(ports ...string) []probe {
	var out []probe
	for _, f := range []struct{ name, url string }{
		{"metadata", "http://169.254.169.254/"},
		{"metadata decimal", "http://2852039166/"},
		{"metadata octal", "http://0251.0376.0251.0376/"},
		{"metadata hex", "http://0xa9fea9fe/"},
		{"metadata IPv4-mapped", "http://[::ffff:169.254.169.254]/"},
		{"metadata IPv4-mapped hex", "http://[::ffff:a9fe:a9fe]/"},
		{"metadata NAT64", "http://[64:ff9b::a9fe:a9fe]/"},
		{"metadata 6to4", "http://[2002:a9fe:a9fe::1]/"},
		{"metadata port 8080", "http://169.254.169.254:8080/"},
		{"private", "http://10.0.0.5/"},
		{"private decimal", "http://167772165/"},
		{"private octal", "http://012.0.0.05/"},
		{"private IPv4-mapped", "http://[::ffff:10.0.0.5]/"},
		{"private port 8080", "http://10.0.0.5:8080/"},
		{"private HTTPS", "https://10.0.0.5/"},
		{"host", "http://198.51.100.1/"},
		{"host decimal", "http://3325256705/"},
		{"host octal", "http://0306.063.0144.01/"},
		{"host IPv4-mapped", "http://[::ffff:198.51.100.1]/"},
		{"host IPv6", "http://[2001:db8::1]/"},
		{"loopback", "http://127.0.0.1:80/"},
	} {
		out = append(out, curlWant(f.name, f.url, blocked))
	}
	return out
}

// neighbours are probes of every other slot's address as the daemon's
// namespace sees it (its uplink) and of the daemon's side of each slot
// (the gateway, the host's own address there), on port (where
// listen runs a server in a neighbour).
func neighbours(t *testing.T, in *nettest.Internet, port int) []probe {
	t.Helper()
	out, err := exec.Command("ip", "-n", filepath.Base(in.DaemonNS), "-o", "addr", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("listing the daemon namespace's addresses: %v: %s", err, out)
	}
	var ps []probe
	for _, f := range strings.Fields(string(out)) {
		pfx, err := netip.ParsePrefix(f)
		if err != nil || !(slotRange4.Contains(pfx.Addr()) || slotRange6.Contains(pfx.Addr())) {
			continue
		}
		gw := pfx.Addr()
		up := gw.Next()
		ps = append(ps,
			curlWant("neighbour "+up.String(), fmt.Sprintf("http://%s/", netip.AddrPortFrom(up, uint16(port))), blocked),
			curlWant("slot gateway "+gw.String(), fmt.Sprintf("http://%s/", netip.AddrPortFrom(gw, 80)), blocked))
	}
	if len(ps) == 0 {
		t.Fatalf("no slot addresses in the daemon namespace: %s", out)
	}
	return ps
}

// The daemon's default slot ranges (internal/network).
var (
	slotRange4 = netip.MustParsePrefix("10.201.0.0/16")
	slotRange6 = netip.MustParsePrefix("fd70:7373:6e64::/48")
)

func setNetwork(t *testing.T, s *daemontest.Server, id string, n wire.Network) {
	t.Helper()
	resp, b := s.Do(t, "PUT", "/v1/sandboxes/"+id+"/network", n)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("set network %+v: %d %s", n, resp.StatusCode, b)
	}
}

// controls shows the stand-ins are there to be refused: from the daemon's
// namespace, outside any sandbox's rules, each answers.
func controls(t *testing.T, in *nettest.Internet) {
	t.Helper()
	for _, u := range []string{pubURL, pub6URL, "http://169.254.169.254/", "http://10.0.0.5/", "http://198.51.100.1/",
		"http://[2001:db8::1]/", "http://198.51.100.53:853/", "https://" + nettest.AllowedName + "/"} {
		if strings.Contains(u, nettest.AllowedName) {
			continue // names need the test resolver; the daemon namespace has none
		}
		if body, err := in.Get(u); err != nil || !strings.Contains(body, "hello from") {
			t.Fatalf("control: %s from the daemon namespace: %q, %v", u, body, err)
		}
	}
}

// Egress from real sandboxes: a sandbox without a network and one with
// network "none" reach nothing; allow-lists reach what they list and
// nothing else; "internet" reaches the public stand-ins and never
// metadata, private, host or neighbour, in any spelling or through a name
// that resolves there. Every refusal comes at once (a reset or an ICMP
// error), never a timeout; DNS goes to the daemon's resolver only.
func TestEgressFromRealSandboxes(t *testing.T) {
	s, in := startNetworked(t)
	controls(t, in)
	before := forbiddenHits(in)

	// A neighbour with a server: what the others must not reach.
	neighbour := createNetT(t, s, "code-interpreter", "none")
	s.Exec(t, neighbour.ID, wire.ExecRequest{Cmd: "mkdir -p www && echo 'hello from a neighbour' > www/index.html && (cd www && python3 -m http.server 8000 >/dev/null 2>&1 &)"})
	waitUntil(t, "the neighbour's server answers through the daemon", func() (bool, string) {
		resp, b := s.Do(t, "GET", "/v1/sandboxes/"+neighbour.ID+"/ports/8000/", nil)
		return resp.StatusCode == 200 && strings.Contains(string(b), "neighbour"), fmt.Sprintf("%d %s", resp.StatusCode, b)
	})

	t.Run("no network", func(t *testing.T) {
		sb := createNetT(t, s, "", nil)
		runProbes(t, s, sb.ID, []probe{
			curlWant("public", pubURL, []string{"refused"}),
			curlWant("public IPv6", pub6URL, []string{"refused"}),
			curlP("public by name", "http://"+nettest.AllowedName+"/", "unresolved"),
			{name: "name lookup", kind: "getent", args: nettest.AllowedName, want: []string{"unresolved"}},
		})
	})

	t.Run("none", func(t *testing.T) {
		sb := createNetT(t, s, "code-interpreter", "none")
		installDNSQuery(t, s, sb.ID)
		ps := []probe{
			curlP("public", pubURL, "refused"),
			curlP("public 8080", pub8080URL, "refused"),
			curlP("public HTTPS", pubTLSURL, "refused"),
			curlP("public IPv6", pub6URL, "refused"),
			curlP("public by name", "http://"+nettest.AllowedName+"/", "unresolved"),
			curlP("public by name, address given", "--resolve allowed.test:80:198.51.100.10 http://allowed.test/", "refused"),
			dnsP("DNS to the daemon's resolver", "10.255.255.1 allowed.test A", "nxdomain"),
			dnsP("DNS for a name no policy allows (not asked upstream)", "10.255.255.1 leak-none.test A", "nxdomain"),
			dnsP("DNS to the daemon's resolver over IPv6", "fd70:7373:6e65::1 allowed.test AAAA", "nxdomain"),
			dnsP("DNS to another resolver", "198.51.100.53 allowed.test A", "error"),
			dnsP("DNS over TCP to another resolver", "198.51.100.53 allowed.test A tcp", "error"),
			curlP("DNS over TLS port", "http://198.51.100.53:853/", "refused"),
		}
		ps = append(ps, forbidden()...)
		runProbes(t, s, sb.ID, append(ps, neighbours(t, in, 8000)...))
	})

	t.Run("allow-lists", func(t *testing.T) {
		first := wire.Network{Allow: []string{"198.51.100.0/24:8080"}}
		sb := createNetT(t, s, "code-interpreter", first)
		installDNSQuery(t, s, sb.ID)
		for _, tc := range []struct {
			name   string
			policy wire.Network
			probes []probe
		}{
			{"a CIDR with a port (at create)", first, []probe{
				curlP("public 8080", pub8080URL, "ok"),
				curlP("public 80", pubURL, "refused"),
				curlP("public 443", pubTLSURL, "refused"),
				curlP("public IPv6", pub6URL, "refused"),
				curlP("private 8080", "http://10.0.0.5:8080/", "refused"),
				curlP("metadata 8080", "http://169.254.169.254:8080/", "refused"),
				curlP("a name, not listed", "http://allowed.test:8080/", "unresolved"),
				dnsP("DNS for a name, not listed", "10.255.255.1 allowed.test A", "nxdomain"),
				dnsP("DNS for a name, not listed (not asked upstream)", "10.255.255.1 leak-allow.test A", "nxdomain"),
				dnsP("DNS to another resolver", "198.51.100.53 allowed.test A", "error"),
			}},
			{"a name with a port", wire.Network{Allow: []string{"allowed.test:443"}}, []probe{
				curlP("the name on its port", "https://allowed.test/", "ok"),
				curlP("the name on port 80", "http://allowed.test/", "reset"),
				curlP("the name on port 8080", "http://allowed.test:8080/", "refused"),
				curlP("another name", "https://other.test/", "unresolved"),
				curlP("another name on the same address (SNI)", "--resolve other.test:443:198.51.100.10 https://other.test/", "reset"),
				curlP("the address without a name (no SNI)", pubTLSURL, "reset"),
				curlP("the address on 8080", pub8080URL, "refused"),
				curlP("the name's IPv6 address without a name", pub6TLSURL, "reset"),
				curlP("the name pointed at metadata (SNI)", "--resolve allowed.test:443:169.254.169.254 https://allowed.test/", "ok"),
				dnsP("DNS for the name", "10.255.255.1 allowed.test A", "answer"),
				dnsP("DNS for another name", "10.255.255.1 other.test A", "nxdomain"),
			}},
			{"a wildcard, a name denied", wire.Network{Allow: []string{"*.test"}, Deny: []string{"other.test"}}, []probe{
				curlP("a name under the wildcard", "http://allowed.test/", "ok"),
				curlP("a name under the wildcard, HTTPS", "https://allowed.test/", "ok"),
				curlP("a name under the wildcard, 8080", "http://allowed.test:8080/", "ok"),
				curlP("the denied name", "http://other.test/", "unresolved"),
				curlP("the denied name on the same address (Host)", "--resolve other.test:80:198.51.100.10 http://other.test/", "reset"),
				curlP("the denied name on the same address (SNI)", "--resolve other.test:443:198.51.100.10 https://other.test/", "reset"),
				curlP("the denied name in the Host header of an allowed one", "-H 'Host: other.test' http://allowed.test/", "reset"),
				curlP("the denied name, other case and a trailing dot", "-H 'Host: OTHER.test.' http://allowed.test/", "reset"),
				curlP("the denied name in an absolute request target", "--request-target http://other.test/ http://allowed.test/", "reset"),
				curlP("a name resolving to a private address", "http://private.test/", "unresolved"),
				curlP("a name resolving to metadata", "http://meta.test/", "unresolved"),
				curlP("a name, private address given (Host)", "--resolve private.test:80:10.0.0.5 http://private.test/", "reset"),
				curlP("a name, metadata address given (SNI)", "--resolve meta.test:443:169.254.169.254 https://meta.test/", "reset"),
				// The proxy connects an allowed name at its own addresses,
				// never at the one dialled: this reaches the public server.
				{name: "an allowed name sent to the private address", kind: "curl", args: "-H 'Host: allowed.test' http://10.0.0.5/", want: []string{"ok"}, body: "hello from 198.51.100.10"},
				dnsP("DNS for the denied name", "10.255.255.1 other.test A", "nxdomain"),
				dnsP("DNS for a name resolving to a private address", "10.255.255.1 private.test A", "noanswer"),
			}},
			{"deny wins over allow", wire.Network{Allow: []string{"198.51.100.0/24", "2001:db8::/32"}, Deny: []string{"198.51.100.10:443", "2001:db8::10"}}, []probe{
				curlP("allowed 80", pubURL, "ok"),
				curlP("allowed 8080", pub8080URL, "ok"),
				curlP("denied port", pubTLSURL, "refused"),
				curlP("denied IPv6 address", pub6URL, "refused"),
			}},
			{"allowing everything opens no forbidden address", wire.Network{Allow: []string{"0.0.0.0/0", "::/0"}}, append(append([]probe{
				curlP("public", pubURL, "ok"),
				curlP("public IPv6", pub6URL, "ok"),
				dnsP("DNS to another resolver", "198.51.100.53 allowed.test A", "error"),
				dnsP("DNS over TCP to another resolver", "198.51.100.53 allowed.test A tcp", "error"),
				curlP("DNS over TLS port", "http://198.51.100.53:853/", "refused"),
			}, forbidden()...), neighbours(t, in, 8000)...)},
		} {
			t.Run(tc.name, func(t *testing.T) {
				setNetwork(t, s, sb.ID, tc.policy)
				runProbes(t, s, sb.ID, tc.probes)
			})
		}
	})

	t.Run("internet", func(t *testing.T) {
		sb := createNetT(t, s, "code-interpreter", "internet")
		installDNSQuery(t, s, sb.ID)
		ps := []probe{
			curlP("public", pubURL, "ok"),
			curlP("public HTTPS", pubTLSURL, "ok"),
			curlP("public 8080", pub8080URL, "ok"),
			curlP("public IPv6", pub6URL, "ok"),
			curlP("public IPv6 HTTPS", pub6TLSURL, "ok"),
			curlP("a public name", "http://allowed.test/", "ok"),
			curlP("another public name", "https://other.test/", "ok"),
			curlP("a name resolving to a private address", "http://private.test/", "unresolved"),
			curlP("a name resolving to metadata", "http://meta.test/", "unresolved"),
			curlP("a name resolving to the host", "http://host.test/", "unresolved"),
			curlP("a name, private address given", "--resolve private.test:80:10.0.0.5 http://private.test/", "refused"),
			curlP("a public name sent to the private address", "-H 'Host: allowed.test' http://10.0.0.5/", "refused"),
			dnsP("DNS for a public name", "10.255.255.1 allowed.test A", "answer"),
			dnsP("DNS for a public name, AAAA over IPv6", "fd70:7373:6e65::1 allowed.test AAAA", "answer"),
			dnsP("DNS for a name that does not exist", "10.255.255.1 nosuch.test A", "nxdomain"),
			dnsP("DNS for a name resolving to metadata", "10.255.255.1 meta.test A", "noanswer"),
			dnsP("DNS for a name resolving to the host (IPv6)", "10.255.255.1 host.test AAAA", "noanswer"),
			dnsP("DNS to another resolver", "198.51.100.53 allowed.test A", "error"),
			dnsP("DNS over TCP to another resolver", "198.51.100.53 allowed.test A tcp", "error"),
			dnsP("DNS to the daemon's service address directly", "10.201.0.1 allowed.test A", "error"),
			curlP("DNS over TLS port", "http://198.51.100.53:853/", "refused"),
			curlP("the daemon's proxy directly", "http://10.201.0.1:10080/", "refused"),
		}
		ps = append(ps, forbidden()...)
		runProbes(t, s, sb.ID, append(ps, neighbours(t, in, 8000)...))
	})

	// The resolver asked upstream only for names a policy allowed: a
	// sandbox cannot send data out in the names it looks up.
	qs := in.Queries()
	if !slices.Contains(qs, "nosuch.test") {
		t.Errorf("the test resolver did not see an allowed lookup: %v", qs)
	}
	for _, q := range qs {
		if strings.HasPrefix(q, "leak-") {
			t.Errorf("a name no policy allowed was asked upstream: %s", q)
		}
	}
	// Nothing any sandbox did reached a forbidden stand-in: only the
	// controls above did.
	if got := forbiddenHits(in); got != before {
		t.Errorf("forbidden stand-ins were reached %d times by sandboxes: %v", got-before, in.Hits())
	}
}

// forbiddenHits counts the requests the stand-ins answered at an address
// other than the public ones.
func forbiddenHits(in *nettest.Internet) int {
	n := 0
	for _, h := range in.Hits() {
		f := strings.Fields(h)
		if len(f) == 3 && !strings.HasPrefix(f[2], nettest.PublicIP.String()+":") && !strings.HasPrefix(f[2], "["+nettest.PublicIP6.String()+"]:") {
			n++
		}
	}
	return n
}

// streams runs long-lived downloads in a sandbox (curl in the background,
// its output, errors and exit status in /tmp/NAME.*) and reads how far
// they got.
type streams struct {
	t  *testing.T
	s  *daemontest.Server
	id string
}

func (st streams) start(name, args string) {
	st.t.Helper()
	st.s.Exec(st.t, st.id, wire.ExecRequest{Cmd: fmt.Sprintf(
		"(curl -sSN -k --max-time 150 %s > /tmp/%s.out 2>/tmp/%s.err; echo $? > /tmp/%s.rc) >/dev/null 2>&1 &", args, name, name, name)})
}

// state returns the lines received so far and the exit status ("" while
// it runs), with its error output.
func (st streams) state(name string) (int, string, string) {
	st.t.Helper()
	res := st.s.Exec(st.t, st.id, wire.ExecRequest{Cmd: fmt.Sprintf("wc -l < /tmp/%s.out; echo \"|$(cat /tmp/%s.rc 2>/dev/null)|$(cat /tmp/%s.err 2>/dev/null)\"", name, name, name)})
	lines, rest, _ := strings.Cut(res.Stdout, "\n")
	n, _ := strconv.Atoi(strings.TrimSpace(lines))
	f := strings.SplitN(strings.TrimSpace(rest), "|", 3)
	if len(f) < 3 {
		return n, "", res.Stdout
	}
	return n, f[1], f[2]
}

// flowing waits until the stream has received at least n more lines than
// it had, and has not ended.
func (st streams) flowing(name string, more int) {
	st.t.Helper()
	from, rc, _ := st.state(name)
	if rc != "" {
		st.t.Fatalf("stream %s ended (exit %s), want it flowing", name, rc)
	}
	waitUntil(st.t, "stream "+name+" flows", func() (bool, string) {
		n, rc, errs := st.state(name)
		if rc != "" {
			st.t.Fatalf("stream %s ended after %d lines: exit %s: %s", name, n, rc, errs)
		}
		return n >= from+more, fmt.Sprintf("%d lines, from %d", n, from)
	})
}

// cut waits until the stream has ended and checks it ended by a cut
// connection, not by its own timeout (curl exit 28) or a complete
// response (0).
func (st streams) cut(name string) {
	st.t.Helper()
	var rc, errs string
	var n int
	from := time.Now()
	waitUntil(st.t, "stream "+name+" ends", func() (bool, string) {
		n, rc, errs = st.state(name)
		return rc != "", fmt.Sprintf("%d lines", n)
	})
	st.t.Logf("outcome: %s: stream %s cut (seen within %v of the change's answer) after %d lines: curl exit %s: %s",
		st.t.Name(), name, time.Since(from).Round(10*time.Millisecond), n, rc, errs)
	if rc == "0" || rc == "28" {
		st.t.Errorf("stream %s: curl exit %s (%s), want a cut connection", name, rc, errs)
	}
}

// A policy change applies at once: new connections follow it, a
// long-lived connection to a destination it no longer allows is cut (the
// client sees its connection end, not a stall), and one to a destination
// it still allows goes on — by address and through the name proxy.
func TestNetworkPolicyChangesAtRuntime(t *testing.T) {
	s, _ := startNetworked(t)
	sb := createNetT(t, s, "", "internet")
	st := streams{t, s, sb.ID}
	st.start("s4", pubURL+"stream")
	st.start("s6", pub6URL+"stream")
	st.flowing("s4", 5)
	st.flowing("s6", 5)

	setNetwork(t, s, sb.ID, wire.Network{Internet: true, Deny: []string{nettest.PublicIP.String()}})
	runProbes(t, s, sb.ID, []probe{
		curlP("the newly denied address", pubURL, "refused"),
		curlP("the newly denied address, another port", pub8080URL, "refused"),
		curlP("an address still allowed", pub6URL, "ok"),
	})
	st.cut("s4")
	st.flowing("s6", 20)

	// Names: HTTP and TLS go through the proxy.
	setNetwork(t, s, sb.ID, wire.Network{Allow: []string{"*.test"}})
	st.cut("s6") // its address is no longer allowed
	st.start("sp", "http://allowed.test/stream")
	st.start("sk", "https://allowed.test/stream")
	st.flowing("sp", 5)
	st.flowing("sk", 5)
	setNetwork(t, s, sb.ID, wire.Network{Allow: []string{"allowed.test:443"}})
	runProbes(t, s, sb.ID, []probe{
		curlP("the name on a port no longer allowed", "http://allowed.test/", "reset"),
		curlP("the name on its port", "https://allowed.test/", "ok"),
	})
	st.cut("sp")
	st.flowing("sk", 20)
	// A connection a name rule opened (not through the proxy: port 8080)
	// goes on when the policy changes but still allows the name.
	setNetwork(t, s, sb.ID, wire.Network{Allow: []string{"allowed.test:443,8080"}})
	st.start("sn", "http://allowed.test:8080/stream")
	st.flowing("sn", 5)
	setNetwork(t, s, sb.ID, wire.Network{Allow: []string{"allowed.test:443,8080", "other.test"}})
	st.flowing("sn", 20)
	st.flowing("sk", 5)
	setNetwork(t, s, sb.ID, wire.Network{})
	st.cut("sk")
	st.cut("sn")
	runProbes(t, s, sb.ID, []probe{
		curlP("after none, the name", "https://allowed.test/", "unresolved"),
		curlP("after none, the address", pubURL, "refused"),
	})
}

// Pause and resume, forks, and a snapshot's new sandbox keep networking and
// the policy: each comes back in a namespace of its own with the same
// inside address, its egress follows the policy it had, its exposed ports
// answer, and a fork's policy is then its own.
func TestNetworkThroughPauseForkSnapshot(t *testing.T) {
	s, _ := startNetworked(t)
	policy := wire.Network{Allow: []string{nettest.PublicIP.String() + ":80", "allowed.test:443"}}
	parent := createNetT(t, s, "code-interpreter", policy)
	s.Exec(t, parent.ID, wire.ExecRequest{Cmd: "mkdir -p www && echo parent > www/who && (cd www && python3 -m http.server 8000 >/dev/null 2>&1 &)"})
	who := func(id string) string {
		resp, b := s.Do(t, "GET", "/v1/sandboxes/"+id+"/ports/8000/who", nil)
		return fmt.Sprintf("%d %s", resp.StatusCode, strings.TrimSpace(string(b)))
	}
	waitUntil(t, "the parent's server answers", func() (bool, string) { got := who(parent.ID); return got == "200 parent", got })
	egress := []probe{
		curlP("the allowed address and port", pubURL, "ok"),
		curlP("the allowed name", "https://allowed.test/", "ok"),
		curlP("another port", pub8080URL, "refused"),
		curlP("another name", "https://other.test/", "unresolved"),
		curlP("another name on the allowed address (SNI)", "--resolve other.test:443:198.51.100.10 https://other.test/", "reset"),
		curlWant("metadata", "http://169.254.169.254/", blocked),
		curlP("IPv6 (port 80: through the proxy, no name allowed)", pub6URL, "reset"),
	}
	policyOf := func(id string) string {
		resp, b := s.Do(t, "GET", "/v1/sandboxes/"+id, nil)
		var sb wire.Sandbox
		_ = json.Unmarshal(b, &sb)
		if resp.StatusCode != 200 || sb.Network == nil {
			return fmt.Sprintf("%d %s", resp.StatusCode, b)
		}
		return fmt.Sprintf("internet=%v allow=%v deny=%v", sb.Network.Internet, sb.Network.Allow, sb.Network.Deny)
	}
	wantPolicy := fmt.Sprintf("internet=false allow=%v deny=[]", policy.Allow)
	runProbes(t, s, parent.ID, egress)

	t.Run("pause and resume", func(t *testing.T) {
		post[wire.Sandbox](t, s, "/v1/sandboxes/"+parent.ID+"/pause", nil, http.StatusOK)
		post[wire.Sandbox](t, s, "/v1/sandboxes/"+parent.ID+"/resume", nil, http.StatusOK)
		if got := policyOf(parent.ID); got != wantPolicy {
			t.Errorf("policy after resume: %s, want %s", got, wantPolicy)
		}
		runProbes(t, s, parent.ID, egress)
		if got := who(parent.ID); got != "200 parent" {
			t.Errorf("the server after resume: %s", got)
		}
	})

	t.Run("forks", func(t *testing.T) {
		fr := post[wire.ForkResponse](t, s, "/v1/sandboxes/"+parent.ID+"/fork", wire.ForkRequest{Count: 2}, http.StatusCreated)
		if len(fr.Sandboxes) != 2 {
			t.Fatalf("fork: got %d sandboxes", len(fr.Sandboxes))
		}
		for i, f := range fr.Sandboxes {
			t.Cleanup(func() { s.Do(t, "DELETE", "/v1/sandboxes/"+f.ID, nil) })
			if got := policyOf(f.ID); got != wantPolicy {
				t.Errorf("fork %d's policy: %s, want %s", i, got, wantPolicy)
			}
			s.Exec(t, f.ID, wire.ExecRequest{Cmd: fmt.Sprintf("echo fork%d > www/who", i)})
		}
		// Each fork's server answers for itself: each has a namespace
		// of its own, though all have the same inside address.
		for i, f := range fr.Sandboxes {
			if got, want := who(f.ID), fmt.Sprintf("200 fork%d", i); got != want {
				t.Errorf("fork %d's server: %s, want %s", i, got, want)
			}
			runProbes(t, s, f.ID, egress)
		}
		if got := who(parent.ID); got != "200 parent" {
			t.Errorf("the parent's server after the fork: %s", got)
		}
		// A fork's policy is its own.
		setNetwork(t, s, fr.Sandboxes[0].ID, wire.Network{})
		runProbes(t, s, fr.Sandboxes[0].ID, []probe{curlP("fork 0, now none", pubURL, "refused")})
		runProbes(t, s, fr.Sandboxes[1].ID, []probe{curlP("fork 1, unchanged", pubURL, "ok")})
		runProbes(t, s, parent.ID, []probe{curlP("the parent, unchanged", pubURL, "ok")})
	})

	t.Run("snapshot", func(t *testing.T) {
		snap := post[wire.Snapshot](t, s, "/v1/sandboxes/"+parent.ID+"/snapshot", nil, http.StatusCreated)
		sb := s.Create(t, wire.CreateSandboxRequest{SnapshotID: snap.ID})
		if got := policyOf(sb.ID); got != wantPolicy {
			t.Errorf("the snapshot's sandbox's policy: %s, want %s", got, wantPolicy)
		}
		runProbes(t, s, sb.ID, egress)
		if got := who(sb.ID); got != "200 parent" {
			t.Errorf("the snapshot's sandbox's server: %s", got)
		}
	})
}

// netCycles is how many create/delete cycles TestNetworkLeavesNothing
// runs: PANDASTACK_NET_CYCLES, or 200 (the number; about a minute
// here).
func netCycles(t *testing.T) int {
	if v := os.Getenv("PANDASTACK_NET_CYCLES"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("PANDASTACK_NET_CYCLES=%q: want a positive number", v)
		}
		return n
	}
	return 200
}

// Deleting a networked sandbox leaves nothing: after create/delete cycles
// of real sandboxes with traffic (addresses, names through the resolver
// and the proxy), the namespaces, veths, addresses, routes, nftables
// tables, sets and rules, and conntrack entries of the daemon's namespace
// and of the host are what they were.
func TestNetworkLeavesNothing(t *testing.T) {
	cycles := netCycles(t)
	s, in := startNetworked(t)
	h := sha256.Sum256([]byte(s.DataDir))
	prefix := "ps" + hex.EncodeToString(h[:2]) // internal/network's names
	census := func() string { return netCensus(t, in, prefix) }
	// The network pool holds one prepared slot (two namespaces), and the
	// kernel has settled its interfaces' IPv6 link-local addresses (their
	// routes come once duplicate address detection is done).
	var before string
	waitUntil(t, "the network pool is prepared", func() (bool, string) {
		before = census()
		out, _ := exec.Command("ip", "-n", filepath.Base(in.DaemonNS), "-6", "addr", "show", "tentative").CombinedOutput()
		return strings.HasPrefix(before, "2 namespaces") && len(strings.TrimSpace(string(out))) == 0, before + "; tentative: " + string(out)
	})
	policies := []any{"internet", wire.Network{Allow: []string{"*.test"}}, "none", wire.Network{Allow: []string{nettest.PublicIP.String()}, Deny: []string{"198.51.100.10:443"}}}
	start := time.Now()
	for i := range cycles {
		resp, b := s.Do(t, "POST", "/v1/sandboxes", map[string]any{"network": policies[i%len(policies)]})
		if resp.StatusCode != http.StatusCreated {
			t.Fatalf("cycle %d: create: %d %s", i, resp.StatusCode, b)
		}
		var sb wire.Sandbox
		_ = json.Unmarshal(b, &sb)
		if i%len(policies) != 2 {
			// Traffic: addresses, a name through the resolver and the
			// proxy, a refused one; connections left open as the
			// sandbox goes.
			s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "curl -sk --max-time 20 " + pubURL + " https://allowed.test/ http://169.254.169.254/ >/dev/null; (curl -sN --max-time 100 " + pubURL + "stream >/dev/null 2>&1 &); (curl -sN --max-time 100 http://allowed.test/stream >/dev/null 2>&1 &)", TimeoutSeconds: 60})
		}
		if i == 0 {
			// The census sees the sandbox's connections while it lives.
			if c := census(); censusConntrack(c) == 0 {
				t.Errorf("a live sandbox's connections: census %s, want conntrack entries", c)
			}
		}
		if resp, b := s.Do(t, "DELETE", "/v1/sandboxes/"+sb.ID, nil); resp.StatusCode >= 300 {
			t.Fatalf("cycle %d: delete: %d %s", i, resp.StatusCode, b)
		}
	}
	t.Logf("%d create/delete cycles with networking in %v", cycles, time.Since(start).Round(time.Millisecond))
	var after string
	waitUntil(t, "everything of the deleted sandboxes' networks is gone", func() (bool, string) {
		after = census()
		return after == before, after + " (before: " + before + ")"
	})
	t.Logf("outcome: %s: after %d cycles: %s", t.Name(), cycles, after)
}

// netCensus counts what networking makes, in the daemon's namespace and
// on the host: namespaces of the daemon's (prefix), links, addresses,
// routes, nftables tables, sets and rules, and conntrack entries of the
// sandboxes' addresses.
func netCensus(t *testing.T, in *nettest.Internet, prefix string) string {
	t.Helper()
	nss := 0
	if ents, err := os.ReadDir("/var/run/netns"); err == nil {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), prefix+"-") {
				nss++
			}
		}
	}
	dns := filepath.Base(in.DaemonNS)
	count := func(args ...string) int {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
		return strings.Count(string(out), "\n")
	}
	countMatching := func(sub string, args ...string) int {
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
		return strings.Count(string(out), sub)
	}
	links := count("ip", "-n", dns, "-o", "link")
	veths := countMatching("veth", "ip", "-n", dns, "-o", "-d", "link")
	addrs := count("ip", "-n", dns, "-o", "addr")
	// Routes the kernel makes itself for addresses and interfaces (proto
	// kernel: local, multicast, link-local) come and go with the links and
	// addresses counted above, some of them late (after duplicate address
	// detection, long after on a loaded machine); what a slot's teardown
	// could leave on its own are the routes the daemon added.
	routes := 0
	for _, fam := range []string{"-4", "-6"} {
		out, err := exec.Command("ip", "-n", dns, fam, "route", "show", "table", "all").CombinedOutput()
		if err != nil {
			t.Fatalf("listing routes: %v: %s", err, out)
		}
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if l != "" && !strings.Contains(l, "proto kernel") {
				routes++
			}
		}
	}
	nftLines := count("ip", "netns", "exec", dns, "nft", "list", "ruleset")
	nftTables := count("ip", "netns", "exec", dns, "nft", "list", "tables")
	nftSets := countMatching("\tset ", "ip", "netns", "exec", dns, "nft", "list", "sets")
	hostLinks := countMatching(prefix, "ip", "-o", "link")
	hostTables := countMatching(prefix, "nft", "list", "tables")
	slots := func(a net.IP) bool {
		ip, ok := netip.AddrFromSlice(a)
		return ok && (slotRange4.Contains(ip.Unmap()) || slotRange6.Contains(ip))
	}
	conntrack := func(h *netlink.Handle) int {
		n := 0
		for _, fam := range []netlink.InetFamily{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			flows, err := h.ConntrackTableList(netlink.ConntrackTable, fam)
			if err != nil {
				t.Fatalf("listing conntrack: %v", err)
			}
			for _, f := range flows {
				if slots(f.Forward.SrcIP) || slots(f.Forward.DstIP) || slots(f.Reverse.SrcIP) || slots(f.Reverse.DstIP) {
					n++
				}
			}
		}
		return n
	}
	dh, err := netns.GetFromPath(in.DaemonNS)
	if err != nil {
		t.Fatal(err)
	}
	defer dh.Close()
	nh, err := netlink.NewHandleAt(dh)
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	hh, err := netlink.NewHandle()
	if err != nil {
		t.Fatal(err)
	}
	defer hh.Close()
	return fmt.Sprintf("%d namespaces; daemon namespace: %d links (%d veths), %d addresses, %d routes, %d nftables tables, %d sets, %d ruleset lines, %d conntrack entries; host: %d links, %d nftables tables, %d conntrack entries",
		nss, links, veths, addrs, routes, nftTables, nftSets, nftLines, conntrack(nh), hostLinks, hostTables, conntrack(hh))
}

// censusConntrack is the daemon namespace's count of conntrack entries in
// a census.
func censusConntrack(c string) int {
	_, after, _ := strings.Cut(c, "ruleset lines, ")
	n, _ := strconv.Atoi(strings.Fields(after + " x")[0])
	return n
}

// wsEcho is a WebSocket echo server in Python's standard library (the
// code-interpreter template has no WebSocket package): it answers the
// upgrade, then echoes text frames.
const wsEcho = `
import base64, hashlib, socket, struct, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 8001)); srv.listen(8)
def serve(c):
    req = b""
    while b"\r\n\r\n" not in req:
        req += c.recv(4096)
    key = [l.split(b":", 1)[1].strip() for l in req.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")][0]
    acc = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n")
    while True:
        h = c.recv(2)
        if len(h) < 2: return
        n = h[1] & 127
        if n == 126: n = struct.unpack(">H", c.recv(2))[0]
        mask = c.recv(4); data = b""
        while len(data) < n: data += c.recv(n - len(data))
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        c.sendall(bytes([0x81, len(data)]) + data)
while True:
    c, _ = srv.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
`

// Exposed ports: a server in a sandbox is reachable through the daemon, by
// path and by host name, WebSocket included, with the API key, the access
// token or (when asked for) publicly; never without. This works with egress
// "none": ingress is not egress.
func TestExposedPorts(t *testing.T) {
	in := nettest.New(t)
	s := daemontest.Start(t, func(c *daemon.Config) {
		noPool(c)
		c.Network = daemon.NetworkConfig{Enabled: true, Namespace: in.DaemonNS, PoolSize: 1, Resolvers: []string{in.DNS}, Domain: "sandbox.test"}
	})
	resp, b := s.Do(t, "POST", "/v1/sandboxes", map[string]any{"template": "code-interpreter", "network": "none"})
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("create: %d %s", resp.StatusCode, b)
	}
	var sb wire.Sandbox
	_ = json.Unmarshal(b, &sb)
	t.Cleanup(func() { s.Do(t, "DELETE", "/v1/sandboxes/"+sb.ID, nil) })
	if sb.Network == nil || sb.Network.AccessToken == "" {
		t.Fatalf("sandbox network: got %+v, want an access token", sb.Network)
	}
	s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "mkdir -p www && echo served > www/index.html && (cd www && python3 -m http.server 8000 >/dev/null 2>&1 &) && (python3 -c '" + strings.ReplaceAll(wsEcho, "'", `'"'"'`) + "' >/dev/null 2>&1 &)"})
	get := func(url string, hdr ...string) (int, string) {
		req, _ := http.NewRequest("GET", url, nil)
		for i := 0; i+1 < len(hdr); i += 2 {
			if hdr[i] == "Host" {
				req.Host = hdr[i+1]
				continue
			}
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	path := s.URL + "/v1/sandboxes/" + sb.ID + "/ports/8000/index.html"
	waitUntil(t, "the server in the sandbox answers", func() (bool, string) {
		code, body := get(path, "Authorization", "Bearer "+s.Key)
		return code == http.StatusOK, fmt.Sprintf("%d %s", code, body)
	})
	for _, tc := range []struct {
		name string
		url  string
		hdr  []string
		want int
	}{
		{"path, API key", path, []string{"Authorization", "Bearer " + s.Key}, 200},
		{"path, token header", path, []string{"X-Access-Token", sb.Network.AccessToken}, 200},
		{"path, token query", path + "?access_token=" + sb.Network.AccessToken, nil, 200},
		{"path, nothing", path, nil, 401},
		{"path, wrong token", path, []string{"X-Access-Token", "nope"}, 401},
		{"path, another tenant's key", path, []string{"Authorization", "Bearer " + s.WithTenant(t, "other").Key}, 404},
		{"host name, token", s.URL + "/index.html", []string{"Host", "8000-" + sb.ID + ".sandbox.test", "X-Access-Token", sb.Network.AccessToken}, 200},
		{"host name, nothing", s.URL + "/index.html", []string{"Host", "8000-" + sb.ID + ".sandbox.test"}, 401},
		{"a port nothing listens on", s.URL + "/v1/sandboxes/" + sb.ID + "/ports/9999/", []string{"Authorization", "Bearer " + s.Key}, 503},
	} {
		code, body := get(tc.url, tc.hdr...)
		if code != tc.want || (tc.want == 200 && !strings.Contains(body, "served")) {
			t.Errorf("%s: got %d %q, want %d", tc.name, code, body, tc.want)
		}
	}
	// A token given in the query becomes a cookie scoped to the port, so a
	// browser's next requests need not carry it; the cookie is not passed
	// on to the sandbox.
	req, _ := http.NewRequest("GET", path+"?access_token="+sb.Network.AccessToken, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	var cookie *http.Cookie
	for _, c := range resp.Cookies() {
		if c.Name == "pandastack_access_token" {
			cookie = c
		}
	}
	if cookie == nil || !cookie.HttpOnly || cookie.Path != "/v1/sandboxes/"+sb.ID+"/ports/8000/" {
		t.Fatalf("cookie after a query token: got %+v, want an HttpOnly one scoped to the port", cookie)
	}
	if code, body := get(path, "Cookie", "a=b; "+cookie.Name+"="+cookie.Value); code != 200 || !strings.Contains(body, "served") {
		t.Errorf("with the cookie only: got %d %q", code, body)
	}
	if code, _ := get(path, "Cookie", cookie.Name+"=wrong"); code != 401 {
		t.Errorf("with a wrong cookie: got %d, want 401", code)
	}
	// Without the trailing slash: a redirect into the port.
	noSlash, _ := http.NewRequest("GET", s.URL+"/v1/sandboxes/"+sb.ID+"/ports/8000", nil)
	if resp, err := http.DefaultTransport.RoundTrip(noSlash); err != nil || resp.StatusCode != http.StatusPermanentRedirect || resp.Header.Get("Location") != "/v1/sandboxes/"+sb.ID+"/ports/8000/" {
		t.Errorf("without the slash: got %v %v, want 308 to the slash", resp, err)
	}
	// Public ports: anyone, and only after the owner says so.
	resp2, b := s.Do(t, "PUT", "/v1/sandboxes/"+sb.ID+"/network", wire.Network{PublicPorts: true})
	if resp2.StatusCode != http.StatusOK || !strings.Contains(string(b), `"public_ports":true`) {
		t.Fatalf("make ports public: %d %s", resp2.StatusCode, b)
	}
	if code, body := get(path); code != 200 || !strings.Contains(body, "served") {
		t.Errorf("public ports without credentials: got %d %q", code, body)
	}
	// A paused sandbox is resumed by a request to its port (its servers
	// come back with it).
	if resp, b := s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/pause", nil); resp.StatusCode != http.StatusOK {
		t.Fatalf("pause: %d %s", resp.StatusCode, b)
	}
	if code, body := get(path); code != 200 || !strings.Contains(body, "served") {
		t.Errorf("a paused sandbox's port: got %d %q", code, body)
	}
	if resp, b := s.Do(t, "PUT", "/v1/sandboxes/"+sb.ID+"/network", wire.Network{}); resp.StatusCode != http.StatusOK {
		t.Fatalf("make ports private again: %d %s", resp.StatusCode, b)
	}
	if code, _ := get(path); code != 401 {
		t.Errorf("ports private again, no credentials: got %d, want 401", code)
	}
	// WebSocket through the path form.
	u := strings.TrimPrefix(s.URL, "http://")
	conn, err := net.Dial("tcp", u)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Minute))
	fmt.Fprintf(conn, "GET /v1/sandboxes/%s/ports/8001/ws HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Access-Token: %s\r\n\r\n", sb.ID, u, sb.Network.AccessToken)
	br := bufio.NewReader(conn)
	up, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	if up.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: got %s", up.Status)
	}
	msg := []byte("hello")
	frame := []byte{0x81, 0x80 | byte(len(msg)), 1, 2, 3, 4}
	for i, c := range msg {
		frame = append(frame, c^[]byte{1, 2, 3, 4}[i%4])
	}
	conn.Write(frame)
	reply := make([]byte, 2+len(msg))
	if _, err := io.ReadFull(br, reply); err != nil || string(reply[2:]) != "hello" {
		t.Errorf("WebSocket echo: got %q, %v", reply, err)
	}
}
