package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/sandbox"
	"github.com/pandastack/pandastack/wire"
)

// The fake's Files API: these tests are about the HTTP edge of the file
// routes (query parameters, streamed bodies, deadlines, watch streams);
// the operations themselves are tested against real sandboxes in
// internal/daemon.

var _ Files = (*fakeSandboxes)(nil)

// fakeFile is what the fake serves for every read: its path decides.
const (
	// failPath is read half-way, then fails.
	failPath = "/fail-midway"
	// fakeContent is the content of every other file.
	fakeContent = "hello from the fake\n"
)

// fakeUploads records the last upload the fake received.
var fakeUploads struct {
	sync.Mutex
	req   any
	bytes int64
	err   error
}

func recordUpload(req any, body io.Reader) (int64, error) {
	n, err := io.Copy(io.Discard, body)
	fakeUploads.Lock()
	fakeUploads.req, fakeUploads.bytes, fakeUploads.err = req, n, err
	fakeUploads.Unlock()
	return n, err
}

func fakeInfo(p string) wire.FileInfo {
	return wire.FileInfo{Path: p, Name: p[strings.LastIndex(p, "/")+1:], Type: wire.FileTypeFile, Size: int64(len(fakeContent)), Mode: 0o644,
		ModTime: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC), Owner: "user", Group: "user"}
}

func (f *fakeSandboxes) StatFile(_ context.Context, tenant, id string, req sandbox.FileRequest) (wire.FileInfo, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return wire.FileInfo{}, err
	}
	if req.Path == "/missing" {
		return wire.FileInfo{}, errdefs.NotFound("%s: no such file", req.Path)
	}
	return fakeInfo(req.Path), nil
}

func (f *fakeSandboxes) ListFiles(_ context.Context, tenant, id string, req sandbox.FileRequest, depth int) (wire.FileList, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return wire.FileList{}, err
	}
	var l wire.FileList
	for i := range depth {
		l.Entries = append(l.Entries, fakeInfo(fmt.Sprintf("%s/f%d", req.Path, i)))
	}
	return l, nil
}

func (f *fakeSandboxes) MakeDir(_ context.Context, tenant, id string, req wire.MakeDirRequest) (wire.FileInfo, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return wire.FileInfo{}, err
	}
	fi := fakeInfo(req.Path)
	fi.Type = wire.FileTypeDir
	return fi, nil
}

func (f *fakeSandboxes) RemoveFile(_ context.Context, tenant, id string, req wire.RemoveRequest) error {
	_, err := f.sandbox(tenant, id)
	return err
}

func (f *fakeSandboxes) RenameFile(_ context.Context, tenant, id string, req wire.RenameRequest) (wire.FileInfo, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return wire.FileInfo{}, err
	}
	return fakeInfo(req.To), nil
}

func (f *fakeSandboxes) ReadFile(_ context.Context, tenant, id string, req sandbox.ReadFileRequest) (*sandbox.FileReader, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return nil, err
	}
	if req.Path == failPath {
		r := io.MultiReader(strings.NewReader(fakeContent[:5]), errorReader{errdefs.Unavailable("the sandbox died")})
		return &sandbox.FileReader{Info: fakeInfo(req.Path), Length: int64(len(fakeContent)), ReadCloser: io.NopCloser(r)}, nil
	}
	return &sandbox.FileReader{Info: fakeInfo(req.Path), Length: int64(len(fakeContent)), ReadCloser: io.NopCloser(strings.NewReader(fakeContent))}, nil
}

type errorReader struct{ err error }

func (e errorReader) Read([]byte) (int, error) { return 0, e.err }

func (f *fakeSandboxes) WriteFile(_ context.Context, tenant, id string, req sandbox.WriteFileRequest, body io.Reader) (wire.FileInfo, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return wire.FileInfo{}, err
	}
	n, err := recordUpload(req, body)
	if err != nil {
		return wire.FileInfo{}, err
	}
	fi := fakeInfo(req.Path)
	fi.Size = n
	return fi, nil
}

func (f *fakeSandboxes) DownloadTar(_ context.Context, tenant, id string, req sandbox.FileRequest) (io.ReadCloser, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return nil, err
	}
	return io.NopCloser(strings.NewReader(fakeContent)), nil
}

func (f *fakeSandboxes) UploadTar(_ context.Context, tenant, id string, req sandbox.UploadRequest, body io.Reader) (wire.UploadResult, error) {
	if _, err := f.sandbox(tenant, id); err != nil {
		return wire.UploadResult{}, err
	}
	n, err := recordUpload(req, body)
	if err != nil {
		return wire.UploadResult{}, err
	}
	return wire.UploadResult{Files: 1, Bytes: n, Skipped: []wire.SkippedEntry{}}, nil
}

func (f *fakeSandboxes) WatchFiles(ctx context.Context, tenant, id string, req sandbox.WatchRequest, ready func() error, emit func(wire.FileEvent) error) error {
	if _, err := f.sandbox(tenant, id); err != nil {
		return err
	}
	if err := ready(); err != nil {
		return err
	}
	for _, ev := range []wire.FileEvent{
		{Type: wire.FileEventCreated, Path: req.Path + "/a"},
		{Type: wire.FileEventRenamed, Path: req.Path + "/b", OldPath: req.Path + "/a"},
	} {
		if err := emit(ev); err != nil {
			return err
		}
	}
	if req.Recursive {
		// A recursive watch in the fake fails after its events.
		return errdefs.Unavailable("the sandbox died")
	}
	return nil
}

func fileRequest(t *testing.T, s http.Handler, method, target string, body io.Reader, hdr ...string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(method, target, body)
	r.Header.Set("Authorization", "Bearer "+testKey)
	for i := 0; i+1 < len(hdr); i += 2 {
		r.Header.Set(hdr[i], hdr[i+1])
	}
	w := httptest.NewRecorder()
	s.ServeHTTP(w, r)
	return w
}

func TestFileRoutesArguments(t *testing.T) {
	s := newTestServer()
	base := "/v1/sandboxes/" + knownID + "/files"
	tests := []struct {
		name, method, target string
		body                 string
		hdr                  []string
		wantStatus           int
	}{
		{name: "read", method: "GET", target: base + "?path=/home/user/f&user=root&offset=1&length=2", wantStatus: 200},
		{name: "read of another sandbox", method: "GET", target: "/v1/sandboxes/sb-other/files?path=/f", wantStatus: 404},
		{name: "unknown parameter", method: "GET", target: base + "?path=/f&pathh=/g", wantStatus: 400},
		{name: "negative offset", method: "GET", target: base + "?path=/f&offset=-1", wantStatus: 400},
		{name: "offset not a number", method: "GET", target: base + "?path=/f&offset=x", wantStatus: 400},
		{name: "write", method: "PUT", target: base + "?path=/f&mode=0640&parents=true", body: "data", wantStatus: 200},
		{name: "write mode 0o", method: "PUT", target: base + "?path=/f&mode=0o755", body: "data", wantStatus: 200},
		{name: "write bad mode", method: "PUT", target: base + "?path=/f&mode=9", body: "data", wantStatus: 400},
		{name: "write bad bool", method: "PUT", target: base + "?path=/f&parents=yes", body: "data", wantStatus: 400},
		{name: "stat", method: "GET", target: base + "/stat?path=/f", wantStatus: 200},
		{name: "stat missing", method: "GET", target: base + "/stat?path=/missing", wantStatus: 404},
		{name: "list", method: "GET", target: base + "/list?path=/d&depth=3", wantStatus: 200},
		{name: "list bad depth", method: "GET", target: base + "/list?path=/d&depth=-3", wantStatus: 400},
		{name: "mkdir", method: "POST", target: base + "/mkdir", body: `{"path":"/d","parents":true,"mode":493}`, wantStatus: 200},
		{name: "mkdir unknown field", method: "POST", target: base + "/mkdir", body: `{"path":"/d","parent":true}`, wantStatus: 400},
		{name: "mkdir no body", method: "POST", target: base + "/mkdir", wantStatus: 400},
		{name: "remove", method: "POST", target: base + "/remove", body: `{"path":"/d","recursive":true}`, wantStatus: 204},
		{name: "rename", method: "POST", target: base + "/rename", body: `{"from":"/a","to":"/b"}`, wantStatus: 200},
		{name: "tar download", method: "GET", target: base + "/tar?path=/d", wantStatus: 200},
		{name: "tar upload", method: "PUT", target: base + "/tar?path=/d", body: "tar", wantStatus: 200},
		{name: "tar upload gzip", method: "PUT", target: base + "/tar?path=/d", body: "tar", hdr: []string{"Content-Encoding", "gzip"}, wantStatus: 200},
		{name: "tar upload other encoding", method: "PUT", target: base + "/tar?path=/d", body: "tar", hdr: []string{"Content-Encoding", "br"}, wantStatus: 400},
		{name: "watch bad bool", method: "GET", target: base + "/watch?path=/d&recursive=maybe", wantStatus: 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := fileRequest(t, s, tt.method, tt.target, strings.NewReader(tt.body), tt.hdr...)
			if w.Code != tt.wantStatus {
				t.Fatalf("status: got %d, want %d (body %q)", w.Code, tt.wantStatus, w.Body)
			}
			if w.Code >= 400 {
				checkErrorBody(t, w.Code, w.Body.Bytes())
			}
		})
	}
}

func TestFileReadAnswer(t *testing.T) {
	s := newTestServer()
	w := fileRequest(t, s, "GET", "/v1/sandboxes/"+knownID+"/files?path=/f", nil)
	if w.Code != 200 || w.Body.String() != fakeContent {
		t.Fatalf("got %d %q, want 200 %q", w.Code, w.Body, fakeContent)
	}
	for k, want := range map[string]string{
		"Content-Type":   "application/octet-stream",
		"Content-Length": fmt.Sprint(len(fakeContent)),
		"Last-Modified":  "Thu, 02 Jan 2025 03:04:05 GMT",
	} {
		if got := w.Header().Get(k); got != want {
			t.Errorf("%s: got %q, want %q", k, got, want)
		}
	}
	w = fileRequest(t, s, "GET", "/v1/sandboxes/"+knownID+"/files/tar?path=/d", nil)
	if ct := w.Header().Get("Content-Type"); w.Code != 200 || ct != "application/x-tar" {
		t.Errorf("tar: got %d %q, want 200 application/x-tar", w.Code, ct)
	}
}

// TestFileReadFailureCutsConnection: a read that fails after its 200 was
// sent is not passed off as a complete body: the connection is cut.
func TestFileReadFailureCutsConnection(t *testing.T) {
	srv := httptest.NewServer(newTestServer())
	defer srv.Close()
	req, _ := http.NewRequest("GET", srv.URL+"/v1/sandboxes/"+knownID+"/files?path="+failPath, nil)
	req.Header.Set("Authorization", "Bearer "+testKey)
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil {
		t.Fatalf("read a complete body %q, want an error", b)
	}
	if string(b) != fakeContent[:5] {
		t.Errorf("body before the cut: got %q, want %q", b, fakeContent[:5])
	}
}

// TestFileUploadsAreNotJSONBodies: uploads are bounded by the sandbox's
// disk, not MaxBodyBytes, and get past BodyReadTimeout as long as data
// keeps coming; a stalled upload is cut off.
func TestFileUploadsAreNotJSONBodies(t *testing.T) {
	s := newTestServerWith(func(c *Config) { c.BodyReadTimeout = 500 * time.Millisecond })
	srv := httptest.NewServer(s)
	defer srv.Close()
	put := func(target string, body io.Reader) (*http.Response, []byte) {
		t.Helper()
		req, _ := http.NewRequest("PUT", srv.URL+target, body)
		req.Header.Set("Authorization", "Bearer "+testKey)
		resp, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, b
	}
	for _, target := range []string{"/files?path=/big", "/files/tar?path=/d"} {
		// 5 MiB, over the test server's 4 KiB body limit, sent slowly
		// enough to take longer than BodyReadTimeout in all.
		const size = 5 << 20
		slow := &pacedReader{left: size, chunk: 512 << 10, pause: 100 * time.Millisecond}
		resp, b := put("/v1/sandboxes/"+knownID+target, slow)
		fakeUploads.Lock()
		got, gotErr := fakeUploads.bytes, fakeUploads.err
		fakeUploads.Unlock()
		if resp.StatusCode != 200 || got != size || gotErr != nil {
			t.Errorf("%s: got %d %s, fake read %d bytes (%v); want 200 and %d bytes", target, resp.StatusCode, b, got, gotErr, size)
		}
	}

	// A body that stops arriving is cut off with a 400.
	c, br := rawRequest(t, srv.Listener.Addr().String(),
		"PUT /v1/sandboxes/"+knownID+"/files?path=/f HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "+testKey+"\r\nContent-Length: 100000\r\n\r\nsome bytes")
	defer c.Close()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("no answer to a stalled upload: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 400 || !strings.Contains(string(body), "stopped arriving") {
		t.Errorf("stalled upload: got %d %s, want 400 saying the body stopped arriving", resp.StatusCode, body)
	}
}

// pacedReader yields left bytes in chunks, pausing between them.
type pacedReader struct {
	left, chunk int
	pause       time.Duration
	started     bool
}

func (p *pacedReader) Read(b []byte) (int, error) {
	if p.left == 0 {
		return 0, io.EOF
	}
	if p.started {
		time.Sleep(p.pause)
	}
	p.started = true
	n := min(len(b), p.left, p.chunk)
	clear(b[:n])
	p.left -= n
	return n, nil
}

func TestFileWatchStream(t *testing.T) {
	s := newTestServer()
	tests := []struct {
		name, accept, query string
		wantLast            string
	}{
		{"ndjson", "", "", wire.FileEventRenamed},
		{"ndjson asked", "application/x-ndjson", "", wire.FileEventRenamed},
		{"sse", "text/event-stream", "", wire.FileEventRenamed},
		{"error after the start", "", "&recursive=true", wire.FileEventError},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var hdr []string
			if tt.accept != "" {
				hdr = []string{"Accept", tt.accept}
			}
			w := fileRequest(t, s, "GET", "/v1/sandboxes/"+knownID+"/files/watch?path=/d"+tt.query, nil, hdr...)
			if w.Code != 200 {
				t.Fatalf("status %d %s", w.Code, w.Body)
			}
			var lines [][]byte
			sc := bufio.NewScanner(bytes.NewReader(w.Body.Bytes()))
			for sc.Scan() {
				line := sc.Bytes()
				if tt.accept == "text/event-stream" {
					d, ok := bytes.CutPrefix(line, []byte("data: "))
					if !ok {
						continue
					}
					line = d
				}
				lines = append(lines, bytes.Clone(line))
			}
			var evs []wire.FileEvent
			for _, l := range lines {
				var ev wire.FileEvent
				dec := json.NewDecoder(bytes.NewReader(l))
				dec.DisallowUnknownFields()
				if err := dec.Decode(&ev); err != nil {
					t.Fatalf("line %q: %v", l, err)
				}
				evs = append(evs, ev)
			}
			if len(evs) < 2 || evs[0].Type != wire.FileEventCreated || evs[len(evs)-1].Type != tt.wantLast {
				t.Fatalf("events %+v, want created … %s", evs, tt.wantLast)
			}
			if last := evs[len(evs)-1]; last.Type == wire.FileEventError && (last.Error == nil || last.Error.Code != wire.CodeUnavailable || last.Error.RequestID == "") {
				t.Errorf("error event %+v, want an unavailable error with a request id", last.Error)
			}
		})
	}
	// A watch that fails before it starts is an ordinary error answer.
	w := fileRequest(t, s, "GET", "/v1/sandboxes/sb-other/files/watch?path=/d", nil)
	if w.Code != 404 {
		t.Errorf("watch of an unknown sandbox: got %d, want 404", w.Code)
	}
}
