package build

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/runtime/gvisor"
	"github.com/pandastack/pandastack/internal/template"
	"github.com/pandastack/pandastack/internal/testenv"
)

// harness is a Builder over a real gVisor runtime and the built base
// template, with a fresh cache.
type harness struct {
	b   *Builder
	tpl template.Template
	dir string
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	runsc := testenv.Runsc(t)
	tpl := testenv.Template(t, "base")
	rt, err := gvisor.New(gvisor.Config{Runsc: runsc, StateDir: t.TempDir(), CgroupParent: "/pandastack-test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	dir := t.TempDir()
	b, err := New(Config{
		Dir:    filepath.Join(dir, "cache"),
		Runner: rt,
		Templates: func(ctx context.Context, name string) (string, string, error) {
			if name == "base" {
				return tpl.Rootfs, tpl.Hash, nil
			}
			return "", "", errdefs.NotFound("template %q not found", name)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	return &harness{b: b, tpl: tpl, dir: dir}
}

// buildLog collects a build's events.
type buildLog struct {
	mu     sync.Mutex
	events []Event
}

func (l *buildLog) add(e Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, e)
}

// cached returns the steps reported CACHED and the steps that ran output.
func (l *buildLog) cached() map[int]bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[int]bool{}
	for _, e := range l.events {
		if e.Kind == EventCached {
			out[e.Step] = true
		}
	}
	return out
}

func (l *buildLog) text() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var sb strings.Builder
	for _, e := range l.events {
		s := e.String()
		sb.WriteString(s)
		if !strings.HasSuffix(s, "\n") {
			sb.WriteString("\n")
		}
	}
	return sb.String()
}

// checkClean fails the test if a build left a step directory, an overlay
// mount or a job sandbox's directory behind.
func checkClean(t *testing.T, h *harness) {
	t.Helper()
	work := filepath.Join(h.dir, "cache", "work")
	if ents, err := os.ReadDir(work); err != nil || len(ents) != 0 {
		t.Errorf("step directories left in %s: %v %v", work, ents, err)
	}
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(mi), h.dir) {
		t.Errorf("mounts left under %s", h.dir)
	}
}

func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, body := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

const appDockerfile = `# an app on the base template
ARG GREETING=hello
FROM base
ARG GREETING
ENV APP_HOME=/srv/app \
    MODE="test mode"
WORKDIR ${APP_HOME}
COPY gen.sh data/ ./
RUN chmod +x gen.sh && ./gen.sh "$GREETING" > out.txt && id -u > uid.txt && pwd > pwd.txt && echo "mode=$MODE" >> out.txt
RUN ["/bin/sh", "-c", "echo json-form > json.txt"]
COPY --chown=user:user gen.sh /home/user/mine.sh
USER user
RUN id -un > /home/user/who.txt && echo "$HOME" >> /home/user/who.txt
EXPOSE 8080
CMD ["./gen.sh", "world"]
RUN echo %s > /home/user/version.txt
`

func TestBuildFromTemplate(t *testing.T) {
	h := newHarness(t)
	ctxDir := filepath.Join(h.dir, "context")
	writeFiles(t, ctxDir, map[string]string{
		"gen.sh":           "#!/bin/sh\nprintf '%s from a script\\n' \"$1\"\n",
		"data/a.txt":       "file a\n",
		"data/sub/b.txt":   "file b\n",
		"unused/other.txt": "not copied\n",
	})
	// A link in a copied directory is copied as a link, never followed:
	// the host's /etc/passwd stays out of the template.
	if err := os.Symlink("/etc/passwd", filepath.Join(ctxDir, "data", "passwd-link")); err != nil {
		t.Fatal(err)
	}
	build := func(version string) (Result, *buildLog, time.Duration) {
		t.Helper()
		var log buildLog
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		start := time.Now()
		res, err := h.b.Build(ctx, Options{
			Dockerfile: []byte(strings.Replace(appDockerfile, "%s", version, 1)),
			Context:    ctxDir,
			Output:     filepath.Join(h.dir, "out"),
			Log:        log.add,
		})
		if err != nil {
			t.Fatalf("build: %v\nlog:\n%s", err, log.text())
		}
		return res, &log, time.Since(start)
	}

	res, log1, first := build("v1")
	if c := log1.cached(); len(c) != 0 {
		t.Errorf("first build reported cached steps %v", c)
	}
	root := res.Rootfs
	for _, tc := range []struct{ path, want string }{
		{"srv/app/out.txt", "hello from a script\nmode=test mode\n"},
		{"srv/app/uid.txt", "0\n"},
		{"srv/app/pwd.txt", "/srv/app\n"},
		{"srv/app/json.txt", "json-form\n"},
		{"srv/app/a.txt", "file a\n"},
		{"srv/app/sub/b.txt", "file b\n"},
		{"home/user/who.txt", "user\n/home/user\n"},
		{"home/user/version.txt", "v1\n"},
	} {
		if got := readFile(t, filepath.Join(root, tc.path)); got != tc.want {
			t.Errorf("/%s = %q, want %q", tc.path, got, tc.want)
		}
	}
	if st, err := os.Stat(filepath.Join(root, "srv/app/gen.sh")); err != nil || st.Mode().Perm() != 0o755 {
		t.Errorf("gen.sh: %v, mode %v; want 0755 (made executable by RUN)", err, st.Mode())
	}
	if _, err := os.Lstat(filepath.Join(root, "srv/app/unused")); err == nil {
		t.Errorf("unused context files were copied")
	}
	if target, err := os.Readlink(filepath.Join(root, "srv/app/passwd-link")); err != nil || target != "/etc/passwd" {
		t.Errorf("passwd-link: %q, %v; want a link to /etc/passwd", target, err)
	}
	var st syscall.Stat_t
	if err := syscall.Lstat(filepath.Join(root, "home/user/mine.sh"), &st); err != nil || st.Uid != 1000 || st.Gid != 1000 {
		t.Errorf("COPY --chown=user:user: uid %d gid %d (%v), want 1000", st.Uid, st.Gid, err)
	}
	if err := syscall.Lstat(filepath.Join(root, "srv/app/a.txt"), &st); err != nil || st.Uid != 0 {
		t.Errorf("COPY without --chown: uid %d (%v), want 0", st.Uid, err)
	}
	// The base template's shell and default user are there.
	if _, err := os.Stat(filepath.Join(root, "usr/bin/dash")); err != nil {
		t.Errorf("no shell in the result: %v", err)
	}
	if !strings.Contains(readFile(t, filepath.Join(root, "etc/passwd")), "user:x:1000:1000:") {
		t.Errorf("the result lost the default user")
	}

	md := res.Metadata
	wantEnv := map[string]bool{"APP_HOME=/srv/app": true, "MODE=test mode": true}
	for _, e := range md.Env {
		delete(wantEnv, e)
	}
	if len(wantEnv) != 0 || md.WorkingDir != "/srv/app" || md.User != "user" ||
		strings.Join(md.Cmd, " ") != "./gen.sh world" || strings.Join(md.ExposedPorts, ",") != "8080/tcp" ||
		!strings.HasPrefix(md.Base, "template:base@"+h.tpl.Hash) {
		t.Errorf("metadata = %+v", md)
	}
	onDisk := readFile(t, filepath.Join(h.dir, "out", MetadataFile))
	if !strings.Contains(onDisk, md.Key) || !strings.Contains(onDisk, `"working_dir": "/srv/app"`) {
		t.Errorf("template.json = %s", onDisk)
	}

	// Only the last line changes: every step before it is CACHED.
	res2, log2, second := build("v2")
	cached := log2.cached()
	steps := res2.Steps
	for _, n := range []int{4, 5, 6, 7, 8, 10} { // WORKDIR, COPY, RUN, RUN, COPY, RUN
		if !cached[n] {
			t.Errorf("step %d was not CACHED on the rebuild; log:\n%s", n, log2.text())
		}
	}
	if cached[steps] {
		t.Errorf("the changed last step %d was CACHED", steps)
	}
	if !strings.Contains(log2.text(), " ---> CACHED") {
		t.Errorf("the log does not say CACHED:\n%s", log2.text())
	}
	if got := readFile(t, filepath.Join(res2.Rootfs, "home/user/version.txt")); got != "v2\n" {
		t.Errorf("rebuilt version.txt = %q", got)
	}
	if res2.Metadata.Key == md.Key {
		t.Errorf("a different result has the same key")
	}
	checkClean(t, h)
	t.Logf("first build %v, rebuild after changing the last line %v (%d of %d steps cached)", first, second, res2.Cached, res2.Steps)
}

func TestBuildRunFails(t *testing.T) {
	h := newHarness(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var log buildLog
	_, err := h.b.Build(ctx, Options{
		Dockerfile: []byte("FROM base\nRUN echo fine\n\nRUN echo some output; echo the reason >&2; exit 3\nRUN echo never\n"),
		Output:     filepath.Join(h.dir, "out"),
		Log:        log.add,
	})
	var se *StepError
	if !errors.As(err, &se) {
		t.Fatalf("err = %v, want a *StepError", err)
	}
	if se.ExitCode != 3 || se.Line != 4 || !strings.Contains(se.Output, "some output") || !strings.Contains(se.Output, "the reason") {
		t.Fatalf("step error = %+v", se)
	}
	for _, want := range []string{"line 4", "exit code 3", "the reason"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if strings.Contains(log.text(), "never") && strings.Contains(log.text(), "Step 4/4") {
		t.Errorf("the build went on after the failure:\n%s", log.text())
	}
	if !strings.Contains(log.text(), "the reason") {
		t.Errorf("the failing step's output was not streamed:\n%s", log.text())
	}
	if _, err := os.Stat(filepath.Join(h.dir, "out")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a failed build left its output: %v", err)
	}
	checkClean(t, h)
}

func TestBuildCancel(t *testing.T) {
	h := newHarness(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	log := func(e Event) {
		if e.Kind == EventOutput && strings.Contains(e.Text, "started") {
			cancel()
		}
	}
	done := make(chan error, 1)
	go func() {
		_, err := h.b.Build(ctx, Options{
			Dockerfile: []byte("FROM base\nRUN echo started; sleep 600\n"),
			Output:     filepath.Join(h.dir, "out"),
			Log:        log,
		})
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
	case <-time.After(90 * time.Second):
		t.Fatal("a cancelled build did not stop")
	}
	checkClean(t, h)
}
