// Package pandastack is the Go client of the PandaStack HTTP API (docs/API.md):
// create sandboxes, run commands in them with blocking or streamed output,
// extend their lifetime and kill them; snapshot, fork, pause and resume them.
//
//	c, err := pandastack.NewClient()
//	sb, err := c.Create(ctx, pandastack.CreateOptions{Template: "base"})
//	defer sb.Close()
//	res, err := sb.Exec(ctx, "echo hi", pandastack.ExecOptions{})
//
// Errors reported by the server are *APIError values that match the Err*
// sentinels under errors.Is (errors.Is(err, pandastack.ErrNotFound)).
package pandastack

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/pandastack/pandastack/wire"
)

// Defaults used when neither an option nor the environment says otherwise.
const (
	DefaultURL     = "http://127.0.0.1:7423"
	DefaultDataDir = "/var/lib/pandastack"
)

// maxErrorBody bounds how much of an error response is read: a misrouted
// request can land on a proxy that answers with a large HTML page.
const maxErrorBody = 64 << 10

// Client talks to one PandaStack server. It is safe for concurrent use.
type Client struct {
	baseURL string
	apiKey  string
	// keyHint says where the key was looked for when none was found; it is
	// added to 401 errors, since a key file readable only by root is the
	// usual reason for one.
	keyHint string
	http    *http.Client

	// domain caches the server's ports domain (GET /v1/health), which
	// Sandbox.URL needs; see network.go.
	domain domainCache
}

// Option configures a Client. An option given an empty value is ignored, so
// that callers can pass flag values through unchanged.
type Option func(*Client)

// WithURL sets the server URL, e.g. "http://127.0.0.1:7423".
func WithURL(u string) Option { return func(c *Client) { c.baseURL = u } }

// WithAPIKey sets the API key sent as a bearer token.
func WithAPIKey(key string) Option { return func(c *Client) { c.apiKey = key } }

// WithHTTPClient sets the HTTP client used for every request. It should have
// no overall Timeout: streamed execs last as long as their command; bound
// calls with their context instead.
func WithHTTPClient(hc *http.Client) Option {
	return func(c *Client) {
		if hc != nil {
			c.http = hc
		}
	}
}

// NewClient returns a client configured from opts, then the environment
// variables PANDASTACK_URL and PANDASTACK_API_KEY, then DefaultURL and the
// key file $PANDASTACK_DATA_DIR/api-key (the directory defaulting to
// DefaultDataDir). A key that cannot be found is not an error here: health
// checks need none, and other calls fail with ErrUnauthenticated.
func NewClient(opts ...Option) (*Client, error) {
	c := &Client{}
	for _, o := range opts {
		o(c)
	}
	if c.baseURL == "" {
		c.baseURL = os.Getenv("PANDASTACK_URL")
	}
	if c.baseURL == "" {
		c.baseURL = DefaultURL
	}
	u, err := url.Parse(c.baseURL)
	if err != nil {
		return nil, fmt.Errorf("parsing server URL %q: %w", c.baseURL, err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("parsing server URL %q: want http://host:port or https://host:port", c.baseURL)
	}
	c.baseURL = strings.TrimRight(c.baseURL, "/")

	if c.apiKey == "" {
		c.apiKey = strings.TrimSpace(os.Getenv("PANDASTACK_API_KEY"))
	}
	if c.apiKey == "" {
		dir := os.Getenv("PANDASTACK_DATA_DIR")
		if dir == "" {
			dir = DefaultDataDir
		}
		path := filepath.Join(dir, "api-key")
		b, err := os.ReadFile(path)
		switch {
		case err != nil:
			c.keyHint = fmt.Sprintf("no API key given: pass one, set PANDASTACK_API_KEY, or make %s readable (%v)", path, err)
		case len(bytes.TrimSpace(b)) == 0:
			c.keyHint = fmt.Sprintf("no API key given and %s is empty", path)
		default:
			c.apiKey = string(bytes.TrimSpace(b))
		}
	}
	if c.http == nil {
		c.http = &http.Client{}
	}
	return c, nil
}

// Health reports the server's status; it needs no API key.
func (c *Client) Health(ctx context.Context) (wire.Health, error) {
	var h wire.Health
	if err := c.do(ctx, http.MethodGet, "/health", nil, &h, http.StatusOK); err != nil {
		return wire.Health{}, fmt.Errorf("checking health: %w", err)
	}
	return h, nil
}

// Templates lists the templates sandboxes can start from.
func (c *Client) Templates(ctx context.Context) ([]wire.Template, error) {
	var l wire.TemplateList
	if err := c.do(ctx, http.MethodGet, "/templates", nil, &l, http.StatusOK); err != nil {
		return nil, fmt.Errorf("listing templates: %w", err)
	}
	return l.Templates, nil
}

// CreateOptions describes a sandbox to create. Zero fields take the
// server's defaults.
type CreateOptions struct {
	// Template names the template; the server uses "base" when empty.
	Template string
	// TTL is the sandbox's lifetime, rounded up to whole seconds.
	TTL      time.Duration
	Env      map[string]string
	Metadata map[string]string
	// CPU is the number of CPUs; fractions are allowed.
	CPU float64
	// MemoryMB is the memory limit in MiB.
	MemoryMB int
	// DiskMB caps the writable root layer in MiB; Pids the processes
	// inside.
	DiskMB, Pids int
	// SnapshotID starts the sandbox from a snapshot (see Sandbox.Snapshot)
	// instead of a fresh boot: its processes continue where the snapshot
	// left them. Template must then be empty or the snapshot's template.
	SnapshotID string
	// OnTimeout is what the TTL does: wire.OnTimeoutKill (the server's
	// default) or wire.OnTimeoutPause, which keeps the sandbox paused until
	// it is resumed or killed.
	OnTimeout string
	// Network gives the sandbox a network: &wire.Network{} for none
	// (loopback only, but its ports can be reached: Sandbox.URL),
	// &wire.Network{Internet: true} for any public address, or Allow and
	// Deny rules (wire.Network). Nil: no network at all, so no ports.
	Network *wire.Network
}

// Create starts a sandbox and returns it once it is running. The caller owns
// it: Kill or Close it when done, or it lives until its TTL runs out.
func (c *Client) Create(ctx context.Context, opts CreateOptions) (*Sandbox, error) {
	req := wire.CreateSandboxRequest{
		Template:   opts.Template,
		TTLSeconds: ceilSeconds(opts.TTL),
		Env:        opts.Env,
		Metadata:   opts.Metadata,
		CPU:        opts.CPU,
		MemoryMB:   opts.MemoryMB,
		DiskMB:     opts.DiskMB,
		Pids:       opts.Pids,
		SnapshotID: opts.SnapshotID,
		OnTimeout:  opts.OnTimeout,
		Network:    opts.Network,
	}
	var info wire.Sandbox
	if err := c.do(ctx, http.MethodPost, "/sandboxes", req, &info, http.StatusCreated); err != nil {
		return nil, fmt.Errorf("creating sandbox: %w", err)
	}
	return &Sandbox{c: c, id: info.ID, info: info}, nil
}

// Connect returns the existing sandbox id, ready for use: a paused sandbox
// is resumed first. It fails with ErrNotFound when there is none (or it
// belongs to another tenant).
func (c *Client) Connect(ctx context.Context, id string) (*Sandbox, error) {
	sb, err := c.Get(ctx, id)
	if err != nil {
		return nil, err
	}
	if sb.Info().State == wire.StatePaused {
		if err := sb.Resume(ctx); err != nil {
			return nil, err
		}
	}
	return sb, nil
}

// Get returns the existing sandbox id as it is: unlike Connect, it leaves a
// paused sandbox paused, for callers that only inspect, pause or kill it. It
// fails with ErrNotFound when there is none.
func (c *Client) Get(ctx context.Context, id string) (*Sandbox, error) {
	sb := &Sandbox{c: c, id: id}
	if err := sb.Refresh(ctx); err != nil {
		return nil, err
	}
	return sb, nil
}

// List returns the caller's sandboxes, running and paused.
func (c *Client) List(ctx context.Context) ([]wire.Sandbox, error) {
	var l wire.SandboxList
	if err := c.do(ctx, http.MethodGet, "/sandboxes", nil, &l, http.StatusOK); err != nil {
		return nil, fmt.Errorf("listing sandboxes: %w", err)
	}
	return l.Sandboxes, nil
}

// ceilSeconds converts d to whole seconds, rounding up so that a positive
// duration never becomes 0, which the server would read as "default".
func ceilSeconds(d time.Duration) int {
	return int(math.Ceil(d.Seconds()))
}

// newRequest builds a request for path under /v1, with in (if not nil) as
// its JSON body.
func (c *Client) newRequest(ctx context.Context, method, path string, in any) (*http.Request, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, fmt.Errorf("encoding request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.baseURL+wire.APIVersion+path, body)
	if err != nil {
		return nil, fmt.Errorf("building request: %w", err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "pandastack-go")
	if c.apiKey != "" {
		req.Header.Set("Authorization", "Bearer "+c.apiKey)
	}
	return req, nil
}

// send performs req and returns the response if its status is want;
// otherwise it closes the body and returns the error it describes.
func (c *Client) send(req *http.Request, want int) (*http.Response, error) {
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != want {
		defer resp.Body.Close()
		return nil, c.responseError(resp)
	}
	return resp, nil
}

// do sends a JSON request and decodes a JSON answer into out (if not nil).
func (c *Client) do(ctx context.Context, method, path string, in, out any, want int) error {
	req, err := c.newRequest(ctx, method, path, in)
	if err != nil {
		return err
	}
	resp, err := c.send(req, want)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decoding %s %s response: %w", method, req.URL.Path, err)
	}
	return nil
}

// responseError turns an error response into an *APIError. A body that is
// not the documented JSON error (a proxy's page, a wrong port) still yields
// a typed error with a code guessed from the status and a readable excerpt.
func (c *Client) responseError(resp *http.Response) error {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	e := &APIError{Status: resp.StatusCode}
	var er wire.ErrorResponse
	if json.Unmarshal(body, &er) == nil && er.Error.Code != "" {
		e.Code, e.Message = er.Error.Code, er.Error.Message
	} else {
		e.Code = codeForStatus(resp.StatusCode)
		e.Message = fmt.Sprintf("unexpected %s response", resp.Status)
		if excerpt := excerpt(body); excerpt != "" {
			e.Message += ": " + excerpt
		}
	}
	e.RequestID = er.Error.RequestID
	if e.RequestID == "" {
		e.RequestID = resp.Header.Get("X-Request-Id")
	}
	if resp.StatusCode == http.StatusUnauthorized && c.keyHint != "" {
		e.Message += "; " + c.keyHint
	}
	return e
}

// excerpt returns the start of body on one line, for error messages.
func excerpt(body []byte) string {
	s := strings.Join(strings.Fields(strings.ToValidUTF8(string(body), "?")), " ")
	const max = 200
	if len(s) > max {
		s = strings.ToValidUTF8(s[:max], "") + "…"
	}
	return s
}
