package sandbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/runtime"
	"golang.org/x/sys/unix"
)

// reserveBytes is the size of the reserve file: space set aside on the data
// disk for the store, given back the moment the disk fills up (sandboxes'
// writable layers grow after their creates were admitted) so that records
// can still be written.
const reserveBytes = 64 << 20

// diskGuard keeps the data disk from filling up: operations that write a
// lot ask it first, and it keeps the reserve file.
type diskGuard struct {
	dir string
	// min is the free space operations leave untouched.
	min int64

	mu sync.Mutex
}

func newDiskGuard(dir string, min int64) *diskGuard {
	return &diskGuard{dir: dir, min: min}
}

func (g *diskGuard) reservePath() string { return filepath.Join(g.dir, "reserve") }

// free returns the bytes an unprivileged writer may still use on the disk
// of the data directory.
func (g *diskGuard) free() (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(g.dir, &st); err != nil {
		return 0, fmt.Errorf("reading free space of %s: %w", g.dir, err)
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}

// check refuses an operation that would write need bytes when that would
// leave less than the kept minimum free.
func (g *diskGuard) check(need int64, what string) error {
	free, err := g.free()
	if err != nil {
		return err
	}
	if free-need < g.min {
		// The public message says what was refused, not how full the
		// host's disk is; the log has the figures.
		return errdefs.Wrap(errdefs.ErrInsufficientStorage, fmt.Errorf("need %d MiB, %d MiB free, %d MiB kept free", mib(need), mib(free), mib(g.min)),
			"the server's disk is too full to %s (it needs about %d MiB)", what, mib(need))
	}
	return nil
}

func mib(b int64) int64 { return (b + 1<<20 - 1) >> 20 }

// maintain keeps the reserve file: made (again) while the disk has room for
// it and the kept minimum. Only a store write that finds the disk full
// releases it (Release): released on low free space, whatever was filling
// the disk would take it and leave the store none.
func (g *diskGuard) maintain() {
	if g.dir == "" {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	free, err := g.free()
	if err != nil {
		return
	}
	_, statErr := os.Stat(g.reservePath())
	have := statErr == nil
	if !have && free > g.min+2*reserveBytes {
		f, err := os.OpenFile(g.reservePath(), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return
		}
		if err := unix.Fallocate(int(f.Fd()), 0, 0, reserveBytes); err != nil {
			f.Close()
			_ = os.Remove(g.reservePath())
			return
		}
		f.Close()
	}
}

// Release gives the reserve back to the disk; it reports whether it freed
// anything. The store calls it when a write finds the disk full.
func (g *diskGuard) Release() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return os.Remove(g.reservePath()) == nil
}

// ReleaseDiskReserve frees the reserve file of the data disk, for a store
// write that found the disk full; it reports whether anything was freed.
func (m *Manager) ReleaseDiskReserve() bool {
	ok := m.disk.Release()
	if ok {
		m.log.Error("the data disk is full: released the store's reserve")
	}
	return ok
}

// checkStored refuses an operation that would store about need more bytes
// for the tenant (a snapshot or a pause image) past MaxStoredMB, or past
// what the disk can take.
func (m *Manager) checkStored(ctx context.Context, tenant string, need int64, what string) error {
	used, err := m.store.StoredBytes(ctx, tenant)
	if err != nil {
		return err
	}
	if limit := int64(m.cfg.MaxStoredMB) << 20; used+need > limit {
		return errdefs.Quota("cannot %s: your snapshots and paused sandboxes use %d MiB, this needs about %d MiB more, and the limit is %d MiB; delete snapshots or paused sandboxes first",
			what, mib(used), mib(need), mib(limit))
	}
	return m.disk.check(need, what)
}

// imageEstimate is about how many bytes a checkpoint of the sandbox will
// write: its memory in use now, or its memory limit when the runtime
// cannot tell.
func (m *Manager) imageEstimate(ctx context.Context, in *instance) int64 {
	if insp, ok := m.rt.(runtime.Inspector); ok {
		if n, err := insp.MemoryUsage(ctx, in.id); err == nil {
			return n
		}
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	return int64(in.rec.MemoryMB) << 20
}

// checkpointError classifies a failed checkpoint for the tenant.
func checkpointError(err error, what string) error {
	if errors.Is(err, runtime.ErrNoSpace) {
		return errdefs.Wrap(errdefs.ErrInsufficientStorage, err, "the server's disk is full: cannot %s", what)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return errdefs.Wrap(errdefs.ErrTimeout, err, "cannot %s: saving the sandbox took too long", what)
	}
	return errdefs.Wrap(errdefs.ErrUnavailable, err, "cannot %s: saving the sandbox failed", what)
}
