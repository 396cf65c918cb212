package cli

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/pandastack/pandastack/internal/daemon"
	pandastack "github.com/pandastack/pandastack/sdk/go"
	"github.com/pandastack/pandastack/wire"
)

// Networking figures. The networked server's sandbox traffic leaves from a
// network namespace the bench makes with nothing in it but loopback: no
// route leads anywhere, so no packet can leave through the machine's real
// interface. Its sandboxes have egress "none" anyway; what is measured is
// the cost of a network at create and the path into an exposed port.

// benchNetNamespace makes an empty network namespace (loopback up) and
// returns its path and a function that removes it.
func benchNetNamespace() (string, func(), error) {
	name := fmt.Sprintf("pandastack-bench-%d", os.Getpid())
	errc := make(chan error, 1)
	go func() {
		// The thread enters the new namespace and goes with the goroutine.
		runtime.LockOSThread()
		ns, err := netns.NewNamed(name)
		if err != nil {
			errc <- fmt.Errorf("creating network namespace %s: %w", name, err)
			return
		}
		defer ns.Close()
		lo, err := netlink.LinkByName("lo")
		if err == nil {
			err = netlink.LinkSetUp(lo)
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		_ = netns.DeleteNamed(name)
		return "", nil, err
	}
	return "/var/run/netns/" + name, func() { _ = netns.DeleteNamed(name) }, nil
}

// Names of the networking figures, for ratios.
const (
	benchNetNoNetwork   = "create → first output, no network"
	benchNetWithNetwork = "create → first output, network none"
	benchNetLoopback    = "HTTP download on the host's loopback"
	benchNetPort        = "HTTP download through an exposed port"
	benchNetInside      = "HTTP download inside the sandbox (its loopback)"
	benchNetRTTHost     = "HTTP request round trip, host loopback"
	benchNetRTTPort     = "HTTP request round trip, exposed port"
)

// benchNetwork starts a networked server (cold boot: no warm pool, no
// template snapshot, so both create figures pay the same boot) and
// measures create → first output with and without a network, interleaved,
// and HTTP through an exposed port beside the same transfer on the host's
// loopback and inside the sandbox.
func benchNetwork(ctx context.Context, runsc string, o benchOpts) ([]benchFigure, error) {
	nsPath, delNS, err := benchNetNamespace()
	if err != nil {
		return nil, err
	}
	defer delNS()
	c, stop, err := benchStartServerWith(ctx, runsc, func(cfg *daemon.Config) {
		cfg.Sandbox.PoolSize = 0
		cfg.Network = daemon.NetworkConfig{Enabled: true, Namespace: nsPath, PoolSize: 2, Resolvers: []string{"127.0.0.1:1"}}
	})
	if err != nil {
		return nil, fmt.Errorf("starting the networked server: %w", err)
	}
	defer stop()
	if h, err := c.Health(ctx); err != nil || !h.Network {
		return nil, fmt.Errorf("the networked server has no network: %+v %v", h, err)
	}
	if err := benchWarm(ctx, c, o.tmpl); err != nil {
		return nil, err
	}
	var plain, netted []time.Duration
	for range o.netN {
		for _, n := range []*wire.Network{nil, {}} {
			d, err := benchCreateOnce(ctx, c, pandastack.CreateOptions{Template: o.tmpl, TTL: 2 * time.Minute, Network: n})
			if err != nil {
				return nil, err
			}
			if n == nil {
				plain = append(plain, d)
			} else {
				netted = append(netted, d)
			}
		}
	}
	figs := []benchFigure{
		figure(benchNetNoNetwork, "networked server, cold boot; template "+o.tmpl, plain),
		figure(benchNetWithNetwork, "same server, interleaved; a namespace and veth from the pool of 2, nftables policy; template "+o.tmpl, netted),
	}
	if o.netMB > 0 {
		more, err := benchPortHTTP(ctx, c, o.netMB)
		if err != nil {
			return nil, err
		}
		figs = append(figs, more...)
	}
	return figs, nil
}

// benchCreateOnce times one create → first streamed output byte, then
// kills the sandbox (untimed).
func benchCreateOnce(ctx context.Context, c *pandastack.Client, opts pandastack.CreateOptions) (time.Duration, error) {
	time.Sleep(300 * time.Millisecond) // untimed: lets pools refill, as between real requests
	start := time.Now()
	sb, err := c.Create(ctx, opts)
	if err != nil {
		return 0, err
	}
	defer sb.Kill(context.WithoutCancel(ctx))
	var first time.Duration
	_, err = sb.Exec(ctx, "echo ok", pandastack.ExecOptions{OnStdout: func(string) {
		if first == 0 {
			first = time.Since(start)
		}
	}})
	return first, err
}

// benchPortHTTP measures HTTP through an exposed port: a file of mb MB
// served by python3 -m http.server in a code-interpreter sandbox with
// egress none, downloaded through the daemon's port route; the same bytes
// from a Go HTTP server on the host's loopback (the baseline) and with
// curl inside the sandbox from its own loopback (what the sandbox's server
// and netstack give without the daemon). Then small requests' round trips
// through the port beside the host's loopback.
func benchPortHTTP(ctx context.Context, c *pandastack.Client, mb int) ([]benchFigure, error) {
	size := int64(mb) << 20
	sb, err := c.Create(ctx, pandastack.CreateOptions{Template: "code-interpreter", TTL: 30 * time.Minute, Network: &wire.Network{}, DiskMB: mb + 1024})
	if err != nil {
		return nil, err
	}
	defer sb.Close()
	start := fmt.Sprintf("mkdir -p /tmp/www && head -c %d /dev/urandom > /tmp/www/blob && echo ok > /tmp/www/small && cd /tmp/www && nohup python3 -m http.server 8000 >/dev/null 2>&1 &", size)
	if res, err := sb.Exec(ctx, start, pandastack.ExecOptions{Timeout: 5 * time.Minute}); err != nil || res.ExitCode != 0 {
		return nil, fmt.Errorf("starting the sandbox's server: %v %+v", err, res)
	}
	blobURL, err := sb.URL(ctx, 8000, "/blob")
	if err != nil {
		return nil, err
	}
	smallURL, err := sb.URL(ctx, 8000, "/small")
	if err != nil {
		return nil, err
	}
	hc := &http.Client{Transport: &http.Transport{Proxy: nil, MaxIdleConnsPerHost: 4}}
	download := func(u string) (time.Duration, error) {
		t := time.Now()
		resp, err := hc.Get(u)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		n, err := io.Copy(io.Discard, resp.Body)
		if err == nil && (resp.StatusCode != 200 || n != size) {
			err = fmt.Errorf("GET %s: %s, %d bytes, want %d", strings.Split(u, "?")[0], resp.Status, n, size)
		}
		return time.Since(t), err
	}
	deadline := time.Now().Add(5 * time.Minute)
	for {
		resp, err := hc.Get(smallURL)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("the sandbox's server did not answer through its port: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// The host's loopback: the same bytes from a Go HTTP server.
	blob := make([]byte, size)
	_, _ = rand.Read(blob)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	srv := &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/small" {
			_, _ = io.WriteString(w, "ok\n")
			return
		}
		w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
		_, _ = w.Write(blob)
	})}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	hostURL := "http://" + ln.Addr().String()

	var host, port, inside []time.Duration
	for range benchFileRuns {
		d, err := download(hostURL + "/blob")
		if err != nil {
			return nil, err
		}
		host = append(host, d)
		if d, err = download(blobURL); err != nil {
			return nil, err
		}
		port = append(port, d)
		res, err := sb.Exec(ctx, "curl -sS -o /dev/null -w '%{time_total}' http://127.0.0.1:8000/blob", pandastack.ExecOptions{Timeout: 5 * time.Minute})
		if err != nil || res.ExitCode != 0 {
			return nil, fmt.Errorf("curl in the sandbox: %v %+v", err, res)
		}
		secs, err := strconv.ParseFloat(strings.TrimSpace(res.Stdout), 64)
		if err != nil {
			return nil, fmt.Errorf("curl's time %q: %w", res.Stdout, err)
		}
		inside = append(inside, time.Duration(secs*float64(time.Second)))
	}
	rate := func(d []time.Duration) float64 {
		best := d[0]
		for _, x := range d {
			best = min(best, x)
		}
		return float64(size) / best.Seconds() / 1e6
	}
	name := fmt.Sprintf(", %d MB", mb)
	base := rate(host)
	figs := []benchFigure{
		figure(benchNetLoopback+name, fmt.Sprintf("%.0f MB/s (best run); Go server and client, the baseline", base), host),
		figure(benchNetPort+name, fmt.Sprintf("%.0f MB/s (best run) = %.3f× the loopback baseline; python3 -m http.server in a sandbox with egress none, through /v1/sandboxes/{id}/ports/8000/ with the access token", rate(port), rate(port)/base), port),
		figure(benchNetInside+name, fmt.Sprintf("%.0f MB/s (best run) = %.3f× the loopback baseline; curl to the same server from inside (curl's time_total)", rate(inside), rate(inside)/base), inside),
	}

	rtt := func(u string, n int) ([]time.Duration, error) {
		var out []time.Duration
		for range n {
			t := time.Now()
			resp, err := hc.Get(u)
			if err != nil {
				return nil, err
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				return nil, fmt.Errorf("GET %s: %s", strings.Split(u, "?")[0], resp.Status)
			}
			out = append(out, time.Since(t))
		}
		return out, nil
	}
	hostRTT, err := rtt(hostURL+"/small", 200)
	if err != nil {
		return nil, err
	}
	portRTT, err := rtt(smallURL, 200)
	if err != nil {
		return nil, err
	}
	hf := figure(benchNetRTTHost, "GET of 3 bytes, kept-alive connection; the baseline", hostRTT)
	pf := figure(benchNetRTTPort, "GET of 3 bytes through the port route (the daemon dials the sandbox afresh per request)", portRTT)
	if hf.P50MS > 0 {
		pf.Comment += fmt.Sprintf("; p50 %.1f× the loopback baseline", pf.P50MS/hf.P50MS)
	}
	return append(figs, hf, pf), nil
}

// relateNetworkFigures notes the create figures' ratios to the runsc
// baseline and to each other.
func relateNetworkFigures(figs []benchFigure) {
	var base, plain float64
	for _, f := range figs {
		switch f.Name {
		case "baseline: runsc do /bin/true":
			base = f.P50MS
		case benchNetNoNetwork:
			plain = f.P50MS
		}
	}
	for i, f := range figs {
		switch f.Name {
		case benchNetNoNetwork:
			if base > 0 {
				figs[i].Comment += fmt.Sprintf("; p50 %.2f× the runsc baseline", f.P50MS/base)
			}
		case benchNetWithNetwork:
			if base > 0 {
				figs[i].Comment += fmt.Sprintf("; p50 %.2f× the runsc baseline", f.P50MS/base)
			}
			if plain > 0 {
				figs[i].Comment += fmt.Sprintf(", %.2f× without a network (+%.1f ms)", f.P50MS/plain, f.P50MS-plain)
			}
		}
	}
}
