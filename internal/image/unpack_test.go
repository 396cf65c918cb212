package image

import (
	"archive/tar"
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
)

// tree lists what is under root, relative names, sorted.
func tree(t testing.TB, root string) []string {
	t.Helper()
	var out []string
	err := filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if p != root {
			rel, _ := filepath.Rel(root, p)
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(out)
	return out
}

func readFile(t testing.TB, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestWhiteouts applies whiteouts and opaque directories across layers,
// including an opaque marker that comes after entries of its own layer.
func TestWhiteouts(t *testing.T) {
	needRoot(t)
	j := newJail(t)
	dir := func(n string) ent { return ent{name: n, typ: tar.TypeDir} }
	layers := layersOf(t, j.out,
		[]ent{dir("a/"), {name: "a/keep", body: "1"}, {name: "a/gone", body: "x"},
			dir("b/"), {name: "b/old1", body: "o"}, dir("b/sub/"), {name: "b/sub/old2", body: "o"},
			{name: "c", body: "c1"}, dir("d/"), {name: "d/x", body: "x"},
			dir("e/"), dir("e/f/"), {name: "e/f/lower", body: "l"}, {name: "e/lower", body: "l"}},
		[]ent{{name: "a/.wh.gone"}, {name: "b/.wh..wh..opq"}, {name: "b/new", body: "n"},
			{name: "c", body: "c2"}, {name: ".wh.d"}, {name: ".wh.never-existed"}, {name: "x/.wh.y"},
			// Whiteouts hide lower layers only: this layer's "w" stays.
			{name: "w", body: "w"}, {name: ".wh.w"},
			{name: "a/.wh..wh.plnk"}},
		// The opaque marker after this layer's entries: they stay, and so
		// does what this layer put in a kept subdirectory, while what lower
		// layers put there goes.
		[]ent{{name: "b/new2", body: "n2"}, {name: "e/f/upper", body: "u"}, {name: "e/.wh..wh..opq"}, {name: "b/.wh..wh..opq"}},
	)
	res, err := Unpack(unpackCtx(t), imageOf(t, v1.Config{}, layers...), j.root, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"a", "a/keep", "b", "b/new2", "c", "e", "e/f", "e/f/upper", "w"}
	if got := tree(t, j.root); !slices.Equal(got, want) {
		t.Errorf("tree = %q\nwant %q", got, want)
	}
	if got := readFile(t, filepath.Join(j.root, "c")); got != "c2" {
		t.Errorf("c = %q", got)
	}
	if res.Layers != 3 || res.Entries != 28 {
		t.Errorf("result = %+v", res)
	}
	j.checkUntouched(t)
}

// TestAttributes checks modes (setuid included), owners, times, fifos,
// symlinks as they are written, hard links and user extended attributes.
func TestAttributes(t *testing.T) {
	needRoot(t)
	j := newJail(t)
	t1 := time.Date(2010, 5, 6, 7, 8, 9, 500, time.UTC)
	t2 := time.Date(2012, 1, 2, 3, 4, 5, 0, time.UTC)
	layers := layersOf(t, j.out,
		[]ent{
			{name: "./", typ: tar.TypeDir, mode: 0o700, uid: 99},
			{name: "bin/", typ: tar.TypeDir, mode: 0o750, uid: 1, gid: 2, mtime: t2},
			{name: "bin/su", body: "#!/bin/sh\n", mode: 0o4755, mtime: t1},
			{name: "bin/grp", body: "g", mode: 0o2711, uid: 1000, gid: 1001},
			{name: "tmp/", typ: tar.TypeDir, mode: 0o1777},
			{name: "tmp/p", typ: tar.TypeFifo, mode: 0o640, uid: 5, gid: 6, mtime: t1},
			{name: "abs", typ: tar.TypeSymlink, link: "/etc/passwd", uid: 7, gid: 8, mtime: t1},
			{name: "rel", typ: tar.TypeSymlink, link: "../../../etc"},
			{name: "x", body: "payload", pax: map[string]string{"SCHILY.xattr.user.note": "hi", "SCHILY.xattr.trusted.evil": "no"}},
			{name: "bin/link", typ: tar.TypeLink, link: "bin/su"},
			{name: "./bin/dotted", typ: tar.TypeLink, link: "./bin/su"},
		},
		// A hard link to a lower layer's file; then the file is replaced
		// and the link keeps the old content, as with overlayfs.
		[]ent{{name: "y", typ: tar.TypeLink, link: "x"}},
		[]ent{{name: "x", body: "new"}},
	)
	if _, err := Unpack(unpackCtx(t), imageOf(t, v1.Config{}, layers...), j.root, Limits{}); err != nil {
		t.Fatal(err)
	}
	lst := func(n string) os.FileInfo {
		fi, err := os.Lstat(filepath.Join(j.root, n))
		if err != nil {
			t.Fatal(err)
		}
		return fi
	}
	if fi := lst("."); fi.Mode().Perm() != 0o755 || owner(fi) != [2]uint32{0, 0} {
		t.Errorf("root: %v %v, want the creator's 0755 root:root", fi.Mode(), owner(fi))
	}
	if fi := lst("bin"); fi.Mode() != os.ModeDir|0o750 || owner(fi) != [2]uint32{1, 2} || !fi.ModTime().Equal(t2) {
		t.Errorf("bin: %v %v %v", fi.Mode(), owner(fi), fi.ModTime())
	}
	su := lst("bin/su")
	if su.Mode() != os.ModeSetuid|0o755 || owner(su) != [2]uint32{0, 0} || !su.ModTime().Equal(t1) || nlink(su) != 3 {
		t.Errorf("bin/su: %v %v %v links %d", su.Mode(), owner(su), su.ModTime(), nlink(su))
	}
	for _, n := range []string{"bin/link", "bin/dotted"} {
		if inode(lst(n)) != inode(su) {
			t.Errorf("%s is not a hard link to bin/su", n)
		}
	}
	if fi := lst("bin/grp"); fi.Mode() != os.ModeSetgid|0o711 || owner(fi) != [2]uint32{1000, 1001} {
		t.Errorf("bin/grp: %v %v", fi.Mode(), owner(fi))
	}
	if fi := lst("tmp"); fi.Mode() != os.ModeDir|os.ModeSticky|0o777 {
		t.Errorf("tmp: %v", fi.Mode())
	}
	if fi := lst("tmp/p"); fi.Mode() != os.ModeNamedPipe|0o640 || owner(fi) != [2]uint32{5, 6} || !fi.ModTime().Equal(t1) {
		t.Errorf("tmp/p: %v %v %v", fi.Mode(), owner(fi), fi.ModTime())
	}
	for n, target := range map[string]string{"abs": "/etc/passwd", "rel": "../../../etc"} {
		if got, err := os.Readlink(filepath.Join(j.root, n)); err != nil || got != target {
			t.Errorf("%s -> %q (%v), want %q", n, got, err, target)
		}
	}
	if fi := lst("abs"); owner(fi) != [2]uint32{7, 8} || !fi.ModTime().Equal(t1) {
		t.Errorf("abs: %v %v", owner(fi), fi.ModTime())
	}
	if got := readFile(t, filepath.Join(j.root, "x")); got != "new" {
		t.Errorf("x = %q", got)
	}
	if got := readFile(t, filepath.Join(j.root, "y")); got != "payload" {
		t.Errorf("y = %q, want the content x had when linked", got)
	}
	buf := make([]byte, 64)
	if n, err := unix.Getxattr(filepath.Join(j.root, "y"), "user.note", buf); errors.Is(err, unix.ENOTSUP) {
		t.Log("file system without user extended attributes")
	} else if err != nil || string(buf[:n]) != "hi" {
		t.Errorf("user.note = %q (%v)", buf[:n], err)
	}
	if _, err := unix.Getxattr(filepath.Join(j.root, "y"), "trusted.evil", buf); err == nil {
		t.Error("trusted.evil was set")
	}
	j.checkUntouched(t)
}

// TestUnpackErrors covers refusals that are not attacks.
func TestUnpackErrors(t *testing.T) {
	needRoot(t)
	for _, tc := range []struct {
		name  string
		ents  []ent
		entry string
	}{
		{"hard link to nothing", []ent{{name: "h", typ: tar.TypeLink, link: "missing"}}, "h"},
		{"hard link to a directory", []ent{{name: "d/", typ: tar.TypeDir}, {name: "h", typ: tar.TypeLink, link: "d"}}, "h"},
		{"hard link to the root", []ent{{name: "h", typ: tar.TypeLink, link: "./"}}, "h"},
		{"file under a file", []ent{{name: "f", body: "x"}, {name: "f/g", body: "y"}}, "f/g"},
		{"symlink without a target", []ent{{name: "s", typ: tar.TypeSymlink}}, "s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			j := newJail(t)
			_, err := Unpack(unpackCtx(t), imageOf(t, v1.Config{}, layersOf(t, j.out, tc.ents)...), j.root, Limits{})
			var ee *EntryError
			if !errors.As(err, &ee) || ee.Entry != tc.entry {
				t.Fatalf("Unpack: %v, want an error about %q", err, tc.entry)
			}
			t.Log(err)
			j.checkUntouched(t)
		})
	}
}

// TestUnpackCancelled stops at once on a cancelled context.
func TestUnpackCancelled(t *testing.T) {
	needRoot(t)
	j := newJail(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	img := imageOf(t, v1.Config{}, layersOf(t, j.out, []ent{{name: "a", body: "a"}})...)
	if _, err := Unpack(ctx, img, j.root, Limits{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Unpack: %v, want context.Canceled", err)
	}
	if _, err := os.Lstat(filepath.Join(j.root, "a")); !os.IsNotExist(err) {
		t.Errorf("a written after cancel: %v", err)
	}
}

// TestDestinationSymlink refuses a destination that is itself a link.
func TestDestinationSymlink(t *testing.T) {
	needRoot(t)
	j := newJail(t)
	if err := os.Symlink(j.out, j.root); err != nil {
		t.Fatal(err)
	}
	img := imageOf(t, v1.Config{}, layersOf(t, j.out, []ent{{name: "pwned", body: "x"}})...)
	if _, err := Unpack(unpackCtx(t), img, j.root, Limits{}); err == nil {
		t.Fatal("Unpack into a symlinked destination succeeded")
	}
	j.checkUntouched(t)
}
