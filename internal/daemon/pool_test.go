package daemon_test

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/wire"
)

// uptime returns how long the sandbox's kernel has run, from /proc/uptime,
// and how long ago the create request that made it started.
func bornBefore(t *testing.T, s *daemontest.Server, id string, requested time.Time) bool {
	t.Helper()
	res := s.Exec(t, id, wire.ExecRequest{Cmd: "cut -d' ' -f1 /proc/uptime"})
	up, err := strconv.ParseFloat(strings.TrimSpace(res.Stdout), 64)
	if err != nil {
		t.Fatalf("reading uptime: %q: %v", res.Stdout, err)
	}
	// A sandbox booted for the request is younger than the request; one
	// that waited in the pool is older.
	return time.Duration(up*float64(time.Second)) > time.Since(requested)
}

// checkFresh checks that a sandbox behaves like a cold one: its own id as
// hostname, its own env, a clean file system; it returns its random bytes.
func checkFresh(t *testing.T, s *daemontest.Server, sb wire.Sandbox, req wire.CreateSandboxRequest) string {
	t.Helper()
	res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "hostname; echo $WHO; cat $HOME/mark 2>/dev/null || echo clean; echo x > $HOME/mark; head -c 16 /dev/urandom | od -An -x"})
	lines := strings.Split(strings.TrimSpace(res.Stdout), "\n")
	if len(lines) != 4 || lines[0] != sb.ID || lines[1] != req.Env["WHO"] || lines[2] != "clean" {
		t.Errorf("sandbox %s: got %q, want its id, WHO=%s, a clean file system, random bytes", sb.ID, res.Stdout, req.Env["WHO"])
		return ""
	}
	want := req.MemoryMB
	if want == 0 {
		want = 1024
	}
	if sb.MemoryMB != want {
		t.Errorf("sandbox %s: memory %d, want %d", sb.ID, sb.MemoryMB, want)
	}
	return lines[3]
}

// TestWarmPool: creates with the server's default limits are handed over
// from the warm pool — shown by the sandbox's kernel being older than the
// create request — and behave like cold ones. Creates with other limits are
// booted for the request.
func TestWarmPool(t *testing.T) {
	s := daemontest.Start(t, func(c *daemon.Config) {
		c.Sandbox.PoolSize = 2
		c.Sandbox.PoolTemplates = []string{"base"}
	})
	random := map[string]bool{}
	// The pool fills in the background: poll, with a generous deadline,
	// for creates that it serves.
	pooled := 0
	deadline := time.Now().Add(3 * time.Minute)
	for i := 0; pooled < 3; i++ {
		if time.Now().After(deadline) {
			t.Fatalf("after %d creates only %d came from the warm pool, want 3", i, pooled)
		}
		req := wire.CreateSandboxRequest{Env: map[string]string{"WHO": "pool" + strconv.Itoa(i)}}
		requested := time.Now()
		sb := s.Create(t, req)
		if bornBefore(t, s, sb.ID, requested) {
			pooled++
			random[checkFresh(t, s, sb, req)] = true
		} else {
			time.Sleep(time.Second) // polling interval while the pool refills
		}
		s.Do(t, "DELETE", "/v1/sandboxes/"+sb.ID, nil)
	}
	if len(random) != 3 {
		t.Errorf("pooled sandboxes share randomness: got %d distinct values of 3: %v", len(random), random)
	}
	for _, req := range []wire.CreateSandboxRequest{
		{Env: map[string]string{"WHO": "c"}, MemoryMB: 512},
		{Env: map[string]string{"WHO": "d"}, CPU: 0.5},
	} {
		requested := time.Now()
		sb := s.Create(t, req)
		checkFresh(t, s, sb, req)
		if bornBefore(t, s, sb.ID, requested) {
			t.Errorf("sandbox with limits %+v came from the pool; want it booted for the request", req)
		}
	}
}

// TestTemplateSnapshots: with template snapshots, creates are restores of
// the template's image — shown by every sandbox having the image's kernel
// boot id, where cold boots each get their own — and behave like cold ones,
// with fresh randomness each.
func TestTemplateSnapshots(t *testing.T) {
	s := daemontest.Start(t, func(c *daemon.Config) {
		c.Sandbox.TemplateSnapshots = true
		c.Sandbox.PoolSize = 0
		c.Sandbox.PoolTemplates = []string{"base"}
	})
	random, bootIDs := map[string]bool{}, map[string]bool{}
	for i := range 3 {
		req := wire.CreateSandboxRequest{Env: map[string]string{"WHO": "snap" + strconv.Itoa(i)}}
		sb := s.Create(t, req)
		bootIDs[s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "cat /proc/sys/kernel/random/boot_id"}).Stdout] = true
		random[checkFresh(t, s, sb, req)] = true
	}
	if len(bootIDs) != 1 {
		t.Errorf("boot ids: got %d distinct of 3 creates, want 1 (all restored from the template's image)", len(bootIDs))
	}
	if len(random) != 3 {
		t.Errorf("restored sandboxes share randomness: got %d distinct values of 3: %v", len(random), random)
	}
}
