package agent

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Pseudo-terminals for background processes (process.go). gVisor has
// /dev/ptmx and a devpts instance at /dev/pts (the sandbox's spec mounts
// one), so this is the usual Unix98 dance, done with x/sys/unix rather than
// a pty package: the agent needs the controlling end non-blocking, so that
// its reads take deadlines and a close ends them, as the exec pipes do
// (github.com/creack/pty's Open calls File.Fd, which makes the file
// blocking).

// openPTY opens a new pseudo-terminal of the given size. master is the
// agent's end, non-blocking; tty is the process's end, made id's (as login
// does) so that the process may reopen it.
func openPTY(size TermSize, id identity) (master, tty *os.File, err error) {
	mfd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("opening /dev/ptmx: %w", err)
	}
	n, err := unix.IoctlGetUint32(mfd, unix.TIOCGPTN)
	if err != nil {
		unix.Close(mfd)
		return nil, nil, fmt.Errorf("getting the terminal's number: %w", err)
	}
	if err := unix.IoctlSetPointerInt(mfd, unix.TIOCSPTLCK, 0); err != nil {
		unix.Close(mfd)
		return nil, nil, fmt.Errorf("unlocking the terminal: %w", err)
	}
	if err := unix.IoctlSetWinsize(mfd, unix.TIOCSWINSZ, &unix.Winsize{Row: size.Rows, Col: size.Cols}); err != nil {
		unix.Close(mfd)
		return nil, nil, fmt.Errorf("setting the terminal's size: %w", err)
	}
	name := "/dev/pts/" + strconv.FormatUint(uint64(n), 10)
	// Blocking: the process reads and writes it as its stdio.
	tfd, err := unix.Open(name, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(mfd)
		return nil, nil, fmt.Errorf("opening %s: %w", name, err)
	}
	if id.name != "" {
		// Best effort: the descriptor the process gets works either way.
		_ = unix.Fchown(tfd, int(id.uid), int(id.gid))
		_ = unix.Fchmod(tfd, 0o620)
	}
	// The master was opened non-blocking, so os.NewFile puts it in the
	// runtime's poller: reads take deadlines.
	return os.NewFile(uintptr(mfd), "/dev/ptmx"), os.NewFile(uintptr(tfd), name), nil
}

// setWinsize sets the window size of the terminal whose controlling end is
// master (TIOCSWINSZ); the kernel signals its foreground process group
// with SIGWINCH.
func setWinsize(master *os.File, size TermSize) error {
	rc, err := master.SyscallConn()
	if err != nil {
		return err
	}
	var ierr error
	if err := rc.Control(func(fd uintptr) {
		ierr = unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, &unix.Winsize{Row: size.Rows, Col: size.Cols})
	}); err != nil {
		return err
	}
	return ierr
}

// loginShell returns id's shell as the sandbox's /etc/passwd names it, or
// /bin/sh when it names none that exists.
func loginShell(id identity) string {
	const fallback = "/bin/sh"
	f, err := os.Open("/etc/passwd")
	if err != nil {
		return fallback
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// name:password:uid:gid:gecos:home:shell
		fields := strings.Split(sc.Text(), ":")
		if len(fields) != 7 {
			continue
		}
		if id.name != "" && fields[0] != id.name || id.name == "" && fields[2] != strconv.FormatUint(uint64(id.uid), 10) {
			continue
		}
		shell := fields[6]
		if fi, err := os.Stat(shell); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return shell
		}
		return fallback
	}
	return fallback
}
