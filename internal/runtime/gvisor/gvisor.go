// Package gvisor implements runtime.Runtime with gVisor's runsc on the
// systrap platform.
//
// Every sandbox is an OCI bundle under the runtime's state directory: the
// template's root filesystem shared read-only, a writable overlay of its own
// (an unlinked, size-capped file in the sandbox's directory), no host mounts,
// no host environment, its own hostname, and network "none". Its init
// process's stdin and stdout are two FIFOs in the sandbox's directory, which
// is how the daemon reaches the agent (see package agent).
package gvisor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pandastack/pandastack/internal/runtime"
	"golang.org/x/sys/unix"
)

// Config configures the runtime.
type Config struct {
	// Runsc is the path of the runsc binary.
	Runsc string
	// StateDir holds one directory per sandbox and runsc's own state.
	StateDir string
	// Platform is runsc's platform; "systrap" when empty.
	Platform string
	// CgroupParent is the cgroup path under which each sandbox gets its own
	// cgroup; "/pandastack" when empty.
	CgroupParent string
	Log          *slog.Logger
	// OnFailure, when set, is told of each runsc command that failed
	// (by subcommand: run, restore, checkpoint, delete, list), for the
	// daemon's metrics.
	OnFailure func(command string)
}

// Runtime drives runsc. It is safe for concurrent use on different ids.
type Runtime struct {
	cfg Config
}

var (
	_ runtime.Runtime      = (*Runtime)(nil)
	_ runtime.Checkpointer = (*Runtime)(nil)
	_ runtime.Inspector    = (*Runtime)(nil)
)

// New checks the configuration and returns a Runtime. It takes over the
// state directory: runsc commands that an earlier runtime on it left
// running (its daemon was killed) are waited for, or killed, first.
func New(cfg Config) (*Runtime, error) {
	if cfg.Platform == "" {
		cfg.Platform = "systrap"
	}
	if cfg.CgroupParent == "" {
		cfg.CgroupParent = "/pandastack"
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if _, err := os.Stat(cfg.Runsc); err != nil {
		return nil, fmt.Errorf("finding runsc: %w", err)
	}
	for _, d := range []string{cfg.StateDir, filepath.Join(cfg.StateDir, "runsc")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("creating runtime state directory %q: %w", d, err)
		}
	}
	r := &Runtime{cfg: cfg}
	// The state directory is this runtime's from now on: runsc commands
	// that an earlier one left running must not change it any more.
	r.stopStaleCommands()
	return r, nil
}

// failed reports a failed runsc command to OnFailure.
func (r *Runtime) failed(command string) {
	if r.cfg.OnFailure != nil {
		r.cfg.OnFailure(command)
	}
}

// Name implements runtime.Runtime.
func (r *Runtime) Name() string { return "gvisor" }

func (r *Runtime) dir(id string) string { return filepath.Join(r.cfg.StateDir, "sandboxes", id) }

// globalFlags are the flags every runsc call for the sandbox gets; they must
// stay identical across its calls (checkpoint and restore compare them).
func (r *Runtime) globalFlags(id string, disk int64) []string {
	network := "none"
	if r.networked(id) {
		// gVisor's netstack takes over the namespace in the spec.
		network = "sandbox"
	}
	overlay := "root:dir=" + r.dir(id)
	if disk > 0 {
		overlay += fmt.Sprintf(",size=%d", disk)
	}
	return []string{
		"--root=" + filepath.Join(r.cfg.StateDir, "runsc"),
		"--platform=" + r.cfg.Platform,
		"--network=" + network,
		"--overlay2=" + overlay,
	}
}

func (r *Runtime) runsc(ctx context.Context, id string, disk int64, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, r.cfg.Runsc, append(r.globalFlags(id, disk), args...)...)
	// runsc gets a clean environment: nothing of the daemon's leaks in.
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd
}

// validID reports whether id is safe as a path element and runsc id.
func validID(id string) bool {
	if id == "" || len(id) > 64 {
		return false
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// Start implements runtime.Runtime.
func (r *Runtime) Start(ctx context.Context, spec runtime.Spec) error {
	return r.launch(ctx, spec, "run", "--detach")
}

// Restore implements runtime.Checkpointer.
func (r *Runtime) Restore(ctx context.Context, spec runtime.Spec, image string) error {
	return r.launch(ctx, spec, "restore", "--detach", "--image-path="+image)
}

// Checkpoint implements runtime.Checkpointer.
func (r *Runtime) Checkpoint(ctx context.Context, id, image string, leaveRunning bool) error {
	if !validID(id) {
		return fmt.Errorf("invalid sandbox id %q", id)
	}
	args := []string{"checkpoint", "--image-path=" + image}
	if leaveRunning {
		args = append(args, "--leave-running")
	}
	// ctx bounds the checkpoint (the caller sizes it to the sandbox's
	// memory); cancelling it kills runsc. With leaveRunning the sandbox
	// then goes on running.
	cmd := r.runsc(ctx, id, 0, append(args, id)...)
	cmd.WaitDelay = time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &limitedBuffer{buf: &stderr, max: 4096}
	if err := cmd.Run(); err != nil {
		r.failed("checkpoint")
		msg := strings.TrimSpace(stderr.String())
		if strings.Contains(msg, "no space left on device") {
			return fmt.Errorf("checkpointing sandbox %s: %w: %s", id, runtime.ErrNoSpace, msg)
		}
		if ctx.Err() != nil {
			return fmt.Errorf("checkpointing sandbox %s: %w", id, ctx.Err())
		}
		return fmt.Errorf("checkpointing sandbox %s with runsc: %w: %s", id, err, msg)
	}
	return nil
}

// networkMark marks, in a sandbox's directory, a sandbox with a network:
// every runsc call for it needs the same --network flag.
const networkMark = "networked"

func (r *Runtime) networked(id string) bool {
	_, err := os.Stat(filepath.Join(r.dir(id), networkMark))
	return err == nil
}

// launch starts a sandbox with runsc's run or restore subcommand.
func (r *Runtime) launch(ctx context.Context, spec runtime.Spec, subcmd ...string) (err error) {
	if !validID(spec.ID) {
		return fmt.Errorf("invalid sandbox id %q", spec.ID)
	}
	dir := r.dir(spec.ID)
	if err := os.MkdirAll(filepath.Join(dir, "bundle"), 0o700); err != nil {
		return fmt.Errorf("creating sandbox directory: %w", err)
	}
	defer func() {
		if err != nil {
			// Undo the partial create; a fresh context so a cancelled
			// request still cleans up.
			_ = r.Delete(context.WithoutCancel(ctx), spec.ID)
		}
	}()
	if spec.NetworkNS != "" {
		if err := os.WriteFile(filepath.Join(dir, networkMark), nil, 0o600); err != nil {
			return fmt.Errorf("marking the sandbox networked: %w", err)
		}
	}
	oci, err := ociSpec(spec, r.cfg.CgroupParent)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "bundle", "config.json"), oci, 0o600); err != nil {
		return fmt.Errorf("writing OCI spec: %w", err)
	}
	in, out, logf, err := r.makeStdio(dir)
	if err != nil {
		return err
	}
	defer in.Close()
	defer out.Close()
	defer logf.Close()

	args := append(append([]string{}, subcmd...), "--bundle="+filepath.Join(dir, "bundle"), spec.ID)
	// runsc is never killed half-way through a create or restore: it
	// would leave a sandbox process behind with no state to delete it by.
	// A cancelled ctx is honoured once runsc returns (the caller deletes);
	// only a runsc that hangs for a minute is killed.
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	cmd := r.runsc(rctx, spec.ID, spec.Limits.DiskBytes, args...)
	// The sandbox inherits these descriptors and outlives runsc: they must
	// be files, not pipes that exec.Cmd would wait on.
	cmd.Stdin, cmd.Stdout, cmd.Stderr = in, out, logf
	if err := cmd.Run(); err != nil {
		r.failed(subcmd[0])
		return fmt.Errorf("starting sandbox with runsc %s: %w: %s", subcmd[0], err, tail(filepath.Join(dir, "agent.log"), 2048))
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("starting sandbox: %w", err)
	}
	return nil
}

// tail returns the last n bytes of a file, for error messages.
func tail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > n {
		_, _ = f.Seek(st.Size()-n, io.SeekStart)
	}
	b, _ := io.ReadAll(io.LimitReader(f, n))
	return strings.TrimSpace(string(b))
}

// makeStdio creates the FIFOs of the init process's stdio and opens them
// read-write for runsc: the sandbox then always holds both ends, so its reads
// block (not EOF) and its writes wait (not EPIPE) while no daemon is
// connected, for instance across a daemon restart.
func (r *Runtime) makeStdio(dir string) (in, out, logf *os.File, err error) {
	for _, name := range []string{"agent.in", "agent.out"} {
		p := filepath.Join(dir, name)
		_ = os.Remove(p)
		if err := unix.Mkfifo(p, 0o600); err != nil {
			return nil, nil, nil, fmt.Errorf("creating fifo %q: %w", p, err)
		}
	}
	in, err = os.OpenFile(filepath.Join(dir, "agent.in"), os.O_RDWR, 0)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("opening agent stdin fifo: %w", err)
	}
	out, err = os.OpenFile(filepath.Join(dir, "agent.out"), os.O_RDWR, 0)
	if err != nil {
		in.Close()
		return nil, nil, nil, fmt.Errorf("opening agent stdout fifo: %w", err)
	}
	// gVisor writes a regular-file stdout from offset 0; O_APPEND keeps
	// every line.
	logf, err = os.OpenFile(filepath.Join(dir, "agent.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		in.Close()
		out.Close()
		return nil, nil, nil, fmt.Errorf("opening agent log: %w", err)
	}
	return in, out, logf, nil
}

// fifoConn is the host's end of the agent's stdio.
type fifoConn struct {
	w *os.File // the agent's stdin
	r *os.File // the agent's stdout
}

func (c *fifoConn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *fifoConn) Write(p []byte) (int, error) { return c.w.Write(p) }
func (c *fifoConn) Close() error {
	return errors.Join(c.w.Close(), c.r.Close())
}

// SetReadDeadline and SetWriteDeadline bound waits on an agent that does
// not answer (stopped, or busy forever): both FIFO ends are non-blocking
// files in Go's poller, which honours deadlines.
func (c *fifoConn) SetReadDeadline(t time.Time) error  { return c.r.SetReadDeadline(t) }
func (c *fifoConn) SetWriteDeadline(t time.Time) error { return c.w.SetWriteDeadline(t) }

// Connect implements runtime.Runtime.
func (r *Runtime) Connect(ctx context.Context, id string) (io.ReadWriteCloser, error) {
	if !validID(id) {
		return nil, fmt.Errorf("invalid sandbox id %q", id)
	}
	dir := r.dir(id)
	// Non-blocking opens: opening the write end fails with ENXIO when no
	// sandbox holds the read end, instead of hanging. The files stay
	// non-blocking, served by Go's poller, so Close interrupts a Read.
	w, err := os.OpenFile(filepath.Join(dir, "agent.in"), os.O_WRONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("opening agent stdin of %s: %w", id, err)
	}
	rd, err := os.OpenFile(filepath.Join(dir, "agent.out"), os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("opening agent stdout of %s: %w", id, err)
	}
	return &fifoConn{w: w, r: rd}, nil
}

// Delete implements runtime.Runtime.
func (r *Runtime) Delete(ctx context.Context, id string) error {
	if !validID(id) {
		return fmt.Errorf("invalid sandbox id %q", id)
	}
	// A delete must finish even for a sandbox whose processes are stopped
	// or stuck: runsc is bounded, and what it leaves is killed by
	// killStragglers below.
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), runscTimeout)
	defer cancel()
	cmd := r.runsc(dctx, id, 0, "delete", "--force", id)
	var stderr bytes.Buffer
	cmd.Stderr = &limitedBuffer{buf: &stderr, max: 4096}
	if err := cmd.Run(); err != nil {
		msg := stderr.String()
		if !strings.Contains(msg, "does not exist") && !strings.Contains(msg, "not found") {
			r.failed("delete")
			return fmt.Errorf("deleting sandbox %s with runsc: %w: %s", id, err, strings.TrimSpace(msg))
		}
	}
	r.killStragglers(id)
	if err := removeCgroups(ctx, r.cfg.CgroupParent, id); err != nil {
		return err
	}
	if err := os.RemoveAll(r.dir(id)); err != nil {
		return fmt.Errorf("removing sandbox directory: %w", err)
	}
	return nil
}

// runscTimeout bounds runsc calls that do not depend on the sandbox's size
// (delete, list): they take milliseconds, and a minute means runsc hangs.
const runscTimeout = time.Minute

// cgroupRemoveWait bounds how long Delete waits for a sandbox's cgroups
// to empty.
const cgroupRemoveWait = 30 * time.Second

// cgroupRoot is where cgroup hierarchies are mounted.
const cgroupRoot = "/sys/fs/cgroup"

// removeCgroups removes the sandbox's cgroups that runsc left behind. runsc
// removes them itself on a normal delete, but not always when the sandbox
// died first (its processes may still be exiting when it tries): rmdir is
// retried while the kernel reports the group busy.
func removeCgroups(ctx context.Context, parent, id string) error {
	var dirs []string
	// cgroup v2 (and hybrid's unified tree) and every v1 controller.
	dirs = append(dirs, filepath.Join(cgroupRoot, parent, id))
	if ents, err := os.ReadDir(cgroupRoot); err == nil {
		for _, e := range ents {
			dirs = append(dirs, filepath.Join(cgroupRoot, e.Name(), parent, id))
		}
	}
	var errs []error
	// The kernel reports a group busy until its last task has exited,
	// which on a loaded machine takes a while after the kill.
	deadline := time.Now().Add(cgroupRemoveWait)
	for _, d := range dirs {
		for {
			err := unix.Rmdir(d)
			if err == nil || err == unix.ENOENT || err == unix.ENOTDIR {
				break
			}
			if err != unix.EBUSY || time.Now().After(deadline) || ctx.Err() != nil {
				errs = append(errs, fmt.Errorf("removing cgroup %s: %w", d, err))
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return errors.Join(errs...)
}

// List implements runtime.Runtime: the sandboxes runsc knows of and the
// directories left on disk.
func (r *Runtime) List(ctx context.Context) ([]string, error) {
	seen := map[string]bool{}
	var ids []string
	add := func(id string) {
		if validID(id) && !seen[id] {
			seen[id] = true
			ids = append(ids, id)
		}
	}
	lctx, cancel := context.WithTimeout(ctx, runscTimeout)
	defer cancel()
	cmd := r.runsc(lctx, "x", 0, "list", "--format=json")
	outb, err := cmd.Output()
	if err != nil {
		r.failed("list")
		return nil, fmt.Errorf("listing runsc sandboxes: %w", err)
	}
	var states []struct {
		ID string `json:"id"`
	}
	if s := bytes.TrimSpace(outb); len(s) > 0 && !bytes.Equal(s, []byte("null")) {
		if err := json.Unmarshal(s, &states); err != nil {
			return nil, fmt.Errorf("decoding runsc list: %w", err)
		}
	}
	for _, s := range states {
		add(s.ID)
	}
	entries, err := os.ReadDir(filepath.Join(r.cfg.StateDir, "sandboxes"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("reading sandbox directories: %w", err)
	}
	for _, e := range entries {
		add(e.Name())
	}
	return ids, nil
}

// limitedBuffer keeps the first max bytes written to it.
type limitedBuffer struct {
	buf *bytes.Buffer
	max int
}

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if room := l.max - l.buf.Len(); room > 0 {
		if len(p) < room {
			room = len(p)
		}
		l.buf.Write(p[:room])
	}
	return len(p), nil
}

// Close releases what the runtime holds outside any sandbox: runsc keeps a
// bind mount of an empty network namespace in its state directory for
// network "none". Running sandboxes are not affected.
func (r *Runtime) Close() error {
	p := filepath.Join(r.cfg.StateDir, "runsc", "null-netns")
	// Concurrent first starts can each mount it: unmount until nothing is
	// mounted there.
	for range 64 {
		err := unix.Unmount(p, unix.MNT_DETACH)
		if err == unix.EINVAL || err == unix.ENOENT {
			return nil
		}
		if err != nil {
			return fmt.Errorf("unmounting %s: %w", p, err)
		}
	}
	return nil
}

// killStragglers SIGKILLs any host process still running for the sandbox
// (its sentry or gofer), found by the sandbox directory on its command
// line. runsc delete finds them by its state file; this covers a sandbox
// whose state file was never written or is damaged.
func (r *Runtime) killStragglers(id string) {
	needle := []byte(r.dir(id) + "/")
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, needle) {
			r.cfg.Log.Warn("killing leftover sandbox process", "id", id, "pid", pid)
			_ = unix.Kill(pid, unix.SIGKILL)
		}
	}
}

// MemoryUsage implements runtime.Inspector: the usage of the sandbox's
// memory cgroup (cgroup v2, or v1's memory controller).
func (r *Runtime) MemoryUsage(ctx context.Context, id string) (int64, error) {
	if !validID(id) {
		return 0, fmt.Errorf("invalid sandbox id %q", id)
	}
	for _, p := range []string{
		filepath.Join(cgroupRoot, r.cfg.CgroupParent, id, "memory.current"),
		filepath.Join(cgroupRoot, "memory", r.cfg.CgroupParent, id, "memory.usage_in_bytes"),
	} {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("reading %s: %w", p, err)
		}
		return n, nil
	}
	return 0, fmt.Errorf("no memory cgroup for sandbox %s", id)
}

// ExitCause implements runtime.Inspector. The host kernel's OOM killer
// counts its kills in the sandbox's memory cgroup (memory.events under v2,
// memory.oom_control under v1); gVisor has no OOM killer of its own, so a
// sandbox over its memory limit loses its sentry.
func (r *Runtime) ExitCause(ctx context.Context, id string) string {
	if !validID(id) {
		return ""
	}
	for _, p := range []string{
		filepath.Join(cgroupRoot, r.cfg.CgroupParent, id, "memory.events"),
		filepath.Join(cgroupRoot, "memory", r.cfg.CgroupParent, id, "memory.oom_control"),
	} {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, " "); ok && k == "oom_kill" && strings.TrimSpace(v) != "0" {
				return runtime.CauseOutOfMemory
			}
		}
	}
	return ""
}
