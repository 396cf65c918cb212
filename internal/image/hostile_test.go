package image

import (
	"archive/tar"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// TestHostileLayers unpacks layers built to escape the root, each of which
// must fail with an error naming the entry and leave the sentinel
// directory beside the root untouched.
func TestHostileLayers(t *testing.T) {
	needRoot(t)
	evilLink := ent{name: "evil", typ: tar.TypeSymlink, link: "$OUT"}
	for _, tc := range []struct {
		name   string
		layers [][]ent
		lim    Limits
		want   error
		layer  int    // the failing layer
		entry  string // the failing entry ("$OUT" expanded)
		gz     bool   // gzip the layers (the bomb)
	}{
		{name: "dotdot", layers: [][]ent{{{name: "../outside/pwned", body: "x"}}},
			want: ErrUnsafePath, layer: 1, entry: "../outside/pwned"},
		{name: "dotdot inside a path", layers: [][]ent{{{name: "a/", typ: tar.TypeDir}, {name: "a/../../outside/pwned", body: "x"}}},
			want: ErrUnsafePath, layer: 1, entry: "a/../../outside/pwned"},
		{name: "absolute path", layers: [][]ent{{{name: "$OUT/pwned", body: "x"}}},
			want: ErrUnsafePath, layer: 1, entry: "$OUT/pwned"},
		{name: "absolute directory", layers: [][]ent{{{name: "$OUT/d/", typ: tar.TypeDir, mode: 0o777}}},
			want: ErrUnsafePath, layer: 1, entry: "$OUT/d/"},
		{name: "through an absolute symlink of the same layer", layers: [][]ent{{evilLink, {name: "evil/pwned", body: "x"}}},
			want: ErrUnsafePath, layer: 1, entry: "evil/pwned"},
		{name: "through a relative symlink", layers: [][]ent{{{name: "evil", typ: tar.TypeSymlink, link: "../outside"}, {name: "evil/pwned", body: "x"}}},
			want: ErrUnsafePath, layer: 1, entry: "evil/pwned"},
		{name: "through a symlink of an earlier layer", layers: [][]ent{{evilLink}, {{name: "evil/pwned", body: "x"}}},
			want: ErrUnsafePath, layer: 2, entry: "evil/pwned"},
		{name: "through a nested symlink", layers: [][]ent{
			{{name: "a/", typ: tar.TypeDir}, {name: "a/b", typ: tar.TypeSymlink, link: "../../outside"}},
			{{name: "a/b/c/pwned", body: "x"}}},
			want: ErrUnsafePath, layer: 2, entry: "a/b/c/pwned"},
		{name: "directory through a symlink", layers: [][]ent{{evilLink}, {{name: "evil/sub/", typ: tar.TypeDir}}},
			want: ErrUnsafePath, layer: 2, entry: "evil/sub/"},
		{name: "symlink through a symlink", layers: [][]ent{{evilLink}, {{name: "evil/l", typ: tar.TypeSymlink, link: "/"}}},
			want: ErrUnsafePath, layer: 2, entry: "evil/l"},
		{name: "through a symlink that stays inside", layers: [][]ent{
			{{name: "usr/", typ: tar.TypeDir}, {name: "lib", typ: tar.TypeSymlink, link: "usr"}},
			{{name: "lib/x", body: "x"}}},
			want: ErrUnsafePath, layer: 2, entry: "lib/x"},
		{name: "hard link out with dotdot", layers: [][]ent{{{name: "stolen", typ: tar.TypeLink, link: "../outside/secret"}}},
			want: ErrUnsafePath, layer: 1, entry: "stolen"},
		{name: "hard link to an absolute path", layers: [][]ent{{{name: "stolen", typ: tar.TypeLink, link: "$OUT/secret"}}},
			want: ErrUnsafePath, layer: 1, entry: "stolen"},
		{name: "hard link through a symlink", layers: [][]ent{{evilLink}, {{name: "stolen", typ: tar.TypeLink, link: "evil/secret"}}},
			want: ErrUnsafePath, layer: 2, entry: "stolen"},
		{name: "whiteout through a symlink", layers: [][]ent{{evilLink}, {{name: "evil/.wh.secret"}}},
			want: ErrUnsafePath, layer: 2, entry: "evil/.wh.secret"},
		{name: "opaque whiteout through a symlink", layers: [][]ent{{evilLink}, {{name: "evil/.wh..wh..opq"}}},
			want: ErrUnsafePath, layer: 2, entry: "evil/.wh..wh..opq"},
		{name: "whiteout with dotdot", layers: [][]ent{{{name: "../outside/.wh.secret"}}},
			want: ErrUnsafePath, layer: 1, entry: "../outside/.wh.secret"},
		{name: "whiteout of dotdot", layers: [][]ent{{{name: "a/", typ: tar.TypeDir}, {name: "a/.wh..."}}},
			want: ErrUnsafePath, layer: 1, entry: "a/.wh..."},
		{name: "gzip bomb", gz: true, layers: [][]ent{{{name: "zeros", size: 16 << 20}}}, lim: Limits{MaxBytes: 1 << 20},
			want: ErrLimit, layer: 1, entry: "zeros"},
		{name: "many files over the byte cap", gz: true, layers: [][]ent{manyFiles(8, 256<<10), manyFiles(8, 256<<10)}, lim: Limits{MaxBytes: 3 << 20},
			want: ErrLimit, layer: 2, entry: "f3"},
		{name: "too many entries", layers: [][]ent{manyFiles(60, 0), manyFiles(60, 0)}, lim: Limits{MaxEntries: 100},
			want: ErrLimit, layer: 2, entry: "f40"},
		{name: "unsupported entry type", layers: [][]ent{{{name: "odd", typ: tar.TypeCont}}},
			want: ErrUnsupported, layer: 1, entry: "odd"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			j := newJail(t)
			var layers []v1.Layer
			for _, ents := range tc.layers {
				b := tarBytes(t, j.out, ents...)
				if tc.gz {
					b = gzipped(t, b)
				}
				layers = append(layers, layerFromBytes(t, b))
			}
			_, err := Unpack(unpackCtx(t), imageOf(t, v1.Config{}, layers...), j.root, tc.lim)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Unpack: %v, want %v", err, tc.want)
			}
			var ee *EntryError
			entry := strings.ReplaceAll(tc.entry, "$OUT", j.out)
			if !errors.As(err, &ee) || ee.Layer != tc.layer || ee.Entry != entry {
				t.Fatalf("Unpack: %v, want an error about layer %d entry %q", err, tc.layer, entry)
			}
			if !strings.Contains(err.Error(), entry) {
				t.Errorf("error %q does not name the entry", err)
			}
			t.Logf("%v", err)
			j.checkUntouched(t)
			if _, err := os.Lstat(filepath.Join(j.out, "pwned")); err == nil {
				t.Error("pwned written outside the root")
			}
		})
	}
}

func manyFiles(n, size int) []ent {
	es := make([]ent, n)
	for i := range es {
		es[i] = ent{name: "f" + strconv.Itoa(i), size: int64(size)}
	}
	return es
}

// TestBombStopsEarly checks that a gzip bomb is stopped while streaming:
// with the per-entry size check out of the way (many entries, each under
// the cap), the disk sees no more than the cap.
func TestBombStopsEarly(t *testing.T) {
	needRoot(t)
	j := newJail(t)
	// 64 files of 1 MiB of zeros: 64 MiB that gzip to some 64 KiB.
	b := gzipped(t, tarBytes(t, j.out, manyFiles(64, 1<<20)...))
	if len(b) > 1<<20 {
		t.Fatalf("bomb is %d bytes compressed", len(b))
	}
	res, err := Unpack(unpackCtx(t), imageOf(t, v1.Config{}, layerFromBytes(t, b)), j.root, Limits{MaxBytes: 4 << 20})
	if !errors.Is(err, ErrLimit) {
		t.Fatalf("Unpack: %v, want ErrLimit", err)
	}
	var total int64
	filepath.Walk(j.root, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			total += fi.Size()
		}
		return nil
	})
	if total > 4<<20 || res.Written > 4<<20 || res.Read > 4<<20+1 {
		t.Errorf("wrote %d bytes (result: read %d, written %d), cap 4 MiB", total, res.Read, res.Written)
	}
	j.checkUntouched(t)
}

// TestConfinedReplacements covers writes that meet a planted link at
// their own path: they replace the link and never act through it.
func TestConfinedReplacements(t *testing.T) {
	needRoot(t)
	for _, tc := range []struct {
		name   string
		layers [][]ent
		check  func(t *testing.T, root string)
	}{
		{name: "file over a symlink", layers: [][]ent{
			{{name: "etc/", typ: tar.TypeDir}, {name: "etc/x", typ: tar.TypeSymlink, link: "$OUT/secret"}},
			{{name: "etc/x", body: "new", mode: 0o777}}},
			check: func(t *testing.T, root string) {
				if b, err := os.ReadFile(filepath.Join(root, "etc/x")); err != nil || string(b) != "new" {
					t.Errorf("etc/x: %q %v", b, err)
				}
			}},
		{name: "directory over a symlink", layers: [][]ent{
			{{name: "d", typ: tar.TypeSymlink, link: "$OUT"}},
			{{name: "d/", typ: tar.TypeDir, mode: 0o777, uid: 4242}}},
			check: func(t *testing.T, root string) {
				fi, err := os.Lstat(filepath.Join(root, "d"))
				if err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o777 || owner(fi)[0] != 4242 {
					t.Errorf("d: %v %v", fi, err)
				}
			}},
		{name: "fifo over a symlink", layers: [][]ent{
			{{name: "p", typ: tar.TypeSymlink, link: "$OUT/secret"}},
			{{name: "p", typ: tar.TypeFifo, mode: 0o666, uid: 7}}},
			check: func(t *testing.T, root string) {
				fi, err := os.Lstat(filepath.Join(root, "p"))
				if err != nil || fi.Mode()&os.ModeNamedPipe == 0 || fi.Mode().Perm() != 0o666 {
					t.Errorf("p: %v %v", fi, err)
				}
			}},
		{name: "whiteout of a symlink", layers: [][]ent{
			{{name: "evil", typ: tar.TypeSymlink, link: "$OUT"}},
			{{name: ".wh.evil"}}},
			check: func(t *testing.T, root string) {
				if _, err := os.Lstat(filepath.Join(root, "evil")); !os.IsNotExist(err) {
					t.Errorf("evil still there: %v", err)
				}
			}},
		{name: "opaque directory holding a symlink out", layers: [][]ent{
			{{name: "d/", typ: tar.TypeDir}, {name: "d/evil", typ: tar.TypeSymlink, link: "$OUT"}},
			{{name: "d/.wh..wh..opq"}}},
			check: func(t *testing.T, root string) {
				if es, err := os.ReadDir(filepath.Join(root, "d")); err != nil || len(es) != 0 {
					t.Errorf("d holds %v (%v)", es, err)
				}
			}},
		{name: "hard link to a symlink out links the symlink", layers: [][]ent{
			{{name: "l", typ: tar.TypeSymlink, link: "$OUT/secret"}},
			{{name: "h", typ: tar.TypeLink, link: "l"}}},
			check: func(t *testing.T, root string) {
				l, _ := os.Lstat(filepath.Join(root, "l"))
				h, err := os.Lstat(filepath.Join(root, "h"))
				if err != nil || h.Mode()&os.ModeSymlink == 0 || inode(h) != inode(l) {
					t.Errorf("h: %v %v", h, err)
				}
			}},
		{name: "device nodes are skipped", layers: [][]ent{
			{{name: "dev/", typ: tar.TypeDir},
				{name: "dev/sda", typ: tar.TypeBlock, mode: 0o666, major: 8},
				{name: "dev/mem", typ: tar.TypeChar, mode: 0o666, major: 1},
				{name: "dev/fifo", typ: tar.TypeFifo, mode: 0o600}}},
			check: func(t *testing.T, root string) {
				for _, n := range []string{"dev/sda", "dev/mem"} {
					if _, err := os.Lstat(filepath.Join(root, n)); !os.IsNotExist(err) {
						t.Errorf("%s created: %v", n, err)
					}
				}
				if fi, err := os.Lstat(filepath.Join(root, "dev/fifo")); err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
					t.Errorf("dev/fifo: %v %v", fi, err)
				}
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			j := newJail(t)
			res, err := Unpack(unpackCtx(t), imageOf(t, v1.Config{}, layersOf(t, j.out, tc.layers...)...), j.root, Limits{})
			if err != nil {
				t.Fatalf("Unpack: %v", err)
			}
			tc.check(t, j.root)
			j.checkUntouched(t)
			if strings.Contains(tc.name, "device") {
				if len(res.Skipped) != 2 || !strings.Contains(res.Skipped[0], "dev/sda") || !strings.Contains(res.Skipped[1], "dev/mem") {
					t.Errorf("Skipped = %q", res.Skipped)
				}
			} else if len(res.Skipped) != 0 {
				t.Errorf("Skipped = %q", res.Skipped)
			}
		})
	}
}
