package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// ent is one entry of a hand-made layer. In names and link targets, "$OUT"
// stands for the sentinel directory outside the root.
type ent struct {
	name  string
	typ   byte // tar.TypeReg when 0
	body  string
	link  string
	mode  int64 // 0644 (0755 for directories) when 0
	uid   int
	gid   int
	mtime time.Time
	pax   map[string]string
	major int64
	size  int64 // a declared size bigger than body: content is zeros
}

var testTime = time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)

// tarBytes writes the entries as a tar archive; out replaces "$OUT".
func tarBytes(t testing.TB, out string, ents ...ent) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := &tar.Header{
			Name:       strings.ReplaceAll(e.name, "$OUT", out),
			Linkname:   strings.ReplaceAll(e.link, "$OUT", out),
			Typeflag:   e.typ,
			Mode:       e.mode,
			Uid:        e.uid,
			Gid:        e.gid,
			ModTime:    e.mtime,
			PAXRecords: e.pax,
			Devmajor:   e.major,
			Format:     tar.FormatPAX,
		}
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Mode == 0 {
			h.Mode = 0o644
			if h.Typeflag == tar.TypeDir {
				h.Mode = 0o755
			}
		}
		if h.ModTime.IsZero() {
			h.ModTime = testTime
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.body))
			if e.size > h.Size {
				h.Size = e.size
			}
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatalf("writing tar header %q: %v", e.name, err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := io.WriteString(tw, e.body); err != nil {
				t.Fatal(err)
			}
			if pad := h.Size - int64(len(e.body)); pad > 0 {
				if _, err := io.CopyN(tw, zeros{}, pad); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

// layerFromBytes makes a layer of a tar archive (gzipped or not).
func layerFromBytes(t testing.TB, b []byte) v1.Layer {
	t.Helper()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func gzipped(t testing.TB, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	if _, err := zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// imageOf stacks layers into a linux/amd64 image with cfg as its run
// configuration.
func imageOf(t testing.TB, cfg v1.Config, layers ...v1.Layer) v1.Image {
	t.Helper()
	return imageFor(t, "amd64", cfg, layers...)
}

func imageFor(t testing.TB, arch string, cfg v1.Config, layers ...v1.Layer) v1.Image {
	t.Helper()
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture, cf.Config = "linux", arch, cfg
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// layersOf builds one layer per entry list.
func layersOf(t testing.TB, out string, lists ...[]ent) []v1.Layer {
	t.Helper()
	var ls []v1.Layer
	for _, ents := range lists {
		ls = append(ls, layerFromBytes(t, tarBytes(t, out, ents...)))
	}
	return ls
}

// newRegistry serves go-containerregistry's in-memory registry on loopback
// and returns its host:port.
func newRegistry(t testing.TB) string {
	t.Helper()
	s := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(s.Close)
	return strings.TrimPrefix(s.URL, "http://")
}

// jail is a test's directory with the root to unpack into and a sentinel
// directory beside it that no unpack may touch.
type jail struct {
	base, root, out string
}

func newJail(t testing.TB) jail {
	t.Helper()
	base := t.TempDir()
	j := jail{base: base, root: filepath.Join(base, "rootfs"), out: filepath.Join(base, "outside")}
	if err := os.Mkdir(j.out, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(j.out, "secret"), []byte("secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	old := time.Date(1999, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, p := range []string{filepath.Join(j.out, "secret"), j.out} {
		if err := os.Chtimes(p, old, old); err != nil {
			t.Fatal(err)
		}
	}
	return j
}

// checkUntouched fails unless the sentinel directory is exactly as made
// and nothing but the root and it exist beside each other.
func (j jail) checkUntouched(t testing.TB) {
	t.Helper()
	names := func(dir string) []string {
		es, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var n []string
		for _, e := range es {
			n = append(n, e.Name())
		}
		return n
	}
	if got := names(j.out); len(got) != 1 || got[0] != "secret" {
		t.Errorf("sentinel directory holds %v, want only secret", got)
	}
	for _, n := range names(j.base) {
		if n != "rootfs" && n != "outside" {
			t.Errorf("unexpected %s written beside the root", n)
		}
	}
	fi, err := os.Lstat(filepath.Join(j.out, "secret"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(j.out, "secret"))
	if string(b) != "secret" || fi.Mode() != 0o600 || fi.ModTime().Year() != 1999 || nlink(fi) != 1 {
		t.Errorf("sentinel file changed: %q mode %v mtime %v links %d", b, fi.Mode(), fi.ModTime(), nlink(fi))
	}
	di, err := os.Lstat(j.out)
	if err != nil {
		t.Fatal(err)
	}
	if di.Mode() != os.ModeDir|0o750 || di.ModTime().Year() != 1999 || owner(di) != [2]uint32{0, 0} && os.Geteuid() == 0 {
		t.Errorf("sentinel directory changed: mode %v mtime %v owner %v", di.Mode(), di.ModTime(), owner(di))
	}
}

func nlink(fi os.FileInfo) uint64 { return uint64(fi.Sys().(*syscall.Stat_t).Nlink) }

func owner(fi os.FileInfo) [2]uint32 {
	st := fi.Sys().(*syscall.Stat_t)
	return [2]uint32{st.Uid, st.Gid}
}

func inode(fi os.FileInfo) uint64 { return fi.Sys().(*syscall.Stat_t).Ino }

// needRoot skips a test that sets owners: the unpacker runs as root.
func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("unpacking sets owners and needs root")
	}
}

func unpackCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}
