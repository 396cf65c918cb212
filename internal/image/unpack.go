package image

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
)

// Errors Unpack wraps (inside an *EntryError when an entry is to blame).
var (
	// ErrUnsafePath: a name is absolute, climbs out of the root with "..",
	// or runs through a symbolic link; or a hard link's target does.
	ErrUnsafePath = errors.New("unsafe path")
	// ErrLimit: the image is larger than Limits allow.
	ErrLimit = errors.New("image exceeds unpack limits")
	// ErrUnsupported: an entry of a kind Unpack does not create, or with
	// values it cannot honour (an owner that does not fit in 32 bits).
	ErrUnsupported = errors.New("unsupported entry")
)

// EntryError says which layer and entry an unpack failed on.
type EntryError struct {
	// Layer counts from 1, bottom layer first.
	Layer int
	// Entry is the entry's name as the archive spells it.
	Entry string
	Err   error
}

func (e *EntryError) Error() string {
	return fmt.Sprintf("layer %d: entry %q: %v", e.Layer, e.Entry, e.Err)
}

func (e *EntryError) Unwrap() error { return e.Err }

// Default limits: far above real images (a large CUDA image is some 10 GiB
// and a few hundred thousand files) and far below what fills a disk.
const (
	DefaultMaxBytes   int64 = 32 << 30
	DefaultMaxEntries int64 = 4 << 20
)

// Limits bound what an image may expand to. They are checked while the
// layers stream, so a hostile layer (a gzip bomb: a few kilobytes that
// inflate to terabytes, or millions of empty files) is stopped as soon as
// it crosses one, not after it filled the disk.
type Limits struct {
	// MaxBytes bounds, over all layers together, both the decompressed
	// layer data read and the file content written (sparse files count at
	// their full size, since they are written out). 0 means
	// DefaultMaxBytes.
	MaxBytes int64
	// MaxEntries bounds the number of archive entries over all layers. 0
	// means DefaultMaxEntries.
	MaxEntries int64
}

func (l Limits) withDefaults() Limits {
	if l.MaxBytes <= 0 {
		l.MaxBytes = DefaultMaxBytes
	}
	if l.MaxEntries <= 0 {
		l.MaxEntries = DefaultMaxEntries
	}
	return l
}

// Result describes an unpack.
type Result struct {
	// Layers is the number of layers applied.
	Layers int
	// Entries is the number of archive entries read.
	Entries int64
	// Read is the number of decompressed layer bytes read.
	Read int64
	// Written is the number of bytes written to regular files.
	Written int64
	// Skipped lists entries deliberately not created (device nodes), as
	// "layer N: name (why)"; at most maxSkipped, then a count.
	Skipped []string
}

const maxSkipped = 100

// Unpack applies img's layers, bottom first, to the directory dst (created
// when missing; anything already there is treated as a lower layer, but dst
// is normally new and empty). It stops at the first error, leaving dst
// partly written: the caller removes it.
//
// The rules, which are those of the OCI image specification's layer
// changesets plus the confinement an untrusted image needs:
//
//   - Names are cleaned; absolute names and names climbing out of dst with
//     ".." are refused (ErrUnsafePath). The entry "." (dst itself) is
//     ignored: dst keeps the mode and owner its creator gave it.
//   - No symbolic link is ever followed. Paths are resolved component by
//     component from a descriptor of dst with O_NOFOLLOW; an entry whose
//     parent path runs through a symbolic link — planted by an earlier entry
//     or layer, pointing anywhere, inside dst or not — is refused
//     (ErrUnsafePath). Image builders record changes at their real paths,
//     so genuine layers never write through a link; Docker and containerd
//     would confine such a write into the root, we refuse it as the mistake
//     or attack it is. An entry whose own name is an existing link replaces
//     the link. Symbolic links are created with their targets as they are:
//     they are resolved only inside the sandbox, against its own root.
//   - An entry replaces what is at its path, except that a directory entry
//     over an existing directory keeps the directory's contents (and takes
//     the entry's mode, owner and times).
//   - Whiteouts: ".wh.NAME" removes NAME from lower layers (a link is
//     removed, not followed); ".wh..wh..opq" empties its directory of
//     everything lower layers put there, keeping what this layer adds,
//     wherever in the layer it comes. Whiteout files themselves are not
//     created; other ".wh..wh." names (AUFS bookkeeping) are ignored.
//   - Hard links must name an existing non-directory inside dst, resolved
//     by the same rules (no ".." out, no link on the way); a target that is
//     a symbolic link is linked as the link itself.
//   - Regular files, directories, symbolic links, hard links and FIFOs are
//     created with the entry's permission bits (setuid, setgid and sticky
//     included), owner (uid and gid as the archive gives them: the unpacker
//     runs as root) and modification time; directory times are set once a
//     layer is done. Extended attributes in the user namespace are kept;
//     others (security.*, trusted.*) mean something to the host and are
//     dropped.
//   - Character and block devices are skipped and listed in
//     Result.Skipped: a sandbox gets its own /dev from gVisor and never
//     needs an image's device nodes, while a node on the host's disk (say,
//     of the host's disk, mode 0666) would be a door for anyone on the
//     host who can reach the directory. They are skipped rather than
//     refused because old base images do ship /dev entries.
//   - Setuid and setgid bits stay: inside the sandbox they act only on the
//     sandbox's own users, which gVisor confines. On the host they are real
//     files, so dst must live in a directory only root can enter (the
//     template store's mode 0700 build directory).
//   - Limits are checked while streaming (ErrLimit).
//
// Each layer is read to its end, so a registry layer's digest is verified.
func Unpack(ctx context.Context, img v1.Image, dst string, lim Limits) (Result, error) {
	var res Result
	layers, err := img.Layers()
	if err != nil {
		return res, fmt.Errorf("listing image layers: %w", err)
	}
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return res, fmt.Errorf("creating destination: %w", err)
	}
	r, err := openRoot(dst)
	if err != nil {
		return res, err
	}
	defer r.close()
	u := &unpacker{ctx: ctx, root: r, lim: lim.withDefaults(), res: &res}
	for i, l := range layers {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		if err := u.layer(i+1, l); err != nil {
			return res, err
		}
		res.Layers++
	}
	return res, nil
}

// unpacker applies layers to one root. It is used by one goroutine.
type unpacker struct {
	ctx  context.Context
	root *root
	lim  Limits
	res  *Result

	// Per layer: the paths this layer wrote (and their parents), which an
	// opaque whiteout keeps, and the directories whose times are set last.
	layerNo int
	seen    map[string]struct{}
	dirs    []dirTimes
	skipped int
}

type dirTimes struct {
	rel          string
	atime, mtime time.Time
}

// countingReader counts a layer's decompressed bytes against the limit and
// stops when the context ends.
type countingReader struct {
	u *unpacker
	r io.Reader
}

func (c *countingReader) Read(p []byte) (int, error) {
	if err := c.u.ctx.Err(); err != nil {
		return 0, err
	}
	if left := c.u.lim.MaxBytes - c.u.res.Read; int64(len(p)) > left+1 {
		p = p[:left+1]
	}
	n, err := c.r.Read(p)
	c.u.res.Read += int64(n)
	if c.u.res.Read > c.u.lim.MaxBytes {
		return n, fmt.Errorf("%w: more than %d bytes of decompressed layer data", ErrLimit, c.u.lim.MaxBytes)
	}
	return n, err
}

// contentReader counts file content written against the limit.
type contentReader struct {
	u *unpacker
	r io.Reader
}

func (c *contentReader) Read(p []byte) (int, error) {
	if left := c.u.lim.MaxBytes - c.u.res.Written; int64(len(p)) > left+1 {
		p = p[:left+1]
	}
	n, err := c.r.Read(p)
	c.u.res.Written += int64(n)
	if c.u.res.Written > c.u.lim.MaxBytes {
		return n, fmt.Errorf("%w: more than %d bytes of file content", ErrLimit, c.u.lim.MaxBytes)
	}
	return n, err
}

func (u *unpacker) layer(n int, l v1.Layer) error {
	u.layerNo = n
	u.seen = make(map[string]struct{})
	u.dirs = u.dirs[:0]
	rc, err := l.Uncompressed()
	if err != nil {
		return fmt.Errorf("layer %d: opening: %w", n, err)
	}
	defer rc.Close()
	cr := &countingReader{u: u, r: rc}
	tr := tar.NewReader(cr)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("layer %d: reading archive: %w", n, err)
		}
		if err := u.entry(hdr, tr); err != nil {
			return &EntryError{Layer: n, Entry: hdr.Name, Err: err}
		}
	}
	if err := u.setDirTimes(); err != nil {
		return fmt.Errorf("layer %d: %w", n, err)
	}
	// Read what follows the archive's end so that the blob is read whole
	// and its digest checked (registry layers verify at EOF).
	if _, err := io.Copy(io.Discard, cr); err != nil {
		return fmt.Errorf("layer %d: reading to the end: %w", n, err)
	}
	if err := rc.Close(); err != nil {
		return fmt.Errorf("layer %d: %w", n, err)
	}
	return nil
}

// entry applies one archive entry.
func (u *unpacker) entry(hdr *tar.Header, content io.Reader) error {
	u.res.Entries++
	if u.res.Entries > u.lim.MaxEntries {
		return fmt.Errorf("%w: more than %d entries", ErrLimit, u.lim.MaxEntries)
	}
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		return nil
	}
	rel, err := cleanName(hdr.Name)
	if err != nil {
		return err
	}
	if rel == "" {
		return nil
	}
	dir, base := path.Split(rel)
	dir = strings.TrimSuffix(dir, "/")
	if strings.HasPrefix(base, whiteoutPrefix) {
		return u.whiteout(dir, base)
	}
	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeGNUSparse, tar.TypeDir, tar.TypeSymlink, tar.TypeLink, tar.TypeFifo:
	case tar.TypeChar, tar.TypeBlock:
		u.skip(rel, "device node not created")
		return nil
	default:
		return fmt.Errorf("%w: type %q", ErrUnsupported, hdr.Typeflag)
	}
	if hdr.Uid < 0 || hdr.Gid < 0 || int64(hdr.Uid) >= 1<<32-1 || int64(hdr.Gid) >= 1<<32-1 {
		return fmt.Errorf("%w: owner %d:%d out of range", ErrUnsupported, hdr.Uid, hdr.Gid)
	}
	if hdr.Size > u.lim.MaxBytes-u.res.Written {
		return fmt.Errorf("%w: a %d-byte file exceeds the %d bytes left of %d", ErrLimit, hdr.Size, u.lim.MaxBytes-u.res.Written, u.lim.MaxBytes)
	}
	pfd, base, err := u.root.openParent(rel, true)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	st, exists, err := lstatAt(pfd, base)
	if err != nil {
		return fmt.Errorf("inspecting existing %s: %w", rel, err)
	}
	keepDir := exists && hdr.Typeflag == tar.TypeDir && st.Mode&unix.S_IFMT == unix.S_IFDIR
	if exists && !keepDir {
		if err := removeAllAt(pfd, base); err != nil {
			return fmt.Errorf("replacing existing %s: %w", rel, err)
		}
	}
	perm := uint32(hdr.Mode) & 0o7777
	switch hdr.Typeflag {
	case tar.TypeDir:
		if !keepDir {
			if err := unix.Mkdirat(pfd, base, 0o700); err != nil {
				return fmt.Errorf("creating directory: %w", err)
			}
		}
		fd, err := unix.Openat(pfd, base, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("opening directory: %w", err)
		}
		err = setAttrs(fd, hdr, perm)
		unix.Close(fd)
		if err != nil {
			return err
		}
		u.dirs = append(u.dirs, dirTimes{rel: rel, atime: hdr.AccessTime, mtime: hdr.ModTime})
	case tar.TypeReg, tar.TypeGNUSparse:
		fd, err := unix.Openat(pfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return fmt.Errorf("creating file: %w", err)
		}
		f := os.NewFile(uintptr(fd), rel)
		if _, err := io.Copy(f, &contentReader{u: u, r: content}); err != nil {
			f.Close()
			return fmt.Errorf("writing file: %w", err)
		}
		err = setAttrs(int(f.Fd()), hdr, perm)
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("writing file: %w", cerr)
		}
		if err != nil {
			return err
		}
		if err := setTimes(pfd, base, hdr); err != nil {
			return err
		}
	case tar.TypeSymlink:
		if hdr.Linkname == "" {
			return fmt.Errorf("%w: symbolic link with an empty target", ErrUnsupported)
		}
		if err := unix.Symlinkat(hdr.Linkname, pfd, base); err != nil {
			return fmt.Errorf("creating symbolic link: %w", err)
		}
		if err := unix.Fchownat(pfd, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("setting owner: %w", err)
		}
		if err := setTimes(pfd, base, hdr); err != nil {
			return err
		}
	case tar.TypeLink:
		if err := u.hardLink(pfd, base, hdr.Linkname); err != nil {
			return err
		}
	case tar.TypeFifo:
		if err := unix.Mknodat(pfd, base, unix.S_IFIFO|0o600, 0); err != nil {
			return fmt.Errorf("creating FIFO: %w", err)
		}
		// Opening a FIFO would block: set its attributes by name. It was
		// just made in a directory held open, so the name is the FIFO.
		if err := unix.Fchownat(pfd, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("setting owner: %w", err)
		}
		if err := unix.Fchmodat(pfd, base, perm, 0); err != nil {
			return fmt.Errorf("setting mode: %w", err)
		}
		if err := setTimes(pfd, base, hdr); err != nil {
			return err
		}
	}
	u.markSeen(rel)
	return nil
}

// hardLink links base in pfd to target, an existing non-directory in the
// root resolved without following links.
func (u *unpacker) hardLink(pfd int, base, target string) error {
	trel, err := cleanName(target)
	if err != nil {
		return fmt.Errorf("hard link target %q: %w", target, err)
	}
	if trel == "" {
		return fmt.Errorf("%w: hard link to the root directory", ErrUnsafePath)
	}
	tfd, tbase, err := u.root.openParent(trel, false)
	if err != nil {
		return fmt.Errorf("hard link target %q: %w", target, err)
	}
	defer unix.Close(tfd)
	st, ok, err := lstatAt(tfd, tbase)
	switch {
	case err != nil:
		return fmt.Errorf("hard link target %q: %w", target, err)
	case !ok:
		return fmt.Errorf("hard link target %q does not exist", target)
	case st.Mode&unix.S_IFMT == unix.S_IFDIR:
		return fmt.Errorf("%w: hard link target %q is a directory", ErrUnsupported, target)
	}
	// Flags 0: a target that is a symbolic link is linked itself.
	if err := unix.Linkat(tfd, tbase, pfd, base, 0); err != nil {
		return fmt.Errorf("creating hard link to %q: %w", target, err)
	}
	return nil
}

const (
	whiteoutPrefix = ".wh."
	whiteoutMeta   = ".wh..wh."
	whiteoutOpaque = ".wh..wh..opq"
)

// whiteout applies a whiteout entry in directory dir (relative, clean).
func (u *unpacker) whiteout(dir, base string) error {
	if base == whiteoutOpaque {
		return u.opaque(dir)
	}
	if strings.HasPrefix(base, whiteoutMeta) {
		return nil // AUFS bookkeeping (.wh..wh.plnk and the like)
	}
	name := strings.TrimPrefix(base, whiteoutPrefix)
	if name == "" || name == "." || name == ".." {
		return fmt.Errorf("%w: whiteout of %q", ErrUnsafePath, name)
	}
	target := path.Join(dir, name)
	if _, ok := u.seen[target]; ok {
		// Whiteouts hide lower layers only, never this layer's entries.
		return nil
	}
	fd, err := u.root.openDir(dir, false)
	if errors.Is(err, errNotExist) {
		return nil // nothing below to hide
	}
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := removeAllAt(fd, name); err != nil {
		return fmt.Errorf("removing %s: %w", target, err)
	}
	return nil
}

// opaque empties dir of what lower layers put there, keeping what this
// layer wrote (entries may come before or after the opaque marker).
func (u *unpacker) opaque(dir string) error {
	pfd, err := u.root.openDir(dir, true)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	keep := func(child string) (bool, bool) {
		_, ok := u.seen[path.Join(dir, child)]
		return ok, ok
	}
	if err := removeChildren(pfd, ".", keep); err != nil {
		return fmt.Errorf("emptying opaque directory %q: %w", dir, err)
	}
	u.markSeen(dir)
	return nil
}

// markSeen records rel and its parents as written by this layer.
func (u *unpacker) markSeen(rel string) {
	for rel != "" && rel != "." {
		if _, ok := u.seen[rel]; ok {
			return
		}
		u.seen[rel] = struct{}{}
		rel = path.Dir(rel)
	}
}

func (u *unpacker) skip(rel, why string) {
	u.skipped++
	switch {
	case u.skipped <= maxSkipped:
		u.res.Skipped = append(u.res.Skipped, fmt.Sprintf("layer %d: %s (%s)", u.layerNo, rel, why))
	case u.skipped == maxSkipped+1:
		u.res.Skipped = append(u.res.Skipped, "and more")
	}
}

// setDirTimes sets the times of the layer's directories, deepest last
// written first, now that nothing more is written into them.
func (u *unpacker) setDirTimes() error {
	for _, d := range slices.Backward(u.dirs) {
		pfd, base, err := u.root.openParent(d.rel, false)
		if err != nil {
			continue // replaced or removed later in the layer
		}
		st, ok, err := lstatAt(pfd, base)
		if err == nil && ok && st.Mode&unix.S_IFMT == unix.S_IFDIR {
			err = utimes(pfd, base, d.atime, d.mtime)
		}
		unix.Close(pfd)
		if err != nil {
			return fmt.Errorf("setting times of %s: %w", d.rel, err)
		}
	}
	return nil
}

// setAttrs sets owner, then mode (a change of owner clears setuid bits),
// then user extended attributes, on an open file or directory.
func setAttrs(fd int, hdr *tar.Header, perm uint32) error {
	if err := unix.Fchown(fd, hdr.Uid, hdr.Gid); err != nil {
		return fmt.Errorf("setting owner: %w", err)
	}
	if err := unix.Fchmod(fd, perm); err != nil {
		return fmt.Errorf("setting mode: %w", err)
	}
	for k, v := range hdr.PAXRecords {
		attr, ok := strings.CutPrefix(k, "SCHILY.xattr.")
		if !ok || !strings.HasPrefix(attr, "user.") {
			continue
		}
		if err := unix.Fsetxattr(fd, attr, []byte(v), 0); err != nil && !errors.Is(err, unix.ENOTSUP) {
			return fmt.Errorf("setting extended attribute %s: %w", attr, err)
		}
	}
	return nil
}

func setTimes(dirfd int, name string, hdr *tar.Header) error {
	if err := utimes(dirfd, name, hdr.AccessTime, hdr.ModTime); err != nil {
		return fmt.Errorf("setting times: %w", err)
	}
	return nil
}

// timespec converts t; the zero time is the Unix epoch (archives without
// times), and times far from now are kept to the second.
func timespec(t time.Time) unix.Timespec {
	if t.IsZero() {
		return unix.Timespec{}
	}
	return unix.Timespec{Sec: t.Unix(), Nsec: int64(t.Nanosecond())}
}

// utimes sets times without following a link; a zero access time takes
// the modification time.
func utimes(dirfd int, name string, atime, mtime time.Time) error {
	if atime.IsZero() {
		atime = mtime
	}
	ts := []unix.Timespec{timespec(atime), timespec(mtime)}
	return unix.UtimesNanoAt(dirfd, name, ts, unix.AT_SYMLINK_NOFOLLOW)
}

// UnpackTar unpacks one tar archive read from r (a build context) into dst
// under the rules and limits of Unpack: it is one layer of an image.
func UnpackTar(ctx context.Context, r io.Reader, dst string, lim Limits) (Result, error) {
	return Unpack(ctx, tarImage{r: r}, dst, lim)
}

// tarImage is an image of one layer read from a stream; Unpack asks it for
// nothing but its layers, and the layer for nothing but its content.
type tarImage struct {
	v1.Image
	r io.Reader
}

func (t tarImage) Layers() ([]v1.Layer, error) { return []v1.Layer{tarLayer{r: t.r}}, nil }

type tarLayer struct {
	v1.Layer
	r io.Reader
}

func (l tarLayer) Uncompressed() (io.ReadCloser, error) { return io.NopCloser(l.r), nil }
