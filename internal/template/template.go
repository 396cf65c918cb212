// Package template builds and caches the root filesystems sandboxes start
// from. A template is a named list of Debian packages; its root filesystem
// is built once with mmdebstrap into the data directory and rebuilt only
// when its definition (or this builder) changes. Sandboxes share it
// read-only; the agent binary is added beside it under /.pandastack.
package template

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/pandastack/pandastack/internal/errdefs"
)

// builderVersion is part of every template's hash: bump it when the build
// steps below change, so cached templates are rebuilt. 2: the unprivileged
// user "user" (uid and gid 1000, home /home/user).
const builderVersion = 2

// The unprivileged user every template has; commands, files and terminals
// run as this user unless a call asks for root.
const (
	UserName = "user"
	UserID   = 1000
	UserHome = "/home/user"
)

// Suite is the Debian release templates are built from.
const Suite = "bookworm"

// DefaultMirror is the Debian mirror mmdebstrap fetches from.
const DefaultMirror = "http://deb.debian.org/debian"

// Definition says what goes into a template.
type Definition struct {
	Name        string   `json:"name"`
	Description string   `json:"description"`
	Packages    []string `json:"packages"`
	// Warm is a shell command run once in a fresh sandbox of the template
	// before it is snapshotted for fast creates: what it loads (shared
	// libraries, Python modules) is then already in the sandbox's page
	// cache in every sandbox restored from the snapshot. Not part of Hash.
	Warm string `json:"warm,omitempty"`
	// WarmCode is Python run silently in the default code context of a
	// sandbox being readied (a template snapshot, a warm pool member):
	// the context's kernel is then running with what it imports loaded,
	// and a new sandbox's first cell starts at once. Not part of Hash.
	WarmCode string `json:"warm_code,omitempty"`
}

// Builtin returns the templates every server offers.
func Builtin() []Definition {
	base := []string{"ca-certificates", "procps", "less", "curl"}
	return []Definition{
		{
			Name:        "base",
			Description: "Minimal Debian 12 with a shell and coreutils",
			Packages:    base,
			Warm:        "sh -c true",
		},
		{
			Name:        "code-interpreter",
			Description: "Debian 12 with python3, numpy, pandas, matplotlib and a Jupyter kernel (ipykernel)",
			Packages: append(append([]string{}, base...), "python3", "python3-numpy", "python3-pandas", "python3-matplotlib",
				"python3-ipykernel", "python3-jupyter-client"),
			Warm: "python3 -c 'import numpy, pandas, matplotlib.pyplot' && python3 -c 'print(sum(range(100)))'",
			// The default Python context starts with these imported, so
			// that its first cell does not pay for them.
			WarmCode: "import numpy, pandas, matplotlib, matplotlib.pyplot",
		},
	}
}

// Hash identifies the definition's content: the same hash means the same
// root filesystem.
func (d Definition) Hash() string { return d.hashAt(builderVersion) }

// LegacyHash is the hash this definition had under the first builder,
// before sandbox records kept their template's hash: such records were
// all made from that build.
func (d Definition) LegacyHash() string { return d.hashAt(1) }

func (d Definition) hashAt(version int) string {
	pk := append([]string{}, d.Packages...)
	sort.Strings(pk)
	h := sha256.New()
	fmt.Fprintf(h, "v%d\n%s\n%s\n%s\n", version, Suite, d.Name, strings.Join(pk, ","))
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// Template is a built template.
type Template struct {
	Definition
	Hash string
	// Rootfs is the root filesystem's directory on the host.
	Rootfs string
	// Defaults are what a built template sets for commands (none for the
	// built-in templates).
	Defaults Defaults
	// Built says it is a Dockerfile build, not a built-in template.
	Built bool
}

// Store keeps built templates under one directory. It is safe for
// concurrent use; builds of one template are serialised.
type Store struct {
	dir    string
	mirror string
	log    *slog.Logger
	defs   map[string]Definition

	buildMu sync.Mutex // serialises builds: two mmdebstraps would only compete

	// Built templates (built.go), when EnableBuilt was called.
	builtMu   sync.Mutex
	builtDir  string
	built     []BuiltEntry
	builtMeta map[string]Metadata // by key
}

// NewStore returns a store for the given definitions under dir.
func NewStore(dir, mirror string, defs []Definition, log *slog.Logger) (*Store, error) {
	if mirror == "" {
		mirror = DefaultMirror
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating template directory %q: %w", dir, err)
	}
	m := make(map[string]Definition, len(defs))
	for _, d := range defs {
		m[d.Name] = d
	}
	return &Store{dir: dir, mirror: mirror, log: log, defs: m}, nil
}

// Definitions returns the known definitions, sorted by name.
func (s *Store) Definitions() []Definition {
	out := make([]Definition, 0, len(s.defs))
	for _, d := range s.defs {
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (s *Store) path(d Definition) string { return s.buildPath(d.Name, d.Hash()) }

func (s *Store) buildPath(name, hash string) string {
	return filepath.Join(s.dir, name+"-"+hash)
}

// Get returns the built template of that name. It fails with ErrNotFound
// for an unknown name and ErrUnavailable when the template is not built.
func (s *Store) Get(name string) (Template, error) {
	d, ok := s.defs[name]
	if !ok {
		return Template{}, errdefs.NotFound("template %q not found", name)
	}
	p := s.path(d)
	if _, err := os.Stat(filepath.Join(p, "rootfs", "bin", "sh")); err != nil {
		return Template{}, errdefs.Unavailable("template %q is not built yet (run `pandastack template build %s`)", name, name)
	}
	return Template{Definition: d, Hash: d.Hash(), Rootfs: filepath.Join(p, "rootfs")}, nil
}

// GetBuild returns the build of the template with the given hash: the one
// a sandbox was made from, which its restores need, whether or not the
// definition has changed since. Builds are never removed while the server
// runs. An empty hash means the legacy build (LegacyHash). For a built
// template (built.go), name is its reference and hash its build's key.
func (s *Store) GetBuild(name, hash string) (Template, error) {
	d, ok := s.defs[name]
	if !ok {
		// A built template: the hash is its build's key.
		return s.builtTemplate(name, hash)
	}
	if hash == "" {
		hash = d.LegacyHash()
	}
	if hash == d.Hash() {
		return s.Get(name)
	}
	p := s.buildPath(name, hash)
	if _, err := os.Stat(filepath.Join(p, "rootfs", "bin", "sh")); err != nil {
		return Template{}, errdefs.Unavailable("the build %s of template %q that this sandbox was made from is gone", hash, name)
	}
	return Template{Definition: d, Hash: hash, Rootfs: filepath.Join(p, "rootfs")}, nil
}

// Ensure returns the template, building it first if needed.
func (s *Store) Ensure(ctx context.Context, name string) (Template, error) {
	t, err := s.Get(name)
	if err == nil || !errors.Is(err, errdefs.ErrUnavailable) {
		return t, err
	}
	s.buildMu.Lock()
	defer s.buildMu.Unlock()
	if t, err := s.Get(name); err == nil {
		return t, nil
	}
	d := s.defs[name]
	if err := s.build(ctx, d); err != nil {
		return Template{}, fmt.Errorf("building template %q: %w", name, err)
	}
	return s.Get(name)
}

func (s *Store) build(ctx context.Context, d Definition) error {
	final := s.path(d)
	tmp := final + ".building"
	if err := os.RemoveAll(tmp); err != nil {
		return fmt.Errorf("removing stale build: %w", err)
	}
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return fmt.Errorf("creating build directory: %w", err)
	}
	s.log.Info("building template", "name", d.Name, "hash", d.Hash(), "packages", d.Packages)
	args := []string{
		"--variant=minbase",
		"--include=" + strings.Join(d.Packages, ","),
		// Documentation and caches are dead weight in a sandbox.
		"--dpkgopt=path-exclude=/usr/share/doc/*",
		"--dpkgopt=path-exclude=/usr/share/man/*",
		"--dpkgopt=path-exclude=/usr/share/locale/*",
		"--dpkgopt=path-include=/usr/share/locale/locale.alias",
		"--customize-hook=mkdir -p \"$1/.pandastack\"",
		fmt.Sprintf("--customize-hook=chroot \"$1\" useradd --create-home --home-dir %s --uid %d --user-group --shell /bin/bash %s", UserHome, UserID, UserName),
		Suite, filepath.Join(tmp, "rootfs"), s.mirror,
	}
	cmd := exec.CommandContext(ctx, "mmdebstrap", args...)
	logf, err := os.Create(filepath.Join(tmp, "build.log"))
	if err != nil {
		return fmt.Errorf("creating build log: %w", err)
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("running mmdebstrap (log in %s): %w", filepath.Join(tmp, "build.log"), err)
	}
	meta, _ := json.MarshalIndent(struct {
		Definition
		Hash string `json:"hash"`
	}{d, d.Hash()}, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, "template.json"), meta, 0o644); err != nil {
		return fmt.Errorf("writing template metadata: %w", err)
	}
	if err := os.RemoveAll(final); err != nil {
		return fmt.Errorf("removing old build: %w", err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return fmt.Errorf("publishing build: %w", err)
	}
	s.log.Info("built template", "name", d.Name, "dir", final)
	return nil
}

// InstallAgent copies the agent binary into the template's root filesystem
// under a name derived from its content, and returns its path inside the
// sandbox. Files already there are never modified, so running sandboxes
// keep the agent they started with. It serves sandboxes of the first layout
// only; newer ones get the agent from a read-only mount (InstallAgentIn).
func InstallAgent(t Template, agentBin string) (string, error) {
	name, err := InstallAgentIn(filepath.Join(t.Rootfs, ".pandastack"), agentBin)
	if err != nil {
		return "", err
	}
	return "/.pandastack/" + name, nil
}

// InstallAgentIn copies the agent binary into dir under a name derived from
// its content ("agent-" and a hash prefix), unless it is there already, and
// returns that name. A file once there is never modified: sandboxes and
// checkpoint images keep using the agent they started with.
func InstallAgentIn(dir, agentBin string) (string, error) {
	f, err := os.Open(agentBin)
	if err != nil {
		return "", fmt.Errorf("opening agent binary: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hashing agent binary: %w", err)
	}
	name := "agent-" + hex.EncodeToString(h.Sum(nil))[:12]
	dst := filepath.Join(dir, name)
	if _, err := os.Stat(dst); err == nil {
		return name, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("creating agent directory: %w", err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return "", fmt.Errorf("rewinding agent binary: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".agent-*")
	if err != nil {
		return "", fmt.Errorf("creating agent copy: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, f); err != nil {
		tmp.Close()
		return "", fmt.Errorf("copying agent binary: %w", err)
	}
	if err := tmp.Chmod(0o755); err != nil {
		tmp.Close()
		return "", fmt.Errorf("making agent executable: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return "", fmt.Errorf("writing agent binary: %w", err)
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return "", fmt.Errorf("installing agent binary: %w", err)
	}
	return name, nil
}
