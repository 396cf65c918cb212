// Package api is PandaStack's HTTP API: routing, authentication, request
// limits, and the translation of error kinds to HTTP statuses (errors.go).
// Handlers return errors instead of writing them.
package api

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
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
	Snapshot(ctx context.Context, tenant, id string) (wire.Snapshot, error)
	GetSnapshot(ctx context.Context, tenant, id string) (wire.Snapshot, error)
	ListSnapshots(ctx context.Context, tenant string) ([]wire.Snapshot, error)
	DeleteSnapshot(ctx context.Context, tenant, id string) error
	Fork(ctx context.Context, tenant, id string, req wire.ForkRequest) ([]wire.Sandbox, error)
	Pause(ctx context.Context, tenant, id string) (wire.Sandbox, error)
	Resume(ctx context.Context, tenant, id string) (wire.Sandbox, error)
}

// Templates lists the server's templates.
type Templates interface {
	List() []wire.Template
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
	// MaxBodyBytes caps request bodies; 1 MiB when zero.
	MaxBodyBytes int64
	// MaxOutputBytes caps each of stdout and stderr of a blocking exec;
	// 10 MiB when zero.
	MaxOutputBytes int
}

// Server serves the API. Create it with New.
type Server struct {
	cfg      Config
	mux      *http.ServeMux
	patterns []string
}

// HashKey returns the stored form of an API key.
func HashKey(key string) string {
	h := sha256.Sum256([]byte(key))
	return hex.EncodeToString(h[:])
}

// New returns a Server with every route registered.
func New(cfg Config) *Server {
	if cfg.MaxBodyBytes == 0 {
		cfg.MaxBodyBytes = 1 << 20
	}
	if cfg.MaxOutputBytes == 0 {
		cfg.MaxOutputBytes = 10 << 20
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, mux: http.NewServeMux()}
	s.route("GET /v1/health", false, s.health)
	s.route("GET /v1/templates", true, s.listTemplates)
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
	s.route("GET /v1/snapshots", true, s.listSnapshots)
	s.route("GET /v1/snapshots/{id}", true, s.getSnapshot)
	s.route("DELETE /v1/snapshots/{id}", true, s.deleteSnapshot)
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errdefs.NotFound("no route for %s %s", r.Method, r.URL.Path))
	})
	return s
}

// Routes lists the registered "METHOD /path" patterns, for the spec test.
func (s *Server) Routes() []string { return append([]string(nil), s.patterns...) }

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	defer func() {
		// A bug in one handler must not take the daemon down.
		if v := recover(); v != nil {
			if v == http.ErrAbortHandler {
				panic(v)
			}
			s.cfg.Log.Error("panic in handler", "method", r.Method, "path", r.URL.Path, "panic", v)
			writeError(w, fmt.Errorf("internal error"))
		}
	}()
	s.mux.ServeHTTP(w, r)
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
			status, _ := errorStatus(err)
			if status >= 500 {
				s.cfg.Log.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
			}
			writeError(w, err)
		}
		s.cfg.Log.Debug("request", "method", r.Method, "path", r.URL.Path, "dur", time.Since(start))
	})
}

func (s *Server) authenticate(r *http.Request) (string, error) {
	h := r.Header.Get("Authorization")
	key, ok := strings.CutPrefix(h, "Bearer ")
	if !ok || key == "" {
		return "", errdefs.New(errdefs.ErrUnauthorized, "missing API key: send Authorization: Bearer <key>")
	}
	tenant, err := s.cfg.Keys.TenantForKey(r.Context(), HashKey(strings.TrimSpace(key)))
	if errors.Is(err, errdefs.ErrNotFound) {
		return "", errdefs.New(errdefs.ErrUnauthorized, "invalid API key")
	}
	if err != nil {
		return "", err
	}
	return tenant, nil
}

// decode reads a JSON body into v, rejecting unknown fields and trailing data.
func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		if tl := tooLarge(err); tl != nil {
			return tl
		}
		if errors.Is(err, io.EOF) {
			return errdefs.Invalid("request body is empty; expected a JSON object")
		}
		return errdefs.Invalid("decoding request body: %v", err)
	}
	// Token reads on to the end of the body: io.EOF means nothing follows.
	if _, err := dec.Token(); err != io.EOF {
		if tl := tooLarge(err); tl != nil {
			return tl
		}
		return errdefs.Invalid("request body has data after the JSON object")
	}
	return nil
}

// tooLarge returns the ErrTooLarge error for a body that hit its size
// limit, or nil.
func tooLarge(err error) error {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return errdefs.New(errdefs.ErrTooLarge, "request body exceeds %d bytes", mbe.Limit)
	}
	return nil
}

// decodeOptional is decode for bodies that may be empty.
func decodeOptional(r *http.Request, v any) error {
	if r.ContentLength == 0 {
		return nil
	}
	return decode(r, v)
}

func (s *Server) health(w http.ResponseWriter, r *http.Request, _ string) error {
	writeJSON(w, http.StatusOK, wire.Health{Status: "ok", Version: s.cfg.Version, Runtime: s.cfg.Runtime})
	return nil
}

func (s *Server) listTemplates(w http.ResponseWriter, r *http.Request, _ string) error {
	writeJSON(w, http.StatusOK, wire.TemplateList{Templates: s.cfg.Templates.List()})
	return nil
}

func (s *Server) createSandbox(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req wire.CreateSandboxRequest
	if err := decodeOptional(r, &req); err != nil {
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
	if err := decode(r, &req); err != nil {
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
	sn, err := s.cfg.Sandboxes.Snapshot(r.Context(), tenant, r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusCreated, sn)
	return nil
}

func (s *Server) fork(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req wire.ForkRequest
	if err := decodeOptional(r, &req); err != nil {
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
