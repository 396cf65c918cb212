// Package build builds template root filesystems from Dockerfiles (issue
// 11). A build starts from a PandaStack template (FROM base) or an OCI
// image (a registry reference, "oci-layout:DIR[:ref]" or
// "docker-archive:FILE[:tag]", through package image), executes the
// Dockerfile's instructions in order and leaves a root filesystem directory
// plus its metadata (environment, working directory, user, start command,
// ports) where the caller asked.
//
// Every step that changes files is one layer: an overlay upper directory
// mounted over the layers below it and the base root filesystem (which is
// never written). RUN executes inside a gVisor sandbox (runtime.JobRunner)
// whose root is that overlay's merged view, written in place (runsc
// --overlay2=none), with network none; COPY and ADD write into the merged
// view through os.Root. After the step the upper directory is the step's
// layer, stored once under its content digest.
//
// Each step is cached under a key hashing the key of the step before, the
// instruction after substitution, the environment, working directory and
// user it runs with, and, for COPY and ADD, the copied files' contents: a
// rebuild reuses every step up to the first whose key changed, and says
// CACHED for each in its log.
//
// The package keeps no global state; every blocking call takes a context.
package build

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/moby/buildkit/frontend/dockerfile/shell"
	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/image"
	"github.com/pandastack/pandastack/internal/runtime"
)

// version is part of every cache key: bump it when a step's result for the
// same inputs changes.
const version = "pandastack-build-1"

// DefaultPath is the PATH of a step whose environment sets none (Docker's).
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// DefaultStepTimeout bounds one RUN step unless Options say otherwise.
const DefaultStepTimeout = 30 * time.Minute

// ResolveTemplate returns the root filesystem directory and build hash of
// the PandaStack template name, or an error wrapping errdefs.ErrNotFound
// when there is no such template (FROM then takes the name as an image).
type ResolveTemplate func(ctx context.Context, name string) (rootfs, hash string, err error)

// Config configures a Builder.
type Config struct {
	// Dir holds the build cache (layers, step records, unpacked bases) and
	// the steps' working directories. One Builder per directory.
	Dir string
	// Runner runs RUN steps in sandboxes.
	Runner runtime.JobRunner
	// Templates resolves FROM names to PandaStack templates; nil means
	// FROM always names an image.
	Templates ResolveTemplate
	// Registry says how to reach registries for FROM image references.
	Registry image.RegistryOptions
	// UnpackLimits bound what an image base may expand to.
	UnpackLimits image.Limits
	Log          *slog.Logger
}

// Builder builds templates. It is safe for concurrent use.
type Builder struct {
	cfg Config
}

// New returns a Builder over cfg.Dir, unmounting and removing what an
// earlier builder on it left mid-step.
func New(cfg Config) (*Builder, error) {
	if cfg.Runner == nil {
		return nil, errors.New("build: no job runner")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	abs, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("build directory: %w", err)
	}
	cfg.Dir = abs
	for _, d := range []string{"layers", "steps", "bases", "work"} {
		if err := os.MkdirAll(filepath.Join(cfg.Dir, d), 0o700); err != nil {
			return nil, fmt.Errorf("creating build directory: %w", err)
		}
	}
	b := &Builder{cfg: cfg}
	if err := b.cleanWork(); err != nil {
		return nil, err
	}
	return b, nil
}

// cleanWork unmounts and removes the working directories of steps an
// earlier builder did not finish.
func (b *Builder) cleanWork() error {
	work := filepath.Join(b.cfg.Dir, "work")
	if mi, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		var points []string
		for _, line := range strings.Split(string(mi), "\n") {
			f := strings.Fields(line)
			if len(f) > 4 && strings.HasPrefix(f[4], work+"/") {
				points = append(points, f[4])
			}
		}
		sort.Sort(sort.Reverse(sort.StringSlice(points)))
		for _, p := range points {
			if err := unmount(p); err != nil {
				return err
			}
		}
	}
	ents, err := os.ReadDir(work)
	if err != nil {
		return fmt.Errorf("reading %s: %w", work, err)
	}
	for _, e := range ents {
		if err := os.RemoveAll(filepath.Join(work, e.Name())); err != nil {
			return fmt.Errorf("removing a leftover step directory: %w", err)
		}
	}
	return nil
}

// Options describe one build.
type Options struct {
	// Dockerfile is the Dockerfile's text.
	Dockerfile []byte
	// Context is the build context directory COPY and ADD read from.
	Context string
	// Args are build arguments (--build-arg): they set declared ARGs.
	Args map[string]string
	// Output is the directory the result goes to (Output/rootfs and
	// Output/template.json); it is replaced when it holds another result.
	Output string
	// StepTimeout bounds each RUN step; 0 means DefaultStepTimeout.
	StepTimeout time.Duration
	// Limits bound each RUN step's sandbox; zero fields get defaults.
	Limits runtime.Limits
	// Log receives the build's progress and the steps' output as they
	// come, from one goroutine at a time; nil discards them.
	Log func(Event)
	// NoCache rebuilds every step (the results still enter the cache).
	NoCache bool
	// NoHostPaths refuses FROM sources that are paths on this machine
	// ("oci-layout:", "docker-archive:"): builds asked for over the API
	// must not read the server's files.
	NoHostPaths bool
	// Templates, when set, resolves FROM names for this build instead of
	// Config.Templates (a tenant's own templates).
	Templates ResolveTemplate
}

// EventKind says what an Event reports.
type EventKind string

const (
	// EventStep: a step begins; Instruction is it as written.
	EventStep EventKind = "step"
	// EventCached: the step's result was taken from the cache.
	EventCached EventKind = "cached"
	// EventOutput: output of a RUN step (Text, as it came).
	EventOutput EventKind = "output"
	// EventDone: the step finished (Elapsed).
	EventDone EventKind = "done"
	// EventResult: the build finished; Text is the result's key.
	EventResult EventKind = "result"
)

// Event is one entry of a build's log.
type Event struct {
	Kind        EventKind     `json:"kind"`
	Step        int           `json:"step,omitempty"`
	Steps       int           `json:"steps,omitempty"`
	Line        int           `json:"line,omitempty"`
	Instruction string        `json:"instruction,omitempty"`
	Text        string        `json:"text,omitempty"`
	Elapsed     time.Duration `json:"elapsed,omitempty"`
}

// String renders the event as a line of a Docker-style build log (output
// events as they came).
func (e Event) String() string {
	switch e.Kind {
	case EventStep:
		return fmt.Sprintf("Step %d/%d : %s", e.Step, e.Steps, e.Instruction)
	case EventCached:
		return " ---> CACHED"
	case EventDone:
		return fmt.Sprintf(" ---> done in %.2fs", e.Elapsed.Seconds())
	case EventResult:
		return "Built " + e.Text
	default:
		return e.Text
	}
}

// Metadata is what a built template says besides its files.
type Metadata struct {
	// Key identifies the build's result: the same key, the same files
	// and metadata.
	Key string `json:"key"`
	// From is the FROM argument after substitution; Base identifies what
	// it resolved to ("template:NAME@HASH" or "image:sha256:…").
	From string `json:"from"`
	Base string `json:"base"`
	// Env is the environment (KEY=VALUE, in order).
	Env []string `json:"env"`
	// WorkingDir is the start command's directory.
	WorkingDir string `json:"working_dir"`
	// User is the USER the Dockerfile (or the image) set; "" means none
	// (sandboxes then run commands as template.UserName).
	User         string            `json:"user,omitempty"`
	Entrypoint   []string          `json:"entrypoint,omitempty"`
	Cmd          []string          `json:"cmd,omitempty"`
	ExposedPorts []string          `json:"exposed_ports,omitempty"`
	Labels       map[string]string `json:"labels,omitempty"`
	StopSignal   string            `json:"stop_signal,omitempty"`
	Shell        []string          `json:"shell,omitempty"`
	// Skipped lists device nodes and sockets left out of the result.
	Skipped []string  `json:"skipped,omitempty"`
	Created time.Time `json:"created"`
}

// MetadataFile is the name of the metadata file beside the rootfs.
const MetadataFile = "template.json"

// Result describes a finished build.
type Result struct {
	// Rootfs is Output/rootfs.
	Rootfs   string
	Metadata Metadata
	// Steps counts the instructions, FROM included; Cached those taken
	// from the cache; Ran the RUN, COPY, ADD and WORKDIR steps executed.
	Steps, Cached, Ran int
}

// StepError is a RUN step that ran and failed.
type StepError struct {
	Line        int
	Instruction string
	// ExitCode is the command's exit status (128+n for signal n).
	ExitCode int
	// Output is the end of its output.
	Output string
}

func (e *StepError) Error() string {
	return fmt.Sprintf("Dockerfile line %d: %s failed with exit code %d; its output ends with:\n%s",
		e.Line, e.Instruction, e.ExitCode, e.Output)
}

// state is what the instructions so far have set.
type state struct {
	key        string
	layers     []string // layer ids, bottom first
	env        []string
	args       map[string]string // declared ARGs with a value
	argOrder   []string
	workdir    string
	user       string
	shell      []string
	cmd        []string
	entrypoint []string
	cmdHere    bool
	ports      map[string]bool
	labels     map[string]string
	stopSignal string
}

// lookupEnv returns the environment substitution sees: ENV over ARG.
func (s *state) substEnv() shell.EnvGetter {
	var kv []string
	for _, k := range s.argOrder {
		if v, ok := s.args[k]; ok {
			kv = append(kv, k+"="+v)
		}
	}
	return shell.EnvsFromSlice(append(kv, s.env...))
}

// runEnv is a RUN step's environment: ENV, then ARGs not set by ENV, then
// PATH if neither set it.
func (s *state) runEnv() []string {
	env := append([]string(nil), s.env...)
	has := func(k string) bool {
		for _, e := range env {
			if strings.HasPrefix(e, k+"=") {
				return true
			}
		}
		return false
	}
	for _, k := range s.argOrder {
		if v, ok := s.args[k]; ok && !has(k) {
			env = append(env, k+"="+v)
		}
	}
	if !has("PATH") {
		env = append(env, "PATH="+DefaultPath)
	}
	return env
}

func (s *state) setEnv(k, v string) {
	for i, e := range s.env {
		if strings.HasPrefix(e, k+"=") {
			s.env[i] = k + "=" + v
			return
		}
	}
	s.env = append(s.env, k+"="+v)
}

// hashOf hashes parts unambiguously.
func hashOf(parts ...string) string {
	h := sha256.New()
	for _, p := range parts {
		fmt.Fprintf(h, "%d:%s\n", len(p), p)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func jsonString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// build is one build in progress.
type build struct {
	b       *Builder
	opts    Options
	df      *Dockerfile
	lex     *shell.Lex
	st      state
	base    baseInfo
	ctxRoot *os.Root
	steps   int
	meta    map[string]string // ARG values before FROM
	res     Result
	logMu   sync.Mutex
}

func (bd *build) emit(e Event) {
	if bd.opts.Log == nil {
		return
	}
	bd.logMu.Lock()
	defer bd.logMu.Unlock()
	e.Steps = bd.steps
	bd.opts.Log(e)
}

// Build runs one build. On failure nothing is left at Output (an earlier
// result there stays) and the error is a *LineError (the Dockerfile asks
// for something wrong or unsupported), a *StepError (a RUN failed), or
// another error wrapped with the step it happened in.
func (b *Builder) Build(ctx context.Context, opts Options) (Result, error) {
	df, err := ParseDockerfile(opts.Dockerfile)
	if err != nil {
		return Result{}, err
	}
	if opts.Output == "" {
		return Result{}, errors.New("build: no output directory")
	}
	if opts.StepTimeout <= 0 {
		opts.StepTimeout = DefaultStepTimeout
	}
	if opts.Limits.MemoryBytes == 0 {
		opts.Limits.MemoryBytes = 2 << 30
	}
	if opts.Limits.Pids == 0 {
		opts.Limits.Pids = 1024
	}
	bd := &build{b: b, opts: opts, df: df, lex: shell.NewLex(df.Escape), steps: 1 + len(df.Steps)}
	bd.res.Steps = bd.steps
	if opts.Context != "" {
		if bd.ctxRoot, err = os.OpenRoot(opts.Context); err != nil {
			return Result{}, fmt.Errorf("opening the build context: %w", err)
		}
		defer bd.ctxRoot.Close()
	}
	if err := bd.from(ctx); err != nil {
		return Result{}, err
	}
	for i, in := range df.Steps {
		if err := ctx.Err(); err != nil {
			return Result{}, fmt.Errorf("build cancelled at line %d: %w", in.Line, err)
		}
		start := time.Now()
		bd.emit(Event{Kind: EventStep, Step: i + 2, Line: in.Line, Instruction: in.Original})
		if err := bd.step(ctx, in, i+2); err != nil {
			return Result{}, err
		}
		bd.emit(Event{Kind: EventDone, Step: i + 2, Line: in.Line, Elapsed: time.Since(start)})
	}
	if err := bd.finish(ctx); err != nil {
		return Result{}, err
	}
	bd.emit(Event{Kind: EventResult, Text: bd.res.Metadata.Key})
	return bd.res, nil
}

// baseInfo is what FROM resolved to.
type baseInfo struct {
	id     string // "template:NAME@HASH" or "image:DIGEST"
	rootfs string
	config image.Config
}

func (bd *build) from(ctx context.Context) error {
	in := bd.df.From
	bd.emit(Event{Kind: EventStep, Step: 1, Line: in.Line, Instruction: in.Original})
	start := time.Now()
	meta := map[string]string{}
	var metaKV []string
	for _, a := range bd.df.MetaArgs {
		for _, w := range a.Args {
			k, def, hasDef := strings.Cut(w, "=")
			if v, ok := bd.opts.Args[k]; ok {
				meta[k] = v
			} else if hasDef {
				v, _, err := bd.lex.ProcessWord(def, shell.EnvsFromSlice(metaKV))
				if err != nil {
					return lineErr(a.Line, "ARG %s: %v", k, err)
				}
				meta[k] = v
			}
			if v, ok := meta[k]; ok {
				metaKV = append(metaKV, k+"="+v)
			}
		}
	}
	ref, _, err := bd.lex.ProcessWord(in.Args[0], shell.EnvsFromSlice(metaKV))
	if err != nil {
		return lineErr(in.Line, "FROM: %v", err)
	}
	flags, _ := flagValues(in, "platform")
	if p, ok := flags["platform"]; ok {
		p, _, _ = bd.lex.ProcessWord(p, shell.EnvsFromSlice(metaKV))
		if p != "linux/amd64" {
			return unsupported(in.Line, "FROM --platform=%s (only linux/amd64) is", p)
		}
	}
	if bd.opts.NoHostPaths && (strings.HasPrefix(ref, "oci-layout:") || strings.HasPrefix(ref, "docker-archive:")) {
		return unsupported(in.Line, "FROM a path on the server is")
	}
	tpls := bd.b.cfg.Templates
	if bd.opts.Templates != nil {
		tpls = bd.opts.Templates
	}
	base, err := bd.b.resolveBase(ctx, ref, tpls)
	if err != nil {
		return &LineError{Line: in.Line, Err: fmt.Errorf("FROM %s: %w", ref, err)}
	}
	bd.base = base
	bd.meta = meta
	c := base.config
	bd.st = state{
		key:        hashOf(version, base.id),
		env:        append([]string(nil), c.Env...),
		args:       map[string]string{},
		workdir:    c.WorkingDir,
		user:       c.User,
		shell:      []string{"/bin/sh", "-c"},
		cmd:        c.Cmd,
		entrypoint: c.Entrypoint,
		ports:      map[string]bool{},
		labels:     map[string]string{},
		stopSignal: c.StopSignal,
	}
	if bd.st.workdir == "" {
		bd.st.workdir = "/"
	}
	for _, p := range c.ExposedPorts {
		bd.st.ports[p] = true
	}
	for k, v := range c.Labels {
		bd.st.labels[k] = v
	}
	bd.res.Metadata.From, bd.res.Metadata.Base = ref, base.id
	bd.emit(Event{Kind: EventDone, Step: 1, Line: in.Line, Elapsed: time.Since(start)})
	return nil
}

// resolveBase resolves FROM: "oci-layout:DIR[:ref]", "docker-archive:FILE[:tag]",
// a PandaStack template's name, else a registry reference.
func (b *Builder) resolveBase(ctx context.Context, ref string, tpls ResolveTemplate) (baseInfo, error) {
	switch {
	case ref == "scratch":
		return baseInfo{}, fmt.Errorf("FROM scratch is %w: a template needs /bin/sh", ErrUnsupported)
	case strings.HasPrefix(ref, "oci-layout:"):
		rest := strings.TrimPrefix(ref, "oci-layout:")
		dir, name := rest, ""
		if i := strings.LastIndex(rest, ":"); i > 0 && !strings.Contains(rest[i+1:], "/") {
			dir, name = rest[:i], rest[i+1:]
		}
		im, err := image.FromLayout(ctx, dir, name)
		if err != nil {
			return baseInfo{}, err
		}
		return b.imageBase(ctx, im)
	case strings.HasPrefix(ref, "docker-archive:"):
		file, tag, _ := strings.Cut(strings.TrimPrefix(ref, "docker-archive:"), ":")
		im, err := image.FromTarball(ctx, file, tag)
		if err != nil {
			return baseInfo{}, err
		}
		return b.imageBase(ctx, im)
	}
	if tpls != nil {
		rootfs, hash, err := tpls(ctx, ref)
		if err == nil {
			return baseInfo{id: "template:" + ref + "@" + hash, rootfs: rootfs}, nil
		}
		if !errors.Is(err, errdefs.ErrNotFound) {
			return baseInfo{}, fmt.Errorf("template %s: %w", ref, err)
		}
	}
	im, err := image.FromRegistry(ctx, ref, b.cfg.Registry)
	if err != nil {
		return baseInfo{}, err
	}
	return b.imageBase(ctx, im)
}
