package daemon_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/internal/store"
	"github.com/pandastack/pandastack/internal/testenv"
	"github.com/pandastack/pandastack/wire"
)

// proc is a daemon running as its own process, so that it can be killed.
type proc struct {
	*daemontest.Server
	cmd *exec.Cmd
	log string
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func startProc(t *testing.T, dataDir string, extra ...string) *proc {
	t.Helper()
	runsc := testenv.Runsc(t)
	testenv.Template(t, "base")
	port := freePort(t)
	logPath := filepath.Join(t.TempDir(), "server.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	args := append([]string{"serve", "--listen", fmt.Sprintf("127.0.0.1:%d", port), "--data-dir", dataDir,
		"--template-dir", testenv.TemplateDir(), "--runsc", runsc, "--agent", testenv.Agent(t),
		"--build-templates=false", "--reap-interval", "200ms", "--metrics-listen", "127.0.0.1:0"}, extra...)
	cmd := exec.Command(testenv.Daemon(t), args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logf.Close()
	p := &proc{cmd: cmd, log: logPath}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Signal(syscall.SIGTERM)
			cmd.Wait()
		}
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("server log:\n%s", b)
		}
	})
	url := fmt.Sprintf("http://127.0.0.1:%d", port)
	// The start reconciles what an earlier daemon left: give it patience.
	for deadline := time.Now().Add(patience); ; {
		resp, err := http.Get(url + "/v1/health")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logPath)
			t.Fatalf("server did not start within %v: %v\n%s", patience, err, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
	key, err := os.ReadFile(filepath.Join(dataDir, "api-key"))
	if err != nil {
		t.Fatal(err)
	}
	p.Server = &daemontest.Server{URL: url, Key: strings.TrimSpace(string(key)), DataDir: dataDir}
	return p
}

func (p *proc) stop(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.cmd.Wait() }()
	select {
	case err := <-done:
		if sig == syscall.SIGTERM && err != nil {
			t.Errorf("server exited with %v after SIGTERM", err)
		}
	case <-time.After(patience):
		t.Fatalf("server still running %v after %v", patience, sig)
	}
}

// runscProcs returns the host processes that belong to sandbox id.
func runscProcs(id string) string {
	out, _ := exec.Command("pgrep", "-f", id).Output()
	return strings.TrimSpace(string(out))
}

func recordState(t *testing.T, dataDir, id string) string {
	t.Helper()
	st, err := store.Open(context.Background(), filepath.Join(dataDir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	l, err := st.ListSandboxes(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range l {
		if r.ID == id {
			return r.State
		}
	}
	return "absent"
}

// TestCrashRecovery kills the daemon with SIGKILL while sandboxes run and
// one is half-created; the next daemon re-adopts the running ones, cleans
// up the rest, and its state matches reality.
func TestCrashRecovery(t *testing.T) {
	dataDir := t.TempDir()
	t.Cleanup(func() { exec.Command("umount", "-l", filepath.Join(dataDir, "runtime", "runsc", "null-netns")).Run() })
	p1 := startProc(t, dataDir)
	a := p1.Create(t, wire.CreateSandboxRequest{TTLSeconds: 1800, Metadata: map[string]string{"name": "a"}})
	short := p1.Create(t, wire.CreateSandboxRequest{TTLSeconds: 4})
	paused := p1.Create(t, wire.CreateSandboxRequest{TTLSeconds: 1800})
	p1.Exec(t, paused.ID, wire.ExecRequest{Cmd: "echo asleep > $HOME/p"})
	if resp, b := p1.Do(t, "POST", "/v1/sandboxes/"+paused.ID+"/pause", nil); resp.StatusCode != 200 {
		t.Fatalf("pause: %d %s", resp.StatusCode, b)
	}
	if res := p1.Exec(t, a.ID, wire.ExecRequest{Cmd: "echo kept > $HOME/f; (setsid sleep 1000 >/dev/null 2>&1 &); until pgrep -x sleep >/dev/null; do sleep 0.05; done; echo started",
		TimeoutSeconds: patience.Seconds()}); res.ExitCode != 0 {
		t.Fatalf("setup exec: %+v", res)
	}

	// A create that was half-way when the daemon died: a record in
	// "creating" and a sandbox directory; and a directory no record knows.
	half, orphan := "sb-00000000000000aa", "sb-00000000000000bb"
	st, err := store.Open(context.Background(), filepath.Join(dataDir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if err := st.CreateSandbox(context.Background(), store.Sandbox{ID: half, Tenant: "default", Template: "base",
		State: wire.StateCreating, CreatedAt: now, ExpiresAt: now.Add(time.Minute), CPU: 1, MemoryMB: 256}); err != nil {
		t.Fatal(err)
	}
	st.Close()
	for _, id := range []string{half, orphan} {
		if err := os.MkdirAll(filepath.Join(dataDir, "runtime", "sandboxes", id, "bundle"), 0o700); err != nil {
			t.Fatal(err)
		}
	}

	p1.stop(t, syscall.SIGKILL)
	if runscProcs(a.ID) == "" {
		t.Fatal("sandbox processes died with the daemon")
	}

	p2 := startProc(t, dataDir)
	resp, b := p2.Do(t, "GET", "/v1/sandboxes/"+a.ID, nil)
	var got wire.Sandbox
	_ = json.Unmarshal(b, &got)
	if resp.StatusCode != 200 || got.Metadata["name"] != "a" || !got.ExpiresAt.Equal(a.ExpiresAt) {
		t.Fatalf("re-adopted sandbox: %d %s", resp.StatusCode, b)
	}
	res := p2.Exec(t, a.ID, wire.ExecRequest{Cmd: "cat $HOME/f; ps -eo args | grep -c '^sleep 1000'"})
	if res.Stdout != "kept\n1\n" {
		t.Errorf("re-adopted sandbox lost state: got %q, want %q", res.Stdout, "kept\n1\n")
	}
	for _, id := range []string{half, orphan} {
		if _, err := os.Stat(filepath.Join(dataDir, "runtime", "sandboxes", id)); !os.IsNotExist(err) {
			t.Errorf("leftover %s not cleaned up: %v", id, err)
		}
	}
	if s := recordState(t, dataDir, half); s != wire.StateFailed {
		t.Errorf("half-created record: state %q, want %q", s, wire.StateFailed)
	}
	// The paused sandbox is still paused, and resumes with its files.
	if s := recordState(t, dataDir, paused.ID); s != wire.StatePaused {
		t.Errorf("paused record after restart: state %q", s)
	}
	if res := p2.Exec(t, paused.ID, wire.ExecRequest{Cmd: "cat $HOME/p"}); res.Stdout != "asleep\n" {
		t.Errorf("paused sandbox after restart: %+v", res)
	}
	// The re-adopted short-lived sandbox still expires (if a slow machine
	// took longer than its TTL to get here, it expired already).
	waitUntil(t, "re-adopted sandbox gone after its TTL", func() (bool, string) {
		resp, b := p2.Do(t, "GET", "/v1/sandboxes/"+short.ID, nil)
		return resp.StatusCode == 404, fmt.Sprintf("%d %s", resp.StatusCode, b)
	})
	// The record is written as the sandbox leaves the API: wait for it.
	waitUntil(t, "expired record", func() (bool, string) {
		s := recordState(t, dataDir, short.ID)
		return s == wire.StateExpired, "state " + s
	})

	// A graceful stop destroys the sandboxes by default.
	p2.stop(t, syscall.SIGTERM)
	if procs := runscProcs(a.ID); procs != "" {
		t.Errorf("processes of %s left after SIGTERM: %s", a.ID, procs)
	}
	if s := recordState(t, dataDir, a.ID); s != wire.StateStopped {
		t.Errorf("record after SIGTERM: state %q, want %q", s, wire.StateStopped)
	}
	if _, err := os.Stat(filepath.Join(dataDir, "runtime", "sandboxes", a.ID)); !os.IsNotExist(err) {
		t.Errorf("sandbox directory left after SIGTERM: %v", err)
	}
}

// TestShutdownActions: with --on-shutdown keep or pause, a graceful stop
// leaves the sandboxes for the next daemon, which re-adopts or resumes them.
func TestShutdownActions(t *testing.T) {
	for _, action := range []string{"keep", "pause"} {
		t.Run(action, func(t *testing.T) {
			dataDir := t.TempDir()
			t.Cleanup(func() { exec.Command("umount", "-l", filepath.Join(dataDir, "runtime", "runsc", "null-netns")).Run() })
			p1 := startProc(t, dataDir, "--on-shutdown", action)
			sb := p1.Create(t, wire.CreateSandboxRequest{TTLSeconds: 1800})
			p1.Exec(t, sb.ID, wire.ExecRequest{Cmd: "echo 7 > /tmp/n"})
			p1.stop(t, syscall.SIGTERM)
			wantState := map[string]string{"keep": wire.StateRunning, "pause": wire.StatePaused}[action]
			if s := recordState(t, dataDir, sb.ID); s != wantState {
				t.Errorf("record after SIGTERM: %q, want %q", s, wantState)
			}
			if procs := runscProcs(sb.ID); (procs == "") != (action == "pause") {
				t.Errorf("processes of %s after SIGTERM with %s: %q", sb.ID, action, procs)
			}
			p2 := startProc(t, dataDir)
			if res := p2.Exec(t, sb.ID, wire.ExecRequest{Cmd: "cat /tmp/n"}); res.Stdout != "7\n" {
				t.Errorf("after restart: %+v", res)
			}
		})
	}
}
