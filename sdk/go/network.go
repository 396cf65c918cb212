package pandastack

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"

	"github.com/pandastack/pandastack/wire"
)

// domainCache holds the server's ports domain once asked for.
type domainCache struct {
	mu     sync.Mutex
	known  bool
	domain string
}

// portsDomain returns the server's ports domain (serve --domain), "" when
// it has none; GET /v1/health is asked once per client.
func (c *Client) portsDomain(ctx context.Context) (string, error) {
	c.domain.mu.Lock()
	defer c.domain.mu.Unlock()
	if c.domain.known {
		return c.domain.domain, nil
	}
	h, err := c.Health(ctx)
	if err != nil {
		return "", err
	}
	c.domain.domain, c.domain.known = strings.Trim(h.Domain, "."), true
	return c.domain.domain, nil
}

// Network returns the sandbox's network as last reported (see Info): its
// policy and the access token of its ports; nil for a sandbox created
// without one.
func (s *Sandbox) Network() *wire.SandboxNetwork {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.info.Network == nil {
		return nil
	}
	n := *s.info.Network
	n.Allow = append([]string(nil), n.Allow...)
	n.Deny = append([]string(nil), n.Deny...)
	return &n
}

// AccessToken returns the token that opens the sandbox's ports to
// whoever has it, besides the API key (header X-Access-Token or query
// access_token); "" for a sandbox without a network.
func (s *Sandbox) AccessToken() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.info.Network == nil {
		return ""
	}
	return s.info.Network.AccessToken
}

// SetNetwork replaces the sandbox's network policy, PublicPorts
// included; it applies at once: new connections follow it and existing
// connections to what it no longer allows are cut. Only a sandbox created
// with a network (CreateOptions.Network, &wire.Network{} is enough) has
// one to change; others fail with ErrConflict. A rule the server cannot
// read fails with ErrInvalidArgument naming it.
func (s *Sandbox) SetNetwork(ctx context.Context, n wire.Network) error {
	var info wire.Sandbox
	if err := s.c.do(ctx, http.MethodPut, s.path("/network"), n, &info, http.StatusOK); err != nil {
		return fmt.Errorf("setting network of sandbox %q: %w", s.id, err)
	}
	s.setInfo(info)
	return nil
}

// URL returns a URL that reaches port of the sandbox through the server,
// for a browser or curl, at path ("" for "/", which may hold a query).
// When the server has a ports domain (serve --domain) it is the host-name
// form {scheme}://{port}-{id}.{domain}[:api port]/path, else the path form
// {server}/v1/sandboxes/{id}/ports/{port}/path. Unless the sandbox's ports
// are public it carries the access token as the query parameter
// access_token: the server then sets an HttpOnly cookie scoped to the
// port, so the page's own requests need no token. The sandbox needs a
// network (ErrConflict otherwise); "none" is enough.
func (s *Sandbox) URL(ctx context.Context, port int, path string) (string, error) {
	if port < 1 || port > 65535 {
		return "", fmt.Errorf("port must be between 1 and 65535, got %d", port)
	}
	n := s.Network()
	if n == nil {
		return "", &APIError{Code: wire.CodeConflict, Message: fmt.Sprintf("sandbox %q was created without a network, so its ports cannot be reached; create it with one (&wire.Network{} is enough)", s.id)}
	}
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	ref, err := url.Parse(path)
	if err != nil {
		return "", fmt.Errorf("parsing path %q: %w", path, err)
	}
	q := ref.RawQuery
	if n.AccessToken != "" && !n.PublicPorts {
		tok := url.Values{"access_token": {n.AccessToken}}.Encode()
		if q != "" {
			q += "&"
		}
		q += tok
	}
	domain, err := s.c.portsDomain(ctx)
	if err != nil {
		return "", fmt.Errorf("finding the server's ports domain: %w", err)
	}
	base, err := url.Parse(s.c.baseURL)
	if err != nil {
		return "", fmt.Errorf("parsing server URL %q: %w", s.c.baseURL, err)
	}
	u := &url.URL{Scheme: base.Scheme, RawQuery: q, Fragment: ref.Fragment}
	if domain != "" {
		u.Host = strconv.Itoa(port) + "-" + s.id + "." + domain
		if p := base.Port(); p != "" {
			u.Host += ":" + p
		}
		u.Path, u.RawPath = ref.Path, ref.RawPath
	} else {
		u.Host = base.Host
		prefix := strings.TrimRight(base.Path, "/") + wire.APIVersion + "/sandboxes/" + url.PathEscape(s.id) + "/ports/" + strconv.Itoa(port)
		u.Path = prefix + ref.Path
		if ref.RawPath != "" {
			u.RawPath = prefix + ref.RawPath
		}
	}
	return u.String(), nil
}
