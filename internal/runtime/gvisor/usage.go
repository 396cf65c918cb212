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
	"syscall"

	"github.com/pandastack/pandastack/internal/runtime"
)

var _ runtime.UsageReader = (*Runtime)(nil)

// Usage implements runtime.UsageReader from the sandbox's cgroups, under
// cgroup v1 (cpuacct and memory controllers) or v2 (the unified tree): CPU
// from cpuacct.usage or cpu.stat's usage_usec, memory as memory.stat's
// rss+shmem (v1) or anon+shmem (v2) — gVisor keeps its processes' memory
// in a memfd the host charges as shared memory. Disk is the allocated size
// of the overlay's filestore, a file runsc creates in the sandbox's
// directory and unlinks at once: it is found through a sandbox process's
// open descriptors.
func (r *Runtime) Usage(ctx context.Context, id string) (runtime.Usage, error) {
	if !validID(id) {
		return runtime.Usage{}, fmt.Errorf("invalid sandbox id %q", id)
	}
	var u runtime.Usage
	v2 := filepath.Join(cgroupRoot, r.cfg.CgroupParent, id)
	v1 := func(ctl string) string { return filepath.Join(cgroupRoot, ctl, r.cfg.CgroupParent, id) }
	var procs string
	switch {
	case fileExists(filepath.Join(v1("cpuacct"), "cpuacct.usage")):
		ns, err := readInt(filepath.Join(v1("cpuacct"), "cpuacct.usage"))
		if err != nil {
			return u, fmt.Errorf("reading CPU usage of %s: %w", id, err)
		}
		u.CPUSeconds = float64(ns) / 1e9
		mem, err := statSum(filepath.Join(v1("memory"), "memory.stat"), []string{"rss", "shmem"})
		if err != nil {
			return u, fmt.Errorf("reading memory usage of %s: %w", id, err)
		}
		u.MemoryBytes = mem
		procs = filepath.Join(v1("memory"), "cgroup.procs")
	case fileExists(filepath.Join(v2, "cpu.stat")):
		usec, err := statSum(filepath.Join(v2, "cpu.stat"), []string{"usage_usec"})
		if err != nil {
			return u, fmt.Errorf("reading CPU usage of %s: %w", id, err)
		}
		u.CPUSeconds = float64(usec) / 1e6
		mem, err := statSum(filepath.Join(v2, "memory.stat"), []string{"anon", "shmem"})
		if err != nil {
			return u, fmt.Errorf("reading memory usage of %s: %w", id, err)
		}
		u.MemoryBytes = mem
		procs = filepath.Join(v2, "cgroup.procs")
	default:
		return u, fmt.Errorf("no cgroup for sandbox %s", id)
	}
	u.DiskBytes = r.filestoreBytes(id, procs)
	return u, nil
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// filestoreBytes returns the allocated bytes of the sandbox's overlay
// filestore, looked for in the open descriptors of the processes in the
// cgroup.procs file procs; 0 when none is found.
func (r *Runtime) filestoreBytes(id, procs string) int64 {
	b, err := os.ReadFile(procs)
	if err != nil {
		return 0
	}
	prefix := filepath.Join(r.dir(id), "runsc-filestore-")
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		pid := strings.TrimSpace(sc.Text())
		if _, err := strconv.Atoi(pid); err != nil {
			continue
		}
		fdDir := filepath.Join("/proc", pid, "fd")
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			target, err := os.Readlink(filepath.Join(fdDir, fd.Name()))
			if err != nil || !strings.HasPrefix(target, prefix) {
				continue
			}
			fi, err := os.Stat(filepath.Join(fdDir, fd.Name()))
			if err != nil {
				continue
			}
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				return st.Blocks * 512
			}
		}
	}
	return 0
}
