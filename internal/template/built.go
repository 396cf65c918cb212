package template

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
)

// Built templates are Dockerfile builds (package build) a tenant registered
// under a name and a tag. Each build's result is kept under its key (the
// build's result key, which is the template hash sandboxes pin):
// <built>/<key>/rootfs and <built>/<key>/template.json. An index maps
// (tenant, name, tag) to the current key and every earlier key built under
// it that is still kept, so that a rebuild never removes the files running
// sandboxes, paused ones and snapshots were made from.

// DefaultTag is the tag of a reference that names none.
const DefaultTag = "latest"

// MetadataFile is the name of a built template's metadata file (written by
// package build).
const MetadataFile = "template.json"

var (
	nameRe = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)
	tagRe  = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$`)
	keyRe  = regexp.MustCompile(`^[0-9a-f]{16,64}$`)
)

// ParseRef splits a template reference "NAME" or "NAME:TAG" (tag "latest"
// when none) and checks both parts.
func ParseRef(ref string) (name, tag string, err error) {
	name, tag, hasTag := strings.Cut(ref, ":")
	if !hasTag {
		tag = DefaultTag
	}
	if !nameRe.MatchString(name) {
		return "", "", errdefs.Invalid("template name %q is not valid: use 1-63 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit", truncate(name, 80))
	}
	if !tagRe.MatchString(tag) {
		return "", "", errdefs.Invalid("template tag %q is not valid: use 1-128 letters, digits, '.', '_' or '-', not starting with '.' or '-'", truncate(tag, 80))
	}
	return name, tag, nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

// Defaults are what a template sets for the commands run in its sandboxes:
// environment (KEY=VALUE, applied over the server's), working directory
// and user ("" for the server's defaults).
type Defaults struct {
	Env        []string
	WorkingDir string
	User       string
}

// Metadata is what a built template's template.json says (the fields the
// store uses; package build writes it).
type Metadata struct {
	Key          string    `json:"key"`
	From         string    `json:"from"`
	Base         string    `json:"base"`
	Env          []string  `json:"env"`
	WorkingDir   string    `json:"working_dir"`
	User         string    `json:"user,omitempty"`
	Entrypoint   []string  `json:"entrypoint,omitempty"`
	Cmd          []string  `json:"cmd,omitempty"`
	ExposedPorts []string  `json:"exposed_ports,omitempty"`
	Created      time.Time `json:"created"`
}

// defaults are the metadata's defaults for commands. A working directory
// of "/" is Docker's default when the Dockerfile sets none, so it is left
// to the server's default (the user's home).
func (md Metadata) defaults() Defaults {
	d := Defaults{Env: append([]string(nil), md.Env...), User: md.User}
	if md.WorkingDir != "/" {
		d.WorkingDir = md.WorkingDir
	}
	return d
}

// BuiltEntry is a built template registered under a tenant, name and tag.
type BuiltEntry struct {
	Tenant string `json:"tenant"`
	Name   string `json:"name"`
	Tag    string `json:"tag"`
	// Key is the current build.
	Key string `json:"key"`
	// Keys are every build of this name and tag still kept, Key included.
	Keys      []string  `json:"keys"`
	SizeBytes int64     `json:"size_bytes"`
	BuiltAt   time.Time `json:"built_at"`
	Metadata  Metadata  `json:"metadata"`
}

// Ref is the entry's reference, "NAME:TAG": the template name its
// sandboxes record.
func (e BuiltEntry) Ref() string { return e.Name + ":" + e.Tag }

type builtIndex struct {
	Entries []BuiltEntry `json:"entries"`
}

// EnableBuilt lets the store serve built templates kept under dir (created
// if missing), loading its index and removing unfinished registrations.
func (s *Store) EnableBuilt(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating built template directory: %w", err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("reading built template directory: %w", err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".staging-") {
			if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
				return fmt.Errorf("removing an unfinished build: %w", err)
			}
		}
	}
	var idx builtIndex
	raw, err := os.ReadFile(filepath.Join(dir, "index.json"))
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("reading built template index: %w", err)
	default:
		if err := json.Unmarshal(raw, &idx); err != nil {
			return fmt.Errorf("decoding built template index: %w", err)
		}
	}
	s.builtMu.Lock()
	defer s.builtMu.Unlock()
	s.builtDir = dir
	s.built = idx.Entries
	s.builtMeta = map[string]Metadata{}
	for _, e := range s.built {
		s.builtMeta[e.Key] = e.Metadata
	}
	return nil
}

// IsBuiltin reports whether name is one of the store's own definitions.
func (s *Store) IsBuiltin(name string) bool {
	_, ok := s.defs[name]
	return ok
}

// StagingDir returns a fresh path under the built template directory for
// a build's output, to be passed to Register (or removed).
func (s *Store) StagingDir() (string, error) {
	s.builtMu.Lock()
	dir := s.builtDir
	s.builtMu.Unlock()
	if dir == "" {
		return "", errors.New("built templates are not enabled")
	}
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return filepath.Join(dir, ".staging-"+hex.EncodeToString(b)), nil
}

// Resolve returns the template a tenant's reference names: a built-in
// template by its name (shared by every tenant), else the tenant's built
// template NAME[:TAG]. Another tenant's template is not found.
func (s *Store) Resolve(tenant, ref string) (Template, error) {
	if _, ok := s.defs[ref]; ok {
		return s.Get(ref)
	}
	name, tag, err := ParseRef(ref)
	if err != nil {
		if _, ok := s.defs[strings.SplitN(ref, ":", 2)[0]]; !ok {
			return Template{}, errdefs.NotFound("template %q not found", truncate(ref, 80))
		}
		return Template{}, err
	}
	e, ok := s.Entry(tenant, name, tag)
	if !ok {
		return Template{}, errdefs.NotFound("template %q not found", name+":"+tag)
	}
	return s.builtTemplate(e.Ref(), e.Key)
}

// Entry returns the tenant's built template name:tag.
func (s *Store) Entry(tenant, name, tag string) (BuiltEntry, bool) {
	s.builtMu.Lock()
	defer s.builtMu.Unlock()
	for _, e := range s.built {
		if e.Tenant == tenant && e.Name == name && e.Tag == tag {
			return e, true
		}
	}
	return BuiltEntry{}, false
}

// Entries returns the tenant's built templates, sorted by name and tag.
func (s *Store) Entries(tenant string) []BuiltEntry {
	s.builtMu.Lock()
	defer s.builtMu.Unlock()
	var out []BuiltEntry
	for _, e := range s.built {
		if e.Tenant == tenant {
			out = append(out, e)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Ref() < out[j].Ref() })
	return out
}

// builtTemplate returns the build key of a built template, recorded under
// name (its reference).
func (s *Store) builtTemplate(name, key string) (Template, error) {
	s.builtMu.Lock()
	dir := s.builtDir
	md, ok := s.builtMeta[key]
	s.builtMu.Unlock()
	if dir == "" || !keyRe.MatchString(key) {
		return Template{}, errdefs.NotFound("template %q not found", name)
	}
	p := filepath.Join(dir, key)
	if _, err := os.Stat(filepath.Join(p, "rootfs", "bin", "sh")); err != nil {
		return Template{}, errdefs.Unavailable("the build %s of template %q is gone", key, name)
	}
	if !ok {
		raw, err := os.ReadFile(filepath.Join(p, MetadataFile))
		if err != nil {
			return Template{}, fmt.Errorf("reading metadata of template %q: %w", name, err)
		}
		if err := json.Unmarshal(raw, &md); err != nil {
			return Template{}, fmt.Errorf("decoding metadata of template %q: %w", name, err)
		}
		s.builtMu.Lock()
		s.builtMeta[key] = md
		s.builtMu.Unlock()
	}
	return Template{
		Definition: Definition{Name: name, Description: "built from " + md.From},
		Hash:       key, Rootfs: filepath.Join(p, "rootfs"), Defaults: md.defaults(), Built: true,
	}, nil
}

// Defaults returns what a template build sets for commands: nothing for
// the built-in templates.
func (s *Store) Defaults(name, hash string) Defaults {
	if _, ok := s.defs[name]; ok || hash == "" {
		return Defaults{}
	}
	s.builtMu.Lock()
	md, ok := s.builtMeta[hash]
	s.builtMu.Unlock()
	if ok {
		return md.defaults()
	}
	t, err := s.builtTemplate(name, hash)
	if err != nil {
		return Defaults{}
	}
	return t.Defaults
}

// Register makes the build output at staging (from StagingDir) the
// tenant's template name:tag. Its files move to the build's key, unless
// that build is kept already; earlier builds under the name stay.
func (s *Store) Register(tenant, name, tag, staging string) (BuiltEntry, error) {
	if s.IsBuiltin(name) {
		return BuiltEntry{}, errdefs.Conflict("%q is a built-in template; choose another name", name)
	}
	defer os.RemoveAll(staging)
	raw, err := os.ReadFile(filepath.Join(staging, MetadataFile))
	if err != nil {
		return BuiltEntry{}, fmt.Errorf("reading the build's metadata: %w", err)
	}
	var md Metadata
	if err := json.Unmarshal(raw, &md); err != nil {
		return BuiltEntry{}, fmt.Errorf("decoding the build's metadata: %w", err)
	}
	if !keyRe.MatchString(md.Key) {
		return BuiltEntry{}, fmt.Errorf("the build's key %q is not valid", md.Key)
	}
	s.builtMu.Lock()
	defer s.builtMu.Unlock()
	final := filepath.Join(s.builtDir, md.Key)
	if _, err := os.Stat(filepath.Join(final, MetadataFile)); err == nil {
		// The same result is kept already: its files and metadata are
		// identical (the key says so), and sandboxes may use them.
		if r, err := os.ReadFile(filepath.Join(final, MetadataFile)); err == nil {
			_ = json.Unmarshal(r, &md)
		}
	} else {
		if err := os.RemoveAll(final); err != nil {
			return BuiltEntry{}, fmt.Errorf("removing a partial build: %w", err)
		}
		if err := os.Rename(staging, final); err != nil {
			return BuiltEntry{}, fmt.Errorf("publishing the build: %w", err)
		}
	}
	size, err := dirSize(filepath.Join(final, "rootfs"))
	if err != nil {
		return BuiltEntry{}, fmt.Errorf("measuring the build: %w", err)
	}
	e := BuiltEntry{Tenant: tenant, Name: name, Tag: tag, Key: md.Key, SizeBytes: size, BuiltAt: md.Created, Metadata: md}
	entries := slices.Clone(s.built)
	found := false
	for i, old := range entries {
		if old.Tenant == tenant && old.Name == name && old.Tag == tag {
			e.Keys = old.Keys
			if !slices.Contains(e.Keys, md.Key) {
				e.Keys = append(e.Keys, md.Key)
			}
			entries[i] = e
			found = true
		}
	}
	if !found {
		e.Keys = []string{md.Key}
		entries = append(entries, e)
	}
	if err := s.saveIndex(entries); err != nil {
		return BuiltEntry{}, err
	}
	s.built = entries
	s.builtMeta[md.Key] = md
	return e, nil
}

// Unregister removes the tenant's template name:tag and the files of its
// builds that no other entry keeps. The caller checks first that no
// sandbox or snapshot depends on it.
func (s *Store) Unregister(tenant, name, tag string) error {
	s.builtMu.Lock()
	defer s.builtMu.Unlock()
	var (
		gone    *BuiltEntry
		entries []BuiltEntry
	)
	for _, e := range s.built {
		if e.Tenant == tenant && e.Name == name && e.Tag == tag {
			gone = &e
			continue
		}
		entries = append(entries, e)
	}
	if gone == nil {
		return errdefs.NotFound("template %q not found", name+":"+tag)
	}
	if err := s.saveIndex(entries); err != nil {
		return err
	}
	s.built = entries
	for _, k := range gone.Keys {
		kept := false
		for _, e := range entries {
			kept = kept || slices.Contains(e.Keys, k)
		}
		if kept || !keyRe.MatchString(k) {
			continue
		}
		delete(s.builtMeta, k)
		if err := os.RemoveAll(filepath.Join(s.builtDir, k)); err != nil {
			return fmt.Errorf("removing build %s: %w", k, err)
		}
	}
	return nil
}

// saveIndex writes the index atomically. The caller holds builtMu.
func (s *Store) saveIndex(entries []BuiltEntry) error {
	raw, err := json.MarshalIndent(builtIndex{Entries: entries}, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding built template index: %w", err)
	}
	p := filepath.Join(s.builtDir, "index.json")
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, raw, 0o600); err != nil {
		return fmt.Errorf("writing built template index: %w", err)
	}
	if err := os.Rename(tmp, p); err != nil {
		return fmt.Errorf("writing built template index: %w", err)
	}
	return nil
}

// dirSize sums the sizes of the regular files under dir, each inode once.
func dirSize(dir string) (int64, error) {
	var total int64
	seen := map[[2]uint64]bool{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if id, ok := inodeOf(fi); ok {
			if seen[id] {
				return nil
			}
			seen[id] = true
		}
		total += fi.Size()
		return nil
	})
	return total, err
}
