package sandbox

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// The reserve is the store's: a disk that fills up keeps it until a store
// write needs it (maintain released it on low free space, and whatever
// filled the disk took it, leaving a kill unable to write its record).
func TestDiskReserveStaysForTheStore(t *testing.T) {
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=256m"); err != nil {
		t.Skipf("mounting a tmpfs (needs root): %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	g := newDiskGuard(dir, 64<<20)
	g.maintain()
	if _, err := os.Stat(g.reservePath()); err != nil {
		t.Fatalf("no reserve on an empty disk: %v", err)
	}
	// Something fills the disk to the last byte, maintain running while
	// it does.
	f, err := os.Create(filepath.Join(dir, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for {
		g.maintain()
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	g.maintain()
	if _, err := os.Stat(g.reservePath()); err != nil {
		t.Fatalf("the reserve is gone on a full disk: %v", err)
	}
	if !g.Release() {
		t.Fatal("Release freed nothing")
	}
	if free, _ := g.free(); free < reserveBytes/2 {
		t.Errorf("after Release: %d bytes free, want the reserve's", free)
	}
	if g.Release() {
		t.Error("a second Release reported freeing something")
	}
}
