// Package testenv gives tests what real sandboxes need: root, the runsc
// binary, a freshly built agent and a built template. Tests that need them
// skip with a clear message when they are missing, unless
// PANDASTACK_REQUIRE_SANDBOX=1 (set by scripts/test.sh), where they fail.
package testenv

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"

	"github.com/pandastack/pandastack/internal/template"
)

// DefaultRunsc is where scripts/install.sh puts runsc.
const DefaultRunsc = "/usr/local/lib/pandastack/runsc"

// DefaultTemplateDir is the template cache shared with the installed server.
const DefaultTemplateDir = "/var/lib/pandastack/templates"

func unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("PANDASTACK_REQUIRE_SANDBOX") == "1" {
		t.Fatalf("real sandboxes required but unavailable: "+format, args...)
	}
	t.Skipf("skipping: real sandboxes unavailable: "+format, args...)
}

// Runsc returns the runsc binary, skipping the test when it is unusable.
func Runsc(t testing.TB) string {
	t.Helper()
	if os.Geteuid() != 0 {
		unavailable(t, "gVisor needs root")
	}
	p := os.Getenv("PANDASTACK_RUNSC")
	if p == "" {
		p = DefaultRunsc
	}
	if _, err := os.Stat(p); err != nil {
		if lp, lerr := exec.LookPath("runsc"); lerr == nil {
			return lp
		}
		unavailable(t, "runsc not found at %s (run scripts/install.sh)", p)
	}
	return p
}

// built is a binary built once per test process.
type built struct {
	once sync.Once
	path string
	err  error
}

var agentBin, daemonBin built

func (b *built) build(t testing.TB, pkg, name string) string {
	t.Helper()
	b.once.Do(func() {
		dir, err := os.MkdirTemp("", "pandastack-bin-")
		if err != nil {
			b.err = err
			return
		}
		out := filepath.Join(dir, name)
		cmd := exec.Command("go", "build", "-o", out, pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		cmd.Dir = moduleRoot()
		if out, err := cmd.CombinedOutput(); err != nil {
			b.err = &buildError{err: err, out: string(out)}
			return
		}
		b.path = out
	})
	if b.err != nil {
		t.Fatalf("building %s: %v", name, b.err)
	}
	return b.path
}

// Agent builds the agent binary once per test process and returns its path.
func Agent(t testing.TB) string {
	return agentBin.build(t, "github.com/pandastack/pandastack/cmd/pandastack-agent", "pandastack-agent")
}

// Daemon builds the pandastack binary once per test process and returns
// its path.
func Daemon(t testing.TB) string {
	return daemonBin.build(t, "github.com/pandastack/pandastack/cmd/pandastack", "pandastack")
}

type buildError struct {
	err error
	out string
}

func (e *buildError) Error() string { return e.err.Error() + ": " + e.out }

func moduleRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// TemplateDir returns the template cache directory tests share.
func TemplateDir() string {
	if d := os.Getenv("PANDASTACK_TEMPLATE_DIR"); d != "" {
		return d
	}
	return DefaultTemplateDir
}

// Templates returns a template store over the shared cache.
func Templates(t testing.TB) *template.Store {
	t.Helper()
	s, err := template.NewStore(TemplateDir(), "", template.Builtin(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// Template returns a built template, building it when the cache lacks it
// (which takes a minute or two and needs mmdebstrap).
func Template(t testing.TB, name string) template.Template {
	t.Helper()
	Runsc(t)
	if _, err := exec.LookPath("mmdebstrap"); err != nil {
		if _, gerr := Templates(t).Get(name); gerr != nil {
			unavailable(t, "template %q not built and mmdebstrap missing", name)
		}
	}
	tpl, err := Templates(t).Ensure(context.Background(), name)
	if err != nil {
		t.Fatalf("ensuring template %q: %v", name, err)
	}
	return tpl
}
