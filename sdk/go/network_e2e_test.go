package pandastack_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/internal/nettest"
	pandastack "github.com/pandastack/pandastack/sdk/go"
	"github.com/pandastack/pandastack/wire"
)

// TestNetworkRealServer runs the SDK's network surface against a real
// server whose sandbox traffic leaves from a test namespace
// (internal/nettest) whose only routes lead to stand-ins: no packet can
// leave through the machine's real interface. The server has a ports
// domain, so Sandbox.URL gives the host-name form.
func TestNetworkRealServer(t *testing.T) {
	in := nettest.New(t)
	s := daemontest.Start(t, func(c *daemon.Config) {
		c.Sandbox.PoolSize = 0
		c.Network = daemon.NetworkConfig{Enabled: true, Namespace: in.DaemonNS, PoolSize: 1, Resolvers: []string{in.DNS}, Domain: "sandbox.test"}
	})
	c := s.Client(t)
	ctx := context.Background()
	if h, err := c.Health(ctx); err != nil || !h.Network || h.Domain != "sandbox.test" {
		t.Fatalf("health: %+v %v", h, err)
	}

	// Ports of a sandbox without egress, through Sandbox.URL.
	sb, err := c.Create(ctx, pandastack.CreateOptions{Template: "code-interpreter", Network: &wire.Network{}})
	if err != nil {
		t.Fatal(err)
	}
	defer sb.Close()
	if n := sb.Network(); n == nil || n.Internet || len(n.Allow) != 0 || sb.AccessToken() == "" {
		t.Fatalf("network at create: %+v", n)
	}
	if res, err := sb.Exec(ctx, "mkdir -p /tmp/www && echo served > /tmp/www/index.html && cd /tmp/www && nohup python3 -m http.server 8000 >/dev/null 2>&1 &", pandastack.ExecOptions{}); err != nil || res.ExitCode != 0 {
		t.Fatalf("starting a server: %+v %v", res, err)
	}
	u, err := sb.URL(ctx, 8000, "/index.html")
	if err != nil {
		t.Fatal(err)
	}
	daemonAddr := strings.TrimPrefix(s.URL, "http://")
	_, apiPort, _ := net.SplitHostPort(daemonAddr)
	if want := "http://8000-" + sb.ID() + ".sandbox.test:" + apiPort + "/index.html?access_token=" + url.QueryEscape(sb.AccessToken()); u != want {
		t.Fatalf("URL: got %q, want %q", u, want)
	}
	// The test's stand-in for a wildcard DNS record: every name is the daemon.
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, daemonAddr)
	}}}
	get := func(u string) (int, string) {
		resp, err := hc.Get(u)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	waitFor(t, "the sandbox's server through Sandbox.URL", func() (bool, string) {
		code, body := get(u)
		return code == 200 && strings.TrimSpace(body) == "served", fmt.Sprintf("%d %q", code, body)
	})
	bare := strings.Split(u, "?")[0]
	if code, _ := get(bare); code != http.StatusUnauthorized {
		t.Errorf("without the token: got %d, want 401", code)
	}

	// SetNetwork round trip: public ports, then none again.
	if err := sb.SetNetwork(ctx, wire.Network{PublicPorts: true}); err != nil {
		t.Fatal(err)
	}
	if pub, _ := sb.URL(ctx, 8000, "/index.html"); pub != bare {
		t.Errorf("public URL: got %q, want %q", pub, bare)
	}
	if code, _ := get(bare); code != 200 {
		t.Errorf("public port without the token: got %d", code)
	}
	if err := sb.SetNetwork(ctx, wire.Network{}); err != nil {
		t.Fatal(err)
	}
	if code, _ := get(bare); code != http.StatusUnauthorized || sb.Network().PublicPorts {
		t.Errorf("private again: got %d, %+v", code, sb.Network())
	}
	err = sb.SetNetwork(ctx, wire.Network{Allow: []string{"host:99999"}})
	var apiErr *pandastack.APIError
	if !errors.As(err, &apiErr) || apiErr.Status != 400 || !strings.Contains(apiErr.Message, "host:99999") {
		t.Errorf("bad rule: got %v, want a 400 naming it", err)
	}

	// Egress by an allow-list, changed at runtime (in the test's internet).
	eg, err := c.Create(ctx, pandastack.CreateOptions{Network: &wire.Network{Allow: []string{nettest.PublicIP.String() + ":80"}}})
	if err != nil {
		t.Fatal(err)
	}
	defer eg.Close()
	curl := func() string {
		res, err := eg.Exec(ctx, "curl -sS --max-time 20 http://"+nettest.PublicIP.String()+"/", pandastack.ExecOptions{Timeout: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		return fmt.Sprintf("%d %s%s", res.ExitCode, res.Stdout, res.Stderr)
	}
	if got := curl(); !strings.Contains(got, "hello from") {
		t.Errorf("allowed address: got %s", got)
	}
	if err := eg.SetNetwork(ctx, wire.Network{Deny: []string{nettest.PublicIP.String()}, Internet: true}); err != nil {
		t.Fatal(err)
	}
	if got := curl(); strings.HasPrefix(got, "0 ") {
		t.Errorf("after a deny rule: got %s, want refused", got)
	}

	// Without a network: no ports, no policy.
	plain, err := c.Create(ctx, pandastack.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if _, err := plain.URL(ctx, 8000, ""); !errors.Is(err, pandastack.ErrConflict) {
		t.Errorf("URL without a network: %v", err)
	}
	if err := plain.SetNetwork(ctx, wire.Network{}); !errors.Is(err, pandastack.ErrConflict) {
		t.Errorf("SetNetwork without a network: %v", err)
	}
}

// waitFor calls check until it reports true, failing with its last detail
// after a generous deadline (machines differ several-fold in speed).
func waitFor(t *testing.T, what string, check func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Minute)
	var detail string
	for time.Now().Before(deadline) {
		var ok bool
		if ok, detail = check(); ok {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s: not within 5 minutes; last: %s", what, detail)
}
