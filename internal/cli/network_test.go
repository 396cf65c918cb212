package cli

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/internal/nettest"
	"github.com/pandastack/pandastack/wire"
)

// TestCLINetworkRealServer drives the network flags, sandbox network and
// sandbox url against a real server whose sandbox traffic leaves from a
// test namespace (internal/nettest): its only routes lead to stand-ins, so
// no packet leaves through the machine's real interface.
func TestCLINetworkRealServer(t *testing.T) {
	in := nettest.New(t)
	s := daemontest.Start(t, func(c *daemon.Config) {
		c.Sandbox.PoolSize = 0
		c.Network = daemon.NetworkConfig{Enabled: true, Namespace: in.DaemonNS, PoolSize: 1, Resolvers: []string{in.DNS}}
	})
	cli := func(args ...string) (string, string, error) {
		t.Helper()
		var out, errOut bytes.Buffer
		root := NewRoot()
		root.SetArgs(append([]string{"--url", s.URL, "--api-key", s.Key}, args...))
		root.SetOut(&out)
		root.SetErr(&errOut)
		err := root.Execute()
		return out.String(), errOut.String(), err
	}
	exitCode := func(err error) int {
		var ec ExitCodeError
		if errors.As(err, &ec) {
			return ec.Code
		}
		if err != nil {
			return -1
		}
		return 0
	}
	pub := nettest.PublicIP.String()

	// run with an allow-list reaches what it lists; with no egress, nothing.
	out, errOut, err := cli("run", "--allow", pub+":80", "--", "curl -sS --max-time 20 http://"+pub+"/")
	if !strings.Contains(out, "hello from") || err != nil {
		t.Errorf("run --allow: got %q %q %v", out, errOut, err)
	}
	if _, _, err := cli("run", "--no-egress", "--", "curl -sS --max-time 20 http://"+pub+"/"); exitCode(err) == 0 {
		t.Error("run --no-egress reached the public stand-in")
	}
	if _, _, err := cli("run", "--internet", "--deny", pub, "--", "curl -sS --max-time 20 http://"+pub+"/"); exitCode(err) == 0 {
		t.Error("run --internet --deny reached the denied address")
	}
	if _, _, err := cli("run", "--no-egress", "--internet", "--", "true"); err == nil || !strings.Contains(err.Error(), "--no-egress") {
		t.Errorf("run --no-egress --internet: got %v, want an error naming the flags", err)
	}

	// A server in a sandbox without egress, through sandbox url.
	out, _, err = cli("sandbox", "create", "--template", "code-interpreter", "--no-egress", "--ttl", "600")
	if err != nil {
		t.Fatalf("create --no-egress: %v", err)
	}
	id := strings.TrimSpace(out)
	defer cli("sandbox", "kill", id)
	if _, _, err := cli("sandbox", "exec", id, "--", "mkdir -p /tmp/www && echo served > /tmp/www/index.html && cd /tmp/www && nohup python3 -m http.server 8000 >/dev/null 2>&1 &"); err != nil {
		t.Fatalf("starting a server: %v", err)
	}
	out, _, err = cli("sandbox", "url", id, "8000", "/index.html")
	u := strings.TrimSpace(out)
	if err != nil || !strings.HasPrefix(u, s.URL+"/v1/sandboxes/"+id+"/ports/8000/index.html?access_token=") {
		t.Fatalf("sandbox url: got %q %v", out, err)
	}
	get := func(u string) (int, string) {
		resp, err := http.Get(u)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	deadline := time.Now().Add(5 * time.Minute)
	for {
		code, body := get(u)
		if code == 200 && strings.TrimSpace(body) == "served" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the sandbox's server through sandbox url: last %d %q", code, body)
		}
		time.Sleep(100 * time.Millisecond)
	}
	out, _, err = cli("sandbox", "url", "--no-token", id, "8000", "/index.html")
	if bare := strings.TrimSpace(out); err != nil || bare != s.URL+"/v1/sandboxes/"+id+"/ports/8000/index.html" {
		t.Errorf("sandbox url --no-token: got %q %v", out, err)
	} else if code, _ := get(bare); code != http.StatusUnauthorized {
		t.Errorf("the URL without the token: got %d, want 401", code)
	}

	// sandbox network: print, change, refuse bad input.
	show := func(args ...string) (wire.SandboxNetwork, error) {
		t.Helper()
		out, _, err := cli(append([]string{"sandbox", "network", id}, args...)...)
		var n wire.SandboxNetwork
		if err == nil {
			if jerr := json.Unmarshal([]byte(out), &n); jerr != nil {
				t.Fatalf("sandbox network printed %q: %v", out, jerr)
			}
		}
		return n, err
	}
	n, err := show()
	if err != nil || n.AccessToken == "" || n.Internet || len(n.Allow) != 0 {
		t.Errorf("sandbox network: got %+v %v", n, err)
	}
	token := n.AccessToken
	n, err = show("--allow", pub+":80", "--allow", "*.example.com:443", "--deny", "evil.example.com", "--public-ports")
	if err != nil || fmt.Sprint(n.Allow) != "["+pub+":80 *.example.com:443]" || fmt.Sprint(n.Deny) != "[evil.example.com]" || !n.PublicPorts || n.AccessToken != token {
		t.Errorf("sandbox network --allow ...: got %+v %v", n, err)
	}
	if out, _, _ := cli("sandbox", "url", id, "8000"); strings.Contains(out, "access_token") {
		t.Errorf("the URL of public ports carries the token: %q", out)
	}
	out, _, _ = cli("sandbox", "get", id)
	if !strings.Contains(out, `"*.example.com:443"`) {
		t.Errorf("sandbox get does not show the new rules:\n%s", out)
	}
	// Egress follows at once: the sandbox reaches the allowed stand-in now.
	if out, _, err := cli("sandbox", "exec", id, "--", "curl -sS --max-time 20 http://"+pub+"/"); err != nil || !strings.Contains(out, "hello from") {
		t.Errorf("after --allow: got %q %v", out, err)
	}
	n, err = show("--none")
	if err != nil || len(n.Allow) != 0 || len(n.Deny) != 0 || n.PublicPorts || n.Internet {
		t.Errorf("sandbox network --none: got %+v %v", n, err)
	}
	if _, _, err := cli("sandbox", "exec", id, "--", "curl -sS --max-time 20 http://"+pub+"/"); exitCode(err) == 0 {
		t.Error("after --none the sandbox still reaches the stand-in")
	}
	if _, err := show("--allow", "host:99999"); err == nil || !strings.Contains(err.Error(), "host:99999") {
		t.Errorf("a bad rule: got %v, want an error naming it", err)
	}
	if _, err := show("--none", "--internet"); err == nil || !strings.Contains(err.Error(), "--none") {
		t.Errorf("--none --internet: got %v", err)
	}
	if _, _, err := cli("sandbox", "url", id, "http"); err == nil || !strings.Contains(err.Error(), "PORT") {
		t.Errorf("a bad port: got %v", err)
	}

	// create --internet --json shows the network; a sandbox without one
	// has no ports.
	out, _, err = cli("sandbox", "create", "--internet", "--json")
	var sb wire.Sandbox
	if err != nil || json.Unmarshal([]byte(out), &sb) != nil || sb.Network == nil || !sb.Network.Internet || sb.Network.AccessToken == "" {
		t.Errorf("create --internet --json: got %q %v", out, err)
	}
	cli("sandbox", "kill", sb.ID)
	out, _, err = cli("sandbox", "create")
	plain := strings.TrimSpace(out)
	if err != nil {
		t.Fatal(err)
	}
	defer cli("sandbox", "kill", plain)
	if _, _, err := cli("sandbox", "url", plain, "8000"); err == nil || !strings.Contains(err.Error(), "without a network") {
		t.Errorf("url of a sandbox without network: got %v", err)
	}
	if _, err := func() (string, error) {
		_, _, err := cli("sandbox", "network", plain)
		return "", err
	}(); err == nil || !strings.Contains(err.Error(), "without a network") {
		t.Errorf("network of a sandbox without one: got %v", err)
	}
}
