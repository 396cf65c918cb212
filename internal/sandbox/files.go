package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/pandastack/pandastack/internal/agent"
	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/wire"
)

// Files in a sandbox: every operation is the sandbox's agent's (the host
// never resolves a path of a sandbox), runs as the user the call asks for
// (the sandbox's default user otherwise, as exec), resumes a paused sandbox
// first, and counts as one of the sandbox's calls while it lasts (acquire).
// Contents stream through: the daemon holds one frame (128 KiB) of a file
// or archive at a time, and yamux's window bounds what is in flight.

// maxListEntries bounds a listing, in the agent and in what the daemon
// takes of it.
const maxListEntries = agent.DefaultMaxListEntries

// FileRequest names a path and who acts on it.
type FileRequest struct {
	Path string
	// User is "user" (the default), "root" or another user of the
	// sandbox.
	User string
}

// ReadFileRequest selects what of a file to read; Length 0 reads to the
// end.
type ReadFileRequest struct {
	FileRequest
	Offset, Length int64
}

// WriteFileRequest describes a file to write.
type WriteFileRequest struct {
	FileRequest
	// Mode holds permission bits; 0 keeps a replaced file's, or 0o644.
	Mode uint32
	// Parents makes missing parent directories.
	Parents bool
	// Size is the length of the content when known in advance, or -1.
	Size int64
}

// UploadRequest describes a tar archive to extract into a directory.
type UploadRequest struct {
	FileRequest
	// Gzip: the archive is gzip-compressed (decompressed inside the
	// sandbox).
	Gzip bool
	// Size is the length of the archive when known in advance, or -1.
	Size int64
}

// WatchRequest describes a watch.
type WatchRequest struct {
	FileRequest
	Recursive bool
}

// FileReader is a file being read from a sandbox. Close it when done: it
// holds one of the sandbox's calls.
type FileReader struct {
	Info wire.FileInfo
	// Length is how many bytes follow, or -1 when the file did not say
	// (files of /proc).
	Length int64
	io.ReadCloser
}

// checkPath refuses a path the agent would refuse, before anything is
// resumed or opened.
func checkPath(what, p string) error {
	switch {
	case p == "":
		return errdefs.Invalid("%s is required", what)
	case !strings.HasPrefix(p, "/"):
		return errdefs.Invalid("%s must be an absolute path in the sandbox, got %q", what, truncate(p, 256))
	case len(p) > 4096 || strings.ContainsRune(p, 0):
		return errdefs.Invalid("%s must be at most 4096 bytes without NUL bytes", what)
	}
	return nil
}

// fileCall checks req and acquires the sandbox for one file operation.
func (m *Manager) fileCall(ctx context.Context, tenant, id string, req FileRequest) (*instance, *agent.Client, func(), agent.FileArgs, error) {
	if err := checkPath("path", req.Path); err != nil {
		return nil, nil, nil, agent.FileArgs{}, err
	}
	if err := checkUser(req.User); err != nil {
		return nil, nil, nil, agent.FileArgs{}, err
	}
	in, client, release, err := m.acquire(ctx, tenant, id)
	if err != nil {
		return nil, nil, nil, agent.FileArgs{}, err
	}
	in.mu.Lock()
	args := agent.FileArgs{Path: req.Path, User: in.user(req.User)}
	in.mu.Unlock()
	return in, client, release, args, nil
}

// diskLimit is the sandbox's writable layer, in bytes.
func (m *Manager) diskLimit(in *instance) int64 {
	in.mu.Lock()
	disk := in.rec.DiskMB
	in.mu.Unlock()
	if disk == 0 {
		disk = m.cfg.DiskMB
	}
	return int64(disk) << 20
}

// StatFile describes a path in the sandbox (a symlink itself, not what it
// points to); a missing path is ErrNotFound.
func (m *Manager) StatFile(ctx context.Context, tenant, id string, req FileRequest) (wire.FileInfo, error) {
	in, client, release, args, err := m.fileCall(ctx, tenant, id, req)
	if err != nil {
		return wire.FileInfo{}, err
	}
	defer release()
	fi, err := client.StatFile(ctx, args)
	if err != nil {
		return wire.FileInfo{}, m.agentError(ctx, in, client, err)
	}
	return fileInfo(fi), nil
}

// ListFiles lists a directory down to depth (1: its entries), at most
// 10,000 entries.
func (m *Manager) ListFiles(ctx context.Context, tenant, id string, req FileRequest, depth int) (wire.FileList, error) {
	if depth < 0 || depth > 64 {
		return wire.FileList{}, errdefs.Invalid("depth must be between 1 and 64, got %d", depth)
	}
	in, client, release, args, err := m.fileCall(ctx, tenant, id, req)
	if err != nil {
		return wire.FileList{}, err
	}
	defer release()
	args.Depth, args.MaxEntries = depth, maxListEntries
	l, truncated, err := client.ListFiles(ctx, args, maxListEntries)
	if err != nil {
		return wire.FileList{}, m.agentError(ctx, in, client, err)
	}
	out := wire.FileList{Entries: make([]wire.FileInfo, len(l)), Truncated: truncated}
	for i, fi := range l {
		out.Entries[i] = fileInfo(fi)
	}
	return out, nil
}

// MakeDir makes a directory.
func (m *Manager) MakeDir(ctx context.Context, tenant, id string, req wire.MakeDirRequest) (wire.FileInfo, error) {
	if req.Mode > 0o1777 {
		return wire.FileInfo{}, errdefs.Invalid("mode must be permission bits (at most 0o1777), got %#o", req.Mode)
	}
	in, client, release, args, err := m.fileCall(ctx, tenant, id, FileRequest{Path: req.Path, User: req.User})
	if err != nil {
		return wire.FileInfo{}, err
	}
	defer release()
	args.Parents, args.Mode = req.Parents, req.Mode
	fi, err := client.MakeDir(ctx, args)
	if err != nil {
		return wire.FileInfo{}, m.agentError(ctx, in, client, err)
	}
	return fileInfo(fi), nil
}

// RemoveFile removes a path: a directory only when empty, unless
// recursive. A symlink is removed, never followed.
func (m *Manager) RemoveFile(ctx context.Context, tenant, id string, req wire.RemoveRequest) error {
	in, client, release, args, err := m.fileCall(ctx, tenant, id, FileRequest{Path: req.Path, User: req.User})
	if err != nil {
		return err
	}
	defer release()
	args.Recursive = req.Recursive
	if err := client.RemoveFile(ctx, args); err != nil {
		return m.agentError(ctx, in, client, err)
	}
	return nil
}

// RenameFile moves a path, as rename(2).
func (m *Manager) RenameFile(ctx context.Context, tenant, id string, req wire.RenameRequest) (wire.FileInfo, error) {
	if err := checkPath("from", req.From); err != nil {
		return wire.FileInfo{}, err
	}
	if err := checkPath("to", req.To); err != nil {
		return wire.FileInfo{}, err
	}
	in, client, release, args, err := m.fileCall(ctx, tenant, id, FileRequest{Path: req.From, User: req.User})
	if err != nil {
		return wire.FileInfo{}, err
	}
	defer release()
	args.To = req.To
	fi, err := client.RenameFile(ctx, args)
	if err != nil {
		return wire.FileInfo{}, m.agentError(ctx, in, client, err)
	}
	return fileInfo(fi), nil
}

// ReadFile opens a regular file of the sandbox for reading.
func (m *Manager) ReadFile(ctx context.Context, tenant, id string, req ReadFileRequest) (*FileReader, error) {
	if req.Offset < 0 || req.Length < 0 {
		return nil, errdefs.Invalid("offset and length must not be negative")
	}
	in, client, release, args, err := m.fileCall(ctx, tenant, id, req.FileRequest)
	if err != nil {
		return nil, err
	}
	args.Offset, args.Length = req.Offset, req.Length
	rs, rc, err := client.ReadFile(ctx, args)
	if err != nil {
		release()
		return nil, m.agentError(ctx, in, client, err)
	}
	return &FileReader{Info: fileInfo(rs.Info), Length: rs.Length, ReadCloser: m.stream(ctx, in, client, rc, release)}, nil
}

// DownloadTar opens a tar archive of a directory's contents (names relative
// to it) or of a file (its base name).
func (m *Manager) DownloadTar(ctx context.Context, tenant, id string, req FileRequest) (io.ReadCloser, error) {
	in, client, release, args, err := m.fileCall(ctx, tenant, id, req)
	if err != nil {
		return nil, err
	}
	rc, err := client.TarGet(ctx, args)
	if err != nil {
		release()
		return nil, m.agentError(ctx, in, client, err)
	}
	return m.stream(ctx, in, client, rc, release), nil
}

// stream is a download's reader: its errors are classified like the
// agent's, and Close gives the sandbox's call back.
func (m *Manager) stream(ctx context.Context, in *instance, client *agent.Client, rc io.ReadCloser, release func()) io.ReadCloser {
	return &downloadStream{m: m, ctx: ctx, in: in, client: client, rc: rc, release: release}
}

type downloadStream struct {
	m       *Manager
	ctx     context.Context
	in      *instance
	client  *agent.Client
	rc      io.ReadCloser
	release func()
	closed  bool
}

func (d *downloadStream) Read(p []byte) (int, error) {
	n, err := d.rc.Read(p)
	if err != nil && err != io.EOF {
		err = d.m.agentError(d.ctx, d.in, d.client, err)
	}
	return n, err
}

func (d *downloadStream) Close() error {
	if !d.closed {
		d.closed = true
		d.rc.Close()
		d.release()
	}
	return nil
}

// errOverDisk ends an upload larger than the sandbox's disk.
var errOverDisk = errors.New("the upload is larger than the sandbox's disk")

// WriteFile writes body to a file, atomically (a temporary file renamed
// over the path). The content streams to the sandbox as it arrives; more
// than the sandbox's disk is refused with ErrInsufficientStorage when the
// request says its size, and cut there otherwise, and a full disk inside is
// ErrInsufficientStorage too. The sandbox stays usable: the temporary file
// is removed.
func (m *Manager) WriteFile(ctx context.Context, tenant, id string, req WriteFileRequest, body io.Reader) (wire.FileInfo, error) {
	if req.Mode > 0o777 {
		return wire.FileInfo{}, errdefs.Invalid("mode must be permission bits (at most 0o777), got %#o", req.Mode)
	}
	in, client, release, args, err := m.fileCall(ctx, tenant, id, req.FileRequest)
	if err != nil {
		return wire.FileInfo{}, err
	}
	defer release()
	limit := m.diskLimit(in)
	if req.Size > limit {
		return wire.FileInfo{}, errdefs.InsufficientStorage("the file is %d bytes, more than the sandbox's disk of %d MiB", req.Size, limit>>20)
	}
	args.Mode, args.Parents = req.Mode, req.Parents
	fi, err := client.WriteFile(ctx, args, &limitedReader{r: body, left: limit})
	if err != nil {
		return wire.FileInfo{}, m.uploadError(ctx, in, client, limit, err)
	}
	return fileInfo(fi), nil
}

// UploadTar extracts a tar archive into a directory (made with its parents
// when missing), inside the sandbox: see agent's OpTarPut for what a
// hostile archive cannot do. Bounded like WriteFile.
func (m *Manager) UploadTar(ctx context.Context, tenant, id string, req UploadRequest, body io.Reader) (wire.UploadResult, error) {
	in, client, release, args, err := m.fileCall(ctx, tenant, id, req.FileRequest)
	if err != nil {
		return wire.UploadResult{}, err
	}
	defer release()
	// An archive holds a little more than its files (headers, padding);
	// a compressed one may expand beyond it, which the sandbox's full
	// disk then stops.
	limit := m.diskLimit(in)
	limit += limit/64 + 1<<20
	if req.Size > limit {
		return wire.UploadResult{}, errdefs.InsufficientStorage("the archive is %d bytes, more than the sandbox's disk of %d MiB", req.Size, m.diskLimit(in)>>20)
	}
	args.Gzip, args.MaxEntries = req.Gzip, m.cfg.MaxArchiveEntries
	res, err := client.TarPut(ctx, args, &limitedReader{r: body, left: limit})
	if err != nil {
		return wire.UploadResult{}, m.uploadError(ctx, in, client, m.diskLimit(in), err)
	}
	out := wire.UploadResult{Files: res.Files, Dirs: res.Dirs, Symlinks: res.Symlinks, Links: res.Links, Bytes: res.Bytes,
		Skipped: make([]wire.SkippedEntry, len(res.Skipped))}
	for i, s := range res.Skipped {
		out.Skipped[i] = wire.SkippedEntry{Name: s.Name, Reason: s.Reason}
	}
	return out, nil
}

// uploadError classifies an upload's failure: the upload's own source (the
// client's body, which carries its kind, or errOverDisk), else the agent's.
func (m *Manager) uploadError(ctx context.Context, in *instance, client *agent.Client, limit int64, err error) error {
	var se *agent.ErrUploadSource
	if errors.As(err, &se) {
		if errors.Is(se.Err, errOverDisk) {
			return errdefs.Wrap(errdefs.ErrInsufficientStorage, err, "the upload is more than the sandbox's disk of %d MiB", limit>>20)
		}
		return fmt.Errorf("reading the upload: %w", se.Err)
	}
	return m.agentError(ctx, in, client, err)
}

// limitedReader fails with errOverDisk past left bytes.
type limitedReader struct {
	r    io.Reader
	left int64
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.left < 0 {
		return 0, errOverDisk
	}
	if int64(len(p)) > l.left+1 {
		p = p[:l.left+1]
	}
	n, err := l.r.Read(p)
	l.left -= int64(n)
	if l.left < 0 {
		return 0, errOverDisk
	}
	return n, err
}

// WatchFiles streams the changes in a directory (and, recursive, below it)
// to emit until ctx ends, emit fails, or the directory goes away (nil).
// ready is called once the watch is in place, before any event.
func (m *Manager) WatchFiles(ctx context.Context, tenant, id string, req WatchRequest, ready func() error, emit func(wire.FileEvent) error) error {
	in, client, release, args, err := m.fileCall(ctx, tenant, id, req.FileRequest)
	if err != nil {
		return err
	}
	defer release()
	args.Recursive = req.Recursive
	w, err := client.WatchFiles(ctx, args)
	if err != nil {
		return m.agentError(ctx, in, client, err)
	}
	defer w.Close()
	if err := ready(); err != nil {
		return err
	}
	for {
		batch, err := w.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return m.agentError(ctx, in, client, err)
		}
		for _, e := range batch {
			if err := emit(wire.FileEvent{Type: e.Type, Path: e.Path, OldPath: e.OldPath, IsDir: e.IsDir}); err != nil {
				return err
			}
		}
	}
}

func fileInfo(fi agent.FileInfo) wire.FileInfo {
	return wire.FileInfo{
		Path: fi.Path, Name: fi.Name, Type: fi.Type, Size: fi.Size, Mode: fi.Mode, ModTime: fi.ModTime,
		Owner: fi.Owner, Group: fi.Group, SymlinkTarget: fi.SymlinkTarget,
	}
}
