package daemon_test

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"io"
	mrand "math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/wire"
)

// The Files API against real sandboxes: every path resolves inside the
// sandbox (never on the host), hostile paths and archives cannot reach
// outside what they target, uploads are bounded by the sandbox's disk and
// stream through the daemon, and files belong to whom they were written as.

// filesPath is the API path of a sandbox's file route.
func filesPath(id, route string, q url.Values) string {
	p := "/v1/sandboxes/" + id + "/files" + route
	if len(q) > 0 {
		p += "?" + q.Encode()
	}
	return p
}

// doBody sends a request whose body is r (streamed; nil for none).
func doBody(t testing.TB, s *daemontest.Server, method, path string, r io.Reader, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, s.URL+path, r)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+s.Key)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

// putFile writes content to path (query options in extra: key, value…).
func putFile(t testing.TB, s *daemontest.Server, id, path, content string, extra ...string) (*http.Response, []byte) {
	t.Helper()
	q := url.Values{"path": {path}}
	for i := 0; i+1 < len(extra); i += 2 {
		q.Set(extra[i], extra[i+1])
	}
	return doBody(t, s, "PUT", filesPath(id, "", q), strings.NewReader(content))
}

func getFile(t testing.TB, s *daemontest.Server, id, path string, extra ...string) (*http.Response, []byte) {
	t.Helper()
	q := url.Values{"path": {path}}
	for i := 0; i+1 < len(extra); i += 2 {
		q.Set(extra[i], extra[i+1])
	}
	return doBody(t, s, "GET", filesPath(id, "", q), nil)
}

// sh runs a command as root in the sandbox and returns its stdout.
func sh(t testing.TB, s *daemontest.Server, id, cmd string) string {
	t.Helper()
	res := s.Exec(t, id, wire.ExecRequest{Cmd: cmd, User: wire.UserRoot})
	if res.ExitCode != 0 {
		t.Fatalf("%s: exit %d: %s %s", cmd, res.ExitCode, res.Stdout, res.Stderr)
	}
	return res.Stdout
}

// hostDir makes a directory on the host that sandboxes' paths and links
// name: nothing may appear in it.
func hostDir(t *testing.T) string {
	t.Helper()
	var b [6]byte
	_, _ = rand.Read(b[:])
	d := "/tmp/pandastack-files-host-" + hex.EncodeToString(b[:])
	if err := os.Mkdir(d, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	if err := os.WriteFile(d+"/secret", []byte("host secret"), 0o644); err != nil {
		t.Fatal(err)
	}
	return d
}

// checkHostDir fails unless d holds only its secret, unchanged.
func checkHostDir(t *testing.T, d string) {
	t.Helper()
	entries, _ := os.ReadDir(d)
	b, _ := os.ReadFile(d + "/secret")
	if len(entries) != 1 || string(b) != "host secret" {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Errorf("host directory %s: got %v, secret %q; want only the secret, unchanged", d, names, b)
	}
}

func wantStatus(t *testing.T, what string, resp *http.Response, body []byte, want int) {
	t.Helper()
	if resp.StatusCode != want {
		t.Errorf("%s: got %d %s, want %d", what, resp.StatusCode, body, want)
	}
	if want >= 400 && resp.StatusCode == want {
		if e := errorBody(t, body); e.Message == "" || e.RequestID == "" {
			t.Errorf("%s: error body %s lacks a message or request id", what, body)
		}
	}
}

// TestFilesOperations: every operation once, through the API, in a real
// sandbox, with the owners files get.
func TestFilesOperations(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 1200})
	id := sb.ID

	resp, b := putFile(t, s, id, "/home/user/a/b/c.txt", "hello\n", "parents", "true", "mode", "640")
	var fi wire.FileInfo
	if resp.StatusCode != 200 || json.Unmarshal(b, &fi) != nil || fi.Size != 6 || fi.Mode != 0o640 || fi.Owner != "user" || fi.Type != wire.FileTypeFile {
		t.Fatalf("write: %d %s, want 200 with size 6, mode 0640, owner user", resp.StatusCode, b)
	}
	if resp, b := getFile(t, s, id, "/home/user/a/b/c.txt"); resp.StatusCode != 200 || string(b) != "hello\n" ||
		resp.Header.Get("Content-Length") != "6" || resp.Header.Get("Content-Type") != "application/octet-stream" {
		t.Errorf("read: %d %q %v", resp.StatusCode, b, resp.Header)
	}
	if resp, b := getFile(t, s, id, "/home/user/a/b/c.txt", "offset", "1", "length", "3"); string(b) != "ell" {
		t.Errorf("read a range: %d %q, want %q", resp.StatusCode, b, "ell")
	}
	// Files and the parents a write makes belong to the user they were
	// written as: the sandbox's default user unless root is asked for.
	putFile(t, s, id, "/home/user/r/root.txt", "r", "parents", "true", "user", "root")
	if got := sh(t, s, id, "stat -c %U /home/user/a /home/user/a/b /home/user/a/b/c.txt /home/user/r /home/user/r/root.txt"); got != "user\nuser\nuser\nroot\nroot\n" {
		t.Errorf("owners: got %q, want user for what user wrote, root for what root wrote", got)
	}
	if got := sh(t, s, id, "stat -c %a /home/user/a/b/c.txt"); got != "640\n" {
		t.Errorf("mode: got %q, want 640", got)
	}

	// stat is exists: 404 when absent.
	resp, b = doBody(t, s, "GET", filesPath(id, "/stat", url.Values{"path": {"/home/user/a"}}), nil)
	if resp.StatusCode != 200 || json.Unmarshal(b, &fi) != nil || fi.Type != wire.FileTypeDir || fi.Owner != "user" {
		t.Errorf("stat: %d %s", resp.StatusCode, b)
	}
	resp, b = doBody(t, s, "GET", filesPath(id, "/stat", url.Values{"path": {"/home/user/nope"}}), nil)
	wantStatus(t, "stat of a missing path", resp, b, 404)

	resp, b = doBody(t, s, "GET", filesPath(id, "/list", url.Values{"path": {"/home/user/a"}, "depth": {"2"}}), nil)
	var l wire.FileList
	if resp.StatusCode != 200 || json.Unmarshal(b, &l) != nil || len(l.Entries) != 2 || l.Entries[0].Path != "/home/user/a/b" || l.Entries[1].Path != "/home/user/a/b/c.txt" {
		t.Errorf("list: %d %s", resp.StatusCode, b)
	}

	resp, b = s.Do(t, "POST", filesPath(id, "/mkdir", nil), wire.MakeDirRequest{Path: "/home/user/m/n", Parents: true})
	if resp.StatusCode != 200 || sh(t, s, id, "stat -c %U /home/user/m/n") != "user\n" {
		t.Errorf("mkdir: %d %s", resp.StatusCode, b)
	}
	resp, b = s.Do(t, "POST", filesPath(id, "/mkdir", nil), wire.MakeDirRequest{Path: "/home/user/a/b/c.txt"})
	wantStatus(t, "mkdir over a file", resp, b, 409)
	resp, b = s.Do(t, "POST", filesPath(id, "/rename", nil), wire.RenameRequest{From: "/home/user/a/b/c.txt", To: "/home/user/m/c2.txt"})
	if resp.StatusCode != 200 || sh(t, s, id, "cat /home/user/m/c2.txt") != "hello\n" {
		t.Errorf("rename: %d %s", resp.StatusCode, b)
	}
	resp, b = s.Do(t, "POST", filesPath(id, "/remove", nil), wire.RemoveRequest{Path: "/home/user/m"})
	wantStatus(t, "remove of a full directory without recursive", resp, b, 409)
	resp, b = s.Do(t, "POST", filesPath(id, "/remove", nil), wire.RemoveRequest{Path: "/home/user/m", Recursive: true})
	if resp.StatusCode != 204 || sh(t, s, id, "test -e /home/user/m || echo gone") != "gone\n" {
		t.Errorf("remove -r: %d %s", resp.StatusCode, b)
	}
	resp, b = getFile(t, s, id, "/home/user")
	wantStatus(t, "read of a directory", resp, b, 409)
	resp, b = getFile(t, s, id, "home/user/x")
	wantStatus(t, "relative path", resp, b, 400)
	resp, b = putFile(t, s, id, "/home/user/x", "x", "user", "nobody-here")
	wantStatus(t, "unknown user", resp, b, 400)

	// A directory down and up again as tar streams.
	sh(t, s, id, "mkdir -p /home/user/tree/sub && echo one > /home/user/tree/one && echo two > /home/user/tree/sub/two && ln -s one /home/user/tree/link && chown -R user:user /home/user/tree")
	resp, archive := doBody(t, s, "GET", filesPath(id, "/tar", url.Values{"path": {"/home/user/tree"}}), nil)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/x-tar" {
		t.Fatalf("tar download: %d %s", resp.StatusCode, archive)
	}
	resp, b = doBody(t, s, "PUT", filesPath(id, "/tar", url.Values{"path": {"/home/user/copy"}}), bytes.NewReader(archive))
	var res wire.UploadResult
	if resp.StatusCode != 200 || json.Unmarshal(b, &res) != nil || res.Files != 2 || res.Dirs != 1 || res.Symlinks != 1 {
		t.Errorf("tar upload: %d %s", resp.StatusCode, b)
	}
	if got := sh(t, s, id, "cd /home/user/copy && cat one sub/two && readlink link && stat -c %U . one sub sub/two"); got != "one\ntwo\none\nuser\nuser\nuser\nuser\n" {
		t.Errorf("uploaded tree: got %q", got)
	}
}

// TestFilesPathEscapes: each way a path could leave the sandbox or gain
// rights it should not have, as its own case. Paths resolve inside the
// sandbox with the caller's permissions; the host is never touched.
func TestFilesPathEscapes(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 1200})
	id := sb.ID
	host := hostDir(t)
	passwd := sh(t, s, id, "sha256sum /etc/passwd")
	// What sandbox code plants, as the sandbox's user.
	s.Exec(t, id, wire.ExecRequest{Cmd: "ln -s /etc/passwd ~/link-passwd; ln -s /etc ~/link-etc; ln -s /etc/shadow ~/link-shadow; " +
		"ln -s " + host + " ~/link-host; ln -s " + host + "/secret ~/link-host-secret; mkdir ~/victim"})

	tests := []struct {
		name       string
		do         func() (*http.Response, []byte)
		wantStatus int
		// check inspects the sandbox after the call; "" to skip.
		check, want string
	}{
		{
			name:       "dot-dot in a read stays in the sandbox",
			do:         func() (*http.Response, []byte) { return getFile(t, s, id, "/../../../.."+host+"/secret") },
			wantStatus: 404,
		},
		{
			name: "dot-dot in a write stays in the sandbox",
			do: func() (*http.Response, []byte) {
				return putFile(t, s, id, "/home/user/../../../.."+host+"/evil", "x", "user", "root")
			},
			wantStatus: 404,
		},
		{
			name:       "dot-dot to a sandbox directory",
			do:         func() (*http.Response, []byte) { return putFile(t, s, id, "/home/user/../../tmp/dotdot", "in sandbox") },
			wantStatus: 200,
			check:      "cat /tmp/dotdot", want: "in sandbox",
		},
		{
			name:       "relative path",
			do:         func() (*http.Response, []byte) { return getFile(t, s, id, "../etc/passwd") },
			wantStatus: 400,
		},
		{
			name:       "NUL byte",
			do:         func() (*http.Response, []byte) { return getFile(t, s, id, "/etc/passwd\x00x") },
			wantStatus: 400,
		},
		{
			name:       "symlink planted to a root file is replaced, not written through",
			do:         func() (*http.Response, []byte) { return putFile(t, s, id, "/home/user/link-passwd", "mine") },
			wantStatus: 200,
			// %s too: gVisor leaves the size out of a statx that does not
			// ask for it, and stat then calls any file empty.
			check: "stat -c '%F %U %s' /home/user/link-passwd; sha256sum /etc/passwd", want: "regular file user 4\n" + passwd,
		},
		{
			name:       "write through a planted symlink to /etc as the user",
			do:         func() (*http.Response, []byte) { return putFile(t, s, id, "/home/user/link-etc/evil", "x") },
			wantStatus: 409,
			check:      "test -e /etc/evil || echo absent", want: "absent",
		},
		{
			name: "mkdir through a planted symlink to /etc as the user",
			do: func() (*http.Response, []byte) {
				return s.Do(t, "POST", filesPath(id, "/mkdir", nil), wire.MakeDirRequest{Path: "/home/user/link-etc/evil"})
			},
			wantStatus: 409,
			check:      "test -e /etc/evil || echo absent", want: "absent",
		},
		{
			name:       "read through a planted symlink to /etc/shadow as the user",
			do:         func() (*http.Response, []byte) { return getFile(t, s, id, "/home/user/link-shadow") },
			wantStatus: 409,
		},
		{
			name: "write through a symlink to a host path",
			do: func() (*http.Response, []byte) {
				return putFile(t, s, id, "/home/user/link-host/evil", "x", "user", "root")
			},
			wantStatus: 404,
		},
		{
			name: "read through a symlink to a host file",
			do: func() (*http.Response, []byte) {
				return getFile(t, s, id, "/home/user/link-host-secret", "user", "root")
			},
			wantStatus: 404,
		},
		{
			name: "recursive remove of a symlink removes the link only",
			do: func() (*http.Response, []byte) {
				return s.Do(t, "POST", filesPath(id, "/remove", nil), wire.RemoveRequest{Path: "/home/user/link-etc", Recursive: true})
			},
			wantStatus: 204,
			check:      "test -e /home/user/link-etc || sha256sum /etc/passwd", want: passwd,
		},
		{
			name: "rename into /etc as the user",
			do: func() (*http.Response, []byte) {
				return s.Do(t, "POST", filesPath(id, "/rename", nil), wire.RenameRequest{From: "/home/user/victim", To: "/etc/victim"})
			},
			wantStatus: 409,
			check:      "test -e /etc/victim || echo absent", want: "absent",
		},
		{
			name: "tar download through a symlink to a host directory",
			do: func() (*http.Response, []byte) {
				return doBody(t, s, "GET", filesPath(id, "/tar", url.Values{"path": {host}}), nil)
			},
			wantStatus: 404,
		},
		{
			name: "watch of a host directory",
			do: func() (*http.Response, []byte) {
				return doBody(t, s, "GET", filesPath(id, "/watch", url.Values{"path": {host}}), nil)
			},
			wantStatus: 404,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, b := tt.do()
			wantStatus(t, tt.name, resp, b, tt.wantStatus)
			if tt.check != "" {
				if got := strings.TrimSuffix(sh(t, s, id, tt.check), "\n"); got != strings.TrimSuffix(tt.want, "\n") {
					t.Errorf("after: %s: got %q, want %q", tt.check, got, tt.want)
				}
			}
			checkHostDir(t, host)
		})
	}
	if got := sh(t, s, id, "sha256sum /etc/passwd"); got != passwd {
		t.Errorf("/etc/passwd changed")
	}
}

// archiveEntry is one entry of a test archive.
type archiveEntry struct {
	hdr  tar.Header
	body string
}

func regEntry(name, body string, mode int64) archiveEntry {
	return archiveEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: mode, Size: int64(len(body))}, body: body}
}

func makeArchive(t testing.TB, entries ...archiveEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(tw, e.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestFilesHostileArchives: each hostile archive as its own case, uploaded
// as root (so that only the extraction's own rules stop it, not the
// sandbox's permissions) into a fresh target.
func TestFilesHostileArchives(t *testing.T) {
	const maxEntries = 500
	s := daemontest.Start(t, func(c *daemon.Config) { c.Sandbox.MaxArchiveEntries = maxEntries })
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 1200})
	id := sb.ID
	host := hostDir(t)
	passwd := sh(t, s, id, "sha256sum /etc/passwd")
	many := make([]archiveEntry, maxEntries+1)
	for i := range many {
		many[i] = regEntry(fmt.Sprintf("f%d", i), "", 0o644)
	}
	tests := []struct {
		name    string
		entries []archiveEntry
		// plant runs (as the sandbox's user) in the target before.
		plant      string
		wantStatus int
		check      string
		want       string
	}{
		{name: "entry ../x", entries: []archiveEntry{regEntry("../x", "x", 0o644)}, wantStatus: 400,
			check: "test -e /home/user/x || echo absent", want: "absent"},
		{name: "entry a/../../x", entries: []archiveEntry{regEntry("a/../../x", "x", 0o644)}, wantStatus: 400,
			check: "test -e /home/user/x || echo absent", want: "absent"},
		{name: "absolute entry lands inside the target", entries: []archiveEntry{regEntry("/etc/cron.d/evil", "x", 0o644)}, wantStatus: 200,
			check: "cat T/etc/cron.d/evil; test -e /etc/cron.d/evil || echo absent", want: "xabsent"},
		{name: "absolute entry to a host path", entries: []archiveEntry{regEntry(host+"/evil", "x", 0o644)}, wantStatus: 200,
			check: "cat T" + host + "/evil", want: "x"},
		{name: "tar symlink to /etc then a file through it",
			entries:    []archiveEntry{{hdr: tar.Header{Name: "l", Typeflag: tar.TypeSymlink, Linkname: "/etc"}}, regEntry("l/evil", "x", 0o644)},
			wantStatus: 400, check: "test -e /etc/evil || echo absent", want: "absent"},
		{name: "tar symlink to a host directory then a file through it",
			entries:    []archiveEntry{{hdr: tar.Header{Name: "l", Typeflag: tar.TypeSymlink, Linkname: host}}, regEntry("l/evil", "x", 0o644)},
			wantStatus: 400},
		{name: "tar symlink up and out then a file through it",
			entries:    []archiveEntry{{hdr: tar.Header{Name: "l", Typeflag: tar.TypeSymlink, Linkname: "../../../../etc"}}, regEntry("l/evil", "x", 0o644)},
			wantStatus: 400, check: "test -e /etc/evil || echo absent", want: "absent"},
		{name: "symlink planted in the target by sandbox code", plant: "ln -s /etc T/planted",
			entries: []archiveEntry{regEntry("planted/evil", "x", 0o644)}, wantStatus: 400,
			check: "test -e /etc/evil || echo absent", want: "absent"},
		{name: "file entry over a planted symlink to /etc/passwd", plant: "ln -s /etc/passwd T/victim",
			entries: []archiveEntry{regEntry("victim", "x", 0o644)}, wantStatus: 200,
			check: "stat -c '%F %s' T/victim; sha256sum /etc/passwd", want: "regular file 1\n" + passwd},
		{name: "hard link to outside the target",
			entries:    []archiveEntry{{hdr: tar.Header{Name: "h", Typeflag: tar.TypeLink, Linkname: "../../../etc/passwd"}}},
			wantStatus: 400, check: "test -e T/h || echo absent", want: "absent"},
		{name: "hard link to an absolute path",
			entries:    []archiveEntry{{hdr: tar.Header{Name: "h", Typeflag: tar.TypeLink, Linkname: "/etc/passwd"}}},
			wantStatus: 400, check: "test -e T/h || echo absent", want: "absent"},
		{name: "hard link inside the archive",
			entries:    []archiveEntry{regEntry("f", "same", 0o644), {hdr: tar.Header{Name: "h", Typeflag: tar.TypeLink, Linkname: "f"}}},
			wantStatus: 200, check: "stat -c %h T/h", want: "2"},
		{name: "device node is skipped",
			entries:    []archiveEntry{{hdr: tar.Header{Name: "mem", Typeflag: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devminor: 1}}},
			wantStatus: 200, check: "test -e T/mem || echo absent", want: "absent"},
		{name: "block device is skipped",
			entries:    []archiveEntry{{hdr: tar.Header{Name: "disk", Typeflag: tar.TypeBlock, Mode: 0o666, Devmajor: 8}}},
			wantStatus: 200, check: "test -e T/disk || echo absent", want: "absent"},
		{name: "FIFO is skipped",
			entries:    []archiveEntry{{hdr: tar.Header{Name: "fifo", Typeflag: tar.TypeFifo, Mode: 0o666}}},
			wantStatus: 200, check: "test -e T/fifo || echo absent", want: "absent"},
		{name: "setuid root file loses its setuid bit",
			entries:    []archiveEntry{{hdr: tar.Header{Name: "suid", Typeflag: tar.TypeReg, Mode: 0o4755, Size: 1, Uid: 0}, body: "x"}},
			wantStatus: 200, check: "stat -c %a T/suid", want: "755"},
		{name: "setgid directory loses its setgid bit",
			entries:    []archiveEntry{{hdr: tar.Header{Name: "sgid", Typeflag: tar.TypeDir, Mode: 0o2775}}},
			wantStatus: 200, check: "stat -c %a T/sgid", want: "775"},
		{name: "too many entries", entries: many, wantStatus: 400},
		{name: "name over PATH_MAX", entries: []archiveEntry{regEntry(strings.Repeat("a/", 2100)+"f", "x", 0o644)}, wantStatus: 400},
		{name: "component over NAME_MAX", entries: []archiveEntry{regEntry(strings.Repeat("n", 300), "x", 0o644)}, wantStatus: 400},
		{name: "not an archive", entries: nil, wantStatus: 400},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			target := fmt.Sprintf("/home/user/up%d", i)
			sh(t, s, id, "mkdir -p "+target+" && chown user:user "+target)
			if tt.plant != "" {
				s.Exec(t, id, wire.ExecRequest{Cmd: strings.ReplaceAll(tt.plant, "T/", target+"/")})
			}
			var archive []byte
			if tt.entries == nil {
				archive = bytes.Repeat([]byte("not an archive "), 1000)
			} else {
				archive = makeArchive(t, tt.entries...)
			}
			resp, b := doBody(t, s, "PUT", filesPath(id, "/tar", url.Values{"path": {target}, "user": {"root"}}), bytes.NewReader(archive))
			wantStatus(t, tt.name, resp, b, tt.wantStatus)
			if tt.check != "" {
				res := s.Exec(t, id, wire.ExecRequest{Cmd: strings.ReplaceAll(tt.check, "T/", target+"/"), User: wire.UserRoot})
				if got := strings.TrimSuffix(res.Stdout, "\n"); got != strings.TrimSuffix(tt.want, "\n") {
					t.Errorf("after: got %q, want %q (stderr %q)", got, tt.want, res.Stderr)
				}
			}
			checkHostDir(t, host)
		})
	}
	if got := sh(t, s, id, "sha256sum /etc/passwd"); got != passwd {
		t.Errorf("/etc/passwd changed")
	}
	if _, err := os.Lstat("/etc/cron.d/evil"); err == nil {
		t.Errorf("an entry reached the host's /etc/cron.d")
	}
}

// gzipTarBomb returns a small gzip-compressed archive that expands to n
// bytes of zeros in one file.
func gzipTarBomb(t testing.TB, n int64) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	tw := tar.NewWriter(zw)
	if err := tw.WriteHeader(&tar.Header{Name: "bomb", Typeflag: tar.TypeReg, Mode: 0o644, Size: n}); err != nil {
		t.Fatal(err)
	}
	zero := make([]byte, 1<<20)
	for left := n; left > 0; left -= int64(len(zero)) {
		if _, err := tw.Write(zero[:min(left, int64(len(zero)))]); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestFilesFullDisk: what does not fit on a sandbox's disk is refused with
// 507 (up front when the request says its size, at ENOSPC inside
// otherwise, and for an archive that expands past the disk), and the
// sandbox stays usable: the partial file is gone and writes work again.
func TestFilesFullDisk(t *testing.T) {
	s := daemontest.Start(t, noPool)
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 1200, DiskMB: 64})
	id := sb.ID
	usable := func(t *testing.T) {
		t.Helper()
		if resp, b := putFile(t, s, id, "/home/user/after", "still works"); resp.StatusCode != 200 {
			t.Fatalf("write after a full disk: %d %s", resp.StatusCode, b)
		}
		if got := sh(t, s, id, "cat /home/user/after; rm /home/user/after; ls -A /home/user | grep -c pandastack || true"); got != "still works0\n" {
			t.Errorf("after a full disk: got %q, want the file and no temporary files", got)
		}
	}
	big := int64(100 << 20)
	tests := []struct {
		name string
		do   func() (*http.Response, []byte)
	}{
		{"write with its size, over the disk", func() (*http.Response, []byte) {
			return doBody(t, s, "PUT", filesPath(id, "", url.Values{"path": {"/home/user/big"}}), io.LimitReader(zeroReader{}, big),
				"Content-Length", fmt.Sprint(big))
		}},
		{"write without its size fills the disk", func() (*http.Response, []byte) {
			// No Content-Length: the body is chunked, and the sandbox's
			// disk is what stops it.
			return doBody(t, s, "PUT", filesPath(id, "", url.Values{"path": {"/home/user/big"}}), struct{ io.Reader }{io.LimitReader(zeroReader{}, big)})
		}},
		{"archive that expands past the disk (tar bomb)", func() (*http.Response, []byte) {
			return doBody(t, s, "PUT", filesPath(id, "/tar", url.Values{"path": {"/home/user/bomb"}}), bytes.NewReader(gzipTarBomb(t, big)),
				"Content-Encoding", "gzip")
		}},
		{"archive of many files past the disk", func() (*http.Response, []byte) {
			entries := make([]archiveEntry, 0, 20)
			chunk := strings.Repeat("z", 8<<20)
			for i := range 12 {
				entries = append(entries, regEntry(fmt.Sprintf("part%d", i), chunk, 0o644))
			}
			return doBody(t, s, "PUT", filesPath(id, "/tar", url.Values{"path": {"/home/user/parts"}}), struct{ io.Reader }{bytes.NewReader(makeArchive(t, entries...))})
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, b := tt.do()
			wantStatus(t, tt.name, resp, b, http.StatusInsufficientStorage)
			if resp.StatusCode == http.StatusInsufficientStorage && errorBody(t, b).Code != wire.CodeInsufficientStorage {
				t.Errorf("code: got %s, want %s", b, wire.CodeInsufficientStorage)
			}
			// What an archive made before the disk filled may stay; the
			// test removes it, as its owner would.
			sh(t, s, id, "rm -rf /home/user/bomb /home/user/parts")
			usable(t)
		})
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// TestFilesGigabyteStreamsThrough: a 1 GB file written and read back
// through the API is never held by the daemon: its peak memory (this
// process's, the daemon runs in it; the test's own client streams too) is
// measured and bounded.
func TestFilesGigabyteStreamsThrough(t *testing.T) {
	const size = 1 << 30
	s := daemontest.Start(t, noPool)
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 1800, DiskMB: 2048})
	// Earlier tests' garbage goes back to the system first: the baseline
	// is what the process really holds, and memory the transfers take
	// shows as growth.
	debug.FreeOSMemory()
	before := rssKB(t)
	var mu sync.Mutex
	peak := before
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if r := rssKB(t); r > peak {
				mu.Lock()
				peak = r
				mu.Unlock()
			}
		}
	}()

	src := &hashingReader{r: io.LimitReader(pseudoRandom(1), size), h: sha256.New()}
	start := time.Now()
	resp, b := doBody(t, s, "PUT", filesPath(sb.ID, "", url.Values{"path": {"/home/user/gig"}}), src, "Content-Length", fmt.Sprint(size))
	up := time.Since(start)
	if resp.StatusCode != 200 {
		t.Fatalf("write: %d %s", resp.StatusCode, b)
	}
	want := hex.EncodeToString(src.h.Sum(nil))
	if got := sh(t, s, sb.ID, "sha256sum /home/user/gig | cut -d' ' -f1"); got != want+"\n" {
		t.Errorf("in the sandbox: sha256 %q, want %q", got, want)
	}

	req, _ := http.NewRequest("GET", s.URL+filesPath(sb.ID, "", url.Values{"path": {"/home/user/gig"}}), nil)
	req.Header.Set("Authorization", "Bearer "+s.Key)
	start = time.Now()
	gresp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	n, err := io.Copy(h, gresp.Body)
	gresp.Body.Close()
	down := time.Since(start)
	if err != nil || n != size || hex.EncodeToString(h.Sum(nil)) != want || gresp.ContentLength != size {
		t.Errorf("read: %d bytes (Content-Length %d), %v; want %d bytes of the same sha256", n, gresp.ContentLength, err, size)
	}
	close(stop)
	<-sampled
	growth := (peak - before) / 1024
	t.Logf("1 GiB up in %v (%.0f MB/s), down in %v (%.0f MB/s); RSS before %d MiB, peak %d MiB (+%d MiB)",
		up.Round(time.Millisecond), size/up.Seconds()/1e6, down.Round(time.Millisecond), size/down.Seconds()/1e6, before/1024, peak/1024, growth)
	// One frame per stream in the daemon, yamux's window, HTTP buffers,
	// the GC's slack: tens of MiB, against the 1024 a buffered file would
	// take.
	if growth > 64 {
		t.Errorf("RSS grew by %d MiB during the transfers; want at most 64", growth)
	}
}

// pseudoRandom is a fast, seeded, incompressible byte stream.
func pseudoRandom(seed uint64) io.Reader {
	return &prng{r: mrand.NewChaCha8([32]byte{byte(seed)})}
}

type prng struct{ r *mrand.ChaCha8 }

func (p *prng) Read(b []byte) (int, error) { return p.r.Read(b) }

type hashingReader struct {
	r io.Reader
	h hash.Hash
}

func (hr *hashingReader) Read(p []byte) (int, error) {
	n, err := hr.r.Read(p)
	hr.h.Write(p[:n])
	return n, err
}

// watchStream reads a watch's NDJSON events into a channel.
type watchStream struct {
	events chan wire.FileEvent
	done   chan error
	body   io.Closer
}

func startWatch(t *testing.T, s *daemontest.Server, id, path string, recursive bool) *watchStream {
	t.Helper()
	q := url.Values{"path": {path}}
	if recursive {
		q.Set("recursive", "true")
	}
	req, _ := http.NewRequest("GET", s.URL+filesPath(id, "/watch", q), nil)
	req.Header.Set("Authorization", "Bearer "+s.Key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/x-ndjson" {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		t.Fatalf("watch: %d %s", resp.StatusCode, b)
	}
	w := &watchStream{events: make(chan wire.FileEvent, 1000), done: make(chan error, 1), body: resp.Body}
	t.Cleanup(func() { resp.Body.Close() })
	go func() {
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			var ev wire.FileEvent
			if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
				w.done <- err
				return
			}
			w.events <- ev
		}
		w.done <- sc.Err()
	}()
	return w
}

// expect waits for an event equal to want, skipping others.
func (w *watchStream) expect(t *testing.T, want wire.FileEvent) {
	t.Helper()
	w.expectFunc(t, fmt.Sprintf("%+v", want), func(ev wire.FileEvent) bool { return ev == want })
}

// expectFunc waits for an event that match accepts, skipping others.
func (w *watchStream) expectFunc(t *testing.T, want string, match func(wire.FileEvent) bool) {
	t.Helper()
	deadline := time.After(patience)
	for {
		select {
		case ev := <-w.events:
			if match(ev) {
				return
			}
		case err := <-w.done:
			t.Fatalf("watch ended waiting for %s: %v", want, err)
		case <-deadline:
			t.Fatalf("no event %s within %v", want, patience)
		}
	}
}

// TestFilesWatch: created, written, removed and renamed entries are
// streamed, below the directory only when recursive; the answer's header
// means the watch is in place.
func TestFilesWatch(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 1200})
	id := sb.ID
	sh(t, s, id, "mkdir -p /home/user/w/sub /tmp/tw && chown -R user:user /home/user/w")
	for _, recursive := range []bool{false, true} {
		t.Run(fmt.Sprintf("recursive=%v", recursive), func(t *testing.T) {
			w := startWatch(t, s, id, "/home/user/w", recursive)
			run := func(cmd string) {
				t.Helper()
				if res := s.Exec(t, id, wire.ExecRequest{Cmd: cmd}); res.ExitCode != 0 {
					t.Fatalf("%s: %+v", cmd, res)
				}
			}
			d := "/home/user/w"
			run("echo one > " + d + "/f")
			w.expect(t, wire.FileEvent{Type: wire.FileEventCreated, Path: d + "/f"})
			w.expect(t, wire.FileEvent{Type: wire.FileEventWritten, Path: d + "/f"})
			run("echo more >> " + d + "/f")
			w.expect(t, wire.FileEvent{Type: wire.FileEventWritten, Path: d + "/f"})
			run("mv " + d + "/f " + d + "/g")
			w.expect(t, wire.FileEvent{Type: wire.FileEventRenamed, Path: d + "/g", OldPath: d + "/f"})
			run("rm " + d + "/g")
			w.expect(t, wire.FileEvent{Type: wire.FileEventRemoved, Path: d + "/g"})
			// A write through the API is a temporary file renamed
			// into place.
			putFile(t, s, id, d+"/api", "x")
			w.expectFunc(t, "api renamed into place", func(ev wire.FileEvent) bool {
				return ev.Type == wire.FileEventRenamed && ev.Path == d+"/api" && strings.HasPrefix(ev.OldPath, d+"/.api.")
			})
			// Below the directory: reported only when recursive; a
			// marker afterwards shows the event would have come by now.
			run("echo s > " + d + "/sub/s; mkdir " + d + "/sub/new; echo n > " + d + "/sub/new/n; touch " + d + "/marker")
			if recursive {
				w.expect(t, wire.FileEvent{Type: wire.FileEventCreated, Path: d + "/sub/s"})
				w.expect(t, wire.FileEvent{Type: wire.FileEventCreated, Path: d + "/sub/new/n"})
			} else {
				deadline := time.After(patience)
			loop:
				for {
					select {
					case ev := <-w.events:
						if strings.HasPrefix(ev.Path, d+"/sub/") {
							t.Errorf("a flat watch reported %+v", ev)
						}
						if ev.Path == d+"/marker" {
							break loop
						}
					case err := <-w.done:
						t.Fatalf("watch ended: %v", err)
					case <-deadline:
						t.Fatal("no marker event")
					}
				}
			}
			run("rm -rf " + d + "/sub/s " + d + "/sub/new " + d + "/marker " + d + "/api")
		})
	}
}

// TestFilesResumePaused: a file call on a paused sandbox resumes it, as an
// exec does.
func TestFilesResumePaused(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 1200})
	putFile(t, s, sb.ID, "/home/user/kept", "before the pause")
	post[wire.Sandbox](t, s, "/v1/sandboxes/"+sb.ID+"/pause", nil, http.StatusOK)
	if resp, b := getFile(t, s, sb.ID, "/home/user/kept"); resp.StatusCode != 200 || string(b) != "before the pause" {
		t.Errorf("read from a paused sandbox: %d %q", resp.StatusCode, b)
	}
	_, b := s.Do(t, "GET", "/v1/sandboxes/"+sb.ID, nil)
	var got wire.Sandbox
	if err := json.Unmarshal(b, &got); err != nil || got.State != wire.StateRunning {
		t.Errorf("state after the read: %s, want running", b)
	}
}

// fileIsolationRequests are valid requests to the file routes, for
// TestTenantsAreIsolated: what the owner would send to read, replace or
// remove $HOME/f (/home/user/f), as bodies and query strings by route.
func fileIsolationRequests(t testing.TB) (bodies map[string]any, queries map[string]string) {
	f := "?" + url.Values{"path": {"/home/user/f"}}.Encode()
	home := "?" + url.Values{"path": {"/home/user"}}.Encode()
	bodies = map[string]any{
		"GET /v1/sandboxes/{id}/files":         nil,
		"PUT /v1/sandboxes/{id}/files":         "theirs\n",
		"GET /v1/sandboxes/{id}/files/stat":    nil,
		"GET /v1/sandboxes/{id}/files/list":    nil,
		"POST /v1/sandboxes/{id}/files/mkdir":  wire.MakeDirRequest{Path: "/home/user/f/theirs", Parents: true},
		"POST /v1/sandboxes/{id}/files/remove": wire.RemoveRequest{Path: "/home/user/f", Recursive: true},
		"POST /v1/sandboxes/{id}/files/rename": wire.RenameRequest{From: "/home/user/f", To: "/home/user/g"},
		"GET /v1/sandboxes/{id}/files/tar":     nil,
		"PUT /v1/sandboxes/{id}/files/tar":     string(makeArchive(t, regEntry("f", "theirs\n", 0o644))),
		"GET /v1/sandboxes/{id}/files/watch":   nil,
	}
	queries = map[string]string{
		"GET /v1/sandboxes/{id}/files":       f,
		"PUT /v1/sandboxes/{id}/files":       f,
		"GET /v1/sandboxes/{id}/files/stat":  f,
		"GET /v1/sandboxes/{id}/files/list":  home,
		"GET /v1/sandboxes/{id}/files/tar":   home,
		"PUT /v1/sandboxes/{id}/files/tar":   home,
		"GET /v1/sandboxes/{id}/files/watch": home,
	}
	return bodies, queries
}

// TestOpenAPIFileResponses checks real answers of the file routes against
// the spec's schema for their status and media type.
func TestOpenAPIFileResponses(t *testing.T) {
	doc := loadSpec(t)
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 600})
	id := sb.ID
	sh(t, s, id, "mkdir -p /home/user/d/sub /home/user/gone && echo x > /home/user/d/f && ln -s f /home/user/d/l && chown -R user:user /home/user/d /home/user/gone")
	archive := string(makeArchive(t, regEntry("a", "a", 0o644), archiveEntry{hdr: tar.Header{Name: "p", Typeflag: tar.TypeFifo}}))
	f := func(route string, kv ...string) string {
		q := url.Values{}
		for i := 0; i+1 < len(kv); i += 2 {
			q.Set(kv[i], kv[i+1])
		}
		return filesPath(id, route, q)
	}
	cases := []struct {
		method, path, specPath string
		body                   any
		hdr                    []string
	}{
		{"PUT", f("", "path", "/home/user/d/new", "mode", "600"), "/v1/sandboxes/{id}/files", "content", nil},
		{"PUT", f("", "path", "/etc/nope"), "/v1/sandboxes/{id}/files", "content", nil},
		{"GET", f("", "path", "/home/user/d/f"), "/v1/sandboxes/{id}/files", nil, nil},
		{"GET", f("", "path", "/home/user/d/missing"), "/v1/sandboxes/{id}/files", nil, nil},
		{"GET", f("/stat", "path", "/home/user/d/l"), "/v1/sandboxes/{id}/files/stat", nil, nil},
		{"GET", f("/stat", "path", "relative"), "/v1/sandboxes/{id}/files/stat", nil, nil},
		{"GET", f("/list", "path", "/home/user/d", "depth", "2"), "/v1/sandboxes/{id}/files/list", nil, nil},
		{"POST", f("/mkdir"), "/v1/sandboxes/{id}/files/mkdir", wire.MakeDirRequest{Path: "/home/user/d/m/n", Parents: true}, nil},
		{"POST", f("/mkdir"), "/v1/sandboxes/{id}/files/mkdir", wire.MakeDirRequest{Path: "/home/user/d/f"}, nil},
		{"POST", f("/rename"), "/v1/sandboxes/{id}/files/rename", wire.RenameRequest{From: "/home/user/d/new", To: "/home/user/d/new2"}, nil},
		{"POST", f("/remove"), "/v1/sandboxes/{id}/files/remove", wire.RemoveRequest{Path: "/home/user/d/m", Recursive: true}, nil},
		{"POST", f("/remove"), "/v1/sandboxes/{id}/files/remove", wire.RemoveRequest{Path: "/home/user/d/m"}, nil},
		{"PUT", f("/tar", "path", "/home/user/t"), "/v1/sandboxes/{id}/files/tar", archive, nil},
		{"GET", f("/tar", "path", "/home/user/d"), "/v1/sandboxes/{id}/files/tar", nil, nil},
		{"GET", f("/watch", "path", "/home/user/nope"), "/v1/sandboxes/{id}/files/watch", nil, nil},
		{"GET", f("/watch", "path", "/home/user/gone"), "/v1/sandboxes/{id}/files/watch", "end", nil},
	}
	for _, c := range cases {
		t.Run(c.method+" "+c.path, func(t *testing.T) {
			var resp *http.Response
			var body []byte
			if c.specPath == "/v1/sandboxes/{id}/files/watch" && c.body == "end" {
				// A watch ends when its directory goes: removed once the
				// answer's header (the watch in place) has come.
				req, _ := http.NewRequest(c.method, s.URL+c.path, nil)
				req.Header.Set("Authorization", "Bearer "+s.Key)
				var err error
				if resp, err = http.DefaultClient.Do(req); err != nil {
					t.Fatal(err)
				}
				sh(t, s, id, "echo x > /home/user/gone/x; rm -rf /home/user/gone")
				body, err = io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil {
					t.Fatal(err)
				}
			} else {
				resp, body = s.Do(t, c.method, c.path, c.body, c.hdr...)
			}
			op := doc.operation(t, c.method, c.specPath)
			r, ok := op.Responses[fmt.Sprint(resp.StatusCode)]
			if !ok {
				t.Fatalf("status %d (%s) not in spec for %s %s", resp.StatusCode, body, c.method, c.specPath)
			}
			if resp.StatusCode == http.StatusNoContent {
				return
			}
			ct, _, _ := strings.Cut(resp.Header.Get("Content-Type"), ";")
			media, ok := r.Content[ct]
			if !ok {
				t.Fatalf("media type %q not in spec for %d", ct, resp.StatusCode)
			}
			var docs [][]byte
			switch ct {
			case "application/octet-stream", "application/x-tar":
				return
			case "application/x-ndjson":
				sc := bufio.NewScanner(bytes.NewReader(body))
				for sc.Scan() {
					docs = append(docs, bytes.Clone(sc.Bytes()))
				}
				if len(docs) == 0 {
					t.Fatalf("empty event stream")
				}
			default:
				docs = [][]byte{body}
			}
			for _, d := range docs {
				var v any
				if err := json.Unmarshal(d, &v); err != nil {
					t.Fatalf("response %q is not JSON: %v", d, err)
				}
				if errs := doc.validate(media.Schema, v, "$"); len(errs) > 0 {
					t.Errorf("response %s does not match the spec:\n%s", d, strings.Join(errs, "\n"))
				}
			}
		})
	}
}
