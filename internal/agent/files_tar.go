package agent

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// TarResult is the agent's answer to OpTarPut (wire.UploadResult's shape).
type TarResult struct {
	Files    int            `json:"files"`
	Dirs     int            `json:"dirs"`
	Symlinks int            `json:"symlinks"`
	Links    int            `json:"links"`
	Bytes    int64          `json:"bytes"`
	Skipped  []SkippedEntry `json:"skipped"`
}

// SkippedEntry is an archive entry an upload left out, and why.
type SkippedEntry struct {
	Name   string `json:"name"`
	Reason string `json:"reason"`
}

// maxSkippedReported bounds TarResult.Skipped; further skipped entries are
// counted in one last line.
const maxSkippedReported = 100

// tarGet sends a tar archive of path: a directory's contents with names
// relative to it, or a single file under its base name. Symlinks are
// archived as symlinks (never followed below path itself); files with
// several links inside the tree become hard links to the first one; device
// nodes, FIFOs and sockets are left out. Files are read as the user. A file
// that shrinks while it is archived is padded with zeros (its header was
// written already), as GNU tar does; one that grows is cut at its size.
func (o fileOps) tarGet(root string) error {
	return runAs(o.id, func() error {
		fi, err := os.Stat(root)
		if err != nil {
			return fileError(err, root, false)
		}
		if !fi.IsDir() && !fi.Mode().IsRegular() {
			return opErr(ErrKindExists, "%s is neither a directory nor a regular file", root)
		}
		if err := WriteJSON(o.st, FrameReply, struct{}{}); err != nil {
			return errCallerGone
		}
		bw := bufio.NewWriterSize(newDataWriter(o.st), fileChunk)
		tw := tar.NewWriter(bw)
		links := map[[2]uint64]string{}
		add := func(p, name string, fi fs.FileInfo) error {
			return o.tarEntry(tw, links, p, name, fi)
		}
		if fi.IsDir() {
			err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
				if err != nil {
					return fileError(err, p, false)
				}
				if p == root {
					return nil
				}
				fi, err := d.Info()
				if errors.Is(err, fs.ErrNotExist) {
					return nil // removed meanwhile
				}
				if err != nil {
					return fileError(err, p, false)
				}
				return add(p, strings.TrimPrefix(p, strings.TrimSuffix(root, "/")+"/"), fi)
			})
		} else {
			err = add(root, filepath.Base(root), fi)
		}
		if err != nil {
			return err
		}
		if err := tw.Close(); err != nil {
			return err
		}
		if err := bw.Flush(); err != nil {
			return err
		}
		if err := WriteFrame(o.st, FrameFileEnd, nil); err != nil {
			return errCallerGone
		}
		return nil
	})
}

// tarEntry writes one entry of a download.
func (o fileOps) tarEntry(tw *tar.Writer, links map[[2]uint64]string, p, name string, fi fs.FileInfo) error {
	var target string
	switch m := fi.Mode(); {
	case m.IsRegular(), m.IsDir():
	case m&fs.ModeSymlink != 0:
		t, err := os.Readlink(p)
		if err != nil {
			return fileError(err, p, false)
		}
		target = t
	default:
		return nil // devices, FIFOs, sockets
	}
	hdr, err := tar.FileInfoHeader(fi, target)
	if err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	hdr.Name = name
	if fi.IsDir() {
		hdr.Name += "/"
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		hdr.Uname, hdr.Gname = o.names.user(st.Uid), o.names.group(st.Gid)
		if fi.Mode().IsRegular() && st.Nlink > 1 {
			key := [2]uint64{st.Dev, st.Ino}
			if first, ok := links[key]; ok {
				hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
			} else {
				links[key] = name
			}
		}
	}
	if hdr.Typeflag != tar.TypeReg {
		return tarWrite(tw.WriteHeader(hdr))
	}
	// O_NOFOLLOW and O_NONBLOCK: the entry may have been replaced by a
	// symlink or a FIFO since it was listed.
	f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fileError(err, p, false)
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil || !st.Mode().IsRegular() {
		return nil
	}
	if err := tarWrite(tw.WriteHeader(hdr)); err != nil {
		return err
	}
	n, err := io.CopyN(tw, f, hdr.Size)
	if err != nil && err != io.EOF {
		if errors.Is(err, errCallerGone) {
			return err
		}
		return fileError(err, p, false)
	}
	if n < hdr.Size {
		if _, err := io.CopyN(tw, zeros{}, hdr.Size-n); err != nil {
			return tarWrite(err)
		}
	}
	return nil
}

// tarWrite classifies an error of the tar writer, which writes to the
// stream.
func tarWrite(err error) error {
	if err == nil || errors.Is(err, errCallerGone) {
		return err
	}
	return fmt.Errorf("writing archive: %w", err)
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// tarPut extracts the archive the daemon sends into the directory path
// (made, with its parents, when missing), as the user: what it makes
// belongs to the user. The archive is untrusted, and:
//   - names are relative to path: a leading "/" is dropped (as GNU tar
//     does), and a name with a ".." element is refused;
//   - an entry whose parent directories, inside path, include a symlink
//     (one in the archive, or one planted in path by the sandbox's code) is
//     refused, and every operation goes through an os.Root of path, which
//     never resolves a name outside it, also if a directory is swapped for a
//     symlink meanwhile;
//   - an existing file, symlink or hard link at an entry's name is removed
//     before the entry is made, never written through;
//   - a hard link must point to a regular file inside path;
//   - device nodes, FIFOs and sockets are skipped and reported; setuid and
//     setgid bits are dropped; owners in the archive are ignored;
//   - the entries are counted (a.MaxEntries), names are at most PATH_MAX,
//     and the data is bounded by the sandbox's disk: a full disk is
//     ErrKindNoSpace, and the entry being written is removed.
//
// Extraction stops at the first refused entry; entries made before it stay.
func (o fileOps) tarPut(dir string, a FileArgs) error {
	maxEntries := a.MaxEntries
	if maxEntries <= 0 {
		maxEntries = DefaultMaxArchiveEntries
	}
	return runAs(o.id, func() error {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fileError(err, dir, true)
		}
		root, err := os.OpenRoot(dir)
		if err != nil {
			return fileError(err, dir, false)
		}
		defer root.Close()
		if err := WriteJSON(o.st, FrameReply, struct{}{}); err != nil {
			return errCallerGone
		}
		raw := newDataReader(o.st)
		var src io.Reader = raw
		if a.Gzip {
			zr, err := gzip.NewReader(src)
			if err != nil {
				return archiveError(err, "")
			}
			src = zr
		}
		x := &extractor{root: root, dir: dir, max: maxEntries, realDirs: map[string]bool{"": true}}
		if err := x.extract(tar.NewReader(src)); err != nil {
			return err
		}
		// Read what follows the archive's end (tar pads archives to
		// records of 10 KiB) up to the daemon's end frame, but not
		// without bound; the daemon stops sending at the answer.
		if _, err := io.CopyN(io.Discard, raw, 1<<20); errors.Is(err, errCallerGone) {
			return err
		}
		if x.result.Skipped == nil {
			x.result.Skipped = []SkippedEntry{}
		}
		return WriteJSON(o.st, FrameReply, x.result)
	})
}

// extractor extracts one archive.
type extractor struct {
	root   *os.Root
	dir    string
	max    int
	count  int
	result TarResult
	// realDirs holds the directories (relative to root, "" for root)
	// found to be directories, not symlinks.
	realDirs map[string]bool
	// dirModes are the modes of the archive's directories, applied at the
	// end, so that a read-only directory does not keep its own entries
	// out.
	dirModes []dirMode
	skipped  int
}

type dirMode struct {
	name string
	mode fs.FileMode
}

func (x *extractor) extract(tr *tar.Reader) error {
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return archiveError(err, "")
		}
		x.count++
		if x.count > x.max {
			return opErr(ErrKindInvalid, "the archive has more than %d entries, the most an upload may have", x.max)
		}
		if err := x.entry(hdr, tr); err != nil {
			return err
		}
	}
	for i := len(x.dirModes) - 1; i >= 0; i-- {
		d := x.dirModes[i]
		if err := x.root.Chmod(d.name, d.mode); err != nil {
			return x.fail(err, d.name)
		}
	}
	if x.skipped > maxSkippedReported {
		x.result.Skipped = append(x.result.Skipped, SkippedEntry{Name: "…", Reason: fmt.Sprintf("%d more entries skipped", x.skipped-maxSkippedReported)})
	}
	return nil
}

func (x *extractor) skip(name, reason string) {
	x.skipped++
	if x.skipped <= maxSkippedReported {
		x.result.Skipped = append(x.result.Skipped, SkippedEntry{Name: name, Reason: reason})
	}
}

// entry makes one entry.
func (x *extractor) entry(hdr *tar.Header, r io.Reader) error {
	name, err := entryName(hdr.Name)
	if err != nil {
		return err
	}
	switch hdr.Typeflag {
	case tar.TypeXGlobalHeader:
		return nil
	case tar.TypeChar, tar.TypeBlock:
		x.skip(hdr.Name, "device nodes are not created")
		return nil
	case tar.TypeFifo:
		x.skip(hdr.Name, "FIFOs are not created")
		return nil
	case tar.TypeDir, tar.TypeReg, tar.TypeGNUSparse, tar.TypeSymlink, tar.TypeLink:
	default:
		x.skip(hdr.Name, fmt.Sprintf("entries of type %q are not supported", hdr.Typeflag))
		return nil
	}
	if name == "" {
		if hdr.Typeflag == tar.TypeDir {
			return nil // the target itself
		}
		return opErr(ErrKindInvalid, "archive entry %q has no name", hdr.Name)
	}
	if err := x.parents(name); err != nil {
		return err
	}
	switch hdr.Typeflag {
	case tar.TypeDir:
		if err := x.root.Mkdir(name, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return x.fail(err, name)
		}
		fi, err := x.root.Lstat(name)
		if err != nil {
			return x.fail(err, name)
		}
		if !fi.IsDir() {
			return opErr(ErrKindExists, "archive entry %q: %s exists and is not a directory", hdr.Name, path.Join(x.dir, name))
		}
		x.realDirs[name] = true
		mode := fs.FileMode(hdr.Mode & 0o777)
		if hdr.Mode&unix.S_ISVTX != 0 {
			mode |= fs.ModeSticky
		}
		x.dirModes = append(x.dirModes, dirMode{name, mode})
		x.result.Dirs++
	case tar.TypeReg, tar.TypeGNUSparse:
		if err := x.clear(name, hdr.Name); err != nil {
			return err
		}
		f, err := x.root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return x.fail(err, name)
		}
		n, err := copyToFile(f, r)
		x.result.Bytes += n
		if err == nil {
			// Setuid and setgid bits are dropped.
			err = f.Chmod(fs.FileMode(hdr.Mode & 0o777))
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			// The entry is removed: a full disk must not stay full.
			_ = x.root.Remove(name)
			return x.fail(err, name)
		}
		_ = x.root.Chtimes(name, hdr.ModTime, hdr.ModTime)
		x.result.Files++
	case tar.TypeSymlink:
		if len(hdr.Linkname) > maxPath || strings.ContainsRune(hdr.Linkname, 0) || hdr.Linkname == "" {
			return opErr(ErrKindInvalid, "archive entry %q: symlink target must be 1 to %d bytes without NUL bytes", hdr.Name, maxPath)
		}
		if err := x.clear(name, hdr.Name); err != nil {
			return err
		}
		if err := x.root.Symlink(hdr.Linkname, name); err != nil {
			return x.fail(err, name)
		}
		x.result.Symlinks++
	case tar.TypeLink:
		target, err := entryName(hdr.Linkname)
		if err != nil {
			return err
		}
		if target != "" {
			err = x.parents(target)
		}
		var fi fs.FileInfo
		if err == nil && target != "" {
			fi, err = x.root.Lstat(target)
		}
		if err != nil || target == "" || !fi.Mode().IsRegular() {
			return opErr(ErrKindInvalid, "archive entry %q is a hard link to %q, which is not a regular file the archive made in the target", hdr.Name, hdr.Linkname)
		}
		if err := x.clear(name, hdr.Name); err != nil {
			return err
		}
		if err := x.root.Link(target, name); err != nil {
			return x.fail(err, name)
		}
		x.result.Links++
	}
	return nil
}

// parents makes the parent directories of name, refusing any that is not
// a real directory (a symlink in the archive, or one planted in the
// target).
func (x *extractor) parents(name string) error {
	dir := path.Dir(name)
	if dir == "." {
		return nil
	}
	var sofar string
	for _, c := range strings.Split(dir, "/") {
		sofar = path.Join(sofar, c)
		if x.realDirs[sofar] {
			continue
		}
		fi, err := x.root.Lstat(sofar)
		if errors.Is(err, fs.ErrNotExist) {
			if err := x.root.Mkdir(sofar, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
				return x.fail(err, sofar)
			}
			fi, err = x.root.Lstat(sofar)
		}
		if err != nil {
			return x.fail(err, sofar)
		}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			return opErr(ErrKindInvalid, "archive entry %q goes through the symlink %s; entries may not", name, path.Join(x.dir, sofar))
		case !fi.IsDir():
			return opErr(ErrKindExists, "archive entry %q: %s is not a directory", name, path.Join(x.dir, sofar))
		}
		x.realDirs[sofar] = true
	}
	return nil
}

// clear removes what is at name (not a directory) before an entry is made
// there, so that nothing is written through a symlink or an existing hard
// link.
func (x *extractor) clear(name, entry string) error {
	fi, err := x.root.Lstat(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return x.fail(err, name)
	}
	if fi.IsDir() {
		return opErr(ErrKindExists, "archive entry %q: %s is a directory", entry, path.Join(x.dir, name))
	}
	if err := x.root.Remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return x.fail(err, name)
	}
	return nil
}

// fail classifies an error of making name: by its errno, else (an os.Root
// refusing a name that leaves the target) as invalid.
func (x *extractor) fail(err error, name string) error {
	return archiveError(err, path.Join(x.dir, name))
}

func archiveError(err error, p string) error {
	var oe *OpError
	if errors.As(err, &oe) || errors.Is(err, errCallerGone) {
		return err
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return fileError(err, p, true)
	}
	if p == "" {
		return opErr(ErrKindInvalid, "reading the archive: %v", err)
	}
	return opErr(ErrKindInvalid, "%s: %v", p, err)
}

// entryName turns an archive entry's name into a clean name relative to
// the target: a leading "/" (or "./") goes, a ".." element is refused. The
// target itself is "".
func entryName(name string) (string, error) {
	if len(name) > maxPath || strings.ContainsRune(name, 0) {
		return "", opErr(ErrKindInvalid, "archive entry name %q is longer than %d bytes or has a NUL byte", truncateString(name, 256), maxPath)
	}
	for _, el := range strings.Split(name, "/") {
		if el == ".." {
			return "", opErr(ErrKindInvalid, "archive entry %q has a \"..\" element; entries must stay inside the target", truncateString(name, 256))
		}
	}
	clean := path.Clean("/" + name)
	if clean == "/" {
		return "", nil
	}
	return clean[1:], nil
}
