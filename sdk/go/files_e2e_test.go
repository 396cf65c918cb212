package pandastack_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemontest"
	pandastack "github.com/pandastack/pandastack/sdk/go"
)

// TestFilesRealServer runs the SDK's Files surface against a real server.
func TestFilesRealServer(t *testing.T) {
	s := daemontest.Start(t, nil)
	c := s.Client(t)
	ctx := context.Background()
	sb, err := c.Create(ctx, pandastack.CreateOptions{TTL: 10 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer sb.Close()
	f := sb.Files()

	data := bytes.Repeat([]byte("0123456789"), 300_000)
	fi, err := f.WriteFile(ctx, "/home/user/dir/data.bin", data, pandastack.WriteOptions{Parents: true, Mode: 0o600})
	if err != nil || fi.Size != int64(len(data)) || fi.Owner != "user" || fi.Mode != 0o600 {
		t.Fatalf("write: %+v %v", fi, err)
	}
	if got, err := f.ReadFile(ctx, "/home/user/dir/data.bin"); err != nil || !bytes.Equal(got, data) {
		t.Errorf("read back: %d bytes, %v; want %d", len(got), err, len(data))
	}
	rc, err := f.Read(ctx, "/home/user/dir/data.bin", pandastack.ReadOptions{Offset: 3, Length: 4})
	if err != nil {
		t.Fatal(err)
	}
	var part bytes.Buffer
	part.ReadFrom(rc)
	rc.Close()
	if part.String() != "3456" {
		t.Errorf("range: got %q", part.String())
	}
	if ok, err := f.Exists(ctx, "/home/user/dir/data.bin"); !ok || err != nil {
		t.Errorf("exists: %v %v", ok, err)
	}
	if ok, err := f.Exists(ctx, "/home/user/nope"); ok || err != nil {
		t.Errorf("exists of a missing file: %v %v", ok, err)
	}
	if _, err := f.Stat(ctx, "/home/user/nope"); !errors.Is(err, pandastack.ErrNotFound) {
		t.Errorf("stat of a missing file: %v, want ErrNotFound", err)
	}
	if _, err := f.WriteFile(ctx, "/etc/nope", []byte("x"), pandastack.WriteOptions{}); !errors.Is(err, pandastack.ErrConflict) {
		t.Errorf("write into /etc as the user: %v, want ErrConflict (permission denied)", err)
	}
	if fi, err := f.As("root").WriteFile(ctx, "/etc/pandastack-test", []byte("x"), pandastack.WriteOptions{}); err != nil || fi.Owner != "root" {
		t.Errorf("write as root: %+v %v", fi, err)
	}
	if _, err := f.MakeDir(ctx, "/home/user/dir/a/b", pandastack.MakeDirOptions{Parents: true}); err != nil {
		t.Fatal(err)
	}
	l, err := f.List(ctx, "/home/user/dir", 2)
	if err != nil || len(l.Entries) != 3 {
		t.Errorf("list: %+v %v", l, err)
	}
	if fi, err := f.Rename(ctx, "/home/user/dir/data.bin", "/home/user/dir/a/data.bin"); err != nil || fi.Path != "/home/user/dir/a/data.bin" {
		t.Errorf("rename: %+v %v", fi, err)
	}

	// A local tree up, and down again.
	local := t.TempDir()
	if err := os.MkdirAll(filepath.Join(local, "src", "pkg"), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, body := range map[string]string{"src/main.py": "print('hi')\n", "src/pkg/__init__.py": "", "README": "read me"} {
		if err := os.WriteFile(filepath.Join(local, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	res, err := f.UploadDir(ctx, local, "/home/user/project")
	if err != nil || res.Files != 3 || res.Dirs != 2 {
		t.Fatalf("upload: %+v %v", res, err)
	}
	out, err := sb.Exec(ctx, "cd /home/user/project && python3 src/main.py 2>/dev/null || cat src/main.py; stat -c %U src/pkg/__init__.py", pandastack.ExecOptions{})
	if err != nil || out.Stdout != "print('hi')\nuser\n" {
		t.Errorf("uploaded tree in the sandbox: %+v %v", out, err)
	}
	back := t.TempDir()
	if err := f.DownloadDir(ctx, "/home/user/project", back); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(back, "src", "main.py")); err != nil || string(b) != "print('hi')\n" {
		t.Errorf("downloaded: %q %v", b, err)
	}

	// Watch: the events of changes made after Watch returns.
	w, err := f.Watch(ctx, "/home/user/project", pandastack.WatchOptions{Recursive: true})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if _, err := f.WriteFile(ctx, "/home/user/project/src/pkg/new.py", []byte("x"), pandastack.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := f.Remove(ctx, "/home/user/project/README", pandastack.RemoveOptions{}); err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{"renamed /home/user/project/src/pkg/new.py": false, "removed /home/user/project/README": false}
	deadline := time.After(3 * time.Minute)
	for left := len(want); left > 0; {
		select {
		case ev, ok := <-w.Events():
			if !ok {
				t.Fatalf("watch ended: %v", w.Err())
			}
			if seen, in := want[ev.Type+" "+ev.Path]; in && !seen {
				want[ev.Type+" "+ev.Path] = true
				left--
			}
		case <-deadline:
			t.Fatalf("events seen: %v", want)
		}
	}
	if err := f.Remove(ctx, "/home/user/project", pandastack.RemoveOptions{Recursive: true}); err != nil {
		t.Fatal(err)
	}
	if ok, _ := f.Exists(ctx, "/home/user/project"); ok {
		t.Error("project still there after a recursive remove")
	}
}
