package agent

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
)

// These tests run the file operations of a real Server on the host, in a
// temporary directory, through a real Client. The same operations inside a
// sandbox are tested in internal/daemon (files_test.go).

// nobody is a user every Linux host has, for the tests of credentials.
const nobody = "nobody"

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: file operations switch users")
	}
}

func fileOpKind(err error) string {
	var oe *OpError
	if errors.As(err, &oe) {
		return oe.Kind
	}
	return ""
}

func readAll(t *testing.T, c *Client, a FileArgs) (ReadStart, []byte, error) {
	t.Helper()
	rs, rc, err := c.ReadFile(context.Background(), a)
	if err != nil {
		return rs, nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	return rs, b, err
}

func TestFileWriteRead(t *testing.T) {
	c, _ := startAgent(t)
	dir := t.TempDir()
	ctx := context.Background()
	data := make([]byte, 3<<20+17)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "a", "b", "f.bin")
	fi, err := c.WriteFile(ctx, FileArgs{Path: p, Parents: true, Mode: 0o640}, bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size != int64(len(data)) || fi.Type != FileTypeFile || fi.Mode != 0o640 || fi.Path != p {
		t.Errorf("write: got %+v, want size %d, a file, mode 0640", fi, len(data))
	}
	tests := []struct {
		name           string
		offset, length int64
		want           []byte
	}{
		{"whole", 0, 0, data},
		{"offset", 1000, 0, data[1000:]},
		{"range", 5, 100, data[5:105]},
		{"past the end", int64(len(data)) + 10, 0, nil},
		{"length past the end", int64(len(data)) - 3, 100, data[len(data)-3:]},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rs, got, err := readAll(t, c, FileArgs{Path: p, Offset: tt.offset, Length: tt.length})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, tt.want) || rs.Length != int64(len(tt.want)) {
				t.Errorf("got %d bytes (announced %d), want %d", len(got), rs.Length, len(tt.want))
			}
		})
	}
	// Overwriting keeps the mode unless one is asked for, and leaves no
	// temporary file.
	if fi, err = c.WriteFile(ctx, FileArgs{Path: p}, strings.NewReader("short")); err != nil || fi.Mode != 0o640 || fi.Size != 5 {
		t.Errorf("overwrite: got %+v %v, want mode 0640 size 5", fi, err)
	}
	entries, _ := os.ReadDir(filepath.Dir(p))
	if len(entries) != 1 {
		t.Errorf("directory after writes: got %d entries, want 1 (no temporary files left)", len(entries))
	}
	// A /proc file reports size 0 and is read to its end.
	if _, got, err := readAll(t, c, FileArgs{Path: "/proc/self/status"}); err != nil || !bytes.Contains(got, []byte("Pid:")) {
		t.Errorf("/proc/self/status: got %q %v", got, err)
	}
}

// TestFileWriteReplacesSymlink: a write replaces a symlink at its path; it
// never writes through it.
func TestFileWriteReplacesSymlink(t *testing.T) {
	c, _ := startAgent(t)
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	if err := os.WriteFile(target, []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteFile(context.Background(), FileArgs{Path: link}, strings.NewReader("new")); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(target); string(b) != "keep" {
		t.Errorf("target: got %q, want %q", b, "keep")
	}
	if fi, err := os.Lstat(link); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("link: got %v %v, want a regular file", fi, err)
	}
}

// TestFileUploadSourceFails: when what is uploaded fails half-way, the file
// is left as it was.
func TestFileUploadSourceFails(t *testing.T) {
	c, _ := startAgent(t)
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	src := io.MultiReader(bytes.NewReader(make([]byte, 1<<20)), errReader{boom})
	_, err := c.WriteFile(context.Background(), FileArgs{Path: p}, src)
	var se *ErrUploadSource
	if !errors.As(err, &se) || !errors.Is(err, boom) {
		t.Fatalf("got %v, want the source's error", err)
	}
	if b, _ := os.ReadFile(p); string(b) != "old" {
		t.Errorf("file: got %q, want %q", b, "old")
	}
	deadline := time.Now().Add(patience)
	for {
		entries, _ := os.ReadDir(filepath.Dir(p))
		if len(entries) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("temporary file left: %d entries", len(entries))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

func TestFileOpErrors(t *testing.T) {
	c, _ := startAgent(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	full := filepath.Join(dir, "full")
	for _, p := range []string{file, filepath.Join(full, "x")} {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	missing := filepath.Join(dir, "missing")
	tests := []struct {
		name string
		call func() error
		want string
	}{
		{"relative path", func() error { _, err := c.StatFile(ctx, FileArgs{Path: "etc/passwd"}); return err }, ErrKindInvalid},
		{"empty path", func() error { _, err := c.StatFile(ctx, FileArgs{Path: ""}); return err }, ErrKindInvalid},
		{"NUL in path", func() error { _, err := c.StatFile(ctx, FileArgs{Path: "/tmp/a\x00b"}); return err }, ErrKindInvalid},
		{"unknown user", func() error { _, err := c.StatFile(ctx, FileArgs{Path: "/", User: "no-such-user"}); return err }, ErrKindInvalid},
		{"stat missing", func() error { _, err := c.StatFile(ctx, FileArgs{Path: missing}); return err }, ErrKindNotFound},
		{"stat below a file", func() error { _, err := c.StatFile(ctx, FileArgs{Path: file + "/x"}); return err }, ErrKindNotFound},
		{"read missing", func() error { _, _, err := readAll(t, c, FileArgs{Path: missing}); return err }, ErrKindNotFound},
		{"read a directory", func() error { _, _, err := readAll(t, c, FileArgs{Path: dir}); return err }, ErrKindExists},
		{"read a device", func() error { _, _, err := readAll(t, c, FileArgs{Path: "/dev/zero"}); return err }, ErrKindExists},
		{"negative offset", func() error { _, _, err := readAll(t, c, FileArgs{Path: file, Offset: -1}); return err }, ErrKindInvalid},
		{"write over a directory", func() error {
			_, err := c.WriteFile(ctx, FileArgs{Path: full}, strings.NewReader("x"))
			return err
		}, ErrKindExists},
		{"write without parent", func() error {
			_, err := c.WriteFile(ctx, FileArgs{Path: missing + "/x"}, strings.NewReader("x"))
			return err
		}, ErrKindNotFound},
		{"write below a file", func() error {
			_, err := c.WriteFile(ctx, FileArgs{Path: file + "/x", Parents: true}, strings.NewReader("x"))
			return err
		}, ErrKindExists},
		{"write with a bad mode", func() error {
			_, err := c.WriteFile(ctx, FileArgs{Path: missing, Mode: 0o4755}, strings.NewReader("x"))
			return err
		}, ErrKindInvalid},
		{"mkdir existing", func() error { _, err := c.MakeDir(ctx, FileArgs{Path: full}); return err }, ErrKindExists},
		{"mkdir over a file", func() error { _, err := c.MakeDir(ctx, FileArgs{Path: file, Parents: true}); return err }, ErrKindExists},
		{"mkdir below a file", func() error { _, err := c.MakeDir(ctx, FileArgs{Path: file + "/d", Parents: true}); return err }, ErrKindExists},
		{"mkdir without parent", func() error { _, err := c.MakeDir(ctx, FileArgs{Path: missing + "/d"}); return err }, ErrKindNotFound},
		{"remove missing", func() error { return c.RemoveFile(ctx, FileArgs{Path: missing}) }, ErrKindNotFound},
		{"remove a full directory", func() error { return c.RemoveFile(ctx, FileArgs{Path: full}) }, ErrKindExists},
		{"remove /", func() error { return c.RemoveFile(ctx, FileArgs{Path: "/", Recursive: true}) }, ErrKindInvalid},
		{"rename missing", func() error {
			_, err := c.RenameFile(ctx, FileArgs{Path: missing, To: missing + "2"})
			return err
		}, ErrKindNotFound},
		{"rename into a missing directory", func() error {
			_, err := c.RenameFile(ctx, FileArgs{Path: file, To: missing + "/x"})
			return err
		}, ErrKindNotFound},
		{"rename a file over a directory", func() error {
			_, err := c.RenameFile(ctx, FileArgs{Path: file, To: full})
			return err
		}, ErrKindExists},
		{"list a file", func() error { _, _, err := c.ListFiles(ctx, FileArgs{Path: file}, 100); return err }, ErrKindExists},
		{"list missing", func() error { _, _, err := c.ListFiles(ctx, FileArgs{Path: missing}, 100); return err }, ErrKindNotFound},
		{"tar of missing", func() error { _, err := c.TarGet(ctx, FileArgs{Path: missing}); return err }, ErrKindNotFound},
		{"tar into a file", func() error { _, err := c.TarPut(ctx, FileArgs{Path: file}, bytes.NewReader(nil)); return err }, ErrKindExists},
		{"watch missing", func() error { _, err := c.WatchFiles(ctx, FileArgs{Path: missing}); return err }, ErrKindNotFound},
		{"watch a file", func() error { _, err := c.WatchFiles(ctx, FileArgs{Path: file}); return err }, ErrKindExists},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			if got := fileOpKind(err); got != tt.want {
				t.Errorf("got %v (kind %q), want kind %q", err, got, tt.want)
			}
		})
	}
	// Nothing above changed the files.
	if b, err := os.ReadFile(file); err != nil || string(b) != "x" {
		t.Errorf("file after the errors: %q %v", b, err)
	}
}

func TestFileMkdirListRemoveRename(t *testing.T) {
	c, _ := startAgent(t)
	dir := t.TempDir()
	ctx := context.Background()
	fi, err := c.MakeDir(ctx, FileArgs{Path: dir + "/a/b/c", Parents: true, Mode: 0o750})
	if err != nil || fi.Type != FileTypeDir || fi.Mode != 0o750 {
		t.Fatalf("mkdir: %+v %v", fi, err)
	}
	if _, err := c.MakeDir(ctx, FileArgs{Path: dir + "/a/b/c", Parents: true}); err != nil {
		t.Errorf("mkdir -p of an existing directory: %v", err)
	}
	for _, p := range []string{"a/f1", "a/b/f2", "a/b/c/f3"} {
		if _, err := c.WriteFile(ctx, FileArgs{Path: dir + "/" + p}, strings.NewReader(p)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("/etc", dir+"/a/link"); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		depth int
		want  []string
	}{
		{1, []string{"a/b", "a/f1", "a/link"}},
		{2, []string{"a/b", "a/b/c", "a/b/f2", "a/f1", "a/link"}},
		{0, []string{"a/b", "a/f1", "a/link"}},
		{9, []string{"a/b", "a/b/c", "a/b/c/f3", "a/b/f2", "a/f1", "a/link"}},
	} {
		l, trunc, err := c.ListFiles(ctx, FileArgs{Path: dir + "/a", Depth: tt.depth}, 100)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, e := range l {
			got = append(got, strings.TrimPrefix(e.Path, dir+"/"))
			if e.Name == "link" && (e.Type != FileTypeSymlink || e.SymlinkTarget != "/etc") {
				t.Errorf("link: got %+v, want a symlink to /etc", e)
			}
		}
		if strings.Join(got, " ") != strings.Join(tt.want, " ") || trunc {
			t.Errorf("depth %d: got %v (truncated %v), want %v", tt.depth, got, trunc, tt.want)
		}
	}
	if l, trunc, err := c.ListFiles(ctx, FileArgs{Path: dir + "/a", Depth: 9, MaxEntries: 2}, 100); err != nil || len(l) != 2 || !trunc {
		t.Errorf("bounded list: got %d entries, truncated %v, %v; want 2, true", len(l), trunc, err)
	}
	if l, trunc, err := c.ListFiles(ctx, FileArgs{Path: dir + "/a", Depth: 9}, 3); err != nil || len(l) != 3 || !trunc {
		t.Errorf("list bounded by the client: got %d entries, truncated %v, %v; want 3, true", len(l), trunc, err)
	}
	if fi, err := c.RenameFile(ctx, FileArgs{Path: dir + "/a/b", To: dir + "/a/moved"}); err != nil || fi.Path != dir+"/a/moved" || fi.Type != FileTypeDir {
		t.Errorf("rename: %+v %v", fi, err)
	}
	if err := c.RemoveFile(ctx, FileArgs{Path: dir + "/a/link"}); err != nil {
		t.Errorf("remove link: %v", err)
	}
	if _, err := os.Stat("/etc/passwd"); err != nil {
		t.Fatalf("removing a symlink touched its target: %v", err)
	}
	if err := c.RemoveFile(ctx, FileArgs{Path: dir + "/a", Recursive: true}); err != nil {
		t.Errorf("remove -r: %v", err)
	}
	if _, err := os.Lstat(dir + "/a"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("after remove -r: %v", err)
	}
}

// TestFileOpsRunAsUser: operations run with the user's permissions, and
// what they make belongs to the user.
func TestFileOpsRunAsUser(t *testing.T) {
	needRoot(t)
	c, _ := startAgent(t)
	ctx := context.Background()
	base := t.TempDir()
	// t.TempDir's parent is 0700.
	for _, d := range []string{filepath.Dir(base), base} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	home := filepath.Join(base, "home")
	if err := os.Mkdir(home, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(home, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(base, "secret")
	if err := os.WriteFile(secret, []byte("root only"), 0o600); err != nil {
		t.Fatal(err)
	}
	owner := func(p string) uint32 {
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Sys().(*syscall.Stat_t).Uid
	}
	fi, err := c.WriteFile(ctx, FileArgs{Path: home + "/d/f", Parents: true, User: nobody}, strings.NewReader("x"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Owner != nobody || owner(home+"/d/f") != 65534 || owner(home+"/d") != 65534 {
		t.Errorf("file and parent written as nobody: owner %q, uids %d %d; want nobody", fi.Owner, owner(home+"/d/f"), owner(home+"/d"))
	}
	if _, err := c.WriteFile(ctx, FileArgs{Path: home + "/r", User: "root"}, strings.NewReader("x")); err != nil || owner(home+"/r") != 0 {
		t.Errorf("written as root: %v, uid %d", err, owner(home+"/r"))
	}
	denied := []struct {
		name string
		call func() error
	}{
		{"read a root-only file", func() error { _, _, err := readAll(t, c, FileArgs{Path: secret, User: nobody}); return err }},
		{"write into a root directory", func() error {
			_, err := c.WriteFile(ctx, FileArgs{Path: base + "/x", User: nobody}, strings.NewReader("x"))
			return err
		}},
		{"replace a root file", func() error {
			_, err := c.WriteFile(ctx, FileArgs{Path: secret, User: nobody}, strings.NewReader("x"))
			return err
		}},
		{"mkdir in a root directory", func() error { _, err := c.MakeDir(ctx, FileArgs{Path: base + "/d", User: nobody}); return err }},
		{"remove a root file", func() error { return c.RemoveFile(ctx, FileArgs{Path: secret, User: nobody}) }},
		{"rename a root file", func() error {
			_, err := c.RenameFile(ctx, FileArgs{Path: secret, To: home + "/stolen", User: nobody})
			return err
		}},
		{"extract into a root directory", func() error {
			_, err := c.TarPut(ctx, FileArgs{Path: base + "/t", User: nobody}, bytes.NewReader(tarOf(t, tarFile("f", "x"))))
			return err
		}},
	}
	for _, tt := range denied {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.call(); fileOpKind(err) != ErrKindDenied {
				t.Errorf("got %v, want kind %q", err, ErrKindDenied)
			}
		})
	}
	if b, _ := os.ReadFile(secret); string(b) != "root only" {
		t.Errorf("secret: got %q", b)
	}
	// The agent's own threads keep their credentials.
	if os.Geteuid() != 0 {
		t.Errorf("euid after the calls: got %d, want 0", os.Geteuid())
	}
	res, err := c.TarPut(ctx, FileArgs{Path: home + "/up", User: nobody}, bytes.NewReader(tarOf(t, tarDir("d"), tarFile("d/f", "x"))))
	if err != nil || res.Files != 1 || owner(home+"/up/d/f") != 65534 || owner(home+"/up/d") != 65534 || owner(home+"/up") != 65534 {
		t.Errorf("extract as nobody: %+v %v; owners %d %d %d", res, err, owner(home+"/up"), owner(home+"/up/d"), owner(home+"/up/d/f"))
	}
}

// tarEntry is one entry of a test archive.
type tarEntry struct {
	hdr  tar.Header
	body string
}

func tarFile(name, body string) tarEntry {
	return tarEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body))}, body: body}
}

func tarDir(name string) tarEntry {
	return tarEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeDir, Mode: 0o755}}
}

func tarOf(t testing.TB, entries ...tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(e.body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestTarPutHostile: each hostile archive is refused or neutralised, and
// nothing outside the target is made or changed.
func TestTarPutHostile(t *testing.T) {
	c, _ := startAgent(t)
	ctx := context.Background()
	tests := []struct {
		name    string
		entries []tarEntry
		// plant prepares the target (as sandbox code would) before the
		// upload.
		plant func(t *testing.T, target, outside string)
		// maxEntries bounds the archive's entries (0: the default).
		maxEntries int
		wantKind   string
		// check looks at the target and the outside after the upload.
		check func(t *testing.T, target, outside string, res TarResult)
	}{
		{
			name:     "dot-dot entry",
			entries:  []tarEntry{tarFile("../evil", "x")},
			wantKind: ErrKindInvalid,
		},
		{
			name:     "dot-dot inside an entry",
			entries:  []tarEntry{tarFile("a/../../evil", "x")},
			wantKind: ErrKindInvalid,
		},
		{
			name:    "absolute entry is made inside the target",
			entries: []tarEntry{tarFile("/abs/evil", "x")},
			check: func(t *testing.T, target, outside string, res TarResult) {
				if b, err := os.ReadFile(target + "/abs/evil"); err != nil || string(b) != "x" {
					t.Errorf("absolute entry: got %q %v, want it under the target", b, err)
				}
			},
		},
		{
			name: "symlink entry then a file through it",
			entries: []tarEntry{
				{hdr: tar.Header{Name: "link", Typeflag: tar.TypeSymlink, Linkname: "OUTSIDE"}},
				tarFile("link/evil", "x"),
			},
			wantKind: ErrKindInvalid,
		},
		{
			name: "relative symlink entry then a file through it",
			entries: []tarEntry{
				{hdr: tar.Header{Name: "link", Typeflag: tar.TypeSymlink, Linkname: "../outside"}},
				tarFile("link/evil", "x"),
			},
			wantKind: ErrKindInvalid,
		},
		{
			name:    "symlink planted in the target",
			entries: []tarEntry{tarFile("planted/evil", "x")},
			plant: func(t *testing.T, target, outside string) {
				if err := os.Symlink(outside, target+"/planted"); err != nil {
					t.Fatal(err)
				}
			},
			wantKind: ErrKindInvalid,
		},
		{
			name:    "file entry over a planted symlink replaces the link",
			entries: []tarEntry{tarFile("victim", "x")},
			plant: func(t *testing.T, target, outside string) {
				if err := os.Symlink(outside+"/keep", target+"/victim"); err != nil {
					t.Fatal(err)
				}
			},
			check: func(t *testing.T, target, outside string, res TarResult) {
				if fi, err := os.Lstat(target + "/victim"); err != nil || !fi.Mode().IsRegular() {
					t.Errorf("victim: %v %v, want a regular file", fi, err)
				}
			},
		},
		{
			name:    "file entry over a planted hard link breaks the link",
			entries: []tarEntry{tarFile("hard", "x")},
			plant: func(t *testing.T, target, outside string) {
				if err := os.Link(outside+"/keep", target+"/hard"); err != nil {
					t.Fatal(err)
				}
			},
		},
		{
			name:     "hard link to outside the target",
			entries:  []tarEntry{{hdr: tar.Header{Name: "h", Typeflag: tar.TypeLink, Linkname: "../outside/keep"}}},
			wantKind: ErrKindInvalid,
		},
		{
			name:     "hard link to an absolute path",
			entries:  []tarEntry{{hdr: tar.Header{Name: "h", Typeflag: tar.TypeLink, Linkname: "/etc/passwd"}}},
			wantKind: ErrKindInvalid,
		},
		{
			name: "hard link to a symlink",
			entries: []tarEntry{
				{hdr: tar.Header{Name: "s", Typeflag: tar.TypeSymlink, Linkname: "/etc/passwd"}},
				{hdr: tar.Header{Name: "h", Typeflag: tar.TypeLink, Linkname: "s"}},
			},
			wantKind: ErrKindInvalid,
		},
		{
			name:    "hard link inside the archive",
			entries: []tarEntry{tarFile("f", "same"), {hdr: tar.Header{Name: "h", Typeflag: tar.TypeLink, Linkname: "f"}}},
			check: func(t *testing.T, target, outside string, res TarResult) {
				a, _ := os.Stat(target + "/f")
				b, _ := os.Stat(target + "/h")
				if res.Links != 1 || !os.SameFile(a, b) {
					t.Errorf("hard link: result %+v, same file %v", res, os.SameFile(a, b))
				}
			},
		},
		{
			name: "device node and FIFO are skipped",
			entries: []tarEntry{
				{hdr: tar.Header{Name: "null", Typeflag: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devminor: 3}},
				{hdr: tar.Header{Name: "sda", Typeflag: tar.TypeBlock, Mode: 0o666, Devmajor: 8}},
				{hdr: tar.Header{Name: "fifo", Typeflag: tar.TypeFifo, Mode: 0o666}},
				tarFile("ok", "x"),
			},
			check: func(t *testing.T, target, outside string, res TarResult) {
				for _, n := range []string{"null", "sda", "fifo"} {
					if _, err := os.Lstat(target + "/" + n); !errors.Is(err, os.ErrNotExist) {
						t.Errorf("%s: %v, want it skipped", n, err)
					}
				}
				if len(res.Skipped) != 3 || res.Files != 1 {
					t.Errorf("result: got %+v, want 3 skipped, 1 file", res)
				}
			},
		},
		{
			name: "setuid and setgid bits are dropped",
			entries: []tarEntry{
				{hdr: tar.Header{Name: "suid", Typeflag: tar.TypeReg, Mode: 0o6755, Size: 1}, body: "x"},
				{hdr: tar.Header{Name: "sgid-dir", Typeflag: tar.TypeDir, Mode: 0o2775}},
				{hdr: tar.Header{Name: "sticky", Typeflag: tar.TypeDir, Mode: 0o1777}},
			},
			check: func(t *testing.T, target, outside string, res TarResult) {
				for name, want := range map[string]os.FileMode{"suid": 0o755, "sgid-dir": os.ModeDir | 0o775, "sticky": os.ModeDir | os.ModeSticky | 0o777} {
					fi, err := os.Stat(target + "/" + name)
					if err != nil || fi.Mode() != want {
						t.Errorf("%s: mode %v %v, want %v", name, fi.Mode(), err, want)
					}
				}
			},
		},
		{
			name:       "too many entries",
			entries:    []tarEntry{tarFile("1", ""), tarFile("2", ""), tarFile("3", ""), tarFile("4", "")},
			maxEntries: 3,
			wantKind:   ErrKindInvalid,
		},
		{
			name:     "name too long",
			entries:  []tarEntry{tarFile(strings.Repeat("a/", 2100)+"f", "x")},
			wantKind: ErrKindInvalid,
		},
		{
			name:     "component too long",
			entries:  []tarEntry{tarFile(strings.Repeat("a", 300), "x")},
			wantKind: ErrKindInvalid,
		},
		{
			name:     "file over a directory of the target",
			entries:  []tarEntry{tarDir("d"), tarFile("d", "x")},
			wantKind: ErrKindExists,
		},
		{
			name:     "not an archive",
			entries:  nil,
			wantKind: ErrKindInvalid,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base := t.TempDir()
			target, outside := base+"/target", base+"/outside"
			for _, d := range []string{target, outside} {
				if err := os.Mkdir(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.WriteFile(outside+"/keep", []byte("keep"), 0o644); err != nil {
				t.Fatal(err)
			}
			if tt.plant != nil {
				tt.plant(t, target, outside)
			}
			var archive []byte
			if tt.entries == nil {
				archive = bytes.Repeat([]byte("not a tar archive "), 100)
			} else {
				for i := range tt.entries {
					tt.entries[i].hdr.Linkname = strings.ReplaceAll(tt.entries[i].hdr.Linkname, "OUTSIDE", outside)
				}
				archive = tarOf(t, tt.entries...)
			}
			res, err := c.TarPut(ctx, FileArgs{Path: target, MaxEntries: tt.maxEntries}, bytes.NewReader(archive))
			if got := fileOpKind(err); got != tt.wantKind {
				t.Fatalf("got %v (kind %q), want kind %q", err, got, tt.wantKind)
			}
			// The outside holds only its own file, unchanged.
			entries, _ := os.ReadDir(outside)
			if b, _ := os.ReadFile(outside + "/keep"); len(entries) != 1 || string(b) != "keep" {
				t.Errorf("outside: %d entries, keep %q; want only keep, unchanged", len(entries), b)
			}
			if _, err := os.Lstat(base + "/evil"); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("an entry escaped to %s/evil", base)
			}
			if tt.check != nil {
				tt.check(t, target, outside, res)
			}
		})
	}
}

// TestTarRoundTrip: a tree archived by TarGet and extracted by TarPut is
// the same tree.
func TestTarRoundTrip(t *testing.T) {
	c, _ := startAgent(t)
	ctx := context.Background()
	src := t.TempDir()
	files := map[string]string{"a.txt": "alpha", "sub/b.bin": string(make([]byte, 300<<10)), "sub/deep/c": "c", "empty": ""}
	for name, body := range files {
		if err := os.MkdirAll(filepath.Dir(src+"/"+name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(src+"/"+name, []byte(body), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("a.txt", src+"/link"); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(src+"/a.txt", src+"/sub/hard"); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(src+"/fifo", 0o644); err != nil {
		t.Fatal(err)
	}
	rc, err := c.TarGet(ctx, FileArgs{Path: src})
	if err != nil {
		t.Fatal(err)
	}
	archive, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	tr := tar.NewReader(bytes.NewReader(archive))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
	}
	sort.Strings(names)
	want := "a.txt empty link sub/ sub/b.bin sub/deep/ sub/deep/c sub/hard"
	if got := strings.Join(names, " "); got != want {
		t.Errorf("archive names: got %q, want %q", got, want)
	}
	dst := t.TempDir() + "/copy"
	res, err := c.TarPut(ctx, FileArgs{Path: dst}, bytes.NewReader(archive))
	if err != nil {
		t.Fatal(err)
	}
	if res.Files != 4 || res.Dirs != 2 || res.Symlinks != 1 || res.Links != 1 {
		t.Errorf("result: got %+v, want 4 files, 2 dirs, 1 symlink, 1 link", res)
	}
	for name, body := range files {
		b, err := os.ReadFile(dst + "/" + name)
		fi, _ := os.Stat(dst + "/" + name)
		if err != nil || string(b) != body || fi.Mode() != 0o640 {
			t.Errorf("%s: %d bytes, mode %v, %v; want %d bytes, mode 0640", name, len(b), fi.Mode(), err, len(body))
		}
	}
	if l, err := os.Readlink(dst + "/link"); err != nil || l != "a.txt" {
		t.Errorf("link: %q %v", l, err)
	}
	// A single file is archived under its base name.
	rc, err = c.TarGet(ctx, FileArgs{Path: src + "/sub/deep/c"})
	if err != nil {
		t.Fatal(err)
	}
	archive, _ = io.ReadAll(rc)
	rc.Close()
	h, err := tar.NewReader(bytes.NewReader(archive)).Next()
	if err != nil || h.Name != "c" || h.Size != 1 {
		t.Errorf("single file: %+v %v", h, err)
	}
	// Gzip-compressed archives are extracted too.
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	if _, err := zw.Write(tarOf(t, tarFile("z", "zipped"))); err != nil {
		t.Fatal(err)
	}
	zw.Close()
	if _, err := c.TarPut(ctx, FileArgs{Path: dst, Gzip: true}, &gz); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(dst + "/z"); string(b) != "zipped" {
		t.Errorf("gzip entry: %q", b)
	}
}

// TestFileWatch: a watch reports created, written, removed and renamed
// entries, below root only when recursive.
func TestFileWatch(t *testing.T) {
	for _, recursive := range []bool{false, true} {
		t.Run(map[bool]string{false: "flat", true: "recursive"}[recursive], func(t *testing.T) {
			c, _ := startAgent(t)
			dir := t.TempDir()
			if err := os.Mkdir(dir+"/sub", 0o755); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			w, err := c.WatchFiles(ctx, FileArgs{Path: dir, Recursive: recursive})
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()
			events := make(chan FileEvent, 1000)
			done := make(chan error, 1)
			go func() {
				for {
					batch, err := w.Next()
					if err != nil {
						done <- err
						return
					}
					for _, e := range batch {
						events <- e
					}
				}
			}()
			expect := func(want FileEvent) {
				t.Helper()
				deadline := time.After(patience)
				for {
					select {
					case e := <-events:
						if e == want {
							return
						}
					case err := <-done:
						t.Fatalf("watch ended waiting for %+v: %v", want, err)
					case <-deadline:
						t.Fatalf("no event %+v", want)
					}
				}
			}
			must := func(err error) {
				t.Helper()
				if err != nil {
					t.Fatal(err)
				}
			}
			must(os.WriteFile(dir+"/f", []byte("1"), 0o644))
			expect(FileEvent{Type: FileEventCreated, Path: dir + "/f"})
			expect(FileEvent{Type: FileEventWritten, Path: dir + "/f"})
			must(os.Rename(dir+"/f", dir+"/g"))
			expect(FileEvent{Type: FileEventRenamed, Path: dir + "/g", OldPath: dir + "/f"})
			must(os.Remove(dir + "/g"))
			expect(FileEvent{Type: FileEventRemoved, Path: dir + "/g"})
			must(os.Mkdir(dir+"/new", 0o755))
			expect(FileEvent{Type: FileEventCreated, Path: dir + "/new", IsDir: true})
			// In a subdirectory: seen only when recursive. A marker
			// in root afterwards shows that the event would have come.
			must(os.WriteFile(dir+"/sub/s", []byte("1"), 0o644))
			must(os.WriteFile(dir+"/new/n", []byte("1"), 0o644))
			must(os.WriteFile(dir+"/marker", nil, 0o644))
			if recursive {
				expect(FileEvent{Type: FileEventCreated, Path: dir + "/sub/s"})
				expect(FileEvent{Type: FileEventCreated, Path: dir + "/new/n"})
				expect(FileEvent{Type: FileEventCreated, Path: dir + "/marker"})
				// A directory renamed within the tree keeps being watched
				// under its new name.
				must(os.Rename(dir+"/sub", dir+"/sub2"))
				expect(FileEvent{Type: FileEventRenamed, Path: dir + "/sub2", OldPath: dir + "/sub", IsDir: true})
				must(os.WriteFile(dir+"/sub2/t", []byte("1"), 0o644))
				expect(FileEvent{Type: FileEventCreated, Path: dir + "/sub2/t"})
			} else {
				deadline := time.After(patience)
			loop:
				for {
					select {
					case e := <-events:
						if strings.HasPrefix(e.Path, dir+"/sub/") || strings.HasPrefix(e.Path, dir+"/new/") {
							t.Errorf("flat watch reported %+v", e)
						}
						if e.Path == dir+"/marker" {
							break loop
						}
					case <-deadline:
						t.Fatal("no marker event")
					}
				}
			}
			// Removing root ends the watch.
			must(os.RemoveAll(dir))
			deadline := time.After(patience)
			for {
				select {
				case <-events:
					continue
				case err := <-done:
					if err != io.EOF {
						t.Errorf("watch end: got %v, want io.EOF", err)
					}
					return
				case <-deadline:
					t.Fatal("watch did not end when its root was removed")
				}
			}
		})
	}
}

// TestFileWatchBounded: a recursive watch of more directories than allowed
// is refused.
func TestFileWatchBounded(t *testing.T) {
	c, _ := startAgent(t)
	dir := t.TempDir()
	for i := range 5 {
		if err := os.MkdirAll(filepath.Join(dir, strings.Repeat("d", i+1)), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	_, err := c.WatchFiles(context.Background(), FileArgs{Path: dir, Recursive: true, MaxWatches: 3})
	if fileOpKind(err) != ErrKindInvalid {
		t.Errorf("got %v, want kind %q", err, ErrKindInvalid)
	}
}
