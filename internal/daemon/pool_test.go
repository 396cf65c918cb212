package daemon_test

import (
	"strings"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/wire"
)

// TestWarmPoolAndTemplateSnapshots: creates handed over from the warm pool
// or restored from the template's snapshot behave like cold ones: their own
// id as hostname, their own env, fresh randomness, their own files.
func TestWarmPoolAndTemplateSnapshots(t *testing.T) {
	s := daemontest.Start(t, func(c *daemon.Config) {
		c.Sandbox.TemplateSnapshots = true
		c.Sandbox.PoolSize = 2
		c.Sandbox.PoolTemplates = []string{"base"}
	})
	// Let the pool fill.
	time.Sleep(3 * time.Second)
	random := map[string]bool{}
	for i, req := range []wire.CreateSandboxRequest{
		{Env: map[string]string{"WHO": "a"}},                // from the pool
		{Env: map[string]string{"WHO": "b"}},                // from the pool
		{Env: map[string]string{"WHO": "c"}, MemoryMB: 512}, // limits differ: template snapshot
		{Env: map[string]string{"WHO": "d"}, CPU: 0.5},      // same
	} {
		sb := s.Create(t, req)
		res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "hostname; echo $WHO; cat /root/mark 2>/dev/null || echo clean; echo x > /root/mark; head -c 16 /dev/urandom | od -An -x"})
		lines := strings.Split(strings.TrimSpace(res.Stdout), "\n")
		if len(lines) != 4 || lines[0] != sb.ID || lines[1] != req.Env["WHO"] || lines[2] != "clean" {
			t.Errorf("sandbox %d: got %q", i, res.Stdout)
			continue
		}
		random[lines[3]] = true
		want := req.MemoryMB
		if want == 0 {
			want = 1024
		}
		if sb.MemoryMB != want {
			t.Errorf("sandbox %d: memory %d, want %d", i, sb.MemoryMB, want)
		}
	}
	if len(random) != 4 {
		t.Errorf("sandboxes share randomness: %v", random)
	}
}
