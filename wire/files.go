package wire

import "time"

// File types of FileInfo.Type.
const (
	FileTypeFile    = "file"
	FileTypeDir     = "dir"
	FileTypeSymlink = "symlink"
	// FileTypeOther is anything else: a device, a FIFO, a socket.
	FileTypeOther = "other"
)

// FileInfo describes one file, directory or link in a sandbox, as lstat
// sees it: a symlink is described itself, not what it points to.
type FileInfo struct {
	// Path is the absolute path in the sandbox; Name its last element.
	Path string `json:"path"`
	Name string `json:"name"`
	// Type is one of the FileType* values.
	Type string `json:"type"`
	Size int64  `json:"size"`
	// Mode holds the permission bits (0o755 is 493), with the setuid,
	// setgid and sticky bits.
	Mode    uint32    `json:"mode"`
	ModTime time.Time `json:"mod_time"`
	// Owner and Group are names from the sandbox's /etc/passwd and
	// /etc/group, or the numeric id when it has none.
	Owner string `json:"owner"`
	Group string `json:"group"`
	// SymlinkTarget is where a symlink points, as written in it.
	SymlinkTarget string `json:"symlink_target,omitempty"`
}

// FileList is the body of GET /v1/sandboxes/{id}/files/list.
type FileList struct {
	// Entries are the directory's entries down to the asked depth,
	// parents before their children; symlinked directories are not
	// entered.
	Entries []FileInfo `json:"entries"`
	// Truncated reports that the directory holds more than the server
	// lists at once (10,000 entries).
	Truncated bool `json:"truncated"`
}

// MakeDirRequest is the body of POST /v1/sandboxes/{id}/files/mkdir.
type MakeDirRequest struct {
	Path string `json:"path"`
	// Parents creates missing parents too, and makes an existing
	// directory at Path a success (mkdir -p).
	Parents bool `json:"parents,omitempty"`
	// Mode holds the permission bits; 0o755 when zero.
	Mode uint32 `json:"mode,omitempty"`
	// User is who makes the directory (and owns it): "user" by default,
	// or "root".
	User string `json:"user,omitempty"`
}

// RemoveRequest is the body of POST /v1/sandboxes/{id}/files/remove.
type RemoveRequest struct {
	Path string `json:"path"`
	// Recursive removes a directory with everything in it (rm -r);
	// without it a directory must be empty.
	Recursive bool   `json:"recursive,omitempty"`
	User      string `json:"user,omitempty"`
}

// RenameRequest is the body of POST /v1/sandboxes/{id}/files/rename: it
// moves From to To as rename(2) does (a file at To is replaced).
type RenameRequest struct {
	From string `json:"from"`
	To   string `json:"to"`
	User string `json:"user,omitempty"`
}

// UploadResult is the answer to a directory upload (PUT .../files/tar).
type UploadResult struct {
	// Files, Dirs, Symlinks and Links (hard links) count the entries
	// made; Bytes the file content written.
	Files    int   `json:"files"`
	Dirs     int   `json:"dirs"`
	Symlinks int   `json:"symlinks"`
	Links    int   `json:"links"`
	Bytes    int64 `json:"bytes"`
	// Skipped lists the entries left out, and why (device nodes, FIFOs,
	// sockets).
	Skipped []SkippedEntry `json:"skipped"`
}

// SkippedEntry is an archive entry an upload left out.
type SkippedEntry struct {
	Name   string `json:"name"`
	Reason string `json:"reason"`
}

// FileEvent is one event of a watch (GET .../files/watch), an NDJSON line
// or SSE event.
type FileEvent struct {
	// Type is one of the FileEvent* values.
	Type string `json:"type"`
	// Path is the absolute path of the entry the event is about (for
	// renamed, its new path).
	Path string `json:"path,omitempty"`
	// OldPath is where a renamed entry was.
	OldPath string `json:"old_path,omitempty"`
	// IsDir reports whether the entry is a directory.
	IsDir bool `json:"is_dir,omitempty"`
	// Error is set for an error event, the last of a stream.
	Error *Error `json:"error,omitempty"`
}

// Watch event types.
const (
	FileEventCreated = "created"
	FileEventWritten = "written"
	FileEventRemoved = "removed"
	FileEventRenamed = "renamed"
	// FileEventOverflow: the sandbox's kernel dropped events (too many at
	// once); what changed meanwhile is unknown.
	FileEventOverflow = "overflow"
	// FileEventError ends a stream that failed after it started.
	FileEventError = "error"
)
