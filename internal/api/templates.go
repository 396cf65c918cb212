package api

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/wire"
)

// Templates serves the templates API: built-in templates (shared) and the
// tenant's own, built from a Dockerfile.
type Templates interface {
	List(ctx context.Context, tenant string) ([]wire.Template, error)
	// Get returns the template a reference names ("NAME" or "NAME:TAG").
	Get(ctx context.Context, tenant, ref string) (wire.Template, error)
	// Delete removes the tenant's built template; ErrConflict while a
	// sandbox or snapshot depends on it.
	Delete(ctx context.Context, tenant, ref string) error
	// Build builds a template from the build context tar in body (which
	// holds the Dockerfile). It reports progress to emit, from one
	// goroutine at a time; an error returned before the first emit is the
	// request's (its status), one after it ends the stream.
	Build(ctx context.Context, tenant string, req TemplateBuild, body io.Reader, emit func(wire.TemplateBuildEvent)) (wire.Template, error)
}

// TemplateBuild is a build request's parameters (POST /v1/templates query).
type TemplateBuild struct {
	// Name and Tag name the result; Tag "latest" when empty.
	Name, Tag string
	// Dockerfile is the Dockerfile's path in the context ("Dockerfile").
	Dockerfile string
	// Args are build arguments (--build-arg).
	Args map[string]string
	// NoCache rebuilds every step.
	NoCache bool
	// Gzip says the body is gzip-compressed.
	Gzip bool
}

func (s *Server) templateRoutes() {
	s.route("GET /v1/templates", true, s.listTemplates)
	s.route("POST /v1/templates", true, s.buildTemplate)
	s.route("GET /v1/templates/{name}", true, s.getTemplate)
	s.route("DELETE /v1/templates/{name}", true, s.deleteTemplate)
}

func (s *Server) listTemplates(w http.ResponseWriter, r *http.Request, tenant string) error {
	l, err := s.cfg.Templates.List(r.Context(), tenant)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, wire.TemplateList{Templates: l})
	return nil
}

func (s *Server) getTemplate(w http.ResponseWriter, r *http.Request, tenant string) error {
	t, err := s.cfg.Templates.Get(r.Context(), tenant, r.PathValue("name"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, t)
	return nil
}

func (s *Server) deleteTemplate(w http.ResponseWriter, r *http.Request, tenant string) error {
	if err := s.cfg.Templates.Delete(r.Context(), tenant, r.PathValue("name")); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// buildTemplate builds a template from a build context: the body is a tar
// archive (Content-Type application/x-tar, optionally Content-Encoding
// gzip) holding the Dockerfile and the files COPY and ADD read; the query
// names the result (name, tag), the Dockerfile's path in the archive
// (dockerfile), build arguments (build_arg=KEY=VALUE, repeated) and
// no_cache. The answer is an NDJSON stream of wire.TemplateBuildEvent,
// ending with a "template" or an "error" event. A request refused before
// the build starts (a bad name, a bad Dockerfile with its line) gets an
// ordinary JSON error. A client that hangs up cancels the build.
func (s *Server) buildTemplate(w http.ResponseWriter, r *http.Request, tenant string) error {
	q := r.URL.Query()
	name, tag, _ := strings.Cut(q.Get("name"), ":")
	if t := q.Get("tag"); t != "" {
		if tag != "" && tag != t {
			return errdefs.Invalid("the tag is given twice: name %q and tag %q", q.Get("name"), t)
		}
		tag = t
	}
	if name == "" {
		return errdefs.Invalid("name is required: POST /v1/templates?name=NAME[&tag=TAG] with the build context as a tar body")
	}
	req := TemplateBuild{Name: name, Tag: tag, Dockerfile: q.Get("dockerfile"), Args: map[string]string{}}
	for _, a := range q["build_arg"] {
		k, v, ok := strings.Cut(a, "=")
		if !ok || k == "" {
			return errdefs.Invalid("build_arg %q must be KEY=VALUE", truncateQ(a))
		}
		req.Args[k] = v
	}
	switch q.Get("no_cache") {
	case "", "0", "false":
	case "1", "true":
		req.NoCache = true
	default:
		return errdefs.Invalid("no_cache must be true or false, got %q", truncateQ(q.Get("no_cache")))
	}
	if ct, _, _ := strings.Cut(r.Header.Get("Content-Type"), ";"); ct != "" && ct != "application/x-tar" && ct != "application/octet-stream" {
		return errdefs.Invalid("the body must be the build context as a tar archive (Content-Type application/x-tar), not %q", truncateQ(ct))
	}
	switch enc := r.Header.Get("Content-Encoding"); enc {
	case "", "identity":
	case "gzip", "x-gzip":
		req.Gzip = true
	default:
		return errdefs.Invalid("Content-Encoding %q is not supported; send the archive as it is, or gzip-compressed", truncateQ(enc))
	}
	sb := s.streamBody(w, r)
	defer sb.clear()
	// Once the body is read, the build may take many minutes: the read
	// deadline must not fire then (it would cancel the request).
	body := readerFunc(func(p []byte) (int, error) {
		n, err := sb.Read(p)
		if err == io.EOF {
			sb.clear()
		}
		return n, err
	})

	var (
		mu      sync.Mutex
		started bool
		enc     = json.NewEncoder(w)
		flusher = http.NewResponseController(w)
	)
	emit := func(e wire.TemplateBuildEvent) {
		mu.Lock()
		defer mu.Unlock()
		if !started {
			started = true
			w.Header().Set("Content-Type", "application/x-ndjson")
			w.WriteHeader(http.StatusOK)
		}
		_ = enc.Encode(e)
		_ = flusher.Flush()
	}
	t, err := s.cfg.Templates.Build(r.Context(), tenant, req, body, emit)
	mu.Lock()
	wasStarted := started
	mu.Unlock()
	if err != nil && !wasStarted {
		return err
	}
	if err != nil {
		_, e := s.describe(r, tenant, err)
		emit(wire.TemplateBuildEvent{Type: wire.BuildEventError, Error: &e})
		return nil
	}
	emit(wire.TemplateBuildEvent{Type: wire.BuildEventTemplate, Template: &t})
	return nil
}

// readerFunc is an io.Reader of a function.
type readerFunc func(p []byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }
