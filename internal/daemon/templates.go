package daemon

import (
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/pandastack/pandastack/internal/api"
	"github.com/pandastack/pandastack/internal/build"
	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/image"
	"github.com/pandastack/pandastack/internal/runtime/gvisor"
	"github.com/pandastack/pandastack/internal/store"
	"github.com/pandastack/pandastack/internal/template"
	"github.com/pandastack/pandastack/wire"
)

// Build context bounds (the unpacked archive).
const (
	maxContextBytes   = 2 << 30
	maxContextEntries = 1 << 20
	// maxConcurrentBuilds bounds the builds running at once; more wait.
	maxConcurrentBuilds = 2
)

// templates serves the templates API: the built-in templates of the
// template store, and tenants' templates built from Dockerfiles by the
// builder and registered in the store.
type templates struct {
	tpls    *template.Store
	builder *build.Builder
	db      *store.Store
	// work holds build contexts while their builds run.
	work string
	// dataDir is the server's data directory, never named to tenants.
	dataDir string
	sem     chan struct{}
	log     *slog.Logger
	// rt runs the builds' RUN steps.
	rt *gvisor.Runtime
}

var _ api.Templates = (*templates)(nil)

func (t *templates) List(ctx context.Context, tenant string) ([]wire.Template, error) {
	var out []wire.Template
	for _, d := range t.tpls.Definitions() {
		out = append(out, t.builtinWire(d))
	}
	for _, e := range t.tpls.Entries(tenant) {
		out = append(out, builtWire(e))
	}
	return out, nil
}

func (t *templates) builtinWire(d template.Definition) wire.Template {
	_, err := t.tpls.Get(d.Name)
	return wire.Template{Name: d.Name, Ref: d.Name, Description: d.Description, Packages: append([]string{}, d.Packages...),
		Ready: err == nil, Builtin: true, Hash: d.Hash(), Base: "debian:" + template.Suite}
}

func builtWire(e template.BuiltEntry) wire.Template {
	md := e.Metadata
	at := e.BuiltAt
	return wire.Template{Name: e.Name, Tag: e.Tag, Ref: e.Ref(), Description: "built from " + md.From, Packages: []string{},
		Ready: true, Hash: e.Key, Base: md.From, SizeBytes: e.SizeBytes, BuiltAt: &at,
		Env: md.Env, WorkingDir: md.WorkingDir, User: md.User, Cmd: md.Cmd, Entrypoint: md.Entrypoint, ExposedPorts: md.ExposedPorts}
}

// lookup finds the template a reference names for the tenant.
func (t *templates) lookup(tenant, ref string) (wire.Template, *template.BuiltEntry, error) {
	for _, d := range t.tpls.Definitions() {
		if d.Name == ref {
			return t.builtinWire(d), nil, nil
		}
	}
	name, tag, err := template.ParseRef(ref)
	if err != nil {
		return wire.Template{}, nil, err
	}
	e, ok := t.tpls.Entry(tenant, name, tag)
	if !ok {
		return wire.Template{}, nil, errdefs.NotFound("template %q not found", name+":"+tag)
	}
	return builtWire(e), &e, nil
}

func (t *templates) Get(ctx context.Context, tenant, ref string) (wire.Template, error) {
	w, _, err := t.lookup(tenant, ref)
	return w, err
}

// Delete removes the tenant's built template, refusing while a sandbox
// (running or paused) or a snapshot was made from it.
func (t *templates) Delete(ctx context.Context, tenant, ref string) error {
	w, e, err := t.lookup(tenant, ref)
	if err != nil {
		return err
	}
	if e == nil {
		return errdefs.Conflict("%q is a built-in template; it cannot be deleted", w.Name)
	}
	sbs, err := t.db.ListSandboxes(ctx, tenant, wire.StateCreating, wire.StateRunning, wire.StatePaused)
	if err != nil {
		return fmt.Errorf("listing sandboxes: %w", err)
	}
	var users []string
	for _, sb := range sbs {
		if sb.Template == e.Ref() {
			users = append(users, "sandbox "+sb.ID)
		}
	}
	snaps, err := t.db.ListSnapshots(ctx, tenant)
	if err != nil {
		return fmt.Errorf("listing snapshots: %w", err)
	}
	for _, sn := range snaps {
		if sn.Template == e.Ref() {
			users = append(users, "snapshot "+sn.ID)
		}
	}
	if len(users) > 0 {
		more := ""
		if len(users) > 5 {
			more = fmt.Sprintf(" and %d more", len(users)-5)
			users = users[:5]
		}
		return errdefs.Conflict("template %q is in use by %v%s: kill the sandboxes and delete the snapshots first", e.Ref(), users, more)
	}
	return t.tpls.Unregister(tenant, e.Name, e.Tag)
}

// Build unpacks the build context, checks the Dockerfile, builds it in
// the builder and registers the result as the tenant's template.
func (t *templates) Build(ctx context.Context, tenant string, req api.TemplateBuild, body io.Reader, emit func(wire.TemplateBuildEvent)) (wire.Template, error) {
	ref := req.Name
	if req.Tag != "" {
		ref += ":" + req.Tag
	}
	name, tag, err := template.ParseRef(ref)
	if err != nil {
		return wire.Template{}, err
	}
	if t.tpls.IsBuiltin(name) {
		return wire.Template{}, errdefs.Conflict("%q is a built-in template; choose another name", name)
	}
	dfPath := req.Dockerfile
	if dfPath == "" {
		dfPath = "Dockerfile"
	}
	if !filepath.IsLocal(dfPath) {
		return wire.Template{}, errdefs.Invalid("dockerfile must be a relative path inside the build context, got %q", dfPath)
	}
	if err := os.MkdirAll(t.work, 0o700); err != nil {
		return wire.Template{}, fmt.Errorf("creating the build context directory: %w", err)
	}
	dir, err := os.MkdirTemp(t.work, "context-")
	if err != nil {
		return wire.Template{}, fmt.Errorf("creating a build context directory: %w", err)
	}
	defer os.RemoveAll(dir)
	// The context's root is what `COPY . /dest` gives /dest: MkdirTemp's
	// 0700 would hide the files from the sandbox's user (t.work is 0700).
	if err := os.Chmod(dir, 0o755); err != nil {
		return wire.Template{}, fmt.Errorf("creating a build context directory: %w", err)
	}
	src := body
	if req.Gzip {
		zr, err := gzip.NewReader(body)
		if err != nil {
			return wire.Template{}, errdefs.Invalid("the body is not gzip-compressed: %v", err)
		}
		src = zr
	}
	if _, err := image.UnpackTar(ctx, src, dir, image.Limits{MaxBytes: maxContextBytes, MaxEntries: maxContextEntries}); err != nil {
		return wire.Template{}, contextError(err)
	}
	// Read what may follow the archive, so that the body is consumed.
	if _, err := io.Copy(io.Discard, body); err != nil {
		return wire.Template{}, errdefs.Wrap(errdefs.ErrInvalid, err, "reading the request body failed")
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return wire.Template{}, fmt.Errorf("opening the build context: %w", err)
	}
	df, err := readFile(root, dfPath, 1<<20)
	root.Close()
	if err != nil {
		return wire.Template{}, errdefs.Invalid("the build context has no Dockerfile at %q (name another with dockerfile=PATH)", dfPath)
	}
	if _, err := build.ParseDockerfile(df); err != nil {
		return wire.Template{}, errdefs.Wrap(errdefs.ErrInvalid, err, "%v", err)
	}

	select {
	case t.sem <- struct{}{}:
	case <-ctx.Done():
		return wire.Template{}, ctx.Err()
	}
	defer func() { <-t.sem }()
	out, err := t.tpls.StagingDir()
	if err != nil {
		return wire.Template{}, err
	}
	defer os.RemoveAll(out)
	start := time.Now()
	res, err := t.builder.Build(ctx, build.Options{
		Dockerfile: df, Context: dir, Args: req.Args, Output: out, NoCache: req.NoCache, NoHostPaths: true,
		Templates: func(ctx context.Context, name string) (string, string, error) {
			tp, err := t.tpls.Resolve(tenant, name)
			if err != nil {
				return "", "", err
			}
			return tp.Rootfs, tp.Hash, nil
		},
		Log: func(e build.Event) { emit(buildEvent(e)) },
	})
	if err != nil {
		return wire.Template{}, buildError(ctx, err, dir, t.dataDir)
	}
	e, err := t.tpls.Register(tenant, name, tag, out)
	if err != nil {
		return wire.Template{}, err
	}
	t.log.Info("template built", "tenant", tenant, "template", e.Ref(), "key", e.Key, "steps", res.Steps, "cached", res.Cached,
		"dur", time.Since(start))
	return builtWire(e), nil
}

func buildEvent(e build.Event) wire.TemplateBuildEvent {
	w := wire.TemplateBuildEvent{Type: string(e.Kind), Step: e.Step, Steps: e.Steps, Line: e.Line, Instruction: e.Instruction,
		Text: e.Text, ElapsedMS: float64(e.Elapsed.Microseconds()) / 1000}
	if e.Kind == build.EventResult {
		// The final "template" event reports the result.
		w.Type, w.Text = wire.BuildEventDone, ""
	}
	return w
}

// buildError turns a build's failure into an error the tenant may read:
// the Dockerfile's own faults (a line, a failing RUN with its output) are
// theirs; anything else is the server's, and its text stays in the log.
func buildError(ctx context.Context, err error, hostDirs ...string) error {
	var le *build.LineError
	var se *build.StepError
	switch {
	case ctx.Err() != nil:
		return errdefs.Wrap(errdefs.ErrInvalid, err, "the build was cancelled")
	case errors.As(err, &se):
		return errdefs.Wrap(errdefs.ErrInvalid, err, "%v", se)
	case errors.As(err, &le):
		return errdefs.Wrap(errdefs.ErrInvalid, err, "%s", scrub(le.Error(), hostDirs))
	}
	return err
}

// scrub removes the server's directories from a message: a path in the
// build context is shown relative to it, and nothing names the host's
// files.
func scrub(msg string, dirs []string) string {
	for _, d := range dirs {
		if d == "" {
			continue
		}
		msg = strings.ReplaceAll(msg, d+"/", "")
		msg = strings.ReplaceAll(msg, d, ".")
	}
	return msg
}

// contextError is the tenant's view of a context archive that could not be
// unpacked.
func contextError(err error) error {
	var ee *image.EntryError
	switch {
	case errors.As(err, &ee) && errors.Is(err, image.ErrLimit):
		return errdefs.Wrap(errdefs.ErrTooLarge, err, "the build context is too large: at most %d bytes and %d entries", maxContextBytes, maxContextEntries)
	case errors.As(err, &ee):
		return errdefs.Wrap(errdefs.ErrInvalid, err, "the build context has an entry that cannot be unpacked: %q", ee.Entry)
	case errors.Is(err, errdefs.ErrInvalid):
		return err
	}
	return errdefs.Wrap(errdefs.ErrInvalid, err, "the body is not a tar archive of the build context")
}

// readFile reads a file inside root, at most max bytes.
func readFile(root *os.Root, name string, max int64) ([]byte, error) {
	f, err := root.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%s is larger than %d bytes", name, max)
	}
	return b, nil
}

// newTemplates sets up template builds: built templates under
// <data>/templates-built, the build cache under <data>/build-cache, and a
// runtime of their own for RUN steps (state in <data>/build-runtime), so
// that the sandbox manager's reconciliation never sees a build's jobs. No
// build survives a restart: the jobs an earlier run left there are deleted.
func newTemplates(ctx context.Context, cfg Config, runsc string, tpls *template.Store, db *store.Store, log *slog.Logger) (*templates, error) {
	if err := tpls.EnableBuilt(filepath.Join(cfg.DataDir, "templates-built")); err != nil {
		return nil, err
	}
	rt, err := gvisor.New(gvisor.Config{Runsc: runsc, StateDir: filepath.Join(cfg.DataDir, "build-runtime"), CgroupParent: cfg.CgroupParent, Log: log})
	if err != nil {
		return nil, fmt.Errorf("starting the build runtime: %w", err)
	}
	ids, err := rt.List(ctx)
	if err != nil {
		rt.Close()
		return nil, fmt.Errorf("listing leftover build jobs: %w", err)
	}
	for _, id := range ids {
		if err := rt.Delete(ctx, id); err != nil {
			log.Warn("deleting a leftover build job", "id", id, "err", err)
		}
	}
	cache := filepath.Join(cfg.DataDir, "build-cache")
	b, err := build.New(build.Config{Dir: cache, Runner: rt, Log: log})
	if err != nil {
		rt.Close()
		return nil, err
	}
	return &templates{tpls: tpls, builder: b, db: db, work: filepath.Join(cache, "contexts"), dataDir: cfg.DataDir,
		sem: make(chan struct{}, maxConcurrentBuilds), log: log, rt: rt}, nil
}

func (t *templates) close() { t.rt.Close() }
