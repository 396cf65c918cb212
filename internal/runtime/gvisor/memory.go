package gvisor

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/pandastack/pandastack/internal/runtime"
	"golang.org/x/sys/unix"
)

var _ runtime.MemoryWatcher = (*Runtime)(nil)

// Memory watching. A sandbox's memory is its sentry's: gVisor keeps the
// memory of every process inside in one memfd, which the host charges to
// the sandbox's cgroup as shared memory. The watcher is cold while usage is
// under 90% of the limit: under cgroup v1 it sleeps on a usage threshold
// event (cgroup.event_control), under v2 it reads memory.current every
// coldPoll. Past 90% it polls the cgroup's statistics every hotPoll and
// calls over while the processes' memory (anonymous + shared, not file
// caches) is at the limit.
const (
	hotPoll  = 10 * time.Millisecond
	coldPoll = 100 * time.Millisecond
	// overEvery bounds how often over is called while memory stays high:
	// a killed process's memory takes a moment to be given back.
	overEvery = 50 * time.Millisecond
)

// WatchMemory implements runtime.MemoryWatcher.
func (r *Runtime) WatchMemory(ctx context.Context, id string, limit int64, over func()) error {
	if !validID(id) {
		return fmt.Errorf("invalid sandbox id %q", id)
	}
	warm := limit / 10 * 9
	v1 := filepath.Join(cgroupRoot, "memory", r.cfg.CgroupParent, id)
	v2 := filepath.Join(cgroupRoot, r.cfg.CgroupParent, id)
	var (
		usageFile string
		statKeys  []string
		wait      func() error
	)
	if _, err := os.Stat(filepath.Join(v1, "memory.usage_in_bytes")); err == nil {
		usageFile, statKeys = filepath.Join(v1, "memory.usage_in_bytes"), []string{"rss", "shmem"}
		ev, err := thresholdEvent(v1, warm)
		if err != nil {
			return err
		}
		defer ev.Close()
		stop := context.AfterFunc(ctx, func() { _ = ev.SetReadDeadline(time.Now()) })
		defer stop()
		buf := make([]byte, 8)
		wait = func() error {
			_, err := ev.Read(buf)
			return err
		}
	} else if _, err := os.Stat(filepath.Join(v2, "memory.current")); err == nil {
		usageFile, statKeys = filepath.Join(v2, "memory.current"), []string{"anon", "shmem"}
		wait = func() error {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(coldPoll):
				return nil
			}
		}
	} else {
		return fmt.Errorf("no memory cgroup for sandbox %s", id)
	}
	statFile := filepath.Join(filepath.Dir(usageFile), "memory.stat")
	var lastOver time.Time
	for {
		usage, err := readInt(usageFile)
		if err != nil {
			return nil // the sandbox is gone
		}
		if usage < warm {
			if err := wait(); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return fmt.Errorf("waiting for memory events of %s: %w", id, err)
			}
			continue
		}
		inUse, err := statSum(statFile, statKeys)
		if err != nil {
			return nil
		}
		if inUse >= limit && time.Since(lastOver) >= overEvery {
			lastOver = time.Now()
			over()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(hotPoll):
		}
	}
}

// thresholdEvent registers a cgroup v1 memory threshold: the returned file
// (an eventfd, in Go's poller) becomes readable each time usage crosses
// bytes, up or down.
func thresholdEvent(dir string, bytes int64) (*os.File, error) {
	usage, err := os.Open(filepath.Join(dir, "memory.usage_in_bytes"))
	if err != nil {
		return nil, err
	}
	defer usage.Close()
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("creating eventfd: %w", err)
	}
	ev := os.NewFile(uintptr(efd), "memory-threshold")
	ctl := fmt.Sprintf("%d %d %d", efd, usage.Fd(), bytes)
	if err := os.WriteFile(filepath.Join(dir, "cgroup.event_control"), []byte(ctl), 0); err != nil {
		ev.Close()
		return nil, fmt.Errorf("registering a memory threshold: %w", err)
	}
	return ev, nil
}

func readInt(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
}

// statSum adds up the given keys of a memory.stat file.
func statSum(path string, keys []string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	var sum int64
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		for _, want := range keys {
			if k == want {
				n, err := strconv.ParseInt(v, 10, 64)
				if err == nil {
					sum += n
				}
			}
		}
	}
	return sum, nil
}
