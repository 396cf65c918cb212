package image_test

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/internal/image"
	"github.com/pandastack/pandastack/internal/testenv"
	"github.com/pandastack/pandastack/wire"
)

// TestBaseTemplateRoundTrip re-layers the built base template's root
// filesystem into a `docker save` tarball (uncompressed layers, as Docker
// writes them: everything but /usr, then /usr, then a small change set with
// a whiteout), reads it with FromTarball, unpacks it, and checks the tree
// matches the original entry for entry: types, modes (setuid included),
// owners, times, sizes, contents, link targets and hard-link groups; device
// nodes are the only things skipped. Then a real server serves sandboxes
// from the unpacked tree as its base template and a command runs in one.
func TestBaseTemplateRoundTrip(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("unpacking sets owners and needs root")
	}
	if testing.Short() {
		t.Skip("copies the base template (some 200 MB)")
	}
	tpl, err := testenv.Templates(t).Get("base")
	if err != nil {
		t.Skipf("base template not built: %v", err)
	}
	src := tpl.Rootfs
	work := t.TempDir()

	// Layers 1 and 2 split the tree; hard links in layer 2 may point into
	// layer 1. Layer 3 removes a file and adds one.
	links := map[uint64]string{}
	l1 := writeTreeLayer(t, filepath.Join(work, "l1.tar"), src, "", "usr", links)
	l2 := writeTreeLayer(t, filepath.Join(work, "l2.tar"), src, "usr", "", links)
	const removed, added = "etc/hostname", "etc/from-image"
	if _, err := os.Lstat(filepath.Join(src, removed)); err != nil {
		t.Fatalf("base template lacks %s: %v", removed, err)
	}
	etc, err := os.Lstat(filepath.Join(src, "etc"))
	if err != nil {
		t.Fatal(err)
	}
	l3path := filepath.Join(work, "l3.tar")
	// As a builder records it: the changed directory, then the changes.
	var l3buf bytes.Buffer
	tw := tar.NewWriter(&l3buf)
	stamp := time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)
	for _, h := range []*tar.Header{
		{Name: "etc/", Typeflag: tar.TypeDir, Mode: int64(etc.Mode().Perm()), ModTime: etc.ModTime(), Format: tar.FormatPAX},
		{Name: "etc/.wh.hostname", Typeflag: tar.TypeReg, Mode: 0o644, ModTime: stamp, Format: tar.FormatPAX},
		{Name: added, Typeflag: tar.TypeReg, Mode: 0o640, Uid: 1000, Gid: 1000, Size: 6, ModTime: stamp, Format: tar.FormatPAX},
	} {
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Size > 0 {
			if _, err := io.WriteString(tw, "hello\n"); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(l3path, l3buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	l3 := fileDigest(t, l3path)
	cfg := v1.Config{Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, Cmd: []string{"/bin/bash"}}
	saved := filepath.Join(work, "base.tar")
	writeDockerSave(t, saved, "pandastack/base:e2e", cfg, []string{filepath.Join(work, "l1.tar"), filepath.Join(work, "l2.tar"), l3path}, []string{l1, l2, l3})

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	img, err := image.FromTarball(ctx, saved, "pandastack/base:e2e")
	if err != nil {
		t.Fatal(err)
	}
	// Unpack where a template store looks for base's build, so that a
	// server can use it below.
	tdir := filepath.Join(work, "templates")
	dst := filepath.Join(tdir, "base-"+tpl.Hash, "rootfs")
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	res, err := image.Unpack(ctx, img, dst, image.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("unpacked %d layers, %d entries, %d MB in %v; skipped %d", res.Layers, res.Entries, res.Written>>20, time.Since(start), len(res.Skipped))

	want := describeTree(t, src)
	got := describeTree(t, dst)
	var devices []string
	for rel, d := range want.entries {
		if strings.HasPrefix(d, "char") || strings.HasPrefix(d, "block") {
			devices = append(devices, rel)
			delete(want.entries, rel)
		}
	}
	delete(want.entries, removed)
	if g := got.entries[added]; !strings.HasPrefix(g, "file 0640 1000:1000 6 ") {
		t.Errorf("%s: %s", added, g)
	}
	delete(got.entries, added)
	if len(devices) == 0 || len(res.Skipped) != len(devices) {
		t.Errorf("skipped %q for devices %q", res.Skipped, devices)
	}
	var diffs []string
	for rel, w := range want.entries {
		if g := got.entries[rel]; g != w {
			diffs = append(diffs, fmt.Sprintf("%s:\n  want %s\n  got  %s", rel, w, g))
		}
	}
	for rel, g := range got.entries {
		if _, ok := want.entries[rel]; !ok {
			diffs = append(diffs, fmt.Sprintf("%s: unexpected %s", rel, g))
		}
	}
	slices.Sort(diffs)
	if len(diffs) > 0 {
		t.Fatalf("%d differences, the first: %s", len(diffs), strings.Join(diffs[:min(len(diffs), 10)], "\n"))
	}
	if !slices.Equal(want.linkGroups, got.linkGroups) {
		t.Errorf("hard-link groups differ:\nwant %q\ngot  %q", want.linkGroups, got.linkGroups)
	}
	t.Logf("%d entries match, %d hard-link groups", len(want.entries), len(want.linkGroups))

	t.Run("sandbox", func(t *testing.T) {
		s := daemontest.Start(t, func(c *daemon.Config) { c.TemplateDir = tdir })
		sb := s.Create(t, wire.CreateSandboxRequest{Template: "base"})
		r := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "cat /etc/from-image /etc/debian_version; id -un; curl --version | head -1; test -e /etc/hostname && echo hostname-present; ls -l /usr/bin/su"})
		t.Logf("exec: %+v", r)
		if r.ExitCode != 0 || !strings.HasPrefix(r.Stdout, "hello\n12.") || !strings.Contains(r.Stdout, "\nuser\ncurl ") ||
			strings.Contains(r.Stdout, "hostname-present") || !strings.Contains(r.Stdout, "-rwsr-xr-x") {
			t.Fatalf("exec in a sandbox of the unpacked image: %+v", r)
		}
	})
}

// writeTreeLayer writes the entries of root, in lexical order, as a tar
// layer at path, and returns its sha256 digest: only those under the
// top-level directory only (all when empty), leaving out the top-level
// directory skip. links maps inodes already written to their first name,
// across layers.
func writeTreeLayer(t testing.TB, path, root, only, skip string, links map[uint64]string) string {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	tw := tar.NewWriter(io.MultiWriter(f, h))
	err = filepath.WalkDir(filepath.Join(root, only), func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == skip {
			return fs.SkipDir
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		var target string
		if fi.Mode()&fs.ModeSymlink != 0 {
			if target, err = os.Readlink(p); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(fi, target)
		if err != nil {
			return err
		}
		hdr.Name, hdr.Uname, hdr.Gname = rel, "", ""
		hdr.AccessTime, hdr.ChangeTime = time.Time{}, time.Time{}
		hdr.Format = tar.FormatPAX
		if fi.IsDir() {
			hdr.Name += "/"
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Mode().IsRegular() && st.Nlink > 1 {
			if first, ok := links[st.Ino]; ok {
				hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
			} else {
				links[st.Ino] = rel
			}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if hdr.Typeflag == tar.TypeReg {
			src, err := os.Open(p)
			if err != nil {
				return err
			}
			defer src.Close()
			if _, err := io.Copy(tw, src); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

func fileDigest(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

// writeDockerSave writes what `docker save` writes for one image with
// uncompressed layers: the config, each layer's tar and manifest.json.
func writeDockerSave(t testing.TB, path, tag string, cfg v1.Config, layers, diffIDs []string) {
	t.Helper()
	cf := v1.ConfigFile{OS: "linux", Architecture: "amd64", Config: cfg, RootFS: v1.RootFS{Type: "layers"}, Created: v1.Time{Time: e2eTime}}
	for _, d := range diffIDs {
		h, err := v1.NewHash(d)
		if err != nil {
			t.Fatal(err)
		}
		cf.RootFS.DiffIDs = append(cf.RootFS.DiffIDs, h)
	}
	cfgJSON, err := json.Marshal(cf)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(cfgJSON)
	cfgName := hex.EncodeToString(sum[:]) + ".json"
	manifest := []map[string]any{{"Config": cfgName, "RepoTags": []string{tag}, "Layers": []string{}}}
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	add := func(name string, size int64, r io.Reader) {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: size, Typeflag: tar.TypeReg, ModTime: e2eTime}); err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(tw, r); err != nil {
			t.Fatal(err)
		}
	}
	add(cfgName, int64(len(cfgJSON)), strings.NewReader(string(cfgJSON)))
	for i, l := range layers {
		lf, err := os.Open(l)
		if err != nil {
			t.Fatal(err)
		}
		fi, _ := lf.Stat()
		name := fmt.Sprintf("%s/layer.tar", strings.TrimPrefix(diffIDs[i], "sha256:"))
		add(name, fi.Size(), lf)
		lf.Close()
		manifest[0]["Layers"] = append(manifest[0]["Layers"].([]string), name)
	}
	mj, _ := json.Marshal(manifest)
	add("manifest.json", int64(len(mj)), strings.NewReader(string(mj)))
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
}

// treeDesc describes a tree: each entry (but the root) as a string of its
// type, mode, owner, size, time and content hash or link target, and the
// groups of names sharing an inode.
type treeDesc struct {
	entries    map[string]string
	linkGroups []string
}

func describeTree(t testing.TB, root string) treeDesc {
	t.Helper()
	d := treeDesc{entries: map[string]string{}}
	groups := map[uint64][]string{}
	err := filepath.WalkDir(root, func(p string, de fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		fi, err := de.Info()
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		var kind, extra string
		switch m := fi.Mode(); {
		case m.IsRegular():
			kind = "file"
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			extra = hex.EncodeToString(sum[:8])
			if st.Nlink > 1 {
				groups[st.Ino] = append(groups[st.Ino], rel)
			}
		case m.IsDir():
			kind = "dir"
		case m&fs.ModeSymlink != 0:
			kind = "symlink"
			extra, _ = os.Readlink(p)
		case m&fs.ModeNamedPipe != 0:
			kind = "fifo"
		case m&fs.ModeCharDevice != 0:
			kind = "char"
		case m&fs.ModeDevice != 0:
			kind = "block"
		default:
			kind = "other"
		}
		size := fi.Size()
		if fi.IsDir() {
			size = 0 // a directory's size is the file system's business
		}
		d.entries[rel] = fmt.Sprintf("%s %04o %d:%d %d %d %s", kind, st.Mode&0o7777, st.Uid, st.Gid, size, fi.ModTime().UnixNano(), extra)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range groups {
		slices.Sort(g)
		d.linkGroups = append(d.linkGroups, strings.Join(g, ","))
	}
	slices.Sort(d.linkGroups)
	return d
}

var e2eTime = time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)
