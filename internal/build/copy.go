package build

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"
	"time"
)

// ErrOutsideContext: a COPY or ADD source names something outside the
// build context (with "..", or through a symbolic link leading out).
var ErrOutsideContext = errors.New("source is outside the build context")

// srcEntry is one file, directory or link a COPY takes from the context.
type srcEntry struct {
	ctxPath string // in the context, clean and relative
	rel     string // where it goes, relative to the copy's target ("" is the target itself)
	mode    fs.FileMode
	mtime   time.Time
	link    string // a symbolic link's target
}

// copySource is one source argument after globbing: a file or a directory
// (whose contents are copied) in the context.
type copySource struct {
	name    string // as matched, clean and relative to the context
	isDir   bool
	entries []srcEntry
}

// cleanSource turns a COPY source into a clean path relative to the
// context: a leading "/" is the context's root (as in Docker); one that
// climbs out with ".." is refused.
func cleanSource(src string) (string, error) {
	c := path.Clean("/" + src)
	// path.Clean("/" + x) can never climb above "/"; check the raw name.
	raw := path.Clean(strings.TrimLeft(src, "/"))
	if raw == ".." || strings.HasPrefix(raw, "../") {
		return "", fmt.Errorf("%q: %w", src, ErrOutsideContext)
	}
	c = strings.TrimPrefix(c, "/")
	if c == "" {
		c = "."
	}
	return c, nil
}

// resolveSources expands the sources of a COPY (globs included) in the
// context and lists what each copies. The context is an os.Root: a link
// named as a source, or on the way to one, is followed only while it stays
// inside; links inside copied directories are copied as links, never
// followed.
func resolveSources(ctxRoot *os.Root, srcs []string) ([]copySource, error) {
	var out []copySource
	fsys := ctxRoot.FS()
	for _, s := range srcs {
		if strings.Contains(s, "://") {
			return nil, fmt.Errorf("%q: URL sources are %w", s, ErrUnsupported)
		}
		c, err := cleanSource(s)
		if err != nil {
			return nil, err
		}
		names := []string{c}
		if strings.ContainsAny(c, "*?[") {
			names, err = fs.Glob(fsys, c)
			if err != nil {
				return nil, fmt.Errorf("matching %q in the build context: %w", s, err)
			}
			if len(names) == 0 {
				return nil, fmt.Errorf("%q matches nothing in the build context", s)
			}
		}
		for _, n := range names {
			st, err := ctxRoot.Stat(n)
			if err != nil {
				if strings.Contains(err.Error(), "escapes") {
					return nil, fmt.Errorf("%q: %w (a symbolic link leads out of it)", n, ErrOutsideContext)
				}
				return nil, fmt.Errorf("%q in the build context: %w", n, err)
			}
			cs := copySource{name: n, isDir: st.IsDir()}
			if !st.IsDir() {
				if !st.Mode().IsRegular() {
					return nil, fmt.Errorf("%q in the build context is not a regular file or directory", n)
				}
				cs.entries = []srcEntry{{ctxPath: n, mode: st.Mode(), mtime: st.ModTime()}}
				out = append(out, cs)
				continue
			}
			err = fs.WalkDir(fsys, n, func(p string, d fs.DirEntry, err error) error {
				if err != nil {
					return err
				}
				rel := strings.TrimPrefix(strings.TrimPrefix(p, n), "/")
				if n == "." {
					rel = p
					if p == "." {
						rel = ""
					}
				}
				var info fs.FileInfo
				if p == n {
					info = st // the named directory (maybe through a link)
				} else if info, err = ctxRoot.Lstat(p); err != nil {
					return err
				}
				e := srcEntry{ctxPath: p, rel: rel, mode: info.Mode(), mtime: info.ModTime()}
				switch {
				case info.Mode()&fs.ModeSymlink != 0:
					if e.link, err = ctxRoot.Readlink(p); err != nil {
						return err
					}
				case info.IsDir(), info.Mode().IsRegular():
				default:
					return nil // sockets, devices, FIFOs: not copied (Docker skips them too)
				}
				cs.entries = append(cs.entries, e)
				return nil
			})
			if err != nil {
				return nil, fmt.Errorf("reading %q in the build context: %w", n, err)
			}
			out = append(out, cs)
		}
	}
	return out, nil
}

// hashSources digests what a COPY takes: every entry's path, type,
// permission bits, link target and content. Times are not part of it.
func hashSources(ctxRoot *os.Root, srcs []copySource) (string, error) {
	h := sha256.New()
	for _, s := range srcs {
		fmt.Fprintf(h, "source %q dir=%v\n", s.name, s.isDir)
		for _, e := range s.entries {
			fmt.Fprintf(h, "%q %v %q", e.rel, e.mode, e.link)
			if e.mode.IsRegular() {
				f, err := ctxRoot.Open(e.ctxPath)
				if err != nil {
					return "", fmt.Errorf("opening %q in the build context: %w", e.ctxPath, err)
				}
				fh := sha256.New()
				_, err = io.Copy(fh, f)
				f.Close()
				if err != nil {
					return "", fmt.Errorf("reading %q in the build context: %w", e.ctxPath, err)
				}
				fmt.Fprintf(h, " %x", fh.Sum(nil))
			}
			h.Write([]byte("\n"))
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// copyOpts says how copied entries are owned and moded.
type copyOpts struct {
	uid, gid int
	chmod    fs.FileMode // 0: keep the source's
	hasChmod bool
}

// copyInto copies the sources into the root filesystem dst at dest (an
// absolute path inside it). destDir says dest is a directory (it ends with
// "/", or there are several sources). Paths in dst are resolved by
// os.Root: links already there (planted by earlier steps) are followed only
// while they stay inside dst, so nothing outside is ever written; a link
// at an entry's own path is replaced, not followed.
func copyInto(ctxRoot, dst *os.Root, srcs []copySource, dest string, destDir bool, o copyOpts) error {
	d := strings.TrimPrefix(path.Clean("/"+dest), "/")
	if d == "" {
		d = "."
	}
	if !destDir && len(srcs) == 1 && !srcs[0].isDir {
		// A single file copied onto an existing directory goes into it.
		if st, err := dst.Stat(d); err == nil && st.IsDir() {
			destDir = true
		}
	}
	for _, s := range srcs {
		target := d
		if !s.isDir && destDir {
			target = path.Join(d, path.Base(s.name))
		}
		if s.isDir || destDir {
			dir := d
			if err := dst.MkdirAll(dir, 0o755); err != nil {
				return fmt.Errorf("creating %s: %w", "/"+dir, err)
			}
		} else if parent := path.Dir(target); parent != "." {
			if err := dst.MkdirAll(parent, 0o755); err != nil {
				return fmt.Errorf("creating %s: %w", "/"+parent, err)
			}
		}
		var dirs []srcEntry // directory times once their contents are in
		for _, e := range s.entries {
			p := target
			if e.rel != "" {
				p = path.Join(target, e.rel)
			}
			if err := copyEntry(ctxRoot, dst, e, p, o); err != nil {
				return fmt.Errorf("copying %q to %s: %w", e.ctxPath, "/"+p, err)
			}
			if e.mode.IsDir() {
				e.ctxPath = p
				dirs = append(dirs, e)
			}
		}
		for i := len(dirs) - 1; i >= 0; i-- {
			_ = dst.Chtimes(dirs[i].ctxPath, dirs[i].mtime, dirs[i].mtime)
		}
	}
	return nil
}

func copyEntry(ctxRoot, dst *os.Root, e srcEntry, p string, o copyOpts) error {
	existing, err := dst.Lstat(p)
	exists := err == nil
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	perm := e.mode.Perm() | e.mode&(fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky)
	if o.hasChmod {
		perm = o.chmod
	}
	switch {
	case e.mode.IsDir():
		if exists && !existing.IsDir() {
			if err := dst.Remove(p); err != nil {
				return err
			}
			exists = false
		}
		if !exists {
			if err := dst.Mkdir(p, 0o700); err != nil {
				return err
			}
		}
	case e.mode&fs.ModeSymlink != 0:
		if exists {
			if existing.IsDir() {
				return fmt.Errorf("a directory is in the way")
			}
			if err := dst.Remove(p); err != nil {
				return err
			}
		}
		if err := dst.Symlink(e.link, p); err != nil {
			return err
		}
		return dst.Lchown(p, o.uid, o.gid)
	default:
		if exists {
			if existing.IsDir() {
				return fmt.Errorf("a directory is in the way")
			}
			if err := dst.Remove(p); err != nil {
				return err
			}
		}
		in, err := ctxRoot.Open(e.ctxPath)
		if err != nil {
			return err
		}
		defer in.Close()
		out, err := dst.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return err
		}
		if _, err := io.Copy(out, in); err != nil {
			out.Close()
			return err
		}
		if err := out.Close(); err != nil {
			return err
		}
	}
	// Owner first: chown clears setuid and setgid bits.
	if err := dst.Lchown(p, o.uid, o.gid); err != nil {
		return err
	}
	if err := dst.Chmod(p, perm); err != nil {
		return err
	}
	return dst.Chtimes(p, e.mtime, e.mtime)
}

// isArchive says whether the start of a file looks like an archive ADD
// would unpack in Docker (tar, gzip, bzip2, xz, zstd).
func isArchive(head []byte) bool {
	for _, magic := range [][]byte{{0x1f, 0x8b}, []byte("BZh"), {0xfd, '7', 'z', 'X', 'Z', 0}, {0x28, 0xb5, 0x2f, 0xfd}} {
		if bytes.HasPrefix(head, magic) {
			return true
		}
	}
	return len(head) >= 262 && string(head[257:262]) == "ustar"
}
