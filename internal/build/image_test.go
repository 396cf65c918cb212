package build

import (
	"archive/tar"
	"bytes"
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

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// miniImage is a two-layer image holding only a shell (dash and the C
// library, taken from the base template) and an /etc/passwd with root
// alone: what the builder must give the default user.
func miniImage(t *testing.T, baseRootfs string) v1.Image {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(h *tar.Header, body []byte) {
		h.ModTime = time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
		if h.Mode == 0 {
			h.Mode = 0o755
		}
		h.Size = int64(len(body))
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(body); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"usr/", "usr/bin/", "usr/lib/", "usr/lib/x86_64-linux-gnu/", "usr/lib64/"} {
		add(&tar.Header{Name: d, Typeflag: tar.TypeDir}, nil)
	}
	for n, target := range map[string]string{"bin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib64", "usr/bin/sh": "dash",
		"usr/lib64/ld-linux-x86-64.so.2": "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"} {
		add(&tar.Header{Name: n, Typeflag: tar.TypeSymlink, Linkname: target, Mode: 0o777}, nil)
	}
	for _, f := range []string{"usr/bin/dash", "usr/lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"} {
		b, err := os.ReadFile(filepath.Join(baseRootfs, f))
		if err != nil {
			t.Fatal(err)
		}
		add(&tar.Header{Name: f, Typeflag: tar.TypeReg}, b)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	var etc bytes.Buffer
	tw = tar.NewWriter(&etc)
	tw2 := tw
	add2 := func(h *tar.Header, body []byte) {
		h.Size = int64(len(body))
		if err := tw2.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		_, _ = tw2.Write(body)
	}
	add2(&tar.Header{Name: "etc/", Typeflag: tar.TypeDir, Mode: 0o755}, nil)
	add2(&tar.Header{Name: "etc/passwd", Typeflag: tar.TypeReg, Mode: 0o644}, []byte("root:x:0:0:root:/root:/bin/sh\n"))
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	img := empty.Image
	for _, raw := range [][]byte{buf.Bytes(), etc.Bytes()} {
		l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(raw)), nil })
		if err != nil {
			t.Fatal(err)
		}
		if img, err = mutate.AppendLayers(img, l); err != nil {
			t.Fatal(err)
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Config.Env = []string{"PATH=/usr/bin:/bin", "FROM_IMAGE=yes"}
	cf.Config.WorkingDir = "/data"
	cf.Config.Cmd = []string{"/bin/sh", "-c", "echo image"}
	cf.Config.ExposedPorts = map[string]struct{}{"9000/tcp": {}}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// TestBuildFromImage: FROM an image in the in-process registry, an OCI
// layout and a docker-save tarball; the image's config is the starting
// state, RUN works in it, and the result has the default user.
func TestBuildFromImage(t *testing.T) {
	h := newHarness(t)
	img := miniImage(t, h.tpl.Rootfs)

	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	ref := strings.TrimPrefix(srv.URL, "http://") + "/test/mini:1"
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
	lp, err := layout.Write(filepath.Join(h.dir, "layout"), empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := lp.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "mini"})); err != nil {
		t.Fatal(err)
	}
	tag, _ := name.NewTag("mini:1")
	archive := filepath.Join(h.dir, "mini.tar")
	if err := tarball.WriteToFile(archive, tag, img); err != nil {
		t.Fatal(err)
	}
	digest, _ := img.Digest()

	for _, tc := range []struct{ name, from string }{
		{"registry", ref},
		{"oci-layout", "oci-layout:" + filepath.Join(h.dir, "layout") + ":mini"},
		{"docker-archive", "docker-archive:" + archive + ":mini:1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			var log buildLog
			res, err := h.b.Build(ctx, Options{
				Dockerfile: []byte("FROM " + tc.from + "\nRUN echo \"built on $FROM_IMAGE as $(id -u 2>/dev/null || echo root)\" > made.txt\nENV X=1\n"),
				Output:     filepath.Join(h.dir, "out-"+tc.name),
				Log:        log.add,
			})
			if err != nil {
				t.Fatalf("build: %v\nlog:\n%s", err, log.text())
			}
			// The same image from any source is the same base: the RUN
			// built from the registry's copy serves the others.
			if cached := log.cached()[2]; cached != (tc.name != "registry") {
				t.Errorf("RUN cached = %v\nlog:\n%s", cached, log.text())
			}
			if got := readFile(t, filepath.Join(res.Rootfs, "data/made.txt")); got != "built on yes as root\n" {
				t.Errorf("made.txt = %q", got)
			}
			if pw := readFile(t, filepath.Join(res.Rootfs, "etc/passwd")); !strings.HasPrefix(pw, "root:x:0:0:") || !strings.Contains(pw, "\nuser:x:1000:1000::/home/user:/bin/sh\n") {
				t.Errorf("/etc/passwd = %q, want root and the default user", pw)
			}
			if g := readFile(t, filepath.Join(res.Rootfs, "etc/group")); !strings.Contains(g, "user:x:1000:") {
				t.Errorf("/etc/group = %q", g)
			}
			var st syscall.Stat_t
			if err := syscall.Stat(filepath.Join(res.Rootfs, "home/user"), &st); err != nil || st.Uid != 1000 || st.Gid != 1000 {
				t.Errorf("/home/user: %v, uid %d", err, st.Uid)
			}
			md := res.Metadata
			if md.Base != "image:"+digest.String() || md.WorkingDir != "/data" || strings.Join(md.Cmd, " ") != "/bin/sh -c echo image" ||
				strings.Join(md.ExposedPorts, ",") != "9000/tcp" || strings.Join(md.Env, " ") != "PATH=/usr/bin:/bin FROM_IMAGE=yes X=1" {
				t.Errorf("metadata = %+v", md)
			}
		})
	}
}
