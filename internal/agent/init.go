package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// What the agent does to itself as a sandbox's init, before it serves.
// Commands in the sandbox run as root with Docker's default capabilities,
// so without this they could reach the agent's own descriptors through
// /proc/1/fd: its stdin and stdout are the transport to the daemon (a write
// there corrupts the session), and its stderr is a file on the host.

// SetNotDumpable makes the process non-dumpable. Opening /proc/<pid>/fd/N
// of a non-dumpable process needs CAP_SYS_PTRACE, which the sandbox's
// processes do not have (gVisor: kernel.Task.CanTrace). Children are not
// affected: execve makes a process dumpable again.
func SetNotDumpable() error {
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("making the agent non-dumpable: %w", err)
	}
	return nil
}

// Stdio is what the process's stdin, stdout and stderr were before
// DetachStdio, on close-on-exec descriptors.
type Stdio struct {
	// In and Out are the daemon's transport.
	In, Out *os.File
	// Log is the original stderr, nil when there was none. On a sandbox it
	// is a file on the host: write to it only boundedly (NewBoundedWriter).
	Log *os.File
}

// DetachStdio moves stdin, stdout and stderr to new close-on-exec
// descriptors and puts /dev/null on 0, 1 and 2, so that whatever still
// reaches the process's standard descriptors (a leaked reference, a library
// writing to stderr) reaches /dev/null and never the transport or the
// host's log file. It must run before anything else reads or writes the
// standard descriptors, and before any child is started.
func DetachStdio() (Stdio, error) {
	// Whatever else init inherited stays with init: no descriptor but the
	// ones an exec sets up reaches a command.
	if err := closeOnExecFrom(3); err != nil {
		return Stdio{}, err
	}
	var st Stdio
	var moved []*os.File
	fail := func(err error) (Stdio, error) {
		for _, f := range moved {
			f.Close()
		}
		return Stdio{}, err
	}
	for i, dst := range []**os.File{&st.In, &st.Out, &st.Log} {
		nfd, err := unix.FcntlInt(uintptr(i), unix.F_DUPFD_CLOEXEC, 3)
		if err != nil {
			if i == 2 {
				break // no stderr: nothing to log to
			}
			return fail(fmt.Errorf("moving descriptor %d: %w", i, err))
		}
		*dst = os.NewFile(uintptr(nfd), []string{"agent-in", "agent-out", "agent-log"}[i])
		moved = append(moved, *dst)
	}
	null, err := unix.Open(os.DevNull, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fail(fmt.Errorf("opening %s: %w", os.DevNull, err))
	}
	defer unix.Close(null)
	// os.Stdin and friends keep their descriptor numbers, now /dev/null.
	// Dup3 replaces each atomically: there is no moment at which 0, 1 or 2
	// is free for another open to take.
	for fd := 0; fd <= 2; fd++ {
		if err := unix.Dup3(null, fd, 0); err != nil {
			return fail(fmt.Errorf("putting %s on descriptor %d: %w", os.DevNull, fd, err))
		}
	}
	return st, nil
}

// closeOnExecFrom marks every descriptor from first on close-on-exec.
func closeOnExecFrom(first int) error {
	err := unix.CloseRange(uint(first), ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	if err == nil {
		return nil
	}
	// Kernels before 5.11 lack close_range's CLOEXEC flag.
	entries, rerr := os.ReadDir("/proc/self/fd")
	if rerr != nil {
		return fmt.Errorf("marking inherited descriptors close-on-exec: %w", errors.Join(err, rerr))
	}
	for _, e := range entries {
		fd, cerr := strconv.Atoi(e.Name())
		if cerr != nil || fd < first {
			continue
		}
		if _, ferr := unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC); ferr != nil && ferr != unix.EBADF {
			return fmt.Errorf("marking descriptor %d close-on-exec: %w", fd, ferr)
		}
	}
	return nil
}

// DropSignals catches every signal a process can catch, except SIGCHLD
// (the reaper's), and drops it, until ctx ends. As init, the agent must not
// die or stop because a command ran `kill -TERM 1` (Go's default for
// SIGTERM, SIGHUP and SIGINT is to exit, for SIGQUIT to dump and exit,
// for SIGTSTP to stop; gVisor does not shield init from signals as Linux
// does). Catching, not ignoring: an ignored disposition is inherited across
// execve, a handler is reset to the default, so commands still die of
// SIGTERM and SIGINT. SIGKILL and SIGSTOP cannot be caught. The error
// reports a signal that could not be made harmless; the others still are.
func DropSignals(ctx context.Context) error {
	var sigs []os.Signal
	var errs []error
	for sig := syscall.Signal(1); sig <= 64; sig++ {
		switch sig {
		case syscall.SIGKILL, syscall.SIGSTOP, syscall.SIGCHLD:
			continue
		case syscall.SIGURG:
			// The Go runtime's preemption signal, ignored by default:
			// catching it would only wake this goroutine for nothing.
			continue
		case 33:
			// The Go runtime's own (for per-thread syscalls); its
			// handler ignores one it did not ask for.
			continue
		case 32, 34:
			// Reserved for libc's threads: os/signal cannot catch
			// them.
			if err := dropUnnotifiable(sig); err != nil {
				errs = append(errs, err)
			}
			continue
		}
		sigs = append(sigs, sig)
	}
	c := make(chan os.Signal, 16)
	signal.Notify(c, sigs...)
	go func() {
		defer signal.Stop(c)
		for {
			select {
			case <-ctx.Done():
				return
			case <-c:
			}
		}
	}()
	return errors.Join(errs...)
}

// boundedWriter passes at most limit bytes to w over its lifetime, in whole
// writes, then a note that the rest is dropped.
type boundedWriter struct {
	mu    sync.Mutex
	w     io.Writer
	left  int
	noted bool
}

// NewBoundedWriter returns a writer that passes at most limit bytes to w,
// whole writes only, and drops the rest (after one line saying so). The
// agent logs through it to its original stderr, a file on the host: the
// agent logs things a sandbox can cause, and a sandbox must not be able to
// grow a host file without bound.
func NewBoundedWriter(w io.Writer, limit int) io.Writer {
	return &boundedWriter{w: w, left: limit}
}

func (b *boundedWriter) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(p) <= b.left {
		b.left -= len(p)
		if _, err := b.w.Write(p); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	if !b.noted {
		b.noted = true
		b.left = 0
		_, _ = io.WriteString(b.w, "agent log limit reached; further log lines are dropped\n")
	}
	return len(p), nil
}
