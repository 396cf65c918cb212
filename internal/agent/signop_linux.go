//go:build linux && (amd64 || arm64)

package agent

import (
	"fmt"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Implemented in signop_linux_*.s: the entry points of a signal handler
// that does nothing and of its sa_restorer (0 where none is needed).
func sigNopAddr() uintptr
func sigRestorerAddr() uintptr

// kernelSigaction is struct sigaction as rt_sigaction takes it on amd64
// and arm64.
type kernelSigaction struct {
	handler  uintptr
	flags    uint64
	restorer uintptr
	mask     uint64
}

const (
	saRestart  = 0x10000000
	saOnStack  = 0x08000000
	saRestorer = 0x04000000
)

// dropUnnotifiable makes sig a no-op for this process, for signals that
// os/signal cannot catch. A statically linked Go program leaves 32 and 34
// (reserved for libc's threads) at their default disposition, which is to
// terminate, and installs no handler that signal.Notify could use. SIG_IGN
// would be inherited by every command across execve; a handler is reset
// to the default there, so the agent installs one that does nothing.
// A signal whose disposition is not the default (someone else handles it)
// is left alone.
func dropUnnotifiable(sig syscall.Signal) error {
	var old kernelSigaction
	if _, _, errno := unix.RawSyscall6(unix.SYS_RT_SIGACTION, uintptr(sig), 0, uintptr(unsafe.Pointer(&old)), 8, 0, 0); errno != 0 {
		return fmt.Errorf("reading the action of signal %d: %w", sig, errno)
	}
	if old.handler != 0 { // not SIG_DFL
		return nil
	}
	act := kernelSigaction{handler: sigNopAddr(), flags: saOnStack | saRestart, restorer: sigRestorerAddr()}
	if act.restorer != 0 {
		act.flags |= saRestorer
	}
	if _, _, errno := unix.RawSyscall6(unix.SYS_RT_SIGACTION, uintptr(sig), uintptr(unsafe.Pointer(&act)), 0, 8, 0, 0); errno != 0 {
		return fmt.Errorf("setting the action of signal %d: %w", sig, errno)
	}
	return nil
}
