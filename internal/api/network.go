package api

import (
	"context"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"

	"github.com/pandastack/pandastack/wire"
)

// Networks is what the API needs to change sandboxes' networks.
type Networks interface {
	SetNetwork(ctx context.Context, tenant, id string, req wire.Network) (wire.Sandbox, error)
}

func (s *Server) networkRoutes() {
	s.route("PUT /v1/sandboxes/{id}/network", true, s.setNetwork)
	// Its own authentication (API key, access token or public): not
	// s.route. Every method passes through.
	const ports = "/v1/sandboxes/{id}/ports/{port}/{path...}"
	for _, m := range portMethods {
		s.patterns = append(s.patterns, m+" "+ports)
	}
	s.mux.HandleFunc(ports, s.portRoute)
	// Without the trailing slash: a redirect to it, so that the page's
	// relative links resolve inside the port.
	s.mux.HandleFunc("/v1/sandboxes/{id}/ports/{port}", func(w http.ResponseWriter, r *http.Request) {
		u := *r.URL
		u.Path += "/"
		u.RawPath = ""
		http.Redirect(w, r, u.RequestURI(), http.StatusPermanentRedirect)
	})
}

// portMethods are the methods the ports route lists (it passes any).
var portMethods = []string{"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}

// accessCookie carries a sandbox port's access token after a request gave
// it in the query, so that a browser's next requests (the page's scripts,
// styles, links) need not: it is scoped to the port's origin (host-name
// form) or path (path form), HttpOnly, and never passed on.
const accessCookie = "pandastack_access_token"

// setNetwork replaces a sandbox's network policy; it applies at once.
func (s *Server) setNetwork(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req wire.Network
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	sb, err := s.cfg.Sandboxes.SetNetwork(r.Context(), tenant, r.PathValue("id"), req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, sb)
	return nil
}

// Ports is what the API needs to reach sandboxes' exposed ports.
type Ports interface {
	PortDialer(ctx context.Context, tenant, id, token string, port int) (func(context.Context) (net.Conn, error), error)
}

// servePort proxies a request to a port of a sandbox: the path form
// /v1/sandboxes/{id}/ports/{port}/... (the rest is the path inside) and,
// with Config.Domain, the host-name form {port}-{id}.{domain}. WebSocket
// upgrades and streamed responses pass through. Who may: the sandbox's
// tenant (API key), anyone with its access token (header X-Access-Token or
// query access_token, which is not passed on), anyone when its ports are
// public.
func (s *Server) servePort(w http.ResponseWriter, r *http.Request, id string, port int, path string, hostForm bool) {
	ports, ok := s.cfg.Sandboxes.(Ports)
	if !ok {
		s.fail(w, r, "", errdefs.Unavailable("this server has no sandbox ports"))
		return
	}
	tenant := ""
	if strings.HasPrefix(r.Header.Get("Authorization"), "Bearer ") {
		t, err := s.authenticate(r)
		if err != nil {
			s.fail(w, r, "", err)
			return
		}
		tenant = t
	}
	token := r.Header.Get("X-Access-Token")
	q := r.URL.Query()
	fromQuery := false
	if token == "" && q.Has("access_token") {
		token, fromQuery = q.Get("access_token"), true
	}
	if c, err := r.Cookie(accessCookie); token == "" && err == nil {
		token = c.Value
	}
	dial, err := ports.PortDialer(r.Context(), tenant, id, token, port)
	if err != nil {
		s.fail(w, r, tenant, err)
		return
	}
	q.Del("access_token")
	unescaped, err := url.PathUnescape(path)
	if err != nil {
		s.fail(w, r, tenant, errdefs.Invalid("bad path: %v", err))
		return
	}
	if fromQuery {
		cookiePath := "/"
		if !hostForm {
			cookiePath = "/v1/sandboxes/" + id + "/ports/" + strconv.Itoa(port) + "/"
		}
		http.SetCookie(w, &http.Cookie{Name: accessCookie, Value: token, Path: cookiePath, HttpOnly: true, Secure: r.TLS != nil, SameSite: http.SameSiteLaxMode})
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme = "http"
			pr.Out.URL.Host = "localhost:" + strconv.Itoa(port)
			pr.Out.URL.Path = unescaped
			pr.Out.URL.RawPath = path
			pr.Out.URL.RawQuery = q.Encode()
			if hostForm {
				pr.Out.Host = r.Host
			} else {
				pr.Out.Host = pr.Out.URL.Host
			}
			pr.Out.Header.Del("Authorization")
			pr.Out.Header.Del("X-Access-Token")
			withoutCookie(pr.Out.Header, accessCookie)
			pr.SetXForwarded()
		},
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return dial(ctx) },
			// Each request dials afresh: cheap (a local veth), and nothing
			// is pooled across tenants.
			DisableKeepAlives: true,
		},
		FlushInterval: -1,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			s.fail(w, r, tenant, errdefs.Wrap(errdefs.ErrUnavailable, err, "nothing answers on port %d of the sandbox", port))
		},
	}
	// A long stream or upload must not meet the JSON body deadline.
	_ = http.NewResponseController(w).SetReadDeadline(time.Time{})
	rp.ServeHTTP(w, r)
}

// portRoute serves the path form.
func (s *Server) portRoute(w http.ResponseWriter, r *http.Request) {
	port, err := strconv.Atoi(r.PathValue("port"))
	if err != nil {
		s.fail(w, r, "", errdefs.Invalid("port must be a number, got %q", r.PathValue("port")))
		return
	}
	// The rest of the path as sent (escaped), so that %2F and the like
	// reach the server in the sandbox unchanged.
	prefix := "/v1/sandboxes/" + r.PathValue("id") + "/ports/" + r.PathValue("port")
	s.servePort(w, r, r.PathValue("id"), port, strings.TrimPrefix(r.URL.EscapedPath(), prefix), false)
}

// portHost reports the port and sandbox of a host-name-form request
// ({port}-{id}.{domain}), or ok false.
func (s *Server) portHost(r *http.Request) (port int, id string, ok bool) {
	if s.cfg.Domain == "" {
		return 0, "", false
	}
	host := r.Host
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	label, found := strings.CutSuffix(strings.ToLower(host), "."+strings.ToLower(s.cfg.Domain))
	if !found {
		return 0, "", false
	}
	p, rest, found := strings.Cut(label, "-")
	if !found {
		return 0, "", false
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		return 0, "", false
	}
	return n, rest, true
}

// withoutCookie removes one cookie from a request's Cookie headers.
func withoutCookie(h http.Header, name string) {
	var keep []string
	for _, line := range h.Values("Cookie") {
		var parts []string
		for _, c := range strings.Split(line, ";") {
			if n, _, _ := strings.Cut(strings.TrimSpace(c), "="); n != name {
				parts = append(parts, strings.TrimSpace(c))
			}
		}
		if len(parts) > 0 {
			keep = append(keep, strings.Join(parts, "; "))
		}
	}
	h.Del("Cookie")
	for _, v := range keep {
		h.Add("Cookie", v)
	}
}
