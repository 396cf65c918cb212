// Package api is PandaStack's HTTP API: routing, authentication, request
// limits, and the translation of error kinds to HTTP statuses (errors.go).
// Handlers return errors instead of writing them.
package api

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/metrics"
	"github.com/pandastack/pandastack/internal/sandbox"
	"github.com/pandastack/pandastack/wire"
)

// Sandboxes is what the API needs of the sandbox manager.
type Sandboxes interface {
	Create(ctx context.Context, tenant string, req wire.CreateSandboxRequest) (wire.Sandbox, error)
	Get(ctx context.Context, tenant, id string) (wire.Sandbox, error)
	List(ctx context.Context, tenant string) ([]wire.Sandbox, error)
	Kill(ctx context.Context, tenant, id string) error
	SetTimeout(ctx context.Context, tenant, id string, ttlSeconds int) (wire.Sandbox, error)
	Exec(ctx context.Context, tenant, id string, req wire.ExecRequest, out sandbox.Output) (wire.ExecResult, error)
	Snapshot(ctx context.Context, tenant, id string, req wire.SnapshotRequest) (wire.Snapshot, error)
	GetSnapshot(ctx context.Context, tenant, id string) (wire.Snapshot, error)
	ListSnapshots(ctx context.Context, tenant string) ([]wire.Snapshot, error)
	DeleteSnapshot(ctx context.Context, tenant, id string) error
	Fork(ctx context.Context, tenant, id string, req wire.ForkRequest) ([]wire.Sandbox, error)
	Pause(ctx context.Context, tenant, id string) (wire.Sandbox, error)
	Resume(ctx context.Context, tenant, id string) (wire.Sandbox, error)
	// Metrics returns a sandbox's recent usage samples.
	Metrics(ctx context.Context, tenant, id string) (wire.SandboxMetrics, error)
	// Background processes and terminals (process.go).
	Processes
	// Code contexts and cells in them (code.go).
	CodeSandboxes
	// Files serves the Files API (files.go).
	Files
	// Networks changes sandboxes' networks (network.go).
	Networks
}

// Keys resolves API keys (by their SHA-256 hash) to tenants.
type Keys interface {
	TenantForKey(ctx context.Context, hash string) (string, error)
}

// Config configures the API.
type Config struct {
	Sandboxes Sandboxes
	Templates Templates
	Keys      Keys
	Log       *slog.Logger
	Version   string
	Runtime   string
	// Domain, when set, serves sandboxes' exposed ports at host names
	// {port}-{id}.{domain} too.
	Domain string
	// Network says (in GET /v1/health) that sandboxes may have a network.
	Network bool
	// MaxBodyBytes caps request bodies; 1 MiB when zero.
	MaxBodyBytes int64
	// MaxOutputBytes caps each of stdout and stderr of a blocking exec;
	// 10 MiB when zero.
	MaxOutputBytes int
	// MaxConcurrentExecs caps the execs running at once on the server,
	// blocking and streamed; beyond it an exec is refused (429) before it
	// starts. 1024 when zero.
	MaxConcurrentExecs int
	// MaxBufferedOutputBytes is what all blocking execs together may hold
	// of output in memory; an exec that finds it spent drops its further
	// output and reports truncated. Streamed execs buffer nothing and do
	// not count. 256 MiB when zero.
	MaxBufferedOutputBytes int64
	// BodyReadTimeout is how long a JSON request body may take to
	// arrive; 30 s when zero.
	BodyReadTimeout time.Duration
	// Metrics, when set, gets the latency of sandbox operations and the
	// error answers by code (observe.go).
	Metrics *metrics.Metrics
	// Audit, when set, records tenants' actions and serves GET /v1/audit.
	Audit Audit
}

// Server serves the API. Create it with New.
type Server struct {
	cfg      Config
	mux      *http.ServeMux
	patterns []string
	// execs counts the execs in progress, for MaxConcurrentExecs.
	execs atomic.Int64
	// output is the MaxBufferedOutputBytes budget of blocking execs.
	output *byteBudget
	// drainGrace is the drainGrace of this server.
	drainGrace time.Duration
}

// HashKey returns the stored form of an API key.
func HashKey(key string) string {
	h := sha256.Sum256([]byte(key))
	return hex.EncodeToString(h[:])
}

// KeyID is how the audit log names a key: the first 12 hex digits of its
// stored hash, which tells keys apart without revealing any of them.
func KeyID(hash string) string {
	if len(hash) > 12 {
		return hash[:12]
	}
	return hash
}

// New returns a Server with every route registered.
func New(cfg Config) *Server {
	if cfg.MaxBodyBytes == 0 {
		cfg.MaxBodyBytes = 1 << 20
	}
	if cfg.MaxOutputBytes == 0 {
		cfg.MaxOutputBytes = 10 << 20
	}
	if cfg.MaxConcurrentExecs == 0 {
		cfg.MaxConcurrentExecs = 1024
	}
	if cfg.MaxBufferedOutputBytes == 0 {
		cfg.MaxBufferedOutputBytes = 256 << 20
	}
	if cfg.BodyReadTimeout == 0 {
		cfg.BodyReadTimeout = 30 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Sandboxes != nil && (cfg.Metrics != nil || cfg.Audit != nil) {
		cfg.Sandboxes = &observed{Sandboxes: cfg.Sandboxes, metrics: cfg.Metrics, audit: cfg.Audit, log: cfg.Log}
	}
	s := &Server{cfg: cfg, mux: http.NewServeMux(), output: &byteBudget{max: cfg.MaxBufferedOutputBytes}, drainGrace: drainGrace}
	s.route("GET /v1/health", false, s.health)
	s.templateRoutes()
	s.route("POST /v1/sandboxes", true, s.createSandbox)
	s.route("GET /v1/sandboxes", true, s.listSandboxes)
	s.route("GET /v1/sandboxes/{id}", true, s.getSandbox)
	s.route("DELETE /v1/sandboxes/{id}", true, s.killSandbox)
	s.route("POST /v1/sandboxes/{id}/timeout", true, s.setTimeout)
	s.route("POST /v1/sandboxes/{id}/exec", true, s.exec)
	s.route("POST /v1/sandboxes/{id}/snapshot", true, s.snapshot)
	s.route("POST /v1/sandboxes/{id}/fork", true, s.fork)
	s.route("POST /v1/sandboxes/{id}/pause", true, s.pause)
	s.route("POST /v1/sandboxes/{id}/resume", true, s.resume)
	s.route("GET /v1/sandboxes/{id}/metrics", true, s.sandboxMetrics)
	s.route("GET /v1/audit", true, s.listAudit)
	s.route("GET /v1/snapshots", true, s.listSnapshots)
	s.route("GET /v1/snapshots/{id}", true, s.getSnapshot)
	s.route("DELETE /v1/snapshots/{id}", true, s.deleteSnapshot)
	s.processRoutes()
	s.codeRoutes()
	s.fileRoutes()
	s.networkRoutes()
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		s.fail(w, r, "", errdefs.NotFound("no route for %s %s", r.Method, r.URL.Path))
	})
	return s
}

// Routes lists the registered "METHOD /path" patterns, for the spec test.
func (s *Server) Routes() []string { return append([]string(nil), s.patterns...) }

// ServeHTTP implements http.Handler. Every answer carries the request's id
// in X-Request-Id; error bodies and the server's log lines carry it too, so
// that a tenant's report can be matched to the log.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body := r.Body
	if body == nil {
		body = http.NoBody
	}
	ri := &requestInfo{id: newRequestID(), body: &trackedBody{ReadCloser: body}}
	w.Header().Set("X-Request-Id", ri.id)
	r = r.WithContext(context.WithValue(r.Context(), requestInfoKey{}, ri))
	r.Body = ri.body
	defer func() {
		// A bug in one handler must not take the daemon down.
		if v := recover(); v != nil {
			if v == http.ErrAbortHandler {
				panic(v)
			}
			s.fail(w, r, "", fmt.Errorf("panic in handler: %v\n%s", v, debug.Stack()))
		}
	}()
	if port, id, ok := s.portHost(r); ok {
		s.servePort(w, r, id, port, r.URL.EscapedPath(), true)
		return
	}
	s.mux.ServeHTTP(w, r)
}

// trackedBody remembers whether the request body was read to its end, so
// that an error answer knows whether unread body bytes may still come.
type trackedBody struct {
	io.ReadCloser
	eof bool
}

func (b *trackedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.eof = true
	}
	return n, err
}

// unread reports whether some of r's body may not have been read yet.
func (b *trackedBody) unread(r *http.Request) bool {
	return b != nil && r.ContentLength != 0 && !b.eof
}

type tenantKey struct{}

// handler serves one route for an authenticated tenant ("" for public ones).
type handler func(w http.ResponseWriter, r *http.Request, tenant string) error

func (s *Server) route(pattern string, auth bool, h handler) {
	s.patterns = append(s.patterns, pattern)
	s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		tenant := ""
		var err error
		if auth {
			tenant, err = s.authenticate(r)
		}
		if err == nil {
			r.Body = http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes)
			err = h(w, r, tenant)
		}
		if err != nil {
			s.fail(w, r, tenant, err)
		}
		s.cfg.Log.Debug("request", "request_id", infoOf(r).id, "method", r.Method, "path", r.URL.Path, "dur", time.Since(start))
	})
}

func (s *Server) authenticate(r *http.Request) (string, error) {
	h := r.Header.Get("Authorization")
	key, ok := strings.CutPrefix(h, "Bearer ")
	if !ok || key == "" {
		return "", errdefs.New(errdefs.ErrUnauthorized, "missing API key: send Authorization: Bearer <key>")
	}
	hash := HashKey(strings.TrimSpace(key))
	tenant, err := s.cfg.Keys.TenantForKey(r.Context(), hash)
	if errors.Is(err, errdefs.ErrNotFound) {
		return "", errdefs.New(errdefs.ErrUnauthorized, "invalid API key")
	}
	if err != nil {
		return "", err
	}
	infoOf(r).keyID = KeyID(hash)
	return tenant, nil
}

// decode reads a JSON body, which must be one JSON object, into v,
// rejecting unknown fields and trailing data.
func (s *Server) decode(w http.ResponseWriter, r *http.Request, v any) error {
	return s.readJSON(w, r, v, false)
}

// decodeOptional is decode for bodies that may be empty.
func (s *Server) decodeOptional(w http.ResponseWriter, r *http.Request, v any) error {
	return s.readJSON(w, r, v, true)
}

// readJSON decodes the body into v. A body without a JSON value (no bytes,
// or only white space) is empty, whatever its framing: Content-Length: 0
// and an empty chunked body are the same.
func (s *Server) readJSON(w http.ResponseWriter, r *http.Request, v any, optional bool) error {
	empty := func() error {
		if optional {
			return nil
		}
		return errdefs.Invalid("request body is empty; expected a JSON object")
	}
	if r.ContentLength == 0 {
		return empty()
	}
	// A body that trickles in must not hold its connection and handler
	// for ever. The deadline is cleared again when the body is read: the
	// server then keeps a read pending on the connection to notice a
	// hang-up, and a deadline firing there would cancel the request (an
	// exec may run for an hour).
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Now().Add(s.cfg.BodyReadTimeout))
	defer func() { _ = rc.SetReadDeadline(time.Time{}) }()

	dec := json.NewDecoder(r.Body)
	var raw json.RawMessage
	if err := dec.Decode(&raw); err != nil {
		if err == io.EOF {
			return empty()
		}
		return s.bodyError(err)
	}
	// Token reads on to the end of the body: io.EOF means nothing follows.
	if _, err := dec.Token(); err != io.EOF {
		var se *json.SyntaxError
		if err == nil || errors.As(err, &se) {
			return errdefs.Invalid("request body has data after the JSON value")
		}
		return s.bodyError(err)
	}
	// null would decode into the zero struct (and create a sandbox with
	// every default): only an object is a request.
	if raw[0] != '{' {
		return errdefs.Invalid("request body must be a JSON object, not %s", jsonKind(raw[0]))
	}
	obj := json.NewDecoder(bytes.NewReader(raw))
	obj.DisallowUnknownFields()
	if err := obj.Decode(v); err != nil {
		return errdefs.Invalid("decoding request body: %v", err)
	}
	return nil
}

// bodyError turns an error met reading the body into one of a kind.
func (s *Server) bodyError(err error) error {
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &mbe):
		return errdefs.New(errdefs.ErrTooLarge, "request body exceeds %d bytes", mbe.Limit)
	case errors.Is(err, os.ErrDeadlineExceeded):
		return errdefs.Invalid("request body did not arrive within %s", s.cfg.BodyReadTimeout)
	}
	return errdefs.Invalid("decoding request body: %v", err)
}

// jsonKind names the kind of JSON value that starts with c.
func jsonKind(c byte) string {
	switch c {
	case 'n':
		return "null"
	case 't', 'f':
		return "a boolean"
	case '"':
		return "a string"
	case '[':
		return "an array"
	}
	return "a number"
}

func (s *Server) health(w http.ResponseWriter, r *http.Request, _ string) error {
	writeJSON(w, http.StatusOK, wire.Health{Status: "ok", Version: s.cfg.Version, Runtime: s.cfg.Runtime, Network: s.cfg.Network, Domain: s.cfg.Domain})
	return nil
}

func (s *Server) createSandbox(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req wire.CreateSandboxRequest
	if err := s.decodeOptional(w, r, &req); err != nil {
		return err
	}
	sb, err := s.cfg.Sandboxes.Create(r.Context(), tenant, req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, sb)
	return nil
}

func (s *Server) listSandboxes(w http.ResponseWriter, r *http.Request, tenant string) error {
	l, err := s.cfg.Sandboxes.List(r.Context(), tenant)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, wire.SandboxList{Sandboxes: l})
	return nil
}

func (s *Server) getSandbox(w http.ResponseWriter, r *http.Request, tenant string) error {
	sb, err := s.cfg.Sandboxes.Get(r.Context(), tenant, r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, sb)
	return nil
}

func (s *Server) killSandbox(w http.ResponseWriter, r *http.Request, tenant string) error {
	if err := s.cfg.Sandboxes.Kill(r.Context(), tenant, r.PathValue("id")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) setTimeout(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req wire.SetTimeoutRequest
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	sb, err := s.cfg.Sandboxes.SetTimeout(r.Context(), tenant, r.PathValue("id"), req.TTLSeconds)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, sb)
	return nil
}

func (s *Server) snapshot(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req wire.SnapshotRequest
	if err := s.decodeOptional(w, r, &req); err != nil {
		return err
	}
	sn, err := s.cfg.Sandboxes.Snapshot(r.Context(), tenant, r.PathValue("id"), req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, sn)
	return nil
}

func (s *Server) fork(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req wire.ForkRequest
	if err := s.decodeOptional(w, r, &req); err != nil {
		return err
	}
	l, err := s.cfg.Sandboxes.Fork(r.Context(), tenant, r.PathValue("id"), req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, wire.ForkResponse{Sandboxes: l})
	return nil
}

func (s *Server) pause(w http.ResponseWriter, r *http.Request, tenant string) error {
	sb, err := s.cfg.Sandboxes.Pause(r.Context(), tenant, r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, sb)
	return nil
}

func (s *Server) resume(w http.ResponseWriter, r *http.Request, tenant string) error {
	sb, err := s.cfg.Sandboxes.Resume(r.Context(), tenant, r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, sb)
	return nil
}

func (s *Server) listSnapshots(w http.ResponseWriter, r *http.Request, tenant string) error {
	l, err := s.cfg.Sandboxes.ListSnapshots(r.Context(), tenant)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, wire.SnapshotList{Snapshots: l})
	return nil
}

func (s *Server) getSnapshot(w http.ResponseWriter, r *http.Request, tenant string) error {
	sn, err := s.cfg.Sandboxes.GetSnapshot(r.Context(), tenant, r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, sn)
	return nil
}

func (s *Server) deleteSnapshot(w http.ResponseWriter, r *http.Request, tenant string) error {
	if err := s.cfg.Sandboxes.DeleteSnapshot(r.Context(), tenant, r.PathValue("id")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
