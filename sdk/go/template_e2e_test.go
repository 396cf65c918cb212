package pandastack_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/pandastack/pandastack/internal/daemontest"
	pandastack "github.com/pandastack/pandastack/sdk/go"
	"github.com/pandastack/pandastack/wire"
)

func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, body := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		mode := os.FileMode(0o644)
		if strings.HasSuffix(name, ".sh") {
			mode = 0o755
		}
		if err := os.WriteFile(p, []byte(body), mode); err != nil {
			t.Fatal(err)
		}
	}
}

// eventLog collects a build's events.
type eventLog struct {
	mu  sync.Mutex
	evs []wire.TemplateBuildEvent
}

func (l *eventLog) add(e wire.TemplateBuildEvent) {
	l.mu.Lock()
	l.evs = append(l.evs, e)
	l.mu.Unlock()
}
func (l *eventLog) all() []wire.TemplateBuildEvent {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]wire.TemplateBuildEvent(nil), l.evs...)
}

// TestTemplatesRealServer builds a template with BuildTemplate from a
// directory (a .dockerignore leaving files out, a symbolic link out of the
// context sent as a link and not copied, a Dockerfile outside the context),
// streams its log, creates a sandbox from it, rebuilds with the last line
// changed (earlier steps CACHED), lists, gets and deletes it (refused while
// in use), and checks refusals and a failing step. (A cancelled build:
// TestTemplateCLIRealServer, through Ctrl-C.)
func TestTemplatesRealServer(t *testing.T) {
	s := daemontest.Start(t, nil)
	c := s.Client(t)
	ctx := context.Background()

	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{
		"app/hello.sh":      "#!/bin/sh\necho \"hello from $1\"\n",
		"app/notes.txt":     "kept\n",
		"app/secret.key":    "must not be sent\n",
		"app/cache/big.bin": "ignored directory\n",
		".dockerignore":     "# comments and patterns\n**/*.key\napp/cache\n",
	})
	if err := os.Symlink("/etc/passwd", filepath.Join(dir, "passwd-link")); err != nil {
		t.Fatal(err)
	}
	dfDir := t.TempDir()
	dockerfile := func(last string) {
		writeFiles(t, dfDir, map[string]string{"build.Dockerfile": "FROM base\n" +
			"COPY app/ /opt/app/\n" +
			"RUN /opt/app/hello.sh build | tee /opt/app/made.txt && ls -a /opt/app > /opt/app/listing\n" +
			"ARG FLAVOUR=plain\n" +
			"ENV FLAVOUR=$FLAVOUR\n" +
			"CMD " + last + "\n"})
	}
	dockerfile(`["/opt/app/hello.sh", "one"]`)
	var log eventLog
	opts := pandastack.BuildTemplateOptions{
		Name: "sdk-app:v1", ContextDir: dir, Dockerfile: filepath.Join(dfDir, "build.Dockerfile"),
		BuildArgs: map[string]string{"FLAVOUR": "mint"}, OnLog: log.add,
	}
	tpl, err := c.BuildTemplate(ctx, opts)
	if err != nil {
		t.Fatalf("build: %v\n%+v", err, log.all())
	}
	if tpl.Ref != "sdk-app:v1" || tpl.Builtin || tpl.Hash == "" || tpl.Base != "base" || len(tpl.Cmd) != 2 {
		t.Fatalf("template: %+v", tpl)
	}
	steps, output := 0, ""
	for _, e := range log.all() {
		switch e.Type {
		case wire.BuildEventStep:
			steps++
			if e.Steps != 6 || e.Instruction == "" || e.Line != e.Step {
				t.Errorf("step event %+v", e)
			}
		case wire.BuildEventOutput:
			output += e.Text
		}
	}
	if evs := log.all(); steps != 6 || evs[len(evs)-1].Type != wire.BuildEventTemplate {
		t.Errorf("%d steps, log %+v", steps, evs)
	}
	if !strings.Contains(output, "hello from build") {
		t.Errorf("RUN output not streamed: %q", output)
	}

	sb, err := c.Create(ctx, pandastack.CreateOptions{Template: tpl.Ref})
	if err != nil {
		t.Fatal(err)
	}
	defer sb.Close()
	res, err := sb.Exec(ctx, "cat /opt/app/made.txt /opt/app/notes.txt; echo $FLAVOUR; cat /opt/app/listing", pandastack.ExecOptions{})
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("exec: %+v %v", res, err)
	}
	if !strings.HasPrefix(res.Stdout, "hello from build\nkept\nmint\n") || strings.Contains(res.Stdout, "secret") || strings.Contains(res.Stdout, "cache") {
		t.Errorf("the sandbox sees %q (the .dockerignore'd files must be absent)", res.Stdout)
	}

	// Rebuild with the last line changed: the earlier steps are cached.
	dockerfile(`["/opt/app/hello.sh", "two"]`)
	log = eventLog{}
	tpl2, err := c.BuildTemplate(ctx, opts)
	if err != nil {
		t.Fatalf("rebuild: %v", err)
	}
	cached := map[int]bool{}
	for _, e := range log.all() {
		if e.Type == wire.BuildEventCached {
			cached[e.Step] = true
		}
	}
	if !cached[2] || !cached[3] || cached[6] || tpl2.Hash == tpl.Hash || tpl2.Cmd[1] != "two" {
		t.Errorf("rebuild: cached %v, template %+v", cached, tpl2)
	}

	list, err := c.ListTemplates(ctx)
	found := false
	for _, x := range list {
		found = found || x.Ref == "sdk-app:v1"
	}
	if err != nil || !found {
		t.Errorf("list: %+v %v", list, err)
	}
	if got, err := c.GetTemplate(ctx, "sdk-app:v1"); err != nil || got.Hash != tpl2.Hash {
		t.Errorf("get: %+v %v", got, err)
	}
	if err := c.DeleteTemplate(ctx, "sdk-app:v1"); !errors.Is(err, pandastack.ErrConflict) || !strings.Contains(err.Error(), sb.ID()) {
		t.Errorf("delete in use: got %v, want ErrConflict naming %s", err, sb.ID())
	}
	if err := sb.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.DeleteTemplate(ctx, "sdk-app:v1"); err != nil {
		t.Errorf("delete: %v", err)
	}
	if _, err := c.GetTemplate(ctx, "sdk-app:v1"); !errors.Is(err, pandastack.ErrNotFound) {
		t.Errorf("get after delete: %v, want ErrNotFound", err)
	}

	// A Dockerfile the server refuses: invalid argument naming the line.
	writeFiles(t, dir, map[string]string{"Dockerfile": "FROM base\nHEALTHCHECK CMD true\n"})
	if _, err := c.BuildTemplate(ctx, pandastack.BuildTemplateOptions{Name: "sdk-bad", ContextDir: dir}); !errors.Is(err, pandastack.ErrInvalidArgument) || !strings.Contains(err.Error(), "line 2") {
		t.Errorf("bad Dockerfile: got %v, want invalid argument naming line 2", err)
	}
	// A failing step: a *BuildError naming its line.
	writeFiles(t, dir, map[string]string{"Dockerfile": "FROM base\nRUN echo failing; exit 3\n"})
	_, err = c.BuildTemplate(ctx, pandastack.BuildTemplateOptions{Name: "sdk-bad", ContextDir: dir})
	var be *pandastack.BuildError
	if !errors.As(err, &be) || be.Step != 2 || !strings.Contains(err.Error(), "line 2") {
		t.Errorf("failing step: got %v, want a BuildError at step 2", err)
	}

}
