package agent

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"
	"golang.org/x/sys/unix"
)

// File operations (ops.go). The agent runs inside the sandbox, so every
// path they name resolves in the sandbox's own filesystem: the host never
// follows a path of a sandbox. Each runs with the credentials of the user it
// is made for (files_creds.go), so the sandbox's permissions apply to it as
// to a command of that user, and what it creates belongs to that user.
//
// Streams carry FrameFileData frames (file or archive bytes, or JSON batches
// of list entries and watch events), ended by FrameFileEnd; the conventions
// of each operation are documented beside its constant.
const (
	// OpFileRead: FileArgs Path, Offset, Length. The agent answers a
	// FrameReply ReadStart, then the bytes in FrameFileData frames, then
	// FrameFileEnd (or a FrameError if reading fails half-way).
	OpFileRead = "file.read"
	// OpFileWrite: FileArgs Path, Mode, Parents. The agent answers a
	// FrameReply (an empty object) once the file can be written; the
	// daemon then sends the content in FrameFileData frames and
	// FrameFileEnd, and the agent answers a FrameReply FileInfo. The new
	// content is written to a temporary file in the same directory and
	// renamed over the path: readers see the old file or the new one,
	// never half of it, and a symlink at the path is replaced, not
	// followed.
	OpFileWrite = "file.write"
	// OpFileStat: FileArgs Path; a FrameReply FileInfo (lstat).
	OpFileStat = "file.stat"
	// OpFileList: FileArgs Path, Depth, MaxEntries; FrameFileData frames
	// each holding a JSON array of FileInfo, then a FrameReply ListEnd.
	OpFileList = "file.list"
	// OpFileMkdir: FileArgs Path, Mode, Parents; a FrameReply FileInfo.
	OpFileMkdir = "file.mkdir"
	// OpFileRemove: FileArgs Path, Recursive; a FrameReply (empty object).
	OpFileRemove = "file.remove"
	// OpFileRename: FileArgs Path (from), To; a FrameReply FileInfo of To.
	OpFileRename = "file.rename"
	// OpTarGet: FileArgs Path. The agent answers a FrameReply (empty
	// object), then a tar archive of Path in FrameFileData frames, then
	// FrameFileEnd (or a FrameError half-way).
	OpTarGet = "file.tar_get"
	// OpTarPut: FileArgs Path, Gzip, MaxEntries. Like OpFileWrite: a
	// FrameReply once Path is a directory, then the daemon sends a tar
	// archive (gzip-compressed with Gzip) and FrameFileEnd; the agent
	// extracts it into Path and answers a FrameReply TarResult.
	OpTarPut = "file.tar_put"
	// OpFileWatch: FileArgs Path, Recursive, MaxWatches. A FrameReply
	// (empty object) once the watch is in place, then FrameFileData frames
	// each holding a JSON array of FileEvent, until the daemon closes the
	// stream. A FrameError ends a watch that fails.
	OpFileWatch = "file.watch"
)

// Frames of the file operations.
const (
	// FrameFileData (either way) carries bytes of a file or an archive,
	// or a JSON batch of list entries or watch events.
	FrameFileData byte = 'D'
	// FrameFileEnd (either way) ends the data.
	FrameFileEnd byte = 'Z'
)

// fileChunk is the most file data one FrameFileData carries: large enough
// that frame headers cost nothing, small against the yamux window (1 MiB).
const fileChunk = 128 << 10

// Bounds of the file operations, when the daemon asks for none.
const (
	// DefaultMaxListEntries bounds a listing.
	DefaultMaxListEntries = 10000
	// DefaultMaxArchiveEntries bounds the entries of an uploaded archive.
	DefaultMaxArchiveEntries = 100000
	// DefaultMaxWatches bounds the directories one recursive watch
	// watches.
	DefaultMaxWatches = 10000
	// maxPath is PATH_MAX.
	maxPath = 4096
	// maxListDepth bounds a listing's depth.
	maxListDepth = 64
)

// FileArgs are the arguments of every file operation; each uses the fields
// its constant names, plus User.
type FileArgs struct {
	Path string `json:"path"`
	// User is who the operation runs as ("" for the agent's own, root).
	User string `json:"user,omitempty"`
	// Offset and Length select part of a file to read; Length 0 reads to
	// the end.
	Offset int64 `json:"offset,omitempty"`
	Length int64 `json:"length,omitempty"`
	// Mode holds permission bits for a write or mkdir; 0 means the
	// default (0o644 for a new file, the old file's for one replaced,
	// 0o755 for a directory).
	Mode uint32 `json:"mode,omitempty"`
	// Parents creates missing parent directories (and, for mkdir, makes
	// an existing directory a success).
	Parents bool `json:"parents,omitempty"`
	// Depth is how deep a listing goes (1: the directory's entries).
	Depth int `json:"depth,omitempty"`
	// Recursive removes a directory's contents; watches subdirectories.
	Recursive bool `json:"recursive,omitempty"`
	// To is a rename's destination.
	To string `json:"to,omitempty"`
	// Gzip: the uploaded archive is gzip-compressed.
	Gzip bool `json:"gzip,omitempty"`
	// MaxEntries bounds a listing or an upload's archive entries;
	// MaxWatches a watch's directories. 0: the defaults above.
	MaxEntries int `json:"max_entries,omitempty"`
	MaxWatches int `json:"max_watches,omitempty"`
}

// FileInfo describes a file as lstat sees it (wire.FileInfo's shape).
type FileInfo struct {
	Path          string    `json:"path"`
	Name          string    `json:"name"`
	Type          string    `json:"type"`
	Size          int64     `json:"size"`
	Mode          uint32    `json:"mode"`
	ModTime       time.Time `json:"mod_time"`
	Owner         string    `json:"owner"`
	Group         string    `json:"group"`
	SymlinkTarget string    `json:"symlink_target,omitempty"`
}

// File types of FileInfo.Type.
const (
	FileTypeFile    = "file"
	FileTypeDir     = "dir"
	FileTypeSymlink = "symlink"
	FileTypeOther   = "other"
)

// ReadStart is the agent's first answer to OpFileRead: the file, and how
// many bytes follow (-1: unknown, read to the end, as for /proc files that
// report size 0).
type ReadStart struct {
	Info   FileInfo `json:"info"`
	Length int64    `json:"length"`
}

// ListEnd ends a listing.
type ListEnd struct {
	Truncated bool `json:"truncated"`
}

// fileOp serves one file operation.
func (s *Server) fileOp(ctx context.Context, st *yamux.Stream, req Request) {
	var a FileArgs
	if !decodeArgs(st, req, &a) {
		return
	}
	fail := func(err error) {
		var oe *OpError
		if !errors.As(err, &oe) {
			oe = &OpError{Kind: ErrKindOther, Message: err.Error()}
		}
		_ = WriteJSON(st, FrameError, oe)
	}
	path, err := cleanPath("path", a.Path)
	if err != nil {
		fail(err)
		return
	}
	id, err := lookupIdentity(a.User)
	if err != nil {
		kind := ErrKindOther
		if errors.As(err, new(errUnknownUser)) {
			kind = ErrKindInvalid
		}
		fail(&OpError{Kind: kind, Message: err.Error()})
		return
	}
	ops := fileOps{st: st, id: id, names: newNameCache()}
	switch req.Op {
	case OpFileRead:
		err = ops.read(path, a)
	case OpFileWrite:
		err = ops.write(path, a)
	case OpFileStat:
		var fi FileInfo
		err = runAs(id, func() (err error) { fi, err = ops.stat(path); return err })
		if err == nil {
			err = WriteJSON(st, FrameReply, fi)
		}
	case OpFileList:
		err = ops.list(path, a)
	case OpFileMkdir:
		err = ops.mkdir(path, a)
	case OpFileRemove:
		err = ops.remove(path, a)
	case OpFileRename:
		err = ops.rename(path, a)
	case OpTarGet:
		err = ops.tarGet(path)
	case OpTarPut:
		err = ops.tarPut(path, a)
	case OpFileWatch:
		err = s.watch(ctx, ops, path, a)
	}
	if err != nil && !errors.Is(err, errCallerGone) {
		fail(err)
	}
}

// errCallerGone: the daemon closed the stream; nobody is left to answer.
var errCallerGone = errors.New("the caller went away")

// fileOps is one file operation's stream and user.
type fileOps struct {
	st    *yamux.Stream
	id    identity
	names *nameCache
}

// cleanPath checks that p is an absolute path of reasonable length without
// NUL bytes, and cleans it ("/a/../b" is "/b", "/.." is "/").
func cleanPath(what, p string) (string, error) {
	switch {
	case p == "":
		return "", &OpError{Kind: ErrKindInvalid, Message: what + " is required"}
	case !strings.HasPrefix(p, "/"):
		return "", &OpError{Kind: ErrKindInvalid, Message: fmt.Sprintf("%s must be absolute, got %q", what, truncateString(p, 256))}
	case len(p) > maxPath || strings.ContainsRune(p, 0):
		return "", &OpError{Kind: ErrKindInvalid, Message: fmt.Sprintf("%s must be at most %d bytes without NUL bytes", what, maxPath)}
	}
	return filepath.Clean(p), nil
}

func truncateString(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// fileError classifies an error of a file operation on path by its errno.
// creating says that the operation makes path: a path component that is
// not a directory is then in the way (409) rather than a path that does not
// exist (404).
func fileError(err error, path string, creating bool) error {
	if err == nil {
		return nil
	}
	var oe *OpError
	if errors.As(err, &oe) {
		return oe
	}
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return &OpError{Kind: ErrKindOther, Message: fmt.Sprintf("%s: %v", path, err)}
	}
	kind := ErrKindOther
	switch errno {
	case unix.ENOENT:
		kind = ErrKindNotFound
	case unix.ENOTDIR:
		kind = ErrKindNotFound
		if creating {
			kind = ErrKindExists
		}
	case unix.EEXIST, unix.ENOTEMPTY, unix.EISDIR, unix.EBUSY, unix.EXDEV, unix.ETXTBSY:
		kind = ErrKindExists
	case unix.EACCES, unix.EPERM, unix.EROFS:
		kind = ErrKindDenied
	case unix.ENOSPC, unix.EDQUOT:
		kind = ErrKindNoSpace
	case unix.ENAMETOOLONG, unix.EINVAL, unix.ELOOP:
		kind = ErrKindInvalid
	}
	msg := errno.Error()
	if kind == ErrKindNoSpace {
		msg = "no space left on the sandbox's disk"
	}
	return &OpError{Kind: kind, Message: fmt.Sprintf("%s: %s", path, msg)}
}

// opErr returns an OpError of kind with a formatted message.
func opErr(kind, format string, args ...any) error {
	return &OpError{Kind: kind, Message: fmt.Sprintf(format, args...)}
}

// nameCache maps uids and gids to names from the sandbox's /etc/passwd and
// /etc/group, for one operation.
type nameCache struct {
	users, groups map[uint32]string
}

func newNameCache() *nameCache {
	return &nameCache{users: map[uint32]string{}, groups: map[uint32]string{}}
}

func (c *nameCache) user(uid uint32) string {
	if n, ok := c.users[uid]; ok {
		return n
	}
	n := strconv.FormatUint(uint64(uid), 10)
	if u, err := user.LookupId(n); err == nil {
		n = u.Username
	}
	c.users[uid] = n
	return n
}

func (c *nameCache) group(gid uint32) string {
	if n, ok := c.groups[gid]; ok {
		return n
	}
	n := strconv.FormatUint(uint64(gid), 10)
	if g, err := user.LookupGroupId(n); err == nil {
		n = g.Name
	}
	c.groups[gid] = n
	return n
}

// info describes fi, found at path (lstat's view).
func (o fileOps) info(path string, fi fs.FileInfo) FileInfo {
	out := FileInfo{
		Path: path, Name: filepath.Base(path), Size: fi.Size(), ModTime: fi.ModTime().UTC(),
		Mode: uint32(fi.Mode().Perm()),
	}
	m := fi.Mode()
	if m&fs.ModeSetuid != 0 {
		out.Mode |= unix.S_ISUID
	}
	if m&fs.ModeSetgid != 0 {
		out.Mode |= unix.S_ISGID
	}
	if m&fs.ModeSticky != 0 {
		out.Mode |= unix.S_ISVTX
	}
	switch {
	case m.IsRegular():
		out.Type = FileTypeFile
	case m.IsDir():
		out.Type = FileTypeDir
	case m&fs.ModeSymlink != 0:
		out.Type = FileTypeSymlink
		if t, err := os.Readlink(path); err == nil {
			out.SymlinkTarget = t
		}
	default:
		out.Type = FileTypeOther
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		out.Owner, out.Group = o.names.user(st.Uid), o.names.group(st.Gid)
	}
	return out
}

// stat describes path (lstat); the caller runs it as the user.
func (o fileOps) stat(path string) (FileInfo, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return FileInfo{}, fileError(err, path, false)
	}
	return o.info(path, fi), nil
}

// read sends a regular file's bytes. It opens the file as the user; the
// reading itself needs no permission beyond the open descriptor.
func (o fileOps) read(path string, a FileArgs) error {
	if a.Offset < 0 || a.Length < 0 {
		return opErr(ErrKindInvalid, "offset and length must not be negative")
	}
	var f *os.File
	var fi FileInfo
	err := runAs(o.id, func() error {
		// O_NONBLOCK: opening a FIFO must not wait for a writer; it is
		// refused below like every file that is not a regular one.
		var err error
		f, err = os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
		if err != nil {
			return fileError(err, path, false)
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return fileError(err, path, false)
		}
		fi = o.info(path, st)
		if !st.Mode().IsRegular() {
			f.Close()
			if st.IsDir() {
				return opErr(ErrKindExists, "%s is a directory; list it, or download it as an archive", path)
			}
			return opErr(ErrKindExists, "%s is not a regular file", path)
		}
		return nil
	})
	if err != nil {
		return err
	}
	defer f.Close()
	length := int64(-1)
	if fi.Size > 0 {
		length = max(fi.Size-a.Offset, 0)
		if a.Length > 0 {
			length = min(length, a.Length)
		}
	} else if a.Length > 0 {
		// A file that reports size 0 (/proc) is read to its end, up
		// to Length.
		length = -1
	}
	if err := WriteJSON(o.st, FrameReply, ReadStart{Info: fi, Length: length}); err != nil {
		return errCallerGone
	}
	var src io.Reader = io.NewSectionReader(f, a.Offset, 1<<62)
	if length >= 0 {
		src = io.LimitReader(src, length)
	} else if a.Length > 0 {
		src = io.LimitReader(src, a.Length)
	}
	fw := newDataWriter(o.st)
	n, err := io.Copy(fw, src)
	if err != nil {
		if errors.Is(err, errCallerGone) {
			return err
		}
		return fileError(err, path, false)
	}
	if length >= 0 && n < length {
		return opErr(ErrKindOther, "%s: the file shrank while it was read (%d of %d bytes)", path, n, length)
	}
	if err := WriteFrame(o.st, FrameFileEnd, nil); err != nil {
		return errCallerGone
	}
	return nil
}

// write receives a file's content into a temporary file beside path and
// renames it over path.
func (o fileOps) write(path string, a FileArgs) error {
	if path == "/" {
		return opErr(ErrKindExists, "/ is a directory")
	}
	if a.Mode > 0o777 {
		return opErr(ErrKindInvalid, "mode must be permission bits (at most 0777), got %#o", a.Mode)
	}
	dir, base := filepath.Split(path)
	var tmp *os.File
	mode := os.FileMode(0o644)
	err := runAs(o.id, func() error {
		if a.Parents {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return fileError(err, dir, true)
			}
		}
		// Lstat: a symlink at path is replaced, and lends no mode.
		if fi, err := os.Lstat(path); err == nil {
			switch {
			case fi.IsDir():
				return opErr(ErrKindExists, "%s is a directory", path)
			case fi.Mode().IsRegular():
				mode = fi.Mode().Perm()
			}
		}
		if a.Mode != 0 {
			mode = os.FileMode(a.Mode)
		}
		var err error
		tmp, err = os.CreateTemp(dir, "."+truncateString(base, 128)+".pandastack-*")
		if err != nil {
			return fileError(err, path, true)
		}
		return nil
	})
	if err != nil {
		return err
	}
	done := false
	defer func() {
		if !done {
			tmp.Close()
			_ = os.Remove(tmp.Name())
		}
	}()
	if err := WriteJSON(o.st, FrameReply, struct{}{}); err != nil {
		return errCallerGone
	}
	if _, err := copyToFile(tmp, newDataReader(o.st)); err != nil {
		if errors.Is(err, errCallerGone) {
			return err
		}
		return fileError(err, path, true)
	}
	// The temporary file was made 0600 (os.CreateTemp); Chmod is not
	// subject to the umask.
	if err := tmp.Chmod(mode); err != nil {
		return fileError(err, path, true)
	}
	if err := tmp.Close(); err != nil {
		return fileError(err, path, true)
	}
	var fi FileInfo
	err = runAs(o.id, func() error {
		if err := os.Rename(tmp.Name(), path); err != nil {
			return fileError(err, path, true)
		}
		done = true
		var err error
		fi, err = o.stat(path)
		return err
	})
	if err != nil {
		return err
	}
	return WriteJSON(o.st, FrameReply, fi)
}

// list sends the entries under path, down to a.Depth, parents first.
func (o fileOps) list(path string, a FileArgs) error {
	depth := a.Depth
	if depth <= 0 {
		depth = 1
	}
	depth = min(depth, maxListDepth)
	maxEntries := a.MaxEntries
	if maxEntries <= 0 {
		maxEntries = DefaultMaxListEntries
	}
	return runAs(o.id, func() error {
		fi, err := os.Stat(path)
		if err != nil {
			return fileError(err, path, false)
		}
		if !fi.IsDir() {
			return opErr(ErrKindExists, "%s is not a directory", path)
		}
		var batch []FileInfo
		batchBytes, count, truncated := 0, 0, false
		flush := func() error {
			if len(batch) == 0 {
				return nil
			}
			if err := WriteJSON(o.st, FrameFileData, batch); err != nil {
				return errCallerGone
			}
			batch, batchBytes = batch[:0], 0
			return nil
		}
		var walk func(dir string, level int) error
		walk = func(dir string, level int) error {
			entries, err := os.ReadDir(dir)
			if err != nil {
				if dir == path {
					return fileError(err, path, false)
				}
				// A subdirectory the user may not read is listed
				// but not entered.
				return nil
			}
			for _, e := range entries {
				if count >= maxEntries {
					truncated = true
					return nil
				}
				p := filepath.Join(dir, e.Name())
				fi, err := e.Info()
				if err != nil {
					continue // removed meanwhile
				}
				info := o.info(p, fi)
				batch = append(batch, info)
				count++
				// Entries are at most a few hundred bytes (a path is
				// at most 4096): a frame stays far below MaxFrame.
				batchBytes += len(info.Path) + len(info.SymlinkTarget) + 200
				if batchBytes > MaxFrame/4 {
					if err := flush(); err != nil {
						return err
					}
				}
				if e.IsDir() && level < depth {
					if err := walk(p, level+1); err != nil {
						return err
					}
				}
			}
			return nil
		}
		if err := walk(path, 1); err != nil {
			return err
		}
		if err := flush(); err != nil {
			return err
		}
		return WriteJSON(o.st, FrameReply, ListEnd{Truncated: truncated})
	})
}

// mkdir makes a directory (and its parents with a.Parents).
func (o fileOps) mkdir(path string, a FileArgs) error {
	if a.Mode > 0o1777 {
		return opErr(ErrKindInvalid, "mode must be permission bits (at most 01777), got %#o", a.Mode)
	}
	mode := os.FileMode(0o755)
	if a.Mode != 0 {
		mode = os.FileMode(a.Mode & 0o777)
		if a.Mode&unix.S_ISVTX != 0 {
			mode |= os.ModeSticky
		}
	}
	var fi FileInfo
	err := runAs(o.id, func() error {
		var err error
		if a.Parents {
			err = os.MkdirAll(path, mode)
		} else {
			err = os.Mkdir(path, mode)
		}
		if err != nil {
			if errors.Is(err, fs.ErrExist) {
				return opErr(ErrKindExists, "%s exists", path)
			}
			return fileError(err, path, true)
		}
		// Mkdir's mode is subject to the umask; the caller's is not.
		if a.Mode != 0 {
			if err := os.Chmod(path, mode); err != nil {
				return fileError(err, path, true)
			}
		}
		fi, err = o.stat(path)
		return err
	})
	if err != nil {
		return err
	}
	return WriteJSON(o.st, FrameReply, fi)
}

// remove removes path; a directory only when empty, or with a.Recursive.
// A recursive remove never follows symlinks (os.RemoveAll works from
// directory descriptors).
func (o fileOps) remove(path string, a FileArgs) error {
	if path == "/" {
		return opErr(ErrKindInvalid, "refusing to remove /")
	}
	err := runAs(o.id, func() error {
		fi, err := os.Lstat(path)
		if err != nil {
			return fileError(err, path, false)
		}
		if fi.IsDir() && a.Recursive {
			err = os.RemoveAll(path)
		} else {
			err = os.Remove(path)
		}
		if err != nil {
			if fi.IsDir() && (errors.Is(err, unix.ENOTEMPTY) || errors.Is(err, unix.EEXIST)) {
				return opErr(ErrKindExists, "%s is a directory that is not empty; remove it recursively", path)
			}
			return fileError(err, path, false)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return WriteJSON(o.st, FrameReply, struct{}{})
}

// rename moves path to a.To as rename(2) does.
func (o fileOps) rename(path string, a FileArgs) error {
	to, err := cleanPath("to", a.To)
	if err != nil {
		return err
	}
	if path == "/" || to == "/" {
		return opErr(ErrKindInvalid, "cannot rename /")
	}
	var fi FileInfo
	err = runAs(o.id, func() error {
		if err := os.Rename(path, to); err != nil {
			var le *os.LinkError
			if errors.As(err, &le) && errors.Is(err, unix.ENOENT) {
				if _, serr := os.Lstat(path); serr != nil {
					return fileError(serr, path, false)
				}
				return fileError(err, to, true)
			}
			return fileError(err, path+" → "+to, true)
		}
		var err error
		fi, err = o.stat(to)
		return err
	})
	if err != nil {
		return err
	}
	return WriteJSON(o.st, FrameReply, fi)
}

// copyToFile copies r to f a frame at a time. (io.Copy would use
// f.ReadFrom, which falls back to 32 KiB reads: four writes, four
// syscalls into gVisor, per frame.)
func copyToFile(f *os.File, r io.Reader) (int64, error) {
	return io.CopyBuffer(struct{ io.Writer }{f}, r, make([]byte, fileChunk))
}

// dataWriter sends what is written to it as FrameFileData frames of at
// most fileChunk bytes, each with a single Write to the stream and no
// allocation.
type dataWriter struct {
	w   io.Writer
	buf []byte
	// lost is the error a failed write wraps (errCallerGone in the agent).
	lost error
}

func newDataWriter(w io.Writer) *dataWriter {
	return &dataWriter{w: w, buf: make([]byte, 5+fileChunk), lost: errCallerGone}
}

func (d *dataWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		c := copy(d.buf[5:], p)
		if err := d.send(c); err != nil {
			return n, err
		}
		n += c
		p = p[c:]
	}
	return n, nil
}

// ReadFrom reads r straight into the frame buffer (io.Copy uses it), a
// whole frame at a time where r has that much: fewer, larger frames cost
// the transport less (the stdio FIFOs move at most a pipe buffer per
// write).
func (d *dataWriter) ReadFrom(r io.Reader) (int64, error) {
	var n int64
	for {
		c, err := io.ReadFull(r, d.buf[5:])
		if err == io.ErrUnexpectedEOF {
			err = io.EOF
		}
		if c > 0 {
			if werr := d.send(c); werr != nil {
				return n, werr
			}
			n += int64(c)
		}
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

func (d *dataWriter) send(c int) error {
	d.buf[0] = FrameFileData
	binary.BigEndian.PutUint32(d.buf[1:5], uint32(c))
	if _, err := d.w.Write(d.buf[:5+c]); err != nil {
		return fmt.Errorf("%w: %v", d.lost, err)
	}
	return nil
}

// dataReader reads the bytes of FrameFileData frames until FrameFileEnd
// (io.EOF), straight into the caller's buffer. The stream failing or ending
// first is lost (errCallerGone in the agent, errAgentGone in the daemon);
// another frame is onFrame's business.
type dataReader struct {
	r    io.Reader
	lost error
	// left is what remains of the current frame's payload.
	left int
	eof  bool
	// onFrame, if set, sees every frame that is neither data nor end; it
	// returns the error Read reports.
	onFrame func(typ byte, payload []byte) error
}

func newDataReader(r io.Reader) *dataReader { return &dataReader{r: r, lost: errCallerGone} }

func (d *dataReader) Read(p []byte) (int, error) {
	for d.left == 0 {
		if d.eof {
			return 0, io.EOF
		}
		var hdr [5]byte
		if _, err := io.ReadFull(d.r, hdr[:]); err != nil {
			return 0, fmt.Errorf("%w: %v", d.lost, err)
		}
		n := binary.BigEndian.Uint32(hdr[1:])
		if n > MaxFrame {
			return 0, fmt.Errorf("%w: frame of %d bytes", d.lost, n)
		}
		switch hdr[0] {
		case FrameFileData:
			d.left = int(n)
		case FrameFileEnd:
			if n != 0 {
				return 0, fmt.Errorf("%w: end frame with a payload", d.lost)
			}
			d.eof = true
		default:
			payload := make([]byte, n)
			if _, err := io.ReadFull(d.r, payload); err != nil {
				return 0, fmt.Errorf("%w: %v", d.lost, err)
			}
			if d.onFrame != nil {
				return 0, d.onFrame(hdr[0], payload)
			}
			return 0, fmt.Errorf("%w: unexpected frame %q", d.lost, hdr[0])
		}
	}
	if len(p) > d.left {
		p = p[:d.left]
	}
	n, err := d.r.Read(p)
	d.left -= n
	if err != nil && (err != io.EOF || d.left > 0) {
		return n, fmt.Errorf("%w: %v", d.lost, err)
	}
	return n, nil
}

// jsonBatch decodes a FrameFileData payload holding a JSON array.
func jsonBatch[T any](payload []byte) ([]T, error) {
	var v []T
	if err := json.Unmarshal(payload, &v); err != nil {
		return nil, fmt.Errorf("decoding batch: %w", err)
	}
	return v, nil
}
