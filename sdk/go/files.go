package pandastack

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
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
	"strconv"
	"strings"
	"sync"

	"github.com/pandastack/pandastack/wire"
)

// Files is the filesystem of a sandbox (docs/API.md, "Files"). Paths are
// absolute paths in the sandbox, resolved there with the permissions of the
// user the calls run as: the sandbox's unprivileged default user, or the one
// As names. What a call creates belongs to that user. Contents stream both
// ways: nothing here holds a whole file in memory unless asked to
// (ReadFile, WriteFile).
//
//	f := sb.Files()
//	_, err := f.WriteFile(ctx, "/home/user/hello.txt", []byte("hi"), pandastack.WriteOptions{})
//	b, err := f.ReadFile(ctx, "/home/user/hello.txt")
//	_, err = f.As("root").MakeDir(ctx, "/opt/data", pandastack.MakeDirOptions{Parents: true})
type Files struct {
	s    *Sandbox
	user string
}

// Files returns the sandbox's filesystem, acting as its default user.
func (s *Sandbox) Files() *Files { return &Files{s: s} }

// As returns the same filesystem acting as user ("root", or "user" for the
// default).
func (f *Files) As(user string) *Files { return &Files{s: f.s, user: user} }

// query returns the query of a file call on p, plus key/value pairs.
func (f *Files) query(p string, kv ...string) url.Values {
	q := url.Values{"path": {p}}
	if f.user != "" {
		q.Set("user", f.user)
	}
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] != "" {
			q.Set(kv[i], kv[i+1])
		}
	}
	return q
}

// request builds a request of a file route with a raw body.
func (f *Files) request(ctx context.Context, method, route string, q url.Values, body io.Reader) (*http.Request, error) {
	c := f.s.c
	u := c.baseURL + wire.APIVersion + f.s.path("/files"+route)
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, fmt.Errorf("building request: %w", err)
	}
	req.Header.Set("User-Agent", "pandastack-go")
	if c.apiKey != "" {
		req.Header.Set("Authorization", "Bearer "+c.apiKey)
	}
	return req, nil
}

// doJSON sends a request of a file route and decodes its JSON answer.
func (f *Files) doJSON(req *http.Request, want int, out any) error {
	req.Header.Set("Accept", "application/json")
	resp, err := f.s.c.send(req, want)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decoding %s %s response: %w", req.Method, req.URL.Path, err)
	}
	return nil
}

// ReadOptions selects part of a file to read.
type ReadOptions struct {
	// Offset is the first byte; Length the most bytes to read (0: to the
	// end).
	Offset, Length int64
}

// Read opens a file of the sandbox for reading; its bytes stream as the
// reader is read. Close it when done. A transfer cut short (the sandbox
// died) is an error from Read, never a silently short file.
func (f *Files) Read(ctx context.Context, p string, opts ReadOptions) (io.ReadCloser, error) {
	kv := []string{}
	if opts.Offset != 0 {
		kv = append(kv, "offset", strconv.FormatInt(opts.Offset, 10))
	}
	if opts.Length != 0 {
		kv = append(kv, "length", strconv.FormatInt(opts.Length, 10))
	}
	req, err := f.request(ctx, http.MethodGet, "", f.query(p, kv...), nil)
	if err != nil {
		return nil, err
	}
	resp, err := f.s.c.send(req, http.StatusOK)
	if err != nil {
		return nil, fmt.Errorf("reading %s in sandbox %q: %w", p, f.s.id, err)
	}
	return resp.Body, nil
}

// ReadFile returns the whole content of a file.
func (f *Files) ReadFile(ctx context.Context, p string) ([]byte, error) {
	rc, err := f.Read(ctx, p, ReadOptions{})
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		return nil, fmt.Errorf("reading %s in sandbox %q: %w", p, f.s.id, err)
	}
	return b, nil
}

// WriteOptions tunes a write.
type WriteOptions struct {
	// Mode holds the permission bits (0: a replaced file's, or 0644).
	Mode fs.FileMode
	// Parents makes missing parent directories.
	Parents bool
}

// Write writes what r yields to a file of the sandbox, streamed: the
// content goes to a temporary file beside it, renamed over the path once
// complete, so readers never see half of it and a failed write leaves the
// old file. A symlink at the path is replaced, not followed. More than the
// sandbox's disk holds fails with ErrInsufficientStorage.
func (f *Files) Write(ctx context.Context, p string, r io.Reader, opts WriteOptions) (wire.FileInfo, error) {
	kv := []string{"parents", ""}
	if opts.Parents {
		kv[1] = "true"
	}
	if opts.Mode != 0 {
		kv = append(kv, "mode", strconv.FormatUint(uint64(opts.Mode.Perm()), 8))
	}
	req, err := f.request(ctx, http.MethodPut, "", f.query(p, kv...), r)
	if err != nil {
		return wire.FileInfo{}, err
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	var fi wire.FileInfo
	if err := f.doJSON(req, http.StatusOK, &fi); err != nil {
		return wire.FileInfo{}, fmt.Errorf("writing %s in sandbox %q: %w", p, f.s.id, err)
	}
	return fi, nil
}

// WriteFile writes data to a file; see Write.
func (f *Files) WriteFile(ctx context.Context, p string, data []byte, opts WriteOptions) (wire.FileInfo, error) {
	return f.Write(ctx, p, bytes.NewReader(data), opts)
}

// Stat describes a path (a symlink itself, not what it points to). A
// missing path is ErrNotFound.
func (f *Files) Stat(ctx context.Context, p string) (wire.FileInfo, error) {
	req, err := f.request(ctx, http.MethodGet, "/stat", f.query(p), nil)
	if err != nil {
		return wire.FileInfo{}, err
	}
	var fi wire.FileInfo
	if err := f.doJSON(req, http.StatusOK, &fi); err != nil {
		return wire.FileInfo{}, fmt.Errorf("stat of %s in sandbox %q: %w", p, f.s.id, err)
	}
	return fi, nil
}

// Exists reports whether a path exists (as a symlink too, even a dangling
// one).
func (f *Files) Exists(ctx context.Context, p string) (bool, error) {
	_, err := f.Stat(ctx, p)
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

// List lists a directory down to depth (1, or 0: its own entries), parents
// before their children, at most 10,000 entries (Truncated says when there
// are more).
func (f *Files) List(ctx context.Context, p string, depth int) (wire.FileList, error) {
	kv := []string{}
	if depth > 0 {
		kv = append(kv, "depth", strconv.Itoa(depth))
	}
	req, err := f.request(ctx, http.MethodGet, "/list", f.query(p, kv...), nil)
	if err != nil {
		return wire.FileList{}, err
	}
	var l wire.FileList
	if err := f.doJSON(req, http.StatusOK, &l); err != nil {
		return wire.FileList{}, fmt.Errorf("listing %s in sandbox %q: %w", p, f.s.id, err)
	}
	return l, nil
}

// MakeDirOptions tunes MakeDir.
type MakeDirOptions struct {
	// Parents makes missing parents, and an existing directory a success.
	Parents bool
	// Mode holds the permission bits (0: 0755).
	Mode fs.FileMode
}

// MakeDir makes a directory.
func (f *Files) MakeDir(ctx context.Context, p string, opts MakeDirOptions) (wire.FileInfo, error) {
	body := wire.MakeDirRequest{Path: p, Parents: opts.Parents, User: f.user, Mode: uint32(opts.Mode.Perm())}
	if opts.Mode&fs.ModeSticky != 0 {
		body.Mode |= 0o1000
	}
	var fi wire.FileInfo
	if err := f.postJSON(ctx, "/mkdir", body, http.StatusOK, &fi); err != nil {
		return wire.FileInfo{}, fmt.Errorf("making directory %s in sandbox %q: %w", p, f.s.id, err)
	}
	return fi, nil
}

// RemoveOptions tunes Remove.
type RemoveOptions struct {
	// Recursive removes a directory with its contents.
	Recursive bool
}

// Remove removes a file, symlink or (empty, unless Recursive) directory.
func (f *Files) Remove(ctx context.Context, p string, opts RemoveOptions) error {
	body := wire.RemoveRequest{Path: p, Recursive: opts.Recursive, User: f.user}
	if err := f.postJSON(ctx, "/remove", body, http.StatusNoContent, nil); err != nil {
		return fmt.Errorf("removing %s in sandbox %q: %w", p, f.s.id, err)
	}
	return nil
}

// Rename moves from to to, as rename(2) (a file at to is replaced).
func (f *Files) Rename(ctx context.Context, from, to string) (wire.FileInfo, error) {
	var fi wire.FileInfo
	if err := f.postJSON(ctx, "/rename", wire.RenameRequest{From: from, To: to, User: f.user}, http.StatusOK, &fi); err != nil {
		return wire.FileInfo{}, fmt.Errorf("renaming %s to %s in sandbox %q: %w", from, to, f.s.id, err)
	}
	return fi, nil
}

func (f *Files) postJSON(ctx context.Context, route string, in any, want int, out any) error {
	b, err := json.Marshal(in)
	if err != nil {
		return fmt.Errorf("encoding request: %w", err)
	}
	req, err := f.request(ctx, http.MethodPost, route, nil, bytes.NewReader(b))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	return f.doJSON(req, want, out)
}

// UploadTar extracts the tar archive r yields into the directory dir of the
// sandbox (made with its parents), streamed. The sandbox refuses entries
// that would leave dir (see docs/API.md).
func (f *Files) UploadTar(ctx context.Context, dir string, r io.Reader) (wire.UploadResult, error) {
	req, err := f.request(ctx, http.MethodPut, "/tar", f.query(dir), r)
	if err != nil {
		return wire.UploadResult{}, err
	}
	req.Header.Set("Content-Type", "application/x-tar")
	var res wire.UploadResult
	if err := f.doJSON(req, http.StatusOK, &res); err != nil {
		return wire.UploadResult{}, fmt.Errorf("uploading an archive to %s in sandbox %q: %w", dir, f.s.id, err)
	}
	return res, nil
}

// DownloadTar opens a tar archive of a directory of the sandbox (names
// relative to it) or of a file (its base name). Close it when done.
func (f *Files) DownloadTar(ctx context.Context, p string) (io.ReadCloser, error) {
	req, err := f.request(ctx, http.MethodGet, "/tar", f.query(p), nil)
	if err != nil {
		return nil, err
	}
	resp, err := f.s.c.send(req, http.StatusOK)
	if err != nil {
		return nil, fmt.Errorf("downloading %s from sandbox %q: %w", p, f.s.id, err)
	}
	return resp.Body, nil
}

// UploadDir copies the contents of the local directory localDir into the
// directory remoteDir of the sandbox, as a tar stream made while it is
// sent. Regular files, directories and symlinks are copied (symlinks as
// links); other files are left out.
func (f *Files) UploadDir(ctx context.Context, localDir, remoteDir string) (wire.UploadResult, error) {
	fi, err := os.Stat(localDir)
	if err != nil {
		return wire.UploadResult{}, err
	}
	if !fi.IsDir() {
		return wire.UploadResult{}, fmt.Errorf("uploading %s: not a directory", localDir)
	}
	pr, pw := io.Pipe()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		pw.CloseWithError(WriteTar(pw, localDir))
	}()
	res, err := f.UploadTar(ctx, remoteDir, pr)
	// The request is over: stop the writer if it is still at work.
	pr.CloseWithError(errors.New("upload ended"))
	wg.Wait()
	return res, err
}

// WriteTar writes a tar archive of dir's contents (names relative to it) to
// w: regular files, directories and symlinks; files with several links
// become hard links to the first.
func WriteTar(w io.Writer, dir string) error {
	tw := tar.NewWriter(w)
	links := map[[2]uint64]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == dir {
			return nil
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		var target string
		switch m := fi.Mode(); {
		case m.IsRegular(), m.IsDir():
		case m&fs.ModeSymlink != 0:
			if target, err = os.Readlink(p); err != nil {
				return err
			}
		default:
			return nil
		}
		hdr, err := tar.FileInfoHeader(fi, target)
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		if fi.IsDir() {
			hdr.Name += "/"
		}
		if key, n, ok := inode(fi); ok && n > 1 && fi.Mode().IsRegular() {
			if first, seen := links[key]; seen {
				hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
			} else {
				links[key] = hdr.Name
			}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if hdr.Typeflag != tar.TypeReg {
			return nil
		}
		file, err := os.Open(p)
		if err != nil {
			return err
		}
		defer file.Close()
		if _, err := io.CopyN(tw, file, hdr.Size); err != nil {
			return fmt.Errorf("archiving %s: %w", p, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

// DownloadDir copies a directory of the sandbox (its contents) or a file
// (under its base name) into the local directory localDir, made when
// missing. The archive comes from the sandbox and is not trusted: names are
// kept inside localDir (a name with "..", or whose parents include a
// symlink, is refused; os.Root resolves every name), an existing file or
// symlink at a name is replaced rather than written through, hard links
// must point to a regular file inside localDir, setuid and setgid bits are
// dropped and devices, FIFOs and sockets are skipped.
func (f *Files) DownloadDir(ctx context.Context, remotePath, localDir string) error {
	rc, err := f.DownloadTar(ctx, remotePath)
	if err != nil {
		return err
	}
	defer rc.Close()
	if err := ExtractTar(rc, localDir); err != nil {
		return fmt.Errorf("downloading %s from sandbox %q: %w", remotePath, f.s.id, err)
	}
	return nil
}

// ExtractTar extracts the tar archive r into dir (made when missing), with
// the rules DownloadDir describes.
func ExtractTar(r io.Reader, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return err
	}
	defer root.Close()
	tr := tar.NewReader(bufio.NewReaderSize(r, 128<<10))
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading the archive: %w", err)
		}
		if err := extractEntry(root, hdr, tr); err != nil {
			return err
		}
	}
}

// safeName turns an archive name into a clean name relative to the target:
// a leading "/" goes, a ".." element is refused; "" is the target itself.
func safeName(name string) (string, error) {
	for _, el := range strings.Split(name, "/") {
		if el == ".." {
			return "", fmt.Errorf("archive entry %q leaves the target", name)
		}
	}
	c := path.Clean("/" + name)
	if c == "/" {
		return "", nil
	}
	return c[1:], nil
}

// realParents makes the parents of name, refusing any that is a symlink.
func realParents(root *os.Root, name string) error {
	dir := path.Dir(name)
	if dir == "." {
		return nil
	}
	sofar := ""
	for _, c := range strings.Split(dir, "/") {
		sofar = path.Join(sofar, c)
		fi, err := root.Lstat(sofar)
		if errors.Is(err, fs.ErrNotExist) {
			if err := root.Mkdir(sofar, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
				return err
			}
			fi, err = root.Lstat(sofar)
		}
		if err != nil {
			return err
		}
		if !fi.IsDir() {
			return fmt.Errorf("archive entry %q goes through %s, which is not a directory", name, sofar)
		}
	}
	return nil
}

// clearName removes what is at name, unless it is a directory.
func clearName(root *os.Root, name string) error {
	fi, err := root.Lstat(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.IsDir() {
		return fmt.Errorf("archive entry %q: a directory is in the way", name)
	}
	return root.Remove(name)
}

func extractEntry(root *os.Root, hdr *tar.Header, r io.Reader) error {
	name, err := safeName(hdr.Name)
	if err != nil {
		return err
	}
	switch hdr.Typeflag {
	case tar.TypeDir, tar.TypeReg, tar.TypeSymlink, tar.TypeLink:
	default:
		return nil // devices, FIFOs, global headers
	}
	if name == "" {
		return nil
	}
	if err := realParents(root, name); err != nil {
		return err
	}
	perm := fs.FileMode(hdr.Mode) & 0o777
	switch hdr.Typeflag {
	case tar.TypeDir:
		if err := root.Mkdir(name, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
		fi, err := root.Lstat(name)
		if err != nil {
			return err
		}
		if !fi.IsDir() {
			return fmt.Errorf("archive entry %q: %s is not a directory", hdr.Name, name)
		}
		return root.Chmod(name, perm|0o700)
	case tar.TypeReg:
		if err := clearName(root, name); err != nil {
			return err
		}
		out, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return err
		}
		_, err = io.Copy(out, r)
		if err == nil {
			err = out.Chmod(perm)
		}
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
		return root.Chtimes(name, hdr.ModTime, hdr.ModTime)
	case tar.TypeSymlink:
		if err := clearName(root, name); err != nil {
			return err
		}
		return root.Symlink(hdr.Linkname, name)
	default: // tar.TypeLink
		target, err := safeName(hdr.Linkname)
		if err != nil {
			return err
		}
		fi, err := root.Lstat(target)
		if target == "" || err != nil || !fi.Mode().IsRegular() {
			return fmt.Errorf("archive entry %q is a hard link to %q, not to a regular file of the archive", hdr.Name, hdr.Linkname)
		}
		if err := clearName(root, name); err != nil {
			return err
		}
		return root.Link(target, name)
	}
}

// WatchOptions tunes Watch.
type WatchOptions struct {
	// Recursive watches subdirectories too, also new ones.
	Recursive bool
}

// Watcher is a watch on a directory of a sandbox. Read its events from
// Events until the channel closes (Close, the context ending, the
// directory going away, or an error: see Err).
type Watcher struct {
	events chan wire.FileEvent
	body   io.ReadCloser
	cancel context.CancelFunc
	done   chan struct{}
	stop   chan struct{}
	once   sync.Once
	err    error
}

// Watch starts a watch of the directory p. It returns once the watch is in
// place: every change made after it is reported.
func (f *Files) Watch(ctx context.Context, p string, opts WatchOptions) (*Watcher, error) {
	kv := []string{}
	if opts.Recursive {
		kv = append(kv, "recursive", "true")
	}
	wctx, cancel := context.WithCancel(ctx)
	req, err := f.request(wctx, http.MethodGet, "/watch", f.query(p, kv...), nil)
	if err != nil {
		cancel()
		return nil, err
	}
	req.Header.Set("Accept", "application/x-ndjson")
	resp, err := f.s.c.send(req, http.StatusOK)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("watching %s in sandbox %q: %w", p, f.s.id, err)
	}
	w := &Watcher{events: make(chan wire.FileEvent, 64), body: resp.Body, cancel: cancel, done: make(chan struct{}), stop: make(chan struct{})}
	go w.read()
	return w, nil
}

// read decodes the stream into events; it owns the body and the channel.
func (w *Watcher) read() {
	defer close(w.done)
	defer close(w.events)
	defer w.body.Close()
	dec := json.NewDecoder(w.body)
	for {
		var ev wire.FileEvent
		if err := dec.Decode(&ev); err != nil {
			if !errors.Is(err, io.EOF) {
				select {
				case <-w.stop:
				default:
					w.err = fmt.Errorf("reading watch events: %w", err)
				}
			}
			return
		}
		if ev.Type == wire.FileEventError {
			e := &APIError{Code: wire.CodeInternal, Message: "watch reported an error without details"}
			if ev.Error != nil {
				e.Code, e.Message, e.RequestID = ev.Error.Code, ev.Error.Message, ev.Error.RequestID
			}
			w.err = e
			return
		}
		select {
		case w.events <- ev:
		case <-w.stop:
			return
		}
	}
}

// Events returns the events as they come; the channel closes when the
// watch ends.
func (w *Watcher) Events() <-chan wire.FileEvent { return w.events }

// Err returns why the watch ended, once Events has closed: nil when it
// was closed or its directory went away.
func (w *Watcher) Err() error {
	select {
	case <-w.done:
		return w.err
	default:
		return nil
	}
}

// Close ends the watch and waits until it has.
func (w *Watcher) Close() error {
	w.once.Do(func() {
		close(w.stop)
		w.cancel()
		w.body.Close()
	})
	<-w.done
	return nil
}
