package image

import (
	"archive/tar"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

var appConfig = v1.Config{
	Env:          []string{"PATH=/usr/local/bin:/usr/bin:/bin", "APP=1"},
	Entrypoint:   []string{"/bin/app"},
	Cmd:          []string{"--port", "8080"},
	WorkingDir:   "/srv",
	User:         "1000:1000",
	ExposedPorts: map[string]struct{}{"8080/tcp": {}, "53/udp": {}},
	Labels:       map[string]string{"org.opencontainers.image.title": "app"},
}

// appImage is a two-layer image with a run configuration: a base layer and
// one that deletes and replaces some of it.
func appImage(t testing.TB, out string) v1.Image {
	t.Helper()
	return imageOf(t, appConfig, layersOf(t, out,
		[]ent{{name: "bin/", typ: tar.TypeDir}, {name: "bin/app", body: "v1", mode: 0o755},
			{name: "etc/", typ: tar.TypeDir}, {name: "etc/old", body: "old"}},
		[]ent{{name: "bin/app", body: "v2", mode: 0o755}, {name: "etc/.wh.old"},
			{name: "srv/", typ: tar.TypeDir}, {name: "srv/index.html", body: "hello"}},
	)...)
}

func checkApp(t testing.TB, root string) {
	t.Helper()
	want := []string{"bin", "bin/app", "etc", "srv", "srv/index.html"}
	if got := tree(t, root); !slices.Equal(got, want) {
		t.Errorf("tree = %q, want %q", got, want)
	}
	if got := readFile(t, filepath.Join(root, "bin/app")); got != "v2" {
		t.Errorf("bin/app = %q", got)
	}
}

func digestOf(t testing.TB, img v1.Image) v1.Hash {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// TestConfigOf returns what a template needs from the image config.
func TestConfigOf(t *testing.T) {
	c, err := ConfigOf(appImage(t, ""))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(c.Env, appConfig.Env) || !slices.Equal(c.Entrypoint, appConfig.Entrypoint) ||
		!slices.Equal(c.Cmd, appConfig.Cmd) || c.WorkingDir != "/srv" || c.User != "1000:1000" ||
		!slices.Equal(c.ExposedPorts, []string{"53/udp", "8080/tcp"}) || c.Labels["org.opencontainers.image.title"] != "app" {
		t.Errorf("ConfigOf = %+v", c)
	}
}

// TestFromRegistry pushes images and indexes to the in-process registry
// on loopback and pulls them back.
func TestFromRegistry(t *testing.T) {
	needRoot(t)
	ctx := unpackCtx(t)
	reg := newRegistry(t)
	push := func(ref string, img v1.Image) {
		t.Helper()
		if err := remote.Write(mustRef(t, ref), img, remote.WithContext(ctx)); err != nil {
			t.Fatal(err)
		}
	}
	app := appImage(t, "")
	push(reg+"/app:1", app)

	// An index whose amd64 entry is the app, beside arm64 and a variant.
	arm := imageFor(t, "arm64", v1.Config{}, layersOf(t, "", []ent{{name: "arm", body: "arm"}})...)
	v3 := imageOf(t, v1.Config{}, layersOf(t, "", []ent{{name: "v3", body: "v3"}})...)
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}},
		mutate.IndexAddendum{Add: v3, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64", Variant: "v3"}}},
		mutate.IndexAddendum{Add: app, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
	)
	if err := remote.WriteIndex(mustRef(t, reg+"/multi:1"), idx, remote.WithContext(ctx)); err != nil {
		t.Fatal(err)
	}
	// An index with no amd64 entry, and a lone arm64 image.
	armIdx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}})
	if err := remote.WriteIndex(mustRef(t, reg+"/armonly:1"), armIdx, remote.WithContext(ctx)); err != nil {
		t.Fatal(err)
	}
	push(reg+"/arm:1", arm)

	appDigest := digestOf(t, app)
	for _, tc := range []struct {
		ref  string
		want error
	}{
		{ref: reg + "/app:1"},
		{ref: reg + "/app@" + appDigest.String()},
		{ref: reg + "/multi:1"},
		{ref: reg + "/armonly:1", want: ErrNoPlatform},
		{ref: reg + "/arm:1", want: ErrNoPlatform},
		{ref: reg + "/missing:1", want: errAny},
		{ref: "Not A Reference", want: errAny},
	} {
		t.Run(strings.TrimPrefix(tc.ref, reg+"/"), func(t *testing.T) {
			img, err := FromRegistry(ctx, tc.ref, RegistryOptions{})
			if tc.want != nil {
				if err == nil || (tc.want != errAny && !errors.Is(err, tc.want)) {
					t.Fatalf("FromRegistry: %v, want %v", err, tc.want)
				}
				t.Log(err)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if d := digestOf(t, img); d != appDigest {
				t.Fatalf("resolved to %s, want the amd64 image %s", d, appDigest)
			}
			root := filepath.Join(t.TempDir(), "rootfs")
			res, err := Unpack(ctx, img, root, Limits{})
			if err != nil {
				t.Fatal(err)
			}
			checkApp(t, root)
			if res.Layers != 2 {
				t.Errorf("result = %+v", res)
			}
			if c, err := ConfigOf(img); err != nil || !slices.Equal(c.Cmd, appConfig.Cmd) {
				t.Errorf("ConfigOf = %+v, %v", c, err)
			}
		})
	}
}

// errAny marks a case that must fail, however.
var errAny = errors.New("any error")

// TestFromRegistryCorruptLayer serves a layer whose bytes do not match its
// digest: the unpack fails when the digest is checked at the layer's end
// (having read the whole layer), so the caller discards the directory.
func TestFromRegistryCorruptLayer(t *testing.T) {
	needRoot(t)
	ctx := unpackCtx(t)
	good := layerFromBytes(t, tarBytes(t, "", ent{name: "a", body: "good"}))
	evil, err := io.ReadAll(mustCompressed(t, layerFromBytes(t, tarBytes(t, "", ent{name: "a", body: "evil"}))))
	if err != nil {
		t.Fatal(err)
	}
	gd, err := good.Digest()
	if err != nil {
		t.Fatal(err)
	}
	h := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+gd.String()) {
			w.Write(evil)
			return
		}
		h.ServeHTTP(w, r)
	}))
	defer srv.Close()
	reg := strings.TrimPrefix(srv.URL, "http://")
	if err := remote.Write(mustRef(t, reg+"/c:1"), imageOf(t, v1.Config{}, good), remote.WithContext(ctx)); err != nil {
		t.Fatal(err)
	}
	img, err := FromRegistry(ctx, reg+"/c:1", RegistryOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = Unpack(ctx, img, t.TempDir(), Limits{})
	if err == nil || !strings.Contains(err.Error(), "layer 1") {
		t.Fatalf("Unpack of a corrupt layer: %v", err)
	}
	t.Log(err)
}

func mustCompressed(t testing.TB, l v1.Layer) io.Reader {
	t.Helper()
	rc, err := l.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rc.Close() })
	return rc
}

// TestFromLayout reads an OCI image layout directory: by ref name, and by
// platform through a nested index.
func TestFromLayout(t *testing.T) {
	needRoot(t)
	ctx := unpackCtx(t)
	dir := t.TempDir()
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	app := appImage(t, "")
	other := imageOf(t, v1.Config{}, layersOf(t, "", []ent{{name: "other", body: "o"}})...)
	if err := p.AppendImage(other, layout.WithAnnotations(map[string]string{refNameAnnotation: "other"})); err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(app, layout.WithAnnotations(map[string]string{refNameAnnotation: "example.com/app:1.0"})); err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{"example.com/app:1.0", "1.0"} {
		img, err := FromLayout(ctx, dir, ref)
		if err != nil {
			t.Fatalf("FromLayout %q: %v", ref, err)
		}
		if digestOf(t, img) != digestOf(t, app) {
			t.Fatalf("FromLayout %q picked the wrong image", ref)
		}
	}
	if _, err := FromLayout(ctx, dir, "nope"); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("FromLayout of a missing name: %v", err)
	}
	img, err := FromLayout(ctx, dir, "1.0")
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(t.TempDir(), "rootfs")
	if _, err := Unpack(ctx, img, root, Limits{}); err != nil {
		t.Fatal(err)
	}
	checkApp(t, root)

	// A layout whose only entry is a multi-platform index.
	dir2 := t.TempDir()
	arm := imageFor(t, "arm64", v1.Config{}, layersOf(t, "", []ent{{name: "arm", body: "arm"}})...)
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}},
		mutate.IndexAddendum{Add: app, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}})
	p2, err := layout.Write(dir2, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p2.AppendIndex(idx); err != nil {
		t.Fatal(err)
	}
	img, err = FromLayout(ctx, dir2, "")
	if err != nil {
		t.Fatal(err)
	}
	if digestOf(t, img) != digestOf(t, app) {
		t.Fatal("FromLayout through a nested index picked the wrong image")
	}
	if _, err := FromLayout(ctx, t.TempDir(), ""); err == nil {
		t.Fatal("FromLayout of an empty directory succeeded")
	}
}

// TestFromTarball reads `docker save` tarballs: one image, and one of
// several by tag.
func TestFromTarball(t *testing.T) {
	needRoot(t)
	ctx := unpackCtx(t)
	dir := t.TempDir()
	app := appImage(t, "")
	one := filepath.Join(dir, "one.tar")
	if err := tarball.WriteToFile(one, mustTag(t, "example.com/app:1.0"), app); err != nil {
		t.Fatal(err)
	}
	rnd, err := random.Image(512, 1)
	if err != nil {
		t.Fatal(err)
	}
	many := filepath.Join(dir, "many.tar")
	if err := tarball.MultiWriteToFile(many, map[name.Tag]v1.Image{
		mustTag(t, "example.com/app:1.0"):   app,
		mustTag(t, "example.com/other:2.0"): rnd,
	}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ path, tag string }{{one, ""}, {one, "example.com/app:1.0"}, {many, "example.com/app:1.0"}} {
		img, err := FromTarball(ctx, tc.path, tc.tag)
		if err != nil {
			t.Fatalf("FromTarball(%s, %q): %v", filepath.Base(tc.path), tc.tag, err)
		}
		root := filepath.Join(t.TempDir(), "rootfs")
		if _, err := Unpack(ctx, img, root, Limits{}); err != nil {
			t.Fatal(err)
		}
		checkApp(t, root)
		if c, err := ConfigOf(img); err != nil || c.WorkingDir != "/srv" {
			t.Errorf("ConfigOf = %+v, %v", c, err)
		}
	}
	if _, err := FromTarball(ctx, many, ""); err == nil {
		t.Error("FromTarball of a two-image tarball without a tag succeeded")
	}
	if _, err := FromTarball(ctx, filepath.Join(dir, "missing.tar"), ""); err == nil {
		t.Error("FromTarball of a missing file succeeded")
	}
}

func mustRef(t testing.TB, s string) name.Reference {
	t.Helper()
	r, err := name.ParseReference(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func mustTag(t testing.TB, s string) name.Tag {
	t.Helper()
	r, err := name.NewTag(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}
