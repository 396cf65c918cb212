package daemon_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/wire"
)

// hostCounts is what a sandbox leaves on the host if it leaks.
type hostCounts struct {
	runscProcs, mounts, cgroups, sandboxDirs int
	goroutines, fds                          int
	rssKB                                    int
}

func countHost(t *testing.T, s *daemontest.Server) hostCounts {
	dataDir := s.DataDir
	t.Helper()
	var c hostCounts
	// Only what belongs to this test's server: processes and mounts under
	// its data directory, cgroups under its own parent.
	if out, err := exec.Command("pgrep", "-c", "-f", "runsc-(sandbox|gofer).*"+dataDir).Output(); err == nil {
		c.runscProcs, _ = strconv.Atoi(strings.TrimSpace(string(out)))
	}
	// The runtime's one shared network-namespace mount (made at the first
	// start, removed at Close) is not a sandbox's.
	if b, err := os.ReadFile("/proc/self/mounts"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, dataDir) && !strings.Contains(l, "null-netns") {
				c.mounts++
			}
		}
	}
	for _, ctl := range []string{"memory", "pids", "cpu", "unified"} {
		if es, err := os.ReadDir(filepath.Join("/sys/fs/cgroup", ctl, s.CgroupParent)); err == nil {
			for _, e := range es {
				if e.IsDir() {
					c.cgroups++
				}
			}
		}
	}
	if es, err := os.ReadDir(filepath.Join(dataDir, "runtime", "sandboxes")); err == nil {
		c.sandboxDirs = len(es)
	}
	c.goroutines = runtime.NumGoroutine()
	if es, err := os.ReadDir("/proc/self/fd"); err == nil {
		c.fds = len(es)
	}
	if b, err := os.ReadFile("/proc/self/status"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
				c.rssKB, _ = strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			}
		}
	}
	return c
}

// settle waits (within patience) until the counts come back to the
// baseline: teardown of a sandbox finishes a little after its kill returns.
func settle(t *testing.T, s *daemontest.Server, before hostCounts) hostCounts {
	t.Helper()
	var after hostCounts
	for deadline := time.Now().Add(patience); ; {
		after = countHost(t, s)
		if after.runscProcs <= before.runscProcs && after.mounts <= before.mounts &&
			after.cgroups <= before.cgroups && after.sandboxDirs <= before.sandboxDirs &&
			after.goroutines <= before.goroutines+20 && after.fds <= before.fds+10 {
			break
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	return after
}

func checkNoLeaks(t *testing.T, before, after hostCounts) {
	t.Helper()
	checks := []struct {
		name          string
		before, after int
		slack         int
	}{
		{"runsc processes", before.runscProcs, after.runscProcs, 0},
		{"mounts", before.mounts, after.mounts, 0},
		{"sandbox cgroups", before.cgroups, after.cgroups, 0},
		{"sandbox directories", before.sandboxDirs, after.sandboxDirs, 0},
		{"daemon goroutines", before.goroutines, after.goroutines, 20},
		{"daemon fds", before.fds, after.fds, 10},
		{"daemon RSS (KiB)", before.rssKB, after.rssKB, 100 << 10},
	}
	for _, c := range checks {
		if c.after > c.before+c.slack {
			t.Errorf("%s: %d before, %d after (slack %d)", c.name, c.before, c.after, c.slack)
		}
	}
	t.Logf("before %+v, after %+v", before, after)
}

// TestConcurrentClients runs 50 clients that create, exec, extend and kill
// at once against one daemon: no 5xx, no deadlock, nothing lost or leaked.
func TestConcurrentClients(t *testing.T) {
	s := daemontest.Start(t, noPool)
	// Warm the server up with one sandbox so the baseline includes its
	// long-lived goroutines.
	warm := s.Create(t, wire.CreateSandboxRequest{})
	s.Do(t, "DELETE", "/v1/sandboxes/"+warm.ID, nil)
	before := countHost(t, s)

	const clients = 50
	var wg sync.WaitGroup
	var failures atomic.Int32
	fail := func(format string, args ...any) {
		failures.Add(1)
		t.Errorf(format, args...)
	}
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, b := s.Do(t, "POST", "/v1/sandboxes", wire.CreateSandboxRequest{TTLSeconds: 120, MemoryMB: 128})
			if resp.StatusCode != http.StatusCreated {
				fail("client %d create: %d %s", i, resp.StatusCode, b)
				return
			}
			var sb wire.Sandbox
			if err := jsonUnmarshal(b, &sb); err != nil {
				fail("client %d: %v", i, err)
				return
			}
			want := fmt.Sprintf("client-%d\n", i)
			for range 3 {
				res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "echo client-" + strconv.Itoa(i)})
				if res.Stdout != want {
					fail("client %d exec: got %q, want %q", i, res.Stdout, want)
				}
			}
			if resp, b := s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/timeout", wire.SetTimeoutRequest{TTLSeconds: 60}); resp.StatusCode != 200 {
				fail("client %d timeout: %d %s", i, resp.StatusCode, b)
			}
			// Half the clients race a kill against an exec (the sleep
			// below only makes an overlap likely; every outcome of the
			// race is accepted).
			if i%2 == 0 {
				var inner sync.WaitGroup
				inner.Add(1)
				go func() {
					defer inner.Done()
					resp, b := s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/exec", wire.ExecRequest{Cmd: "sleep 0.2"})
					if resp.StatusCode != 200 && resp.StatusCode != 404 && resp.StatusCode != 409 {
						fail("client %d racing exec: %d %s", i, resp.StatusCode, b)
					}
				}()
				time.Sleep(50 * time.Millisecond)
				if resp, b := s.Do(t, "DELETE", "/v1/sandboxes/"+sb.ID, nil); resp.StatusCode != 204 {
					fail("client %d kill: %d %s", i, resp.StatusCode, b)
				}
				inner.Wait()
			} else if resp, b := s.Do(t, "DELETE", "/v1/sandboxes/"+sb.ID, nil); resp.StatusCode != 204 {
				fail("client %d kill: %d %s", i, resp.StatusCode, b)
			}
			if resp, _ := s.Do(t, "DELETE", "/v1/sandboxes/"+sb.ID, nil); resp.StatusCode != 404 {
				fail("client %d second kill: %d, want 404", i, resp.StatusCode)
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Minute):
		// Generous: 50 creates on a slow machine take minutes.
		t.Fatal("clients still running after 15 minutes: deadlock?")
	}
	if failures.Load() > 0 {
		return
	}
	resp, b := s.Do(t, "GET", "/v1/sandboxes", nil)
	if resp.StatusCode != 200 || !strings.Contains(string(b), `"sandboxes":[]`) {
		t.Errorf("sandboxes left: %s", b)
	}
	checkNoLeaks(t, before, settle(t, s, before))
}

// TestSoakNoLeaks creates and destroys many sandboxes (500 by default,
// PANDASTACK_SOAK_N to change) with some concurrency, in every way a
// sandbox can end, and compares what exists on the host before and after.
func TestSoakNoLeaks(t *testing.T) {
	n := 500
	if v, err := strconv.Atoi(os.Getenv("PANDASTACK_SOAK_N")); err == nil && v > 0 {
		n = v
	}
	if testing.Short() {
		n = 40
	}
	s := daemontest.Start(t, noPool)
	warm := s.Create(t, wire.CreateSandboxRequest{})
	s.Do(t, "DELETE", "/v1/sandboxes/"+warm.ID, nil)
	before := countHost(t, s)

	const workers = 6
	jobs := make(chan int)
	var wg sync.WaitGroup
	var bad atomic.Int32
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				ttl := 120
				if i%10 == 3 {
					ttl = 1 // ends by expiry
				}
				resp, b := s.Do(t, "POST", "/v1/sandboxes", wire.CreateSandboxRequest{TTLSeconds: ttl, MemoryMB: 128})
				if resp.StatusCode != http.StatusCreated {
					bad.Add(1)
					t.Errorf("create %d: %d %s", i, resp.StatusCode, b)
					continue
				}
				var sb wire.Sandbox
				_ = jsonUnmarshal(b, &sb)
				switch i % 10 {
				case 3: // expiry: the reaper destroys it
				case 7: // crash: the sandbox kills its own sentry's init tree
					s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/exec", wire.ExecRequest{Cmd: "echo x"})
					killSentry(sb.ID)
				default:
					if i%2 == 0 {
						s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/exec", wire.ExecRequest{Cmd: "echo x > /tmp/x"})
					}
					s.Do(t, "DELETE", "/v1/sandboxes/"+sb.ID, nil)
				}
			}
		}()
	}
	start := time.Now()
	for i := range n {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	// Let expiries and crash cleanups finish.
	waitUntil(t, "every sandbox expired, killed or cleaned up after its crash", func() (bool, string) {
		resp, b := s.Do(t, "GET", "/v1/sandboxes", nil)
		return resp.StatusCode == 200 && strings.Contains(string(b), `"sandboxes":[]`), fmt.Sprintf("%d %.300s", resp.StatusCode, b)
	})
	t.Logf("%d sandboxes in %v", n, time.Since(start))
	if bad.Load() > 0 {
		return
	}
	checkNoLeaks(t, before, settle(t, s, before))
}

// killSentry SIGKILLs the sandbox's runsc-sandbox process on the host, as
// the kernel's OOM killer would.
func killSentry(id string) {
	out, _ := exec.Command("pgrep", "-f", "runsc-sandbox.*"+id).Output()
	for _, pid := range strings.Fields(string(out)) {
		exec.Command("kill", "-9", pid).Run()
	}
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }

// noPool turns the warm pool off for tests that count host resources: a
// pool refilling in the background would blur the counts.
func noPool(c *daemon.Config) { c.Sandbox.PoolSize = 0 }

// TestFailedCreatesLeaveNothing makes creates fail at different points and
// checks that each failure leaves no process, mount, cgroup or directory,
// and answers a clear 503 without internal details. The failures are
// forced, not left to timing: a start timeout that has always passed when
// runsc returns, and an agent handshake that cannot be answered in time
// (the sandbox runs, its agent's answer is refused). A last case fails
// nothing, as a control.
func TestFailedCreatesLeaveNothing(t *testing.T) {
	for _, tc := range []struct {
		name       string
		mut        func(*daemon.Config)
		wantFailed bool
	}{
		{"start timeout passed", func(c *daemon.Config) { noPool(c); c.Sandbox.StartTimeout = time.Nanosecond }, true},
		{"agent cannot answer in time", func(c *daemon.Config) { noPool(c); c.Sandbox.AgentTimeout = time.Nanosecond }, true},
		{"control", noPool, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := daemontest.Start(t, tc.mut)
			before := countHost(t, s)
			failed := 0
			for range 3 {
				resp, b := s.Do(t, "POST", "/v1/sandboxes", wire.CreateSandboxRequest{})
				switch resp.StatusCode {
				case http.StatusCreated:
					var sb wire.Sandbox
					_ = json.Unmarshal(b, &sb)
					s.Do(t, "DELETE", "/v1/sandboxes/"+sb.ID, nil)
				case http.StatusServiceUnavailable:
					failed++
					if !strings.Contains(string(b), `"code":"unavailable"`) || strings.Contains(string(b), "/") || strings.Contains(string(b), "runsc") {
						t.Errorf("failed create: got %s, want code unavailable and no paths or runsc details", b)
					}
				default:
					t.Errorf("create: got %d %s, want 201 or 503", resp.StatusCode, b)
				}
			}
			if got := failed == 3; got != tc.wantFailed {
				t.Errorf("creates failed: got %d of 3, want all to fail: %v", failed, tc.wantFailed)
			}
			checkNoLeaks(t, before, settle(t, s, before))
		})
	}
}
