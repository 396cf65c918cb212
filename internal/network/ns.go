package network

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// nsDir is where named network namespaces are bind-mounted, as by
// `ip netns add`.
const nsDir = "/var/run/netns"

func nsPath(name string) string { return filepath.Join(nsDir, name) }

// createNamedNS makes a new network namespace bind-mounted at
// /var/run/netns/name. The calling goroutine's thread is unchanged.
func createNamedNS(name string) error {
	errc := make(chan error, 1)
	// A thread that ends locked is thrown away by the Go runtime, so
	// whatever namespace it was left in does no harm.
	go func() {
		runtime.LockOSThread()
		if err := os.MkdirAll(nsDir, 0o755); err != nil {
			errc <- err
			return
		}
		h, err := netns.NewNamed(name)
		if err != nil {
			errc <- fmt.Errorf("creating network namespace %s: %w", name, err)
			return
		}
		h.Close()
		errc <- nil
	}()
	return <-errc
}

// deleteNamedNS removes a named namespace; the namespace itself goes with
// its last user (its interfaces with it). A missing one is not an error.
func deleteNamedNS(name string) error {
	p := nsPath(name)
	if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmounting network namespace %s: %w", name, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing network namespace %s: %w", name, err)
	}
	return nil
}

// openNS opens a network namespace by path; "" is the calling process's.
func openNS(path string) (netns.NsHandle, error) {
	if path == "" {
		return netns.GetFromPath("/proc/self/ns/net")
	}
	h, err := netns.GetFromPath(path)
	if err != nil {
		return netns.None(), fmt.Errorf("opening network namespace %s: %w", path, err)
	}
	return h, nil
}

// inNS runs fn on a thread that is in the namespace ns: sockets fn makes
// (listeners, dialers) belong to ns, and /proc/sys/net is ns's. The thread
// is thrown away afterwards.
func inNS(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("entering network namespace: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// sysctl writes a /proc/sys value in the namespace ns.
func sysctl(ns netns.NsHandle, key, value string) error {
	return inNS(ns, func() error {
		p := filepath.Join("/proc/sys", filepath.FromSlash(key))
		if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
			return fmt.Errorf("setting %s: %w", key, err)
		}
		return nil
	})
}
