// Package image reads OCI (and Docker) container images and unpacks them
// into a directory that can serve as a template's root filesystem. It is
// the groundwork for custom templates (issue 11): an image comes from a
// registry reference, an OCI image layout directory or a `docker save`
// tarball, is resolved to its linux/amd64 variant, and its layers are
// applied in order as the OCI image specification says (whiteouts, opaque
// directories, hard links, symbolic links, modes, owners and times).
//
// Images are untrusted input. Unpack never follows a symbolic link while it
// writes: every path is resolved one component at a time from a directory
// descriptor of the destination, with O_NOFOLLOW, so an entry can neither
// name a path outside the destination (absolute names and ".." that climb
// out are refused) nor reach one through a link planted by an earlier entry
// or layer. Hard links must point inside the destination, device nodes are
// skipped, and the decompressed size and the number of entries are capped
// while streaming. See Unpack for the exact rules.
//
// The package keeps no global state; every blocking call takes a context.
package image

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Platform is the only platform sandboxes run: images are resolved to it.
func Platform() v1.Platform { return v1.Platform{OS: "linux", Architecture: "amd64"} }

// ErrNoPlatform means the image (or index) has no linux/amd64 variant.
var ErrNoPlatform = errors.New("image has no linux/amd64 variant")

// RegistryOptions says how to reach a registry.
type RegistryOptions struct {
	// Insecure allows plain HTTP (and unverified TLS fallbacks) for the
	// registry. Loopback and private addresses are reached over plain HTTP
	// regardless, as go-containerregistry does by default.
	Insecure bool
	// Auth authenticates to the registry; nil means anonymous (the host's
	// Docker credentials are never read implicitly).
	Auth authn.Authenticator
	// Transport carries the requests; nil means http.DefaultTransport.
	Transport http.RoundTripper
}

// FromRegistry resolves ref (for example "docker.io/library/debian:12" or
// "127.0.0.1:5000/app@sha256:…") to its linux/amd64 image. A manifest list
// or OCI index is resolved by platform; a single-platform image for another
// platform is refused with ErrNoPlatform. Layers are fetched lazily, when
// Unpack reads them, with the same context.
func FromRegistry(ctx context.Context, ref string, opts RegistryOptions) (v1.Image, error) {
	var nopts []name.Option
	if opts.Insecure {
		nopts = append(nopts, name.Insecure)
	}
	r, err := name.ParseReference(ref, nopts...)
	if err != nil {
		return nil, fmt.Errorf("parsing image reference %q: %w", ref, err)
	}
	ropts := []remote.Option{remote.WithContext(ctx), remote.WithPlatform(Platform())}
	if opts.Auth != nil {
		ropts = append(ropts, remote.WithAuth(opts.Auth))
	}
	if opts.Transport != nil {
		ropts = append(ropts, remote.WithTransport(opts.Transport))
	}
	desc, err := remote.Get(r, ropts...)
	if err != nil {
		return nil, fmt.Errorf("fetching manifest of %s: %w", r, err)
	}
	var img v1.Image
	if desc.MediaType.IsIndex() {
		idx, err := desc.ImageIndex()
		if err != nil {
			return nil, fmt.Errorf("reading index of %s: %w", r, err)
		}
		img, err = fromIndex(ctx, idx, "")
		if err != nil {
			return nil, fmt.Errorf("resolving %s: %w", r, err)
		}
	} else {
		img, err = desc.Image()
		if err != nil {
			return nil, fmt.Errorf("reading image %s: %w", r, err)
		}
	}
	if err := checkPlatform(img); err != nil {
		return nil, fmt.Errorf("image %s: %w", r, err)
	}
	return img, nil
}

// FromLayout resolves an image in an OCI image layout directory (the
// directory holding oci-layout and index.json). refName selects the
// manifest annotated with that org.opencontainers.image.ref.name (a tag
// such as "latest", or a full reference as some tools write it); empty
// means any, resolved by platform. Nested indexes are followed.
func FromLayout(ctx context.Context, dir, refName string) (v1.Image, error) {
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return nil, fmt.Errorf("reading OCI layout %s: %w", dir, err)
	}
	img, err := fromIndex(ctx, idx, refName)
	if err != nil {
		return nil, fmt.Errorf("resolving image in OCI layout %s: %w", dir, err)
	}
	if err := checkPlatform(img); err != nil {
		return nil, fmt.Errorf("image in OCI layout %s: %w", dir, err)
	}
	return img, nil
}

// FromTarball reads an image from a tarball written by `docker save` (or
// go-containerregistry's tarball.Write). tag selects one image of a
// tarball that holds several ("app:1.0"); empty means the only one.
func FromTarball(ctx context.Context, path, tag string) (v1.Image, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var t *name.Tag
	if tag != "" {
		parsed, err := name.NewTag(tag)
		if err != nil {
			return nil, fmt.Errorf("parsing tag %q: %w", tag, err)
		}
		t = &parsed
	}
	img, err := tarball.ImageFromPath(path, t)
	if err != nil {
		return nil, fmt.Errorf("reading image tarball %s: %w", path, err)
	}
	if err := checkPlatform(img); err != nil {
		return nil, fmt.Errorf("image in tarball %s: %w", path, err)
	}
	return img, nil
}

// refNameAnnotation names a manifest in an OCI layout's index.
const refNameAnnotation = "org.opencontainers.image.ref.name"

// fromIndex picks the linux/amd64 image of an index, following nested
// indexes. With refName set, only top-level manifests of that name count.
func fromIndex(ctx context.Context, idx v1.ImageIndex, refName string) (v1.Image, error) {
	return pickFromIndex(ctx, idx, refName, 0)
}

// maxIndexDepth bounds nested indexes: real ones nest once or twice.
const maxIndexDepth = 4

func pickFromIndex(ctx context.Context, idx v1.ImageIndex, refName string, depth int) (v1.Image, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if depth > maxIndexDepth {
		return nil, fmt.Errorf("image indexes nested more than %d deep", maxIndexDepth)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("reading index manifest: %w", err)
	}
	cands := make([]v1.Descriptor, 0, len(im.Manifests))
	for _, d := range im.Manifests {
		if refName != "" && !refMatches(d.Annotations[refNameAnnotation], refName) {
			continue
		}
		cands = append(cands, d)
	}
	if refName != "" && len(cands) == 0 {
		return nil, fmt.Errorf("no manifest named %q", refName)
	}
	// Exact platform matches first, those without a variant before those
	// with one (amd64 variants are optional micro-architecture levels);
	// then descriptors that state no platform, which must be looked into.
	rank := func(d v1.Descriptor) int {
		switch {
		case d.Platform == nil:
			return 2
		case d.Platform.OS == "linux" && d.Platform.Architecture == "amd64" && d.Platform.Variant == "":
			return 0
		case d.Platform.OS == "linux" && d.Platform.Architecture == "amd64":
			return 1
		default:
			return 3
		}
	}
	sort.SliceStable(cands, func(i, j int) bool { return rank(cands[i]) < rank(cands[j]) })
	var platforms []string
	for _, d := range cands {
		if rank(d) == 3 {
			platforms = append(platforms, d.Platform.String())
			continue
		}
		switch {
		case d.MediaType.IsIndex():
			child, err := idx.ImageIndex(d.Digest)
			if err != nil {
				return nil, fmt.Errorf("reading nested index %s: %w", d.Digest, err)
			}
			img, err := pickFromIndex(ctx, child, "", depth+1)
			if errors.Is(err, ErrNoPlatform) {
				continue
			}
			return img, err
		case d.MediaType.IsImage():
			img, err := idx.Image(d.Digest)
			if err != nil {
				return nil, fmt.Errorf("reading image %s: %w", d.Digest, err)
			}
			if d.Platform == nil {
				// No platform in the index: the config says.
				if err := checkPlatform(img); err != nil {
					continue
				}
			}
			return img, nil
		}
	}
	if len(platforms) > 0 {
		return nil, fmt.Errorf("%w (it has %v)", ErrNoPlatform, platforms)
	}
	return nil, ErrNoPlatform
}

// refMatches says whether a layout's ref.name annotation names want: the
// same string, or a full reference whose tag is want.
func refMatches(annotation, want string) bool {
	if annotation == want {
		return true
	}
	if t, err := name.NewTag(annotation); err == nil && t.TagStr() == want {
		return true
	}
	return false
}

// checkPlatform refuses an image whose config names another platform. An
// image whose config states none is accepted (some builders omit it).
func checkPlatform(img v1.Image) error {
	cf, err := img.ConfigFile()
	if err != nil {
		return fmt.Errorf("reading image config: %w", err)
	}
	if (cf.OS != "" && cf.OS != "linux") || (cf.Architecture != "" && cf.Architecture != "amd64") {
		return fmt.Errorf("%w (it is %s/%s)", ErrNoPlatform, cf.OS, cf.Architecture)
	}
	return nil
}

// Config is what a template takes from an image's configuration: how its
// process is started and in what environment.
type Config struct {
	// Env is the environment, "KEY=value" entries in image order.
	Env []string
	// Entrypoint and Cmd form the start command as Docker combines them.
	Entrypoint []string
	Cmd        []string
	// WorkingDir is the start command's directory ("" means /).
	WorkingDir string
	// User is the user (and group) to run as: a name, "uid", "uid:gid"...
	User string
	// ExposedPorts are the ports the image declares, as "8080/tcp", sorted.
	ExposedPorts []string
	// Labels are the image's labels.
	Labels map[string]string
	// StopSignal is the signal that stops the start command ("" means
	// SIGTERM).
	StopSignal string
}

// ConfigOf returns the image's run configuration.
func ConfigOf(img v1.Image) (Config, error) {
	cf, err := img.ConfigFile()
	if err != nil {
		return Config{}, fmt.Errorf("reading image config: %w", err)
	}
	c := cf.Config
	out := Config{
		Env:        append([]string(nil), c.Env...),
		Entrypoint: append([]string(nil), c.Entrypoint...),
		Cmd:        append([]string(nil), c.Cmd...),
		WorkingDir: c.WorkingDir,
		User:       c.User,
		StopSignal: c.StopSignal,
	}
	for p := range c.ExposedPorts {
		out.ExposedPorts = append(out.ExposedPorts, p)
	}
	sort.Strings(out.ExposedPorts)
	if len(c.Labels) > 0 {
		out.Labels = make(map[string]string, len(c.Labels))
		for k, v := range c.Labels {
			out.Labels[k] = v
		}
	}
	return out, nil
}
