package gvisor

import (
	"context"
	"testing"

	"github.com/pandastack/pandastack/internal/agent"
	"github.com/pandastack/pandastack/internal/runtime"
	"github.com/pandastack/pandastack/internal/runtime/runtimetest"
	"github.com/pandastack/pandastack/internal/template"
	"github.com/pandastack/pandastack/internal/testenv"
)

// startBench starts one sandbox of the base template and returns its agent.
func startBench(b *testing.B) *agent.Client {
	b.Helper()
	tpl := testenv.Template(b, "base")
	agentPath, err := template.InstallAgent(tpl, testenv.Agent(b))
	if err != nil {
		b.Fatal(err)
	}
	rt, err := New(Config{Runsc: testenv.Runsc(b), StateDir: b.TempDir(), CgroupParent: "/pandastack-test"})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { rt.Close() })
	id := runtimetest.NewID()
	ctx := context.Background()
	if err := rt.Start(ctx, runtime.Spec{ID: id, RootfsDir: tpl.Rootfs, Init: []string{agentPath},
		Env: []string{"PATH=/usr/bin:/bin"}}); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { rt.Delete(context.Background(), id) })
	conn, err := rt.Connect(ctx, id)
	if err != nil {
		b.Fatal(err)
	}
	c, err := agent.Dial(ctx, conn)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

// BenchmarkAgentPing is the daemon↔agent transport's round trip.
func BenchmarkAgentPing(b *testing.B) {
	c := startBench(b)
	ctx := context.Background()
	for b.Loop() {
		if _, err := c.Ping(ctx); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAgentExecTrue is an exec of /bin/true through the agent, without
// the HTTP API.
func BenchmarkAgentExecTrue(b *testing.B) {
	c := startBench(b)
	ctx := context.Background()
	for b.Loop() {
		ex, err := c.Exec(ctx, agent.ExecRequest{Argv: []string{"/bin/true"}}, agent.ExecIO{})
		if err != nil || ex.ExitCode != 0 {
			b.Fatal(err, ex)
		}
	}
}
