package pandastack

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/pandastack/pandastack/wire"
)

// templatePath returns the API path of the template ref ("NAME[:TAG]").
func templatePath(ref string) string {
	return "/templates/" + url.PathEscape(ref)
}

// ListTemplates lists the templates sandboxes can start from: the built-in
// ones and the caller's own.
func (c *Client) ListTemplates(ctx context.Context) ([]wire.Template, error) {
	return c.Templates(ctx)
}

// GetTemplate describes the template ref ("NAME" or "NAME:TAG"); it fails
// with ErrNotFound when there is none (or it belongs to another tenant).
func (c *Client) GetTemplate(ctx context.Context, ref string) (wire.Template, error) {
	var t wire.Template
	if err := c.do(ctx, http.MethodGet, templatePath(ref), nil, &t, http.StatusOK); err != nil {
		return wire.Template{}, fmt.Errorf("getting template %q: %w", ref, err)
	}
	return t, nil
}

// DeleteTemplate deletes the caller's built template ref; it fails with
// ErrConflict while a sandbox or snapshot uses it (and for a built-in one).
func (c *Client) DeleteTemplate(ctx context.Context, ref string) error {
	if err := c.do(ctx, http.MethodDelete, templatePath(ref), nil, nil, http.StatusNoContent); err != nil {
		return fmt.Errorf("deleting template %q: %w", ref, err)
	}
	return nil
}

// BuildTemplateOptions describes a template build (docs/TEMPLATES.md).
type BuildTemplateOptions struct {
	// Name names the result, "NAME" or "NAME:TAG".
	Name string
	// Tag is the result's tag ("latest" when neither it nor Name gives one).
	Tag string
	// ContextDir is the build context: the directory whose files COPY and
	// ADD read. It is sent as a tar archive; symbolic links are sent as
	// links, never followed. Patterns in its .dockerignore (with ! and **)
	// leave files out.
	ContextDir string
	// Dockerfile is the Dockerfile's path: relative to ContextDir
	// ("Dockerfile" when empty), or absolute. One outside the context is
	// sent along with it.
	Dockerfile string
	// BuildArgs are the values of the Dockerfile's ARGs.
	BuildArgs map[string]string
	// NoCache runs every step again instead of reusing cached results.
	NoCache bool
	// OnLog, when set, is called with each event of the build's log as it
	// arrives (steps, CACHED, RUN output), from one goroutine.
	OnLog func(wire.TemplateBuildEvent)
}

// BuildError is the failure of a build that had started: Err is the
// server's error (an *APIError naming the Dockerfile line), Step the step
// that failed (0 if none had begun).
type BuildError struct {
	Step int
	Err  error
}

func (e *BuildError) Error() string { return "building template: " + e.Err.Error() }
func (e *BuildError) Unwrap() error { return e.Err }

// BuildTemplate builds a template from a Dockerfile and its context, streaming
// the context to the server and the build's log to opts.OnLog, and returns
// the result once it is stored; sandboxes then start from it with
// CreateOptions{Template: t.Ref}. Cancelling ctx cancels the build.
// A Dockerfile the server refuses fails with ErrInvalidArgument naming the
// line; a step that fails, with a *BuildError.
func (c *Client) BuildTemplate(ctx context.Context, opts BuildTemplateOptions) (wire.Template, error) {
	if opts.Name == "" {
		return wire.Template{}, fmt.Errorf("building template: a name is required")
	}
	if opts.ContextDir == "" {
		return wire.Template{}, fmt.Errorf("building template %q: a context directory is required", opts.Name)
	}
	ctxDir, err := filepath.Abs(opts.ContextDir)
	if err == nil {
		ctxDir, err = filepath.EvalSymlinks(ctxDir)
	}
	if err == nil {
		var fi os.FileInfo
		if fi, err = os.Stat(ctxDir); err == nil && !fi.IsDir() {
			err = fmt.Errorf("%s is not a directory", opts.ContextDir)
		}
	}
	if err != nil {
		return wire.Template{}, fmt.Errorf("building template %q: context: %w", opts.Name, err)
	}
	df, extra, err := dockerfileInContext(ctxDir, opts.Dockerfile)
	if err != nil {
		return wire.Template{}, fmt.Errorf("building template %q: %w", opts.Name, err)
	}
	ignore, err := readDockerignore(ctxDir)
	if err != nil {
		return wire.Template{}, fmt.Errorf("building template %q: %w", opts.Name, err)
	}

	q := url.Values{}
	q.Set("name", opts.Name)
	if opts.Tag != "" {
		q.Set("tag", opts.Tag)
	}
	q.Set("dockerfile", df)
	keys := make([]string, 0, len(opts.BuildArgs))
	for k := range opts.BuildArgs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		q.Add("build_arg", k+"="+opts.BuildArgs[k])
	}
	if opts.NoCache {
		q.Set("no_cache", "true")
	}

	// The archive is written as it is sent: nothing is held in memory or on
	// disk. A request that ends early stops the writer through the pipe.
	pr, pw := io.Pipe()
	go func() {
		pw.CloseWithError(writeContext(pw, ctxDir, df, extra, ignore))
	}()
	defer pr.Close()

	req, err := c.newRequest(ctx, http.MethodPost, "/templates?"+q.Encode(), nil)
	if err != nil {
		return wire.Template{}, err
	}
	req.Body = pr
	req.ContentLength = -1
	req.Header.Set("Content-Type", "application/x-tar")
	req.Header.Set("Content-Encoding", "gzip")
	req.Header.Set("Accept", "application/x-ndjson")
	resp, err := c.send(req, http.StatusOK)
	if err != nil {
		return wire.Template{}, fmt.Errorf("building template %q: %w", opts.Name, err)
	}
	defer resp.Body.Close()

	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
	step := 0
	for sc.Scan() {
		if len(bytes.TrimSpace(sc.Bytes())) == 0 {
			continue
		}
		var ev wire.TemplateBuildEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return wire.Template{}, fmt.Errorf("building template %q: decoding the build log: %w", opts.Name, err)
		}
		if ev.Type == wire.BuildEventStep {
			step = ev.Step
		}
		if opts.OnLog != nil {
			opts.OnLog(ev)
		}
		switch ev.Type {
		case wire.BuildEventTemplate:
			if ev.Template == nil {
				return wire.Template{}, fmt.Errorf("building template %q: the server's last event has no template", opts.Name)
			}
			return *ev.Template, nil
		case wire.BuildEventError:
			e := &APIError{Code: wire.CodeInternal, Message: "the build failed"}
			if ev.Error != nil {
				e.Code, e.Message, e.RequestID = ev.Error.Code, ev.Error.Message, ev.Error.RequestID
			}
			return wire.Template{}, &BuildError{Step: step, Err: e}
		}
	}
	if err := ctx.Err(); err != nil {
		return wire.Template{}, fmt.Errorf("building template %q: %w", opts.Name, err)
	}
	if err := sc.Err(); err != nil {
		return wire.Template{}, fmt.Errorf("building template %q: reading the build log: %w", opts.Name, err)
	}
	return wire.Template{}, fmt.Errorf("building template %q: the build log ended without a result", opts.Name)
}

// dockerfileInContext returns the Dockerfile's path in the archive and, for
// a Dockerfile outside the context, its file on this machine (then sent
// under a name of its own).
func dockerfileInContext(ctxDir, df string) (inArchive, outside string, err error) {
	if df == "" {
		df = "Dockerfile"
	}
	abs := df
	if !filepath.IsAbs(df) {
		abs = filepath.Join(ctxDir, df)
	}
	if real, err := filepath.EvalSymlinks(abs); err == nil {
		abs = real
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return "", "", fmt.Errorf("dockerfile: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return "", "", fmt.Errorf("dockerfile %s is not a file", df)
	}
	if rel, err := filepath.Rel(ctxDir, abs); err == nil && filepath.IsLocal(rel) {
		return filepath.ToSlash(rel), "", nil
	}
	sum := sha256.Sum256([]byte(abs))
	return ".pandastack-dockerfile-" + hex.EncodeToString(sum[:6]), abs, nil
}

// writeContext writes the build context ctxDir to w as a gzip-compressed
// tar archive: regular files, directories and symbolic links (as links,
// never followed), less what ignore excludes; the Dockerfile (df) and
// .dockerignore are always sent, and extra, when set, as df.
func writeContext(w io.Writer, ctxDir, df, extra string, ignore *dockerignore) error {
	zw, err := gzip.NewWriterLevel(w, gzip.BestSpeed)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(zw)
	err = filepath.WalkDir(ctxDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == ctxDir {
			return nil
		}
		rel, err := filepath.Rel(ctxDir, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		if rel != df && rel != ".dockerignore" && ignore.excludes(rel) {
			if d.IsDir() && !ignore.hasExceptions {
				return filepath.SkipDir
			}
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		return addToTar(tw, p, rel, fi)
	})
	if err == nil && extra != "" {
		var fi os.FileInfo
		if fi, err = os.Stat(extra); err == nil {
			err = addToTar(tw, extra, df, fi)
		}
	}
	if err != nil {
		return fmt.Errorf("sending the build context: %w", err)
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return zw.Close()
}

// addToTar writes the file p as name; other kinds of files (sockets,
// devices, pipes) are left out.
func addToTar(tw *tar.Writer, p, name string, fi os.FileInfo) error {
	var link string
	switch {
	case fi.Mode().IsRegular(), fi.IsDir():
	case fi.Mode()&fs.ModeSymlink != 0:
		l, err := os.Readlink(p)
		if err != nil {
			return err
		}
		link = l
	default:
		return nil
	}
	h, err := tar.FileInfoHeader(fi, link)
	if err != nil {
		return err
	}
	h.Name = name
	if fi.IsDir() {
		h.Name += "/"
	}
	// Owners on this machine mean nothing on the server.
	h.Uid, h.Gid, h.Uname, h.Gname = 0, 0, "", ""
	h.Format = tar.FormatPAX
	if err := tw.WriteHeader(h); err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return nil
	}
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	n, err := io.Copy(tw, io.LimitReader(f, fi.Size()))
	if err == nil && n != fi.Size() {
		err = fmt.Errorf("%s changed while it was sent", name)
	}
	return err
}

// dockerignore is a build context's .dockerignore: patterns (path.Match
// syntax plus ** for any number of directories, each also matching what is
// under a match), the last matching one deciding; a leading ! re-includes.
type dockerignore struct {
	rules         []ignoreRule
	hasExceptions bool
}

type ignoreRule struct {
	re     *regexp.Regexp
	negate bool
}

func readDockerignore(ctxDir string) (*dockerignore, error) {
	b, err := os.ReadFile(filepath.Join(ctxDir, ".dockerignore"))
	if errors.Is(err, fs.ErrNotExist) {
		return &dockerignore{}, nil
	}
	if err != nil {
		return nil, err
	}
	return parseDockerignore(string(b))
}

func parseDockerignore(s string) (*dockerignore, error) {
	d := &dockerignore{}
	for i, line := range strings.Split(s, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		negate := strings.HasPrefix(line, "!")
		if negate {
			line = strings.TrimSpace(line[1:])
			d.hasExceptions = true
		}
		pat := strings.TrimPrefix(path.Clean("/"+filepath.ToSlash(line)), "/")
		if pat == "" {
			continue
		}
		re, err := globRegexp(pat)
		if err != nil {
			return nil, fmt.Errorf(".dockerignore line %d: %q: %w", i+1, line, err)
		}
		d.rules = append(d.rules, ignoreRule{re: re, negate: negate})
	}
	return d, nil
}

// excludes reports whether the context path rel (slash-separated) is left
// out.
func (d *dockerignore) excludes(rel string) bool {
	out := false
	for _, r := range d.rules {
		if r.re.MatchString(rel) {
			out = !r.negate
		}
	}
	return out
}

// globRegexp turns a .dockerignore pattern into a regexp matching the path
// and everything under it.
func globRegexp(pat string) (*regexp.Regexp, error) {
	if _, err := path.Match(pat, ""); err != nil {
		return nil, err
	}
	var b strings.Builder
	b.WriteString("^")
	for i := 0; i < len(pat); i++ {
		c := pat[i]
		switch {
		case c == '*' && i+1 < len(pat) && pat[i+1] == '*':
			i++
			if i+1 < len(pat) && pat[i+1] == '/' {
				i++
				b.WriteString("(.*/)?") // **/ : any number of directories
			} else {
				b.WriteString(".*")
			}
		case c == '*':
			b.WriteString("[^/]*")
		case c == '?':
			b.WriteString("[^/]")
		case c == '[':
			j := strings.IndexByte(pat[i:], ']')
			if j < 0 {
				return nil, path.ErrBadPattern
			}
			class := pat[i+1 : i+j]
			if strings.HasPrefix(class, "^") {
				class = "!" + class[1:]
			}
			if strings.HasPrefix(class, "!") {
				class = "^/" + class[1:]
			}
			b.WriteString("[" + strings.ReplaceAll(class, `\`, `\\`) + "]")
			i += j
		case c == '\\' && i+1 < len(pat):
			i++
			b.WriteString(regexp.QuoteMeta(string(pat[i])))
		default:
			b.WriteString(regexp.QuoteMeta(string(c)))
		}
	}
	b.WriteString("(/.*)?$")
	return regexp.Compile(b.String())
}
