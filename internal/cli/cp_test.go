package cli

import (
	"archive/tar"
	"bytes"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/pandastack/pandastack/internal/daemontest"
)

func TestParseCpArg(t *testing.T) {
	tests := []struct {
		in   string
		want cpArg
	}{
		{"sb-1:/home/user/f", cpArg{sandbox: "sb-1", path: "/home/user/f"}},
		{"sb-1:", cpArg{sandbox: "sb-1", path: ""}},
		{"./a:b", cpArg{path: "./a:b"}},
		{"/abs/a:b", cpArg{path: "/abs/a:b"}},
		{"local", cpArg{path: "local"}},
		{"-", cpArg{path: "-"}},
		{":x", cpArg{path: ":x"}},
	}
	for _, tt := range tests {
		if got := parseCpArg(tt.in); got != tt.want {
			t.Errorf("parseCpArg(%q): got %+v, want %+v", tt.in, got, tt.want)
		}
	}
}

// TestCpRealServer copies files and directories both ways, and tar streams
// through stdin and stdout, against a real server.
func TestCpRealServer(t *testing.T) {
	s := daemontest.Start(t, nil)
	cli := func(stdin io.Reader, args ...string) (string, error) {
		t.Helper()
		var out, errOut bytes.Buffer
		root := NewRoot()
		root.SetArgs(append([]string{"--url", s.URL, "--api-key", s.Key}, args...))
		root.SetOut(&out)
		root.SetErr(&errOut)
		if stdin != nil {
			root.SetIn(stdin)
		}
		err := root.Execute()
		return out.String(), err
	}
	out, err := cli(nil, "sandbox", "create", "--ttl", "600")
	if err != nil {
		t.Fatal(err)
	}
	id := strings.TrimSpace(out)
	defer cli(nil, "sandbox", "kill", id)
	run := func(cmd string) string {
		t.Helper()
		out, err := cli(nil, "sandbox", "exec", id, "--", cmd)
		if err != nil {
			t.Fatalf("%s: %v", cmd, err)
		}
		return out
	}

	local := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.WriteFile(filepath.Join(local, "note.txt"), []byte("note"), 0o640))
	must(os.MkdirAll(filepath.Join(local, "proj", "sub"), 0o755))
	must(os.WriteFile(filepath.Join(local, "proj", "sub", "x"), []byte("x"), 0o644))

	steps := []struct {
		name  string
		args  []string
		stdin io.Reader
		check func(t *testing.T)
	}{
		{"file into a directory", []string{filepath.Join(local, "note.txt"), id + ":/home/user/"}, nil, func(t *testing.T) {
			if got := run("cat /home/user/note.txt; stat -c ' %a %U' /home/user/note.txt"); got != "note 640 user\n" {
				t.Errorf("got %q", got)
			}
		}},
		{"file to a new name", []string{filepath.Join(local, "note.txt"), id + ":/home/user/renamed.txt"}, nil, func(t *testing.T) {
			if got := run("cat /home/user/renamed.txt"); got != "note" {
				t.Errorf("got %q", got)
			}
		}},
		{"directory to a new path", []string{filepath.Join(local, "proj"), id + ":/home/user/p2"}, nil, func(t *testing.T) {
			if got := run("cat /home/user/p2/sub/x"); got != "x" {
				t.Errorf("got %q", got)
			}
		}},
		{"directory into an existing one", []string{filepath.Join(local, "proj"), id + ":/home/user"}, nil, func(t *testing.T) {
			if got := run("cat /home/user/proj/sub/x"); got != "x" {
				t.Errorf("got %q", got)
			}
		}},
		{"file out", []string{id + ":/home/user/note.txt", filepath.Join(local, "back.txt")}, nil, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join(local, "back.txt"))
			fi, _ := os.Stat(filepath.Join(local, "back.txt"))
			if string(b) != "note" || err != nil || fi.Mode().Perm() != 0o640 {
				t.Errorf("got %q %v %v", b, err, fi.Mode())
			}
		}},
		{"directory out to a new path", []string{id + ":/home/user/proj", filepath.Join(local, "out")}, nil, func(t *testing.T) {
			if b, err := os.ReadFile(filepath.Join(local, "out", "sub", "x")); string(b) != "x" || err != nil {
				t.Errorf("got %q %v", b, err)
			}
		}},
		{"directory out into an existing one", []string{id + ":/home/user/proj", filepath.Join(local, "out")}, nil, func(t *testing.T) {
			if b, err := os.ReadFile(filepath.Join(local, "out", "proj", "sub", "x")); string(b) != "x" || err != nil {
				t.Errorf("got %q %v", b, err)
			}
		}},
		{"tar from stdin", []string{"-", id + ":/home/user/fromtar"}, bytes.NewReader(testTar(t, "a/b", "from stdin")), func(t *testing.T) {
			if got := run("cat /home/user/fromtar/a/b"); got != "from stdin" {
				t.Errorf("got %q", got)
			}
		}},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			if _, err := cli(st.stdin, append([]string{"sandbox", "cp"}, st.args...)...); err != nil {
				t.Fatal(err)
			}
			st.check(t)
		})
	}
	// A tar to stdout.
	out, err = cli(nil, "sandbox", "cp", id+":/home/user/proj", "-")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	tr := tar.NewReader(strings.NewReader(out))
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
	if got := strings.Join(names, " "); got != "sub/ sub/x" {
		t.Errorf("tar to stdout: got %q, want %q", got, "sub/ sub/x")
	}
	// Errors.
	for _, args := range [][]string{
		{"a", "b"},
		{id + ":/x", id + ":/y"},
		{"a", id + ":relative"},
		{id + ":/home/user/missing", filepath.Join(local, "m")},
	} {
		if _, err := cli(nil, append([]string{"sandbox", "cp"}, args...)...); err == nil {
			t.Errorf("cp %v: no error", args)
		}
	}
}

func testTar(t *testing.T, name, body string) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body))}); err != nil {
		t.Fatal(err)
	}
	io.WriteString(tw, body)
	tw.Close()
	return buf.Bytes()
}
