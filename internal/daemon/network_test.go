package daemon_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

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

// curl runs curl in the sandbox and returns "ok: <body>" or "fail <exit code>: <error>".
func curl(t *testing.T, s *daemontest.Server, id, url string, extra ...string) string {
	t.Helper()
	cmd := "curl -sS --max-time 20 " + strings.Join(extra, " ") + " " + url
	res := s.Exec(t, id, wire.ExecRequest{Cmd: cmd + "; echo rc=$?", TimeoutSeconds: 60})
	out := strings.TrimSpace(res.Stdout)
	rc := out[strings.LastIndex(out, "rc=")+3:]
	if rc == "0" {
		return "ok: " + strings.TrimSpace(strings.TrimSuffix(out, "rc=0"))
	}
	return fmt.Sprintf("fail %s: %s", rc, strings.TrimSpace(res.Stderr))
}

func createNet(t *testing.T, s *daemontest.Server, network any) wire.Sandbox {
	t.Helper()
	body := map[string]any{"network": network}
	if network == nil {
		body = map[string]any{}
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

func TestEgressFromRealSandboxes(t *testing.T) {
	s, _ := startNetworked(t)
	pub := "http://" + nettest.PublicIP.String() + "/"
	meta := "http://" + nettest.MetadataIP.String() + "/"
	private := "http://" + nettest.PrivateIP.String() + "/"

	none := createNet(t, s, nil)
	if got := curl(t, s, none.ID, pub); !strings.HasPrefix(got, "fail") {
		t.Errorf("a sandbox without network reached the public stand-in: %s", got)
	}
	inet := createNet(t, s, "internet")
	if got := curl(t, s, inet.ID, pub); !strings.Contains(got, "hello from") {
		t.Errorf("internet sandbox → public: got %s", got)
	}
	for _, u := range []string{meta, private} {
		if got := curl(t, s, inet.ID, u); !strings.HasPrefix(got, "fail") {
			t.Errorf("internet sandbox → %s: got %s, want refused", u, got)
		}
	}
	// Changed at runtime: now nothing.
	resp, b := s.Do(t, "PUT", "/v1/sandboxes/"+inet.ID+"/network", wire.Network{})
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("set network: %d %s", resp.StatusCode, b)
	}
	if got := curl(t, s, inet.ID, pub); !strings.HasPrefix(got, "fail") {
		t.Errorf("after the policy became none: got %s, want refused", got)
	}
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
