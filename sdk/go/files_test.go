package pandastack

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pandastack/pandastack/wire"
)

// filesServer is a stand-in for the file routes of docs/API.md: it records
// what the SDK sends and answers what the test sets.
type filesServer struct {
	mu   sync.Mutex
	reqs []recorded
	// answer, if set, answers instead of the defaults.
	answer func(w http.ResponseWriter, r *http.Request, body []byte) bool
}

type recorded struct {
	method, path string
	query        map[string]string
	header       http.Header
	body         []byte
}

func newFilesServer(t *testing.T) (*filesServer, *Sandbox) {
	t.Helper()
	fs := &filesServer{}
	srv := httptest.NewServer(http.HandlerFunc(fs.serve))
	t.Cleanup(srv.Close)
	c, err := NewClient(WithURL(srv.URL), WithAPIKey(testKey))
	if err != nil {
		t.Fatal(err)
	}
	return fs, &Sandbox{c: c, id: "sb-1"}
}

func (f *filesServer) last() recorded {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.reqs[len(f.reqs)-1]
}

func (f *filesServer) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	q := map[string]string{}
	for k, v := range r.URL.Query() {
		q[k] = v[0]
	}
	f.mu.Lock()
	f.reqs = append(f.reqs, recorded{method: r.Method, path: r.URL.Path, query: q, header: r.Header.Clone(), body: body})
	answer := f.answer
	f.mu.Unlock()
	if r.Header.Get("Authorization") != "Bearer "+testKey {
		writeError(w, 401, wire.CodeUnauthenticated, "no key")
		return
	}
	if answer != nil && answer(w, r, body) {
		return
	}
	route := strings.TrimPrefix(r.URL.Path, "/v1/sandboxes/sb-1/files")
	fi := wire.FileInfo{Path: q["path"], Name: filepath.Base(q["path"]), Type: wire.FileTypeFile, Owner: "user", Group: "user"}
	switch {
	case r.Method == "GET" && route == "":
		w.Header().Set("Content-Type", "application/octet-stream")
		io.WriteString(w, "content of "+q["path"])
	case r.Method == "PUT" && route == "":
		fi.Size = int64(len(body))
		writeJSON(w, 200, fi)
	case route == "/stat":
		if q["path"] == "/missing" {
			writeError(w, 404, wire.CodeNotFound, "no such file")
			return
		}
		writeJSON(w, 200, fi)
	case route == "/list":
		writeJSON(w, 200, wire.FileList{Entries: []wire.FileInfo{fi}, Truncated: true})
	case route == "/mkdir", route == "/rename":
		writeJSON(w, 200, fi)
	case route == "/remove":
		w.WriteHeader(204)
	case route == "/tar" && r.Method == "PUT":
		writeJSON(w, 200, wire.UploadResult{Files: 1, Skipped: []wire.SkippedEntry{}})
	default:
		writeError(w, 404, wire.CodeNotFound, "no route")
	}
}

func TestFilesRequests(t *testing.T) {
	fs, sb := newFilesServer(t)
	ctx := context.Background()
	f := sb.Files()
	type want struct {
		method, path string
		query        map[string]string
		body         string
	}
	tests := []struct {
		name string
		call func() error
		want want
	}{
		{"read", func() error {
			b, err := f.ReadFile(ctx, "/home/user/a b")
			if string(b) != "content of /home/user/a b" {
				return fmt.Errorf("got %q", b)
			}
			return err
		}, want{"GET", "/v1/sandboxes/sb-1/files", map[string]string{"path": "/home/user/a b"}, ""}},
		{"read a range as root", func() error {
			rc, err := f.As("root").Read(ctx, "/f", ReadOptions{Offset: 5, Length: 10})
			if err == nil {
				rc.Close()
			}
			return err
		}, want{"GET", "/v1/sandboxes/sb-1/files", map[string]string{"path": "/f", "user": "root", "offset": "5", "length": "10"}, ""}},
		{"write", func() error {
			fi, err := f.WriteFile(ctx, "/f", []byte("data"), WriteOptions{Mode: 0o640, Parents: true})
			if err == nil && fi.Size != 4 {
				return fmt.Errorf("size %d", fi.Size)
			}
			return err
		}, want{"PUT", "/v1/sandboxes/sb-1/files", map[string]string{"path": "/f", "mode": "640", "parents": "true"}, "data"}},
		{"write a stream", func() error {
			_, err := f.Write(ctx, "/f", strings.NewReader("streamed"), WriteOptions{})
			return err
		}, want{"PUT", "/v1/sandboxes/sb-1/files", map[string]string{"path": "/f"}, "streamed"}},
		{"stat", func() error { _, err := f.Stat(ctx, "/f"); return err },
			want{"GET", "/v1/sandboxes/sb-1/files/stat", map[string]string{"path": "/f"}, ""}},
		{"exists", func() error {
			ok, err := f.Exists(ctx, "/missing")
			if ok {
				return errors.New("exists")
			}
			return err
		}, want{"GET", "/v1/sandboxes/sb-1/files/stat", map[string]string{"path": "/missing"}, ""}},
		{"list", func() error {
			l, err := f.List(ctx, "/d", 3)
			if err == nil && (!l.Truncated || len(l.Entries) != 1) {
				return fmt.Errorf("list %+v", l)
			}
			return err
		}, want{"GET", "/v1/sandboxes/sb-1/files/list", map[string]string{"path": "/d", "depth": "3"}, ""}},
		{"mkdir", func() error { _, err := f.MakeDir(ctx, "/d", MakeDirOptions{Parents: true, Mode: 0o750}); return err },
			want{"POST", "/v1/sandboxes/sb-1/files/mkdir", map[string]string{}, `{"path":"/d","parents":true,"mode":488}`}},
		{"remove as root", func() error { return f.As("root").Remove(ctx, "/d", RemoveOptions{Recursive: true}) },
			want{"POST", "/v1/sandboxes/sb-1/files/remove", map[string]string{}, `{"path":"/d","recursive":true,"user":"root"}`}},
		{"rename", func() error { _, err := f.Rename(ctx, "/a", "/b"); return err },
			want{"POST", "/v1/sandboxes/sb-1/files/rename", map[string]string{}, `{"from":"/a","to":"/b"}`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.call(); err != nil {
				t.Fatal(err)
			}
			got := fs.last()
			if got.method != tt.want.method || got.path != tt.want.path || fmt.Sprint(got.query) != fmt.Sprint(tt.want.query) ||
				strings.TrimSpace(string(got.body)) != tt.want.body {
				t.Errorf("got %s %s %v %q, want %s %s %v %q", got.method, got.path, got.query, got.body,
					tt.want.method, tt.want.path, tt.want.query, tt.want.body)
			}
		})
	}
}

func TestFilesErrors(t *testing.T) {
	fs, sb := newFilesServer(t)
	fs.answer = func(w http.ResponseWriter, r *http.Request, _ []byte) bool {
		writeError(w, http.StatusInsufficientStorage, wire.CodeInsufficientStorage, "no space left on the sandbox's disk")
		return true
	}
	_, err := sb.Files().WriteFile(context.Background(), "/f", []byte("x"), WriteOptions{})
	if !errors.Is(err, ErrInsufficientStorage) {
		t.Errorf("507: got %v, want ErrInsufficientStorage", err)
	}
	if _, err := sb.Files().Exists(context.Background(), "/f"); !errors.Is(err, ErrInsufficientStorage) {
		t.Errorf("exists with a server error: got %v, want the error", err)
	}
}

// tarEntries lists an archive's names and kinds.
func tarEntries(t *testing.T, b []byte) []string {
	t.Helper()
	var out []string
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, fmt.Sprintf("%s:%c:%s", h.Name, h.Typeflag, h.Linkname))
	}
	sort.Strings(out)
	return out
}

func TestUploadDirStreamsATar(t *testing.T) {
	fs, sb := newFilesServer(t)
	dir := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(dir+"/sub", 0o755))
	must(os.WriteFile(dir+"/a", []byte("a"), 0o644))
	must(os.WriteFile(dir+"/sub/b", []byte("b"), 0o600))
	must(os.Symlink("a", dir+"/link"))
	must(os.Link(dir+"/a", dir+"/sub/hard"))
	res, err := sb.Files().UploadDir(context.Background(), dir, "/home/user/up")
	if err != nil || res.Files != 1 {
		t.Fatalf("upload: %+v %v", res, err)
	}
	got := fs.last()
	if got.method != "PUT" || got.path != "/v1/sandboxes/sb-1/files/tar" || got.query["path"] != "/home/user/up" {
		t.Errorf("request: %s %s %v", got.method, got.path, got.query)
	}
	want := "a:0: link:2:a sub/:5: sub/b:0: sub/hard:1:a"
	if e := strings.Join(tarEntries(t, got.body), " "); e != want {
		t.Errorf("archive: got %q, want %q", e, want)
	}
	if _, err := sb.Files().UploadDir(context.Background(), dir+"/a", "/x"); err == nil {
		t.Error("upload of a file as a directory: no error")
	}
}

// TestExtractTarIsSafe: an archive from a sandbox cannot write outside the
// local directory it is extracted into.
func TestExtractTarIsSafe(t *testing.T) {
	type entry struct {
		hdr  tar.Header
		body string
	}
	file := func(name, body string) entry {
		return entry{tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o6755, Size: int64(len(body))}, body}
	}
	tests := []struct {
		name    string
		entries []entry
		plant   func(dir, outside string) error
		wantErr bool
		check   func(t *testing.T, dir string)
	}{
		{name: "dot-dot", entries: []entry{file("../evil", "x")}, wantErr: true},
		{name: "absolute name stays inside", entries: []entry{file("/evil", "x")}, check: func(t *testing.T, dir string) {
			if b, _ := os.ReadFile(dir + "/evil"); string(b) != "x" {
				t.Errorf("got %q", b)
			}
		}},
		{name: "symlink then a file through it", entries: []entry{
			{tar.Header{Name: "l", Typeflag: tar.TypeSymlink, Linkname: "OUTSIDE"}, ""}, file("l/evil", "x")}, wantErr: true},
		{name: "planted symlink", entries: []entry{file("p/evil", "x")}, plant: func(dir, outside string) error {
			return os.Symlink(outside, dir+"/p")
		}, wantErr: true},
		{name: "file over a symlink replaces it", entries: []entry{file("v", "x")}, plant: func(dir, outside string) error {
			return os.Symlink(outside+"/keep", dir+"/v")
		}, check: func(t *testing.T, dir string) {
			if fi, err := os.Lstat(dir + "/v"); err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o755 {
				t.Errorf("v: %v %v, want a regular file without setuid", fi, err)
			}
		}},
		{name: "hard link outside", entries: []entry{{tar.Header{Name: "h", Typeflag: tar.TypeLink, Linkname: "../outside/keep"}, ""}}, wantErr: true},
		{name: "hard link absolute", entries: []entry{{tar.Header{Name: "h", Typeflag: tar.TypeLink, Linkname: "/etc/passwd"}, ""}}, wantErr: true},
		{name: "device skipped", entries: []entry{{tar.Header{Name: "null", Typeflag: tar.TypeChar, Devmajor: 1, Devminor: 3}, ""}}, check: func(t *testing.T, dir string) {
			if _, err := os.Lstat(dir + "/null"); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("device: %v", err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base := t.TempDir()
			dir, outside := base+"/dir", base+"/outside"
			for _, d := range []string{dir, outside} {
				if err := os.Mkdir(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.WriteFile(outside+"/keep", []byte("keep"), 0o644); err != nil {
				t.Fatal(err)
			}
			if tt.plant != nil {
				if err := tt.plant(dir, outside); err != nil {
					t.Fatal(err)
				}
			}
			var buf bytes.Buffer
			tw := tar.NewWriter(&buf)
			for _, e := range tt.entries {
				h := e.hdr
				h.Linkname = strings.ReplaceAll(h.Linkname, "OUTSIDE", outside)
				if err := tw.WriteHeader(&h); err != nil {
					t.Fatal(err)
				}
				io.WriteString(tw, e.body)
			}
			tw.Close()
			err := ExtractTar(&buf, dir)
			if (err != nil) != tt.wantErr {
				t.Fatalf("got %v, want an error: %v", err, tt.wantErr)
			}
			entries, _ := os.ReadDir(outside)
			if b, _ := os.ReadFile(outside + "/keep"); len(entries) != 1 || string(b) != "keep" {
				t.Errorf("outside changed: %d entries, keep %q", len(entries), b)
			}
			if _, err := os.Lstat(base + "/evil"); err == nil {
				t.Error("an entry escaped")
			}
			if tt.check != nil {
				tt.check(t, dir)
			}
		})
	}
}

func TestDownloadDirRoundTrip(t *testing.T) {
	src := t.TempDir()
	if err := os.MkdirAll(src+"/d/e", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(src+"/d/e/f", []byte("deep"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("e/f", src+"/d/l"); err != nil {
		t.Fatal(err)
	}
	var archive bytes.Buffer
	if err := WriteTar(&archive, src); err != nil {
		t.Fatal(err)
	}
	fs, sb := newFilesServer(t)
	fs.answer = func(w http.ResponseWriter, r *http.Request, _ []byte) bool {
		if r.URL.Path != "/v1/sandboxes/sb-1/files/tar" || r.Method != "GET" {
			return false
		}
		w.Header().Set("Content-Type", "application/x-tar")
		w.Write(archive.Bytes())
		return true
	}
	dst := t.TempDir() + "/new/dir"
	if err := sb.Files().DownloadDir(context.Background(), "/home/user/src", dst); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(dst + "/d/e/f"); err != nil || string(b) != "deep" {
		t.Errorf("file: %q %v", b, err)
	}
	if fi, _ := os.Stat(dst + "/d/e/f"); fi.Mode().Perm() != 0o640 {
		t.Errorf("mode: %v", fi.Mode())
	}
	if l, err := os.Readlink(dst + "/d/l"); err != nil || l != "e/f" {
		t.Errorf("link: %q %v", l, err)
	}
	if q := fs.last().query["path"]; q != "/home/user/src" {
		t.Errorf("path: %q", q)
	}
}

func TestWatchEvents(t *testing.T) {
	fs, sb := newFilesServer(t)
	release := make(chan struct{})
	fs.answer = func(w http.ResponseWriter, r *http.Request, _ []byte) bool {
		if !strings.HasSuffix(r.URL.Path, "/watch") {
			return false
		}
		w.Header().Set("Content-Type", "application/x-ndjson")
		w.WriteHeader(200)
		enc := json.NewEncoder(w)
		enc.Encode(wire.FileEvent{Type: wire.FileEventCreated, Path: "/d/a"})
		enc.Encode(wire.FileEvent{Type: wire.FileEventRenamed, Path: "/d/b", OldPath: "/d/a"})
		w.(http.Flusher).Flush()
		if r.URL.Query().Get("recursive") == "true" {
			enc.Encode(wire.FileEvent{Type: wire.FileEventError, Error: &wire.Error{Code: wire.CodeUnavailable, Message: "the sandbox died"}})
			return true
		}
		select {
		case <-release:
		case <-r.Context().Done():
		}
		return true
	}
	ctx := context.Background()
	// A watch that the client closes.
	w, err := sb.Files().Watch(ctx, "/d", WatchOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var got []wire.FileEvent
	for ev := range w.Events() {
		got = append(got, ev)
		if len(got) == 2 {
			break
		}
	}
	if len(got) != 2 || got[1].OldPath != "/d/a" {
		t.Errorf("events: %+v", got)
	}
	done := make(chan struct{})
	go func() { w.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatal("Close did not return")
	}
	if err := w.Err(); err != nil {
		t.Errorf("Err after Close: %v", err)
	}
	close(release)
	// A watch that fails half-way.
	w, err = sb.Files().Watch(ctx, "/d", WatchOptions{Recursive: true})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for range w.Events() {
		n++
	}
	if n != 2 || !errors.Is(w.Err(), ErrUnavailable) {
		t.Errorf("failed watch: %d events, Err %v; want 2 and ErrUnavailable", n, w.Err())
	}
	w.Close()
}
