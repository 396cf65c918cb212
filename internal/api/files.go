package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/sandbox"
	"github.com/pandastack/pandastack/wire"
)

// Files is what the file routes need of the sandbox manager.
type Files interface {
	StatFile(ctx context.Context, tenant, id string, req sandbox.FileRequest) (wire.FileInfo, error)
	ListFiles(ctx context.Context, tenant, id string, req sandbox.FileRequest, depth int) (wire.FileList, error)
	MakeDir(ctx context.Context, tenant, id string, req wire.MakeDirRequest) (wire.FileInfo, error)
	RemoveFile(ctx context.Context, tenant, id string, req wire.RemoveRequest) error
	RenameFile(ctx context.Context, tenant, id string, req wire.RenameRequest) (wire.FileInfo, error)
	ReadFile(ctx context.Context, tenant, id string, req sandbox.ReadFileRequest) (*sandbox.FileReader, error)
	WriteFile(ctx context.Context, tenant, id string, req sandbox.WriteFileRequest, body io.Reader) (wire.FileInfo, error)
	DownloadTar(ctx context.Context, tenant, id string, req sandbox.FileRequest) (io.ReadCloser, error)
	UploadTar(ctx context.Context, tenant, id string, req sandbox.UploadRequest, body io.Reader) (wire.UploadResult, error)
	WatchFiles(ctx context.Context, tenant, id string, req sandbox.WatchRequest, ready func() error, emit func(wire.FileEvent) error) error
}

// fileRoutes registers the Files API. Paths and options are query
// parameters, so that file contents can be the raw request and response
// bodies; the small operations take JSON bodies like the rest of the API.
func (s *Server) fileRoutes() {
	s.route("GET /v1/sandboxes/{id}/files", true, s.readFile)
	s.route("PUT /v1/sandboxes/{id}/files", true, s.writeFile)
	s.route("GET /v1/sandboxes/{id}/files/stat", true, s.statFile)
	s.route("GET /v1/sandboxes/{id}/files/list", true, s.listFiles)
	s.route("POST /v1/sandboxes/{id}/files/mkdir", true, s.makeDir)
	s.route("POST /v1/sandboxes/{id}/files/remove", true, s.removeFile)
	s.route("POST /v1/sandboxes/{id}/files/rename", true, s.renameFile)
	s.route("GET /v1/sandboxes/{id}/files/tar", true, s.downloadTar)
	s.route("PUT /v1/sandboxes/{id}/files/tar", true, s.uploadTar)
	s.route("GET /v1/sandboxes/{id}/files/watch", true, s.watchFiles)
}

// fileQuery reads a route's query parameters: unknown ones are refused,
// like unknown JSON fields, so that a misspelt option is not ignored.
type fileQuery struct {
	q   map[string][]string
	err error
}

func newFileQuery(r *http.Request, allowed ...string) *fileQuery {
	q := r.URL.Query()
	fq := &fileQuery{q: q}
	for k := range q {
		ok := false
		for _, a := range allowed {
			ok = ok || k == a
		}
		if !ok {
			fq.err = errdefs.Invalid("unknown query parameter %q; this route takes %s", truncateQ(k), strings.Join(allowed, ", "))
		}
	}
	return fq
}

func truncateQ(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}

func (f *fileQuery) str(name string) string {
	if v := f.q[name]; len(v) > 0 {
		return v[0]
	}
	return ""
}

func (f *fileQuery) fail(format string, args ...any) {
	if f.err == nil {
		f.err = errdefs.Invalid(format, args...)
	}
}

func (f *fileQuery) boolean(name string) bool {
	switch v := f.str(name); v {
	case "", "false", "0":
		return false
	case "true", "1":
		return true
	default:
		f.fail("%s must be true or false, got %q", name, truncateQ(v))
		return false
	}
}

func (f *fileQuery) integer(name string) int64 {
	v := f.str(name)
	if v == "" {
		return 0
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < 0 {
		f.fail("%s must be a whole number of at least 0, got %q", name, truncateQ(v))
	}
	return n
}

// mode reads permission bits written in octal ("644", "0644", "0o644").
func (f *fileQuery) mode(name string) uint32 {
	v := f.str(name)
	if v == "" {
		return 0
	}
	n, err := strconv.ParseUint(strings.TrimPrefix(v, "0o"), 8, 32)
	if err != nil {
		f.fail("%s must be permission bits in octal such as 644, got %q", name, truncateQ(v))
	}
	return uint32(n)
}

func (f *fileQuery) file() sandbox.FileRequest {
	return sandbox.FileRequest{Path: f.str("path"), User: f.str("user")}
}

func (s *Server) statFile(w http.ResponseWriter, r *http.Request, tenant string) error {
	q := newFileQuery(r, "path", "user")
	if q.err != nil {
		return q.err
	}
	fi, err := s.cfg.Sandboxes.StatFile(r.Context(), tenant, r.PathValue("id"), q.file())
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, fi)
	return nil
}

func (s *Server) listFiles(w http.ResponseWriter, r *http.Request, tenant string) error {
	q := newFileQuery(r, "path", "user", "depth")
	depth := q.integer("depth")
	if q.err != nil {
		return q.err
	}
	if depth == 0 {
		depth = 1
	}
	l, err := s.cfg.Sandboxes.ListFiles(r.Context(), tenant, r.PathValue("id"), q.file(), int(min(depth, 1<<20)))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, l)
	return nil
}

func (s *Server) makeDir(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req wire.MakeDirRequest
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	fi, err := s.cfg.Sandboxes.MakeDir(r.Context(), tenant, r.PathValue("id"), req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, fi)
	return nil
}

func (s *Server) removeFile(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req wire.RemoveRequest
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	if err := s.cfg.Sandboxes.RemoveFile(r.Context(), tenant, r.PathValue("id"), req); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) renameFile(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req wire.RenameRequest
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	fi, err := s.cfg.Sandboxes.RenameFile(r.Context(), tenant, r.PathValue("id"), req)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, fi)
	return nil
}

// readFile answers a file's bytes as they come from the sandbox.
func (s *Server) readFile(w http.ResponseWriter, r *http.Request, tenant string) error {
	q := newFileQuery(r, "path", "user", "offset", "length")
	req := sandbox.ReadFileRequest{FileRequest: q.file(), Offset: q.integer("offset"), Length: q.integer("length")}
	if q.err != nil {
		return q.err
	}
	fr, err := s.cfg.Sandboxes.ReadFile(r.Context(), tenant, r.PathValue("id"), req)
	if err != nil {
		return err
	}
	defer fr.Close()
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	if fr.Length >= 0 {
		h.Set("Content-Length", strconv.FormatInt(fr.Length, 10))
	}
	h.Set("Last-Modified", fr.Info.ModTime.UTC().Format(http.TimeFormat))
	s.sendBody(w, r, tenant, fr)
	return nil
}

// downloadTar answers a tar archive of a directory or file.
func (s *Server) downloadTar(w http.ResponseWriter, r *http.Request, tenant string) error {
	q := newFileQuery(r, "path", "user")
	if q.err != nil {
		return q.err
	}
	rc, err := s.cfg.Sandboxes.DownloadTar(r.Context(), tenant, r.PathValue("id"), q.file())
	if err != nil {
		return err
	}
	defer rc.Close()
	w.Header().Set("Content-Type", "application/x-tar")
	s.sendBody(w, r, tenant, rc)
	return nil
}

// sendBody answers 200 with what src streams. The status is sent before
// the first byte, so a failure half-way (the sandbox died, a file could not
// be read) cannot become an error answer: it is logged, and the connection
// is cut, so that the client sees a short body instead of a complete one.
// A client that stops reading is cut off after BodyReadTimeout.
func (s *Server) sendBody(w http.ResponseWriter, r *http.Request, tenant string, src io.Reader) {
	dst := &deadlineWriter{w: w, rc: http.NewResponseController(w), timeout: s.cfg.BodyReadTimeout}
	defer dst.clear()
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		return
	}
	// The header goes now: the client learns the status and length even
	// if the body is cut.
	if err := dst.rc.Flush(); err != nil {
		panic(http.ErrAbortHandler)
	}
	buf := make([]byte, 128<<10)
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			if _, err := dst.Write(buf[:n]); err != nil {
				s.cfg.Log.Info("client stopped reading", "request_id", infoOf(r).id, "path", r.URL.Path, "err", err)
				panic(http.ErrAbortHandler)
			}
		}
		if rerr == io.EOF {
			return
		}
		if rerr != nil {
			s.describe(r, tenant, rerr)
			panic(http.ErrAbortHandler)
		}
	}
}

// writeFile streams the request body into a file of the sandbox.
func (s *Server) writeFile(w http.ResponseWriter, r *http.Request, tenant string) error {
	q := newFileQuery(r, "path", "user", "mode", "parents")
	req := sandbox.WriteFileRequest{FileRequest: q.file(), Mode: q.mode("mode"), Parents: q.boolean("parents"), Size: r.ContentLength}
	if q.err != nil {
		return q.err
	}
	body := s.streamBody(w, r)
	defer body.clear()
	fi, err := s.cfg.Sandboxes.WriteFile(r.Context(), tenant, r.PathValue("id"), req, body)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, fi)
	return nil
}

// uploadTar extracts the request body, a tar archive (gzip-compressed with
// Content-Encoding: gzip), into a directory of the sandbox.
func (s *Server) uploadTar(w http.ResponseWriter, r *http.Request, tenant string) error {
	q := newFileQuery(r, "path", "user")
	req := sandbox.UploadRequest{FileRequest: q.file(), Size: r.ContentLength}
	switch enc := strings.ToLower(strings.TrimSpace(r.Header.Get("Content-Encoding"))); enc {
	case "", "identity":
	case "gzip", "x-gzip":
		req.Gzip = true
	default:
		q.fail("Content-Encoding %q is not supported; send the archive as it is, or gzip-compressed", truncateQ(enc))
	}
	if q.err != nil {
		return q.err
	}
	body := s.streamBody(w, r)
	defer body.clear()
	res, err := s.cfg.Sandboxes.UploadTar(r.Context(), tenant, r.PathValue("id"), req, body)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, res)
	return nil
}

// streamBody is the request body of an upload, which is not bounded by
// MaxBodyBytes (the sandbox's disk bounds it) and may take as long as it
// keeps coming: each read gets BodyReadTimeout, so a client that stalls is
// cut off and one that sends a gigabyte is not.
func (s *Server) streamBody(w http.ResponseWriter, r *http.Request) *deadlineReader {
	// The route's MaxBytesReader is for JSON bodies: read what it wraps.
	var src io.Reader = r.Body
	if tb := infoOf(r).body; tb != nil {
		src = tb
	}
	return &deadlineReader{r: src, rc: http.NewResponseController(w), timeout: s.cfg.BodyReadTimeout}
}

// refreshEvery is how often a streaming read or write moves its deadline
// on: not at every call, which would reset a timer per chunk, and often
// enough that the deadline stays at least three quarters of timeout away.
func refreshEvery(timeout time.Duration) time.Duration {
	return min(time.Second, timeout/4)
}

// deadlineReader reads a request body, keeping its read deadline at most
// timeout ahead (and at least three quarters of it).
type deadlineReader struct {
	r       io.Reader
	rc      *http.ResponseController
	timeout time.Duration
	moved   time.Time
}

func (d *deadlineReader) Read(p []byte) (int, error) {
	if now := time.Now(); now.Sub(d.moved) >= refreshEvery(d.timeout) {
		_ = d.rc.SetReadDeadline(now.Add(d.timeout))
		d.moved = now
	}
	n, err := d.r.Read(p)
	switch {
	case err == nil || err == io.EOF:
	case errors.Is(err, os.ErrDeadlineExceeded):
		err = errdefs.Wrap(errdefs.ErrInvalid, err, "the request body stopped arriving: nothing came for %s", d.timeout)
	default:
		err = errdefs.Wrap(errdefs.ErrInvalid, err, "reading the request body failed")
	}
	return n, err
}

// clear takes the deadline away again: the server keeps a read pending on
// the connection afterwards (to notice a hang-up), and a deadline firing
// there would cancel the request.
func (d *deadlineReader) clear() { _ = d.rc.SetReadDeadline(time.Time{}) }

// deadlineWriter writes a response body, keeping its write deadline at
// most timeout ahead, and flushes each write: the bytes are the sandbox's,
// already chunked.
type deadlineWriter struct {
	w       io.Writer
	rc      *http.ResponseController
	timeout time.Duration
	moved   time.Time
}

func (d *deadlineWriter) Write(p []byte) (int, error) {
	if now := time.Now(); now.Sub(d.moved) >= refreshEvery(d.timeout) {
		_ = d.rc.SetWriteDeadline(now.Add(d.timeout))
		d.moved = now
	}
	n, err := d.w.Write(p)
	if err == nil {
		err = d.rc.Flush()
	}
	return n, err
}

func (d *deadlineWriter) clear() { _ = d.rc.SetWriteDeadline(time.Time{}) }

// watchFiles streams a directory's changes as NDJSON lines (the default)
// or SSE events (Accept: text/event-stream). The answer's header is sent
// once the watch is in place: a client that has it misses nothing done
// after.
func (s *Server) watchFiles(w http.ResponseWriter, r *http.Request, tenant string) error {
	q := newFileQuery(r, "path", "user", "recursive")
	req := sandbox.WatchRequest{FileRequest: q.file(), Recursive: q.boolean("recursive")}
	if q.err != nil {
		return q.err
	}
	sse := negotiate(r) == modeSSE
	rc := http.NewResponseController(w)
	dw := &deadlineWriter{w: w, rc: rc, timeout: s.cfg.BodyReadTimeout}
	defer dw.clear()
	var mu sync.Mutex
	started := false
	send := func(ev wire.FileEvent) error {
		mu.Lock()
		defer mu.Unlock()
		b, err := json.Marshal(ev)
		if err != nil {
			return err
		}
		if sse {
			_, err = fmt.Fprintf(dw, "event: %s\ndata: %s\n\n", ev.Type, b)
		} else {
			_, err = fmt.Fprintf(dw, "%s\n", b)
		}
		if err != nil {
			return fmt.Errorf("writing event: %w", err)
		}
		return rc.Flush()
	}
	ready := func() error {
		mu.Lock()
		defer mu.Unlock()
		started = true
		ct := "application/x-ndjson"
		if sse {
			ct = "text/event-stream"
		}
		w.Header().Set("Content-Type", ct)
		w.Header().Set("Cache-Control", "no-cache")
		w.Header().Set("X-Accel-Buffering", "no")
		w.WriteHeader(http.StatusOK)
		return rc.Flush()
	}
	err := s.cfg.Sandboxes.WatchFiles(r.Context(), tenant, r.PathValue("id"), req, ready, send)
	if err == nil || r.Context().Err() != nil {
		return nil
	}
	mu.Lock()
	begun := started
	mu.Unlock()
	if !begun {
		return err
	}
	_, e := s.describe(r, tenant, err)
	_ = send(wire.FileEvent{Type: wire.FileEventError, Error: &e})
	return nil
}
