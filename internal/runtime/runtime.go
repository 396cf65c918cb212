// Package runtime defines what the sandbox manager needs from an isolation
// layer. runtime/gvisor implements it with runsc; a Firecracker runtime can
// sit beside it later. Optional capabilities (checkpoint, restore) are
// separate interfaces that an implementation may also satisfy.
package runtime

import (
	"context"
	"errors"
	"io"
)

// ErrNoSpace reports that the host's disk could not take what an operation
// had to write (a checkpoint image).
var ErrNoSpace = errors.New("no space left on the host's disk")

// Limits are the hard resource limits of one sandbox. Zero means the
// runtime's default.
type Limits struct {
	// CPU is the number of CPUs the sandbox may use (a CFS quota).
	CPU float64
	// MemoryBytes caps the sandbox's memory; above it allocations fail or
	// the sandbox is OOM-killed. The host is never pushed to swap.
	MemoryBytes int64
	// Pids caps the number of processes and threads inside.
	Pids int64
	// DiskBytes caps the writable root layer; writes beyond it get ENOSPC.
	DiskBytes int64
	// TmpBytes and ShmBytes cap the /tmp and /dev/shm tmpfs.
	TmpBytes, ShmBytes int64
	// NoFile caps open files per process.
	NoFile uint64
}

// Spec is everything a runtime needs to start one sandbox.
type Spec struct {
	// ID is the sandbox id; fixed length, [a-z0-9-].
	ID string
	// Hostname is the sandbox's own hostname.
	Hostname string
	// RootfsDir is the template's root filesystem on the host. It is shared
	// read-only by every sandbox of the template; each sandbox writes to a
	// layer of its own.
	RootfsDir string
	// Init is the argv of the sandbox's init process (the agent), as a path
	// inside the root filesystem.
	Init []string
	// Env is the whole environment of the init process (KEY=VALUE). Nothing
	// of the host's environment is added.
	Env    []string
	Limits Limits
	// Binds are host directories shown read-only inside the sandbox (the
	// agent's own directory). A restore must have its image's binds.
	Binds []Bind
	// NetworkNS is the path of a network namespace the sandbox's network
	// stack takes over (its interfaces, addresses and routes); "" means no
	// network but loopback. A restore of an image made with a network must
	// have one too.
	NetworkNS string
}

// Bind shows the host directory Source read-only at Destination inside the
// sandbox; not even root inside can change it.
type Bind struct {
	Source, Destination string
}

// Runtime starts and stops sandboxes. Implementations are safe for
// concurrent use on different ids; the caller serialises calls for one id.
type Runtime interface {
	// Name is a short name of the runtime ("gvisor").
	Name() string
	// Start creates and starts a sandbox whose init process is Spec.Init.
	// On error nothing of the sandbox is left behind.
	Start(ctx context.Context, spec Spec) error
	// Connect returns a connection to the init process's stdio: writes go
	// to its stdin, reads come from its stdout. It can be called again
	// (for example after a daemon restart). Reads see EOF when the sandbox
	// dies.
	Connect(ctx context.Context, id string) (io.ReadWriteCloser, error)
	// Delete stops every process of the sandbox and removes everything the
	// runtime made for it. Deleting an unknown id is not an error.
	Delete(ctx context.Context, id string) error
	// List returns the ids of every sandbox the runtime knows of, running
	// or not, including ones left from an earlier daemon.
	List(ctx context.Context) ([]string, error)
}

// Checkpointer is the optional capability to save a running sandbox's
// memory and filesystem, and to start sandboxes from such an image.
type Checkpointer interface {
	// Checkpoint saves the sandbox to the image directory dir, which must
	// exist and be empty. With leaveRunning the sandbox goes on running;
	// without, it stops once saved and must still be Deleted.
	Checkpoint(ctx context.Context, id, dir string, leaveRunning bool) error
	// Restore starts a new sandbox described by spec from the image in dir:
	// its processes continue where the image left them, with spec's id,
	// hostname and limits. The image can be removed once Restore returns.
	Restore(ctx context.Context, spec Spec, dir string) error
}

// Inspector is the optional capability to tell what a sandbox uses and why
// it stopped.
type Inspector interface {
	// MemoryUsage returns the host memory the sandbox uses now, in bytes.
	MemoryUsage(ctx context.Context, id string) (int64, error)
	// ExitCause describes why a sandbox that stopped on its own stopped,
	// when the runtime can tell (CauseOutOfMemory), or "" when it cannot.
	// It must be called before Delete.
	ExitCause(ctx context.Context, id string) string
}

// CauseOutOfMemory is the ExitCause of a sandbox killed for going over its
// memory limit.
const CauseOutOfMemory = "out of memory"

// MemoryWatcher is the optional capability to watch a sandbox's memory.
// Runtimes whose sandboxes have no OOM killer of their own (gVisor) use it
// to let the manager free memory inside before the host kills the whole
// sandbox: the hard limit then sits above the promised one.
type MemoryWatcher interface {
	// WatchMemory calls over whenever the memory the sandbox's processes
	// use (not caches the host can reclaim) is at or above limit, at most
	// every few milliseconds, until ctx ends or the sandbox is gone. It
	// blocks until then.
	WatchMemory(ctx context.Context, id string, limit int64, over func()) error
}

// Job is one command run to completion in a sandbox of its own whose root
// filesystem is written in place: what it changes stays in RootfsDir (a
// template build step). It has no network but loopback.
type Job struct {
	// ID is the job's sandbox id; the same rules as Spec.ID.
	ID string
	// RootfsDir is written in place, not through an overlay: the caller
	// owns it (a build step's own directory) and keeps what the command
	// leaves there.
	RootfsDir string
	// Args is the command's argv; Args[0] is resolved in the sandbox's PATH
	// (from Env) when it has no slash.
	Args []string
	// Env is the command's whole environment (KEY=VALUE).
	Env []string
	// Cwd is the working directory inside the sandbox; it must exist.
	Cwd string
	// UID, GID and Groups are who the command runs as inside.
	UID, GID uint32
	Groups   []uint32
	Limits   Limits
	// Stdout and Stderr receive the command's output as it comes; nil
	// discards it.
	Stdout, Stderr io.Writer
}

// BuildJobPrefix starts the ids of template builds' jobs (package build),
// so that whoever reconciles a runtime's sandboxes leaves them alone.
const BuildJobPrefix = "build-"

// JobRunner is the optional capability to run Jobs.
type JobRunner interface {
	// RunJob runs the job and returns its exit status (128+n when killed
	// by signal n). A non-zero status is not an error; an error means the
	// job could not be run or was cancelled (ctx), and then its sandbox is
	// gone when RunJob returns.
	RunJob(ctx context.Context, job Job) (exitCode int, err error)
}

// Usage is what a sandbox uses at one moment, as the host sees it.
type Usage struct {
	// CPUSeconds is the CPU time its processes have used since it
	// started (host CPU, the sandbox's kernel included).
	CPUSeconds float64
	// MemoryBytes is the memory its processes use (not caches the host
	// can reclaim).
	MemoryBytes int64
	// DiskBytes is the host disk its writable layer takes.
	DiskBytes int64
}

// UsageReader is the optional capability to read what a sandbox uses.
type UsageReader interface {
	// Usage returns the sandbox's usage now; an error when it is gone.
	Usage(ctx context.Context, id string) (Usage, error)
}
