package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// FileEvent is one event of a watch (wire.FileEvent's shape).
type FileEvent struct {
	Type    string `json:"type"`
	Path    string `json:"path,omitempty"`
	OldPath string `json:"old_path,omitempty"`
	IsDir   bool   `json:"is_dir,omitempty"`
}

// Watch event types.
const (
	FileEventCreated  = "created"
	FileEventWritten  = "written"
	FileEventRemoved  = "removed"
	FileEventRenamed  = "renamed"
	FileEventOverflow = "overflow"
)

// watchMask is what a watch asks inotify for. gVisor implements inotify
// for its own filesystems (the overlay root, tmpfs), which is checked by
// the tests; no polling is needed.
const watchMask = unix.IN_CREATE | unix.IN_MODIFY | unix.IN_CLOSE_WRITE | unix.IN_DELETE |
	unix.IN_MOVED_FROM | unix.IN_MOVED_TO | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF

// maxEventBatch bounds the JSON of one batch of events (a frame).
const maxEventBatch = MaxFrame / 4

// watch streams the changes under root until the daemon closes the stream,
// ctx ends, or root itself is removed or moved away (a last "removed"
// event, then FrameFileEnd).
//
// Events: created (IN_CREATE, or an entry moved in from outside), written
// (IN_MODIFY and IN_CLOSE_WRITE, consecutive ones for the same file in one
// read merged: a client sees at least one after a write), removed
// (IN_DELETE, or moved out), renamed (a move within the watched tree, with
// the old path), overflow (the kernel's queue overflowed). Recursive
// watches add every directory below root, and those created later; the
// entries found in a new directory are reported as created, since they may
// have been made before its watch. Watches are added as the user, so that
// what the user may not read is not watched.
func (s *Server) watch(ctx context.Context, o fileOps, root string, a FileArgs) error {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return opErr(ErrKindOther, "starting inotify: %v", err)
	}
	// A non-blocking descriptor: reads wait in the Go runtime's poller,
	// and Close unblocks them.
	f := os.NewFile(uintptr(fd), "inotify")
	defer f.Close()
	w := &watcher{fd: fd, o: o, root: root, recursive: a.Recursive, max: a.MaxWatches, paths: map[int]string{}}
	if w.max <= 0 {
		w.max = DefaultMaxWatches
	}
	err = runAs(o.id, func() error {
		fi, err := os.Stat(root)
		if err != nil {
			return fileError(err, root, false)
		}
		if !fi.IsDir() {
			return opErr(ErrKindExists, "%s is not a directory; watch the directory it is in", root)
		}
		w.rootWD, err = w.add(root, true)
		if err != nil {
			return err
		}
		if a.Recursive {
			return w.addTree(root, false)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := WriteJSON(o.st, FrameReply, struct{}{}); err != nil {
		return errCallerGone
	}

	// The daemon sends nothing more: its closing the stream (or the
	// session ending) is the end of the watch.
	gone := make(chan struct{})
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		var b [512]byte
		for {
			if _, err := o.st.Read(b[:]); err != nil {
				close(gone)
				f.Close()
				return
			}
		}
	}()
	defer func() {
		_ = o.st.SetReadDeadline(time.Now())
		<-readerDone
	}()
	stop := context.AfterFunc(ctx, func() { f.Close() })
	defer stop()

	buf := make([]byte, 64<<10)
	for {
		n, err := f.Read(buf)
		if err != nil {
			select {
			case <-gone:
				return errCallerGone
			default:
			}
			if ctx.Err() != nil {
				return errCallerGone
			}
			return opErr(ErrKindOther, "reading inotify events: %v", err)
		}
		events, err := w.parse(buf[:n])
		if err != nil {
			return err
		}
		if err := sendEvents(o, events); err != nil {
			return err
		}
		if w.rootGone {
			if err := WriteFrame(o.st, FrameFileEnd, nil); err != nil {
				return errCallerGone
			}
			return nil
		}
	}
}

// sendEvents sends events in batches of bounded size.
func sendEvents(o fileOps, events []FileEvent) error {
	for len(events) > 0 {
		n, size := 0, 0
		for n < len(events) && (n == 0 || size < maxEventBatch) {
			size += len(events[n].Path) + len(events[n].OldPath) + 64
			n++
		}
		if err := WriteJSON(o.st, FrameFileData, events[:n]); err != nil {
			return errCallerGone
		}
		events = events[n:]
	}
	return nil
}

// watcher is one watch's inotify state; only the watch's goroutine uses it.
type watcher struct {
	fd        int
	o         fileOps
	root      string
	rootWD    int
	rootGone  bool
	recursive bool
	max       int
	// paths maps watch descriptors to the directories they watch.
	paths map[int]string
	// pending is a move out of a directory whose move in has not been
	// seen yet.
	pending *pendingMove
	out     []FileEvent
}

type pendingMove struct {
	cookie uint32
	path   string
	isDir  bool
}

// add watches dir; the caller runs as the user. A directory that is gone
// or that the user may not read is not watched (and is no error), except
// root.
func (w *watcher) add(dir string, isRoot bool) (int, error) {
	if len(w.paths) >= w.max {
		return -1, opErr(ErrKindInvalid, "the watch would need more than %d directories; watch a smaller tree, or not recursively", w.max)
	}
	mask := uint32(watchMask | unix.IN_ONLYDIR)
	if !isRoot {
		mask |= unix.IN_DONT_FOLLOW
	}
	wd, err := unix.InotifyAddWatch(w.fd, dir, mask)
	if err != nil {
		if isRoot {
			return -1, fileError(err, dir, false)
		}
		if errors.Is(err, unix.ENOSPC) {
			return -1, opErr(ErrKindOther, "the sandbox cannot watch more directories")
		}
		return -1, nil
	}
	w.paths[wd] = dir
	return wd, nil
}

// addTree watches the directories below dir; with report, the entries
// found are reported as created.
func (w *watcher) addTree(dir string, report bool) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return nil
		}
		if report {
			w.emit(FileEvent{Type: FileEventCreated, Path: p, IsDir: d.IsDir()})
		}
		if d.IsDir() {
			if _, err := w.add(p, false); err != nil {
				return err
			}
		}
		return nil
	})
}

// emit queues an event, merging it into the last one when they are the
// same write.
func (w *watcher) emit(ev FileEvent) {
	if n := len(w.out); n > 0 && ev.Type == FileEventWritten && w.out[n-1] == ev {
		return
	}
	w.out = append(w.out, ev)
}

// flushPending reports a move out whose move in never came: the entry
// left the watched tree.
func (w *watcher) flushPending() {
	if w.pending == nil {
		return
	}
	p := w.pending
	w.pending = nil
	w.emit(FileEvent{Type: FileEventRemoved, Path: p.path, IsDir: p.isDir})
	if p.isDir {
		w.forget(p.path)
	}
}

// forget stops watching dir and what is below it.
func (w *watcher) forget(dir string) {
	for wd, p := range w.paths {
		if p == dir || strings.HasPrefix(p, dir+"/") {
			_, _ = unix.InotifyRmWatch(w.fd, uint32(wd))
			delete(w.paths, wd)
		}
	}
}

// moved updates the paths of the watches below a directory moved within
// the tree.
func (w *watcher) moved(from, to string) {
	for wd, p := range w.paths {
		if p == from {
			w.paths[wd] = to
		} else if rest, ok := strings.CutPrefix(p, from+"/"); ok {
			w.paths[wd] = to + "/" + rest
		}
	}
}

// parse turns one read's raw events into FileEvents.
func (w *watcher) parse(buf []byte) ([]FileEvent, error) {
	w.out = w.out[:0]
	for off := 0; off+unix.SizeofInotifyEvent <= len(buf); {
		wd := int(int32(binary.NativeEndian.Uint32(buf[off:])))
		mask := binary.NativeEndian.Uint32(buf[off+4:])
		cookie := binary.NativeEndian.Uint32(buf[off+8:])
		n := int(binary.NativeEndian.Uint32(buf[off+12:]))
		start := off + unix.SizeofInotifyEvent
		if start+n > len(buf) {
			break
		}
		name := strings.TrimRight(string(buf[start:start+n]), "\x00")
		off = start + n

		if mask&unix.IN_Q_OVERFLOW != 0 {
			w.flushPending()
			w.emit(FileEvent{Type: FileEventOverflow})
			continue
		}
		dir, ok := w.paths[wd]
		if !ok {
			continue
		}
		p := dir
		if name != "" {
			p = filepath.Join(dir, name)
		}
		isDir := mask&unix.IN_ISDIR != 0
		if mask&unix.IN_MOVED_TO == 0 {
			w.flushPending()
		}
		switch {
		case mask&unix.IN_IGNORED != 0:
			delete(w.paths, wd)
		case mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF) != 0:
			if wd == w.rootWD {
				w.emit(FileEvent{Type: FileEventRemoved, Path: w.root, IsDir: true})
				w.rootGone = true
				return w.out, nil
			}
		case mask&unix.IN_CREATE != 0:
			w.emit(FileEvent{Type: FileEventCreated, Path: p, IsDir: isDir})
			if isDir && w.recursive {
				if err := w.addNew(p); err != nil {
					return nil, err
				}
			}
		case mask&(unix.IN_MODIFY|unix.IN_CLOSE_WRITE) != 0:
			w.emit(FileEvent{Type: FileEventWritten, Path: p})
		case mask&unix.IN_DELETE != 0:
			w.emit(FileEvent{Type: FileEventRemoved, Path: p, IsDir: isDir})
		case mask&unix.IN_MOVED_FROM != 0:
			w.pending = &pendingMove{cookie: cookie, path: p, isDir: isDir}
		case mask&unix.IN_MOVED_TO != 0:
			if w.pending != nil && w.pending.cookie == cookie {
				old := w.pending.path
				w.pending = nil
				w.emit(FileEvent{Type: FileEventRenamed, Path: p, OldPath: old, IsDir: isDir})
				if isDir {
					w.moved(old, p)
				}
				continue
			}
			w.flushPending()
			w.emit(FileEvent{Type: FileEventCreated, Path: p, IsDir: isDir})
			if isDir && w.recursive {
				if err := w.addNew(p); err != nil {
					return nil, err
				}
			}
		}
	}
	// A move out whose move in is not in this read left the tree: the
	// kernel queues the two together.
	w.flushPending()
	return w.out, nil
}

// addNew watches a directory that appeared in the tree, and what is in it.
func (w *watcher) addNew(dir string) error {
	return runAs(w.o.id, func() error {
		if _, err := w.add(dir, false); err != nil {
			return err
		}
		return w.addTree(dir, true)
	})
}
