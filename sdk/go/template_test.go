package pandastack

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"io"
	"os"
	"path/filepath"
	"sort"
	"testing"
)

func TestDockerignore(t *testing.T) {
	d, err := parseDockerignore("# comment\n\n*.log\n/build\n**/*.key\n!keep.log\nsub/*/tmp\ndocs/[a-c]?.md\n")
	if err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]bool{
		"a.log": true, "keep.log": false, "dir/a.log": false,
		"build": true, "build/x/y": true, "builder": false,
		"x.key": true, "a/b/c.key": true, "a/b/c.keys": false,
		"sub/1/tmp": true, "sub/1/tmp/f": true, "sub/1/2/tmp": false,
		"docs/ab.md": true, "docs/db.md": false, "Dockerfile": false,
	} {
		if got := d.excludes(path); got != want {
			t.Errorf("excludes(%q) = %v, want %v", path, got, want)
		}
	}
	if _, err := parseDockerignore("a[\n"); err == nil {
		t.Error("a bad pattern was accepted")
	}
}

// TestWriteContext: links are sent as links (never followed), other files
// with their content and mode, ignored ones not at all, a Dockerfile from
// outside under the name it was given.
func TestWriteContext(t *testing.T) {
	dir := t.TempDir()
	outside := filepath.Join(t.TempDir(), "Dockerfile")
	os.WriteFile(outside, []byte("FROM base\n"), 0o644)
	os.MkdirAll(filepath.Join(dir, "src", "skip"), 0o755)
	os.WriteFile(filepath.Join(dir, "src", "run.sh"), []byte("#!/bin/sh\n"), 0o755)
	os.WriteFile(filepath.Join(dir, "src", "skip", "x"), []byte("x"), 0o644)
	os.WriteFile(filepath.Join(dir, ".dockerignore"), []byte("src/skip\n"), 0o644)
	os.Symlink("/etc/shadow", filepath.Join(dir, "abs"))
	os.Symlink("../../outside", filepath.Join(dir, "src", "rel"))

	ign, err := readDockerignore(dir)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := writeContext(&buf, dir, ".pandastack-dockerfile-x", outside, ign); err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(&buf)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	got := map[string]string{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		got[h.Name] = string(rune(h.Typeflag)) + " " + h.Linkname + " " + string(b)
		if h.Name == "src/run.sh" && h.Mode&0o111 == 0 {
			t.Errorf("run.sh lost its mode: %o", h.Mode)
		}
	}
	want := map[string]string{
		".dockerignore":            "0  src/skip\n",
		"abs":                      "2 /etc/shadow ",
		"src/":                     "5  ",
		"src/rel":                  "2 ../../outside ",
		"src/run.sh":               "0  #!/bin/sh\n",
		".pandastack-dockerfile-x": "0  FROM base\n",
	}
	var names []string
	for n := range got {
		names = append(names, n)
	}
	sort.Strings(names)
	if len(got) != len(want) {
		t.Errorf("archive holds %v", names)
	}
	for n, w := range want {
		if got[n] != w {
			t.Errorf("%s: got %q, want %q", n, got[n], w)
		}
	}
}
