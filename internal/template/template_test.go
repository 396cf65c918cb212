package template

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/pandastack/pandastack/internal/errdefs"
)

func TestDefinitionHash(t *testing.T) {
	base := Definition{Name: "py", Description: "python", Packages: []string{"python3", "curl", "procps"}}
	tests := []struct {
		name     string
		other    Definition
		wantSame bool
	}{
		{name: "identical", other: base, wantSame: true},
		{name: "packages reordered", other: Definition{Name: "py", Description: "python", Packages: []string{"procps", "python3", "curl"}}, wantSame: true},
		{name: "description changed", other: Definition{Name: "py", Description: "something else", Packages: base.Packages}, wantSame: true},
		{name: "name changed", other: Definition{Name: "py2", Description: "python", Packages: base.Packages}},
		{name: "package added", other: Definition{Name: "py", Packages: []string{"python3", "curl", "procps", "less"}}},
		{name: "package removed", other: Definition{Name: "py", Packages: []string{"python3", "curl"}}},
		{name: "package replaced", other: Definition{Name: "py", Packages: []string{"python3", "wget", "procps"}}},
		{name: "no packages", other: Definition{Name: "py"}},
	}
	h := base.Hash()
	if len(h) != 16 || strings.Trim(h, "0123456789abcdef") != "" {
		t.Fatalf("Hash: got %q, want 16 lowercase hex digits", h)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.other.Hash()
			if same := got == h; same != tt.wantSame {
				t.Errorf("Hash of %+v: got %q, base %q; want same: %v", tt.other, got, h, tt.wantSame)
			}
		})
	}
	// Hash must not reorder the definition's own packages.
	pk := []string{"b", "a"}
	_ = Definition{Name: "x", Packages: pk}.Hash()
	if pk[0] != "b" || pk[1] != "a" {
		t.Errorf("Hash modified Packages: got %q, want %q", pk, []string{"b", "a"})
	}
	// Stable across calls (it names directories on disk).
	if again := base.Hash(); again != h {
		t.Errorf("Hash not stable: got %q then %q", h, again)
	}
}

func TestBuiltinHashesDiffer(t *testing.T) {
	seen := make(map[string]string)
	for _, d := range Builtin() {
		if other, ok := seen[d.Hash()]; ok {
			t.Errorf("templates %q and %q have the same hash", d.Name, other)
		}
		seen[d.Hash()] = d.Name
	}
}

func newTestStore(t *testing.T) (*Store, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "templates")
	s, err := NewStore(dir, "", Builtin(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return s, dir
}

// fakeBuild makes the directory layout of a finished build of d, as far as
// Get looks at it.
func fakeBuild(t *testing.T, storeDir string, d Definition) string {
	t.Helper()
	rootfs := filepath.Join(storeDir, d.Name+"-"+d.Hash(), "rootfs")
	if err := os.MkdirAll(filepath.Join(rootfs, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rootfs, "bin", "sh"), []byte("#!fake\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return rootfs
}

func TestStoreGet(t *testing.T) {
	s, dir := newTestStore(t)
	defs := Builtin()
	base := defs[0]

	tests := []struct {
		name     string
		template string
		wantErr  error
	}{
		{name: "unknown", template: "no-such-template", wantErr: errdefs.ErrNotFound},
		{name: "empty name", template: "", wantErr: errdefs.ErrNotFound},
		{name: "path-like name", template: "../base", wantErr: errdefs.ErrNotFound},
		{name: "known, not built", template: base.Name, wantErr: errdefs.ErrUnavailable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := s.Get(tt.template)
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("Get(%q): got %v, want %v", tt.template, err, tt.wantErr)
			}
		})
	}

	// A build of an older definition (another hash) does not count.
	stale := base
	stale.Packages = append([]string{"stale"}, base.Packages...)
	fakeBuild(t, dir, stale)
	if _, err := s.Get(base.Name); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("Get with only a stale build: got %v, want ErrUnavailable", err)
	}
	// Nor does a build without a shell (interrupted).
	if err := os.MkdirAll(filepath.Join(dir, base.Name+"-"+base.Hash(), "rootfs"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(base.Name); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("Get of an incomplete build: got %v, want ErrUnavailable", err)
	}

	rootfs := fakeBuild(t, dir, base)
	got, err := s.Get(base.Name)
	if err != nil {
		t.Fatalf("Get of a built template: %v", err)
	}
	if got.Rootfs != rootfs || got.Hash != base.Hash() || got.Name != base.Name {
		t.Errorf("Get: got %+v, want rootfs %q hash %q", got, rootfs, base.Hash())
	}
	// The other builtin stays unbuilt.
	if _, err := s.Get(defs[1].Name); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("Get(%q): got %v, want ErrUnavailable", defs[1].Name, err)
	}
}

func TestStoreDefinitions(t *testing.T) {
	s, _ := newTestStore(t)
	var names []string
	for _, d := range s.Definitions() {
		names = append(names, d.Name)
	}
	if got, want := strings.Join(names, ","), "base,code-interpreter"; got != want {
		t.Errorf("Definitions: got %s, want %s", got, want)
	}
}

// writeAgent writes a fake agent binary and returns its path and the name
// InstallAgent gives it.
func writeAgent(t *testing.T, content string) (path, name string) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "pandastack-agent")
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(content))
	return path, "agent-" + hex.EncodeToString(sum[:])[:12]
}

func TestInstallAgent(t *testing.T) {
	tpl := Template{Definition: Definition{Name: "base"}, Rootfs: t.TempDir()}
	agentV1, nameV1 := writeAgent(t, "#!/bin/sh\n# agent v1\n")

	inSandbox, err := InstallAgent(tpl, agentV1)
	if err != nil {
		t.Fatal(err)
	}
	if want := "/.pandastack/" + nameV1; inSandbox != want {
		t.Fatalf("path: got %q, want %q", inSandbox, want)
	}
	onHost := filepath.Join(tpl.Rootfs, inSandbox)
	fi, err := os.Stat(onHost)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o755 {
		t.Errorf("mode: got %v, want %v", fi.Mode().Perm(), os.FileMode(0o755))
	}
	if b, _ := os.ReadFile(onHost); string(b) != "#!/bin/sh\n# agent v1\n" {
		t.Errorf("content: got %q, want the agent's", b)
	}

	// Idempotent: the same binary again changes nothing, not even the file.
	again, err := InstallAgent(tpl, agentV1)
	if err != nil {
		t.Fatal(err)
	}
	if again != inSandbox {
		t.Errorf("second install: got %q, want %q", again, inSandbox)
	}
	fi2, err := os.Stat(onHost)
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(fi, fi2) || !fi.ModTime().Equal(fi2.ModTime()) {
		t.Error("second install replaced or modified the installed file")
	}

	// A new binary gets a new name; the old one stays for running sandboxes.
	agentV2, nameV2 := writeAgent(t, "#!/bin/sh\n# agent v2\n")
	v2, err := InstallAgent(tpl, agentV2)
	if err != nil {
		t.Fatal(err)
	}
	if want := "/.pandastack/" + nameV2; v2 != want || v2 == inSandbox {
		t.Errorf("new binary: got %q, want %q", v2, want)
	}
	if b, _ := os.ReadFile(onHost); string(b) != "#!/bin/sh\n# agent v1\n" {
		t.Errorf("old agent after installing a new one: got %q", b)
	}

	// An existing file under the name is never overwritten, whatever it
	// holds: running sandboxes may be using it.
	agentV3, nameV3 := writeAgent(t, "#!/bin/sh\n# agent v3\n")
	squatter := filepath.Join(tpl.Rootfs, ".pandastack", nameV3)
	if err := os.WriteFile(squatter, []byte("in use"), 0o555); err != nil {
		t.Fatal(err)
	}
	if _, err := InstallAgent(tpl, agentV3); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(squatter); string(b) != "in use" {
		t.Errorf("existing file: got %q, want it untouched", b)
	}

	// No temporary files are left behind.
	entries, err := os.ReadDir(filepath.Join(tpl.Rootfs, ".pandastack"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if got, want := strings.Join(names, ","), strings.Join(slices.Sorted(slices.Values([]string{nameV1, nameV2, nameV3})), ","); got != want {
		t.Errorf(".pandastack holds %s, want %s", got, want)
	}
}

func TestInstallAgentErrors(t *testing.T) {
	tests := []struct {
		name  string
		setup func(t *testing.T) (Template, string)
	}{
		{name: "missing binary", setup: func(t *testing.T) (Template, string) {
			return Template{Rootfs: t.TempDir()}, filepath.Join(t.TempDir(), "missing")
		}},
		{name: "binary is a directory", setup: func(t *testing.T) (Template, string) {
			return Template{Rootfs: t.TempDir()}, t.TempDir()
		}},
		{name: "rootfs is a file", setup: func(t *testing.T) (Template, string) {
			agent, _ := writeAgent(t, "agent")
			file := filepath.Join(t.TempDir(), "rootfs")
			if err := os.WriteFile(file, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			return Template{Rootfs: file}, agent
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tpl, bin := tt.setup(t)
			if p, err := InstallAgent(tpl, bin); err == nil {
				t.Errorf("InstallAgent: got %q, nil; want an error", p)
			}
		})
	}
}

// TestGetBuildFindsTheBuildASandboxWasMadeFrom: restores need the build
// their image was made from, after the definition (or the builder) has
// changed; records from before hashes were kept use the legacy build.
func TestGetBuildFindsTheBuildASandboxWasMadeFrom(t *testing.T) {
	dir := t.TempDir()
	s, err := NewStore(dir, "", Builtin(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	d := Builtin()[0]
	for _, h := range []string{d.Hash(), d.LegacyHash(), "0123456789abcdef"} {
		if err := os.MkdirAll(filepath.Join(dir, d.Name+"-"+h, "rootfs", "bin"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, d.Name+"-"+h, "rootfs", "bin", "sh"), nil, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if d.Hash() == d.LegacyHash() {
		t.Fatal("the current builder has the legacy hash: bump builderVersion with the build steps")
	}
	for _, tc := range []struct {
		hash, want string
		wantErr    error
	}{
		{"", d.LegacyHash(), nil},
		{d.Hash(), d.Hash(), nil},
		{"0123456789abcdef", "0123456789abcdef", nil},
		{"fedcba9876543210", "", errdefs.ErrUnavailable},
	} {
		got, err := s.GetBuild(d.Name, tc.hash)
		if tc.wantErr != nil {
			if !errors.Is(err, tc.wantErr) {
				t.Errorf("GetBuild(%q): got %v, want %v", tc.hash, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got.Hash != tc.want || got.Rootfs != filepath.Join(dir, d.Name+"-"+tc.want, "rootfs") {
			t.Errorf("GetBuild(%q): got %+v, %v, want build %s", tc.hash, got, err, tc.want)
		}
	}
	if _, err := s.GetBuild("nope", ""); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("unknown template: got %v, want ErrNotFound", err)
	}
}
