package pandastack

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/pandastack/pandastack/wire"
)

// netFake is a server with networks: create's network, PUT .../network,
// GET /v1/health reporting a domain.
type netFake struct {
	mu      sync.Mutex
	domain  string
	health  int
	bodies  []string
	network *wire.SandboxNetwork
}

func (f *netFake) handler(t *testing.T) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		b, _ := io.ReadAll(r.Body)
		switch {
		case r.URL.Path == "/v1/health":
			f.health++
			writeJSON(w, 200, wire.Health{Status: "ok", Network: true, Domain: f.domain})
		case r.Header.Get("Authorization") != "Bearer "+testKey:
			writeError(w, 401, wire.CodeUnauthenticated, "no key")
		case r.Method == "POST" && r.URL.Path == "/v1/sandboxes":
			f.bodies = append(f.bodies, string(b))
			var req wire.CreateSandboxRequest
			if err := json.Unmarshal(b, &req); err != nil {
				writeError(w, 400, wire.CodeInvalid, err.Error())
				return
			}
			sb := wire.Sandbox{ID: "sb-1", State: "running"}
			if req.Network != nil {
				f.network = &wire.SandboxNetwork{Internet: req.Network.Internet, Allow: req.Network.Allow, Deny: req.Network.Deny, PublicPorts: req.Network.PublicPorts, AccessToken: "tok/1"}
				sb.Network = f.network
			}
			writeJSON(w, 201, sb)
		case r.Method == "PUT" && r.URL.Path == "/v1/sandboxes/sb-1/network":
			f.bodies = append(f.bodies, string(b))
			var req wire.Network
			if err := json.Unmarshal(b, &req); err != nil {
				writeError(w, 400, wire.CodeInvalid, err.Error())
				return
			}
			if f.network == nil {
				writeError(w, 409, wire.CodeConflict, "sandbox \"sb-1\" was created without a network")
				return
			}
			for _, r := range append(req.Allow, req.Deny...) {
				if strings.Contains(r, "!") {
					writeError(w, 400, wire.CodeInvalid, "network allow: rule \""+r+"\": bad host name")
					return
				}
			}
			f.network = &wire.SandboxNetwork{Internet: req.Internet, Allow: req.Allow, Deny: req.Deny, PublicPorts: req.PublicPorts, AccessToken: f.network.AccessToken}
			writeJSON(w, 200, wire.Sandbox{ID: "sb-1", State: "running", Network: f.network})
		default:
			t.Errorf("unexpected %s %s", r.Method, r.URL)
			writeError(w, 404, wire.CodeNotFound, "no route")
		}
	})
}

func newNetFake(t *testing.T, domain string) (*netFake, *httptest.Server) {
	f := &netFake{domain: domain}
	srv := httptest.NewServer(f.handler(t))
	t.Cleanup(srv.Close)
	return f, srv
}

func TestNetworkRequests(t *testing.T) {
	ctx := context.Background()
	f, srv := newNetFake(t, "")
	c, err := NewClient(WithURL(srv.URL), WithAPIKey(testKey))
	if err != nil {
		t.Fatal(err)
	}
	plain, err := c.Create(ctx, CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(f.bodies[0], "network") || plain.Network() != nil || plain.AccessToken() != "" {
		t.Errorf("no network asked: sent %s, got %+v", f.bodies[0], plain.Network())
	}
	if _, err := plain.URL(ctx, 8000, ""); !errors.Is(err, ErrConflict) {
		t.Errorf("URL of a sandbox without network: got %v, want ErrConflict", err)
	}
	if err := plain.SetNetwork(ctx, wire.Network{}); !errors.Is(err, ErrConflict) {
		t.Errorf("SetNetwork without a network: got %v, want ErrConflict", err)
	}

	for _, tc := range []struct {
		n    *wire.Network
		want string
	}{
		{&wire.Network{}, `"network":{}`},
		{&wire.Network{Internet: true}, `"network":{"internet":true}`},
		{&wire.Network{Allow: []string{"10.1.2.3/32", "*.pypi.org:443"}, Deny: []string{"x.pypi.org"}, PublicPorts: true}, `"network":{"allow":["10.1.2.3/32","*.pypi.org:443"],"deny":["x.pypi.org"],"public_ports":true}`},
	} {
		sb, err := c.Create(ctx, CreateOptions{Network: tc.n})
		if err != nil {
			t.Fatal(err)
		}
		if last := f.bodies[len(f.bodies)-1]; !strings.Contains(last, tc.want) {
			t.Errorf("create sent %s, want %s in it", last, tc.want)
		}
		if sb.AccessToken() != "tok/1" || sb.Network().Internet != tc.n.Internet {
			t.Errorf("network after create: %+v", sb.Network())
		}
	}

	sb, _ := c.Create(ctx, CreateOptions{Network: &wire.Network{}})
	if err := sb.SetNetwork(ctx, wire.Network{Allow: []string{"*.example.com:443"}}); err != nil {
		t.Fatal(err)
	}
	if last := f.bodies[len(f.bodies)-1]; last != `{"allow":["*.example.com:443"]}` {
		t.Errorf("PUT sent %s", last)
	}
	if n := sb.Network(); len(n.Allow) != 1 || n.Allow[0] != "*.example.com:443" || n.AccessToken != "tok/1" {
		t.Errorf("network after SetNetwork: %+v", n)
	}
	// Network returns a copy.
	sb.Network().Allow[0] = "changed"
	if sb.Network().Allow[0] != "*.example.com:443" {
		t.Error("Network shares its slices with the handle")
	}
	err = sb.SetNetwork(ctx, wire.Network{Deny: []string{"bad!"}})
	var apiErr *APIError
	if !errors.As(err, &apiErr) || !errors.Is(err, ErrInvalidArgument) || !strings.Contains(apiErr.Message, "bad!") {
		t.Errorf("bad rule: got %v, want ErrInvalidArgument naming the rule", err)
	}

	// Path form (no domain), the token in the query, path and query kept.
	for _, tc := range []struct {
		port int
		path string
		want string
	}{
		{8000, "", srv.URL + "/v1/sandboxes/sb-1/ports/8000/?access_token=tok%2F1"},
		{3000, "app/x y.html?a=1#top", srv.URL + "/v1/sandboxes/sb-1/ports/3000/app/x%20y.html?a=1&access_token=tok%2F1#top"},
	} {
		if got, err := sb.URL(ctx, tc.port, tc.path); err != nil || got != tc.want {
			t.Errorf("URL(%d, %q): got %q, %v, want %q", tc.port, tc.path, got, err, tc.want)
		}
	}
	if _, err := sb.URL(ctx, 0, ""); err == nil {
		t.Error("URL of port 0: no error")
	}
	// Public ports: no token in the URL.
	if err := sb.SetNetwork(ctx, wire.Network{PublicPorts: true}); err != nil {
		t.Fatal(err)
	}
	if got, _ := sb.URL(ctx, 8000, "/"); got != srv.URL+"/v1/sandboxes/sb-1/ports/8000/" {
		t.Errorf("public ports URL: %q", got)
	}
}

func TestNetworkHostNameURL(t *testing.T) {
	ctx := context.Background()
	f, srv := newNetFake(t, "sandbox.test.")
	c, _ := NewClient(WithURL(srv.URL), WithAPIKey(testKey))
	sb, err := c.Create(ctx, CreateOptions{Network: &wire.Network{}})
	if err != nil {
		t.Fatal(err)
	}
	port := srv.URL[strings.LastIndex(srv.URL, ":")+1:]
	for i := 0; i < 3; i++ {
		got, err := sb.URL(ctx, 8000, "/index.html")
		if want := "http://8000-sb-1.sandbox.test:" + port + "/index.html?access_token=tok%2F1"; err != nil || got != want {
			t.Errorf("URL: got %q, %v, want %q", got, err, want)
		}
	}
	if f.health != 1 {
		t.Errorf("the domain was asked for %d times, want once per client", f.health)
	}
	// The API's scheme; a default port is left out.
	c.baseURL = "https://api.example.com"
	if got, _ := sb.URL(ctx, 443, ""); got != "https://443-sb-1.sandbox.test/?access_token=tok%2F1" {
		t.Errorf("https URL: %q", got)
	}
}
