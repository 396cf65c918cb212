package agent

import (
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// File operations run with the credentials of the user they are made for,
// so that the sandbox's own permissions apply to them as to a command of
// that user (the agent itself is root): a write as "user" into /etc is
// refused, and what it creates belongs to that user.
//
// Credentials are per thread in Linux and per task in gVisor (both
// checked): runAs locks a goroutine to its thread and changes only that
// thread's effective uid, gid and groups with raw syscalls (glibc, and Go's
// syscall.Setresuid, would change every thread of the agent). The real and
// saved uid stay 0, which lets the thread switch back, and keeps the
// sandbox's processes of that user from signalling or tracing it. A thread
// that cannot switch back is never used again: the goroutine exits still
// locked, and the Go runtime then ends the thread. gVisor has no setfsuid
// (ENOSYS), which is why the effective ids are used.
//
// The Go runtime never clones a new thread from a locked one (it asks its
// template thread instead), so no other goroutine ever runs with these
// credentials.

// runAs runs f with id's credentials and returns its error. For the agent's
// own identity (root), f runs directly.
func runAs(id identity, f func() error) error {
	if id.uid == uint32(os.Geteuid()) && id.gid == uint32(os.Getegid()) {
		return f()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		restore, err := setThreadCreds(id)
		if err != nil {
			errc <- err
			return
		}
		var ferr error
		defer func() {
			if restore() == nil {
				runtime.UnlockOSThread()
			}
			errc <- ferr
		}()
		ferr = f()
	}()
	return <-errc
}

// setThreadCreds gives the calling (locked) thread id's effective
// credentials; restore gives it back its own.
func setThreadCreds(id identity) (restore func() error, err error) {
	saved, err := threadGroups()
	if err != nil {
		return nil, err
	}
	euid, egid := uintptr(os.Geteuid()), uintptr(os.Getegid())
	keep := ^uintptr(0) // -1: leave this id as it is
	restore = func() error {
		// The uid first: changing gid and groups needs it back.
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, keep, euid, keep); e != 0 {
			return e
		}
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, keep, egid, keep); e != 0 {
			return e
		}
		return setThreadGroups(saved)
	}
	if err := setThreadGroups(id.groups); err != nil {
		return nil, fmt.Errorf("setting groups: %w", err)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, keep, uintptr(id.gid), keep); e != 0 {
		_ = restore()
		return nil, fmt.Errorf("setting gid %d: %w", id.gid, e)
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, keep, uintptr(id.uid), keep); e != 0 {
		_ = restore()
		return nil, fmt.Errorf("setting uid %d: %w", id.uid, e)
	}
	return restore, nil
}

func threadGroups() ([]uint32, error) {
	n, _, e := unix.RawSyscall(unix.SYS_GETGROUPS, 0, 0, 0)
	if e != 0 {
		return nil, fmt.Errorf("getting groups: %w", e)
	}
	if n == 0 {
		return nil, nil
	}
	g := make([]uint32, n)
	n, _, e = unix.RawSyscall(unix.SYS_GETGROUPS, n, uintptr(unsafe.Pointer(&g[0])), 0)
	if e != 0 {
		return nil, fmt.Errorf("getting groups: %w", e)
	}
	return g[:n], nil
}

func setThreadGroups(g []uint32) error {
	var p uintptr
	if len(g) > 0 {
		p = uintptr(unsafe.Pointer(&g[0]))
	}
	if _, _, e := unix.RawSyscall(unix.SYS_SETGROUPS, uintptr(len(g)), p, 0); e != 0 {
		return e
	}
	return nil
}
