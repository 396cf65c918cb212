package gvisor

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pandastack/pandastack/internal/runtime"
	"github.com/pandastack/pandastack/internal/runtime/runtimetest"
	"github.com/pandastack/pandastack/internal/template"
	"github.com/pandastack/pandastack/internal/testenv"
)

func TestConformance(t *testing.T) {
	runsc := testenv.Runsc(t)
	tpl := testenv.Template(t, "base")
	agentPath, err := template.InstallAgent(tpl, testenv.Agent(t))
	if err != nil {
		t.Fatal(err)
	}
	state := t.TempDir()
	rt, err := New(Config{Runsc: runsc, StateDir: state, CgroupParent: "/pandastack-test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	runtimetest.Run(t, runtimetest.Harness{
		Runtime: rt,
		Spec: func(id string) runtime.Spec {
			return runtime.Spec{
				ID:        id,
				RootfsDir: tpl.Rootfs,
				Init:      []string{agentPath},
				Env:       []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"},
				Limits:    runtime.Limits{CPU: 1, MemoryBytes: 256 << 20, DiskBytes: 256 << 20},
			}
		},
		Leftovers: func(id string) []string {
			var left []string
			if _, err := os.Stat(rt.dir(id)); err == nil {
				left = append(left, "directory "+rt.dir(id))
			}
			if out, _ := exec.Command("pgrep", "-f", id).Output(); len(strings.TrimSpace(string(out))) > 0 {
				left = append(left, "processes "+strings.TrimSpace(string(out)))
			}
			for _, ctl := range []string{"memory", "pids", "cpu", "unified"} {
				p := filepath.Join("/sys/fs/cgroup", ctl, "pandastack-test", id)
				if _, err := os.Stat(p); err == nil {
					left = append(left, "cgroup "+p)
				}
			}
			return left
		},
	})
}
