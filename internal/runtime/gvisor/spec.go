package gvisor

import (
	"encoding/json"
	"fmt"
	"path"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/pandastack/pandastack/internal/runtime"
)

// Defaults applied where runtime.Limits leaves a field zero.
const (
	defaultNoFile = 1 << 16
	defaultPids   = 512
	defaultTmp    = 512 << 20
	defaultShm    = 64 << 20
	cpuPeriod     = 100_000
)

// defaultCaps are Docker's default capabilities: root inside a sandbox is
// gVisor's root, and still gets no more than a container would.
var defaultCaps = []string{
	"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
	"CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
	"CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
}

// ociSpec renders the OCI runtime spec of one sandbox.
func ociSpec(s runtime.Spec, cgroupParent string) ([]byte, error) {
	if len(s.Init) == 0 {
		return nil, fmt.Errorf("sandbox %s has no init process", s.ID)
	}
	lim := s.Limits
	if lim.NoFile == 0 {
		lim.NoFile = defaultNoFile
	}
	if lim.Pids == 0 {
		lim.Pids = defaultPids
	}
	if lim.TmpBytes == 0 {
		lim.TmpBytes = defaultTmp
	}
	if lim.ShmBytes == 0 {
		lim.ShmBytes = defaultShm
	}
	hostname := s.Hostname
	if hostname == "" {
		hostname = s.ID
	}
	res := &specs.LinuxResources{
		// On systrap every process inside costs the host about 2.5 tasks
		// (its stub process and threads). pids.max is only the backstop:
		// RLIMIT_NPROC below must bind first, so that a fork bomb gets
		// EAGAIN inside instead of the sentry failing its own clone and
		// panicking.
		Pids: &specs.LinuxPids{Limit: 3*lim.Pids + 256},
	}
	if lim.MemoryBytes > 0 {
		m := lim.MemoryBytes
		res.Memory = &specs.LinuxMemory{Limit: &m, Swap: &m}
	}
	if lim.CPU > 0 {
		q := int64(lim.CPU * cpuPeriod)
		p := uint64(cpuPeriod)
		res.CPU = &specs.LinuxCPU{Quota: &q, Period: &p}
	}
	nproc := uint64(lim.Pids)
	sp := specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{
			Args: s.Init,
			Env:  s.Env,
			Cwd:  "/",
			User: specs.User{UID: 0, GID: 0},
			Capabilities: &specs.LinuxCapabilities{
				Bounding:  defaultCaps,
				Effective: defaultCaps,
				Permitted: defaultCaps,
			},
			Rlimits: []specs.POSIXRlimit{
				{Type: "RLIMIT_NOFILE", Hard: lim.NoFile, Soft: lim.NoFile},
				// RLIMIT_NPROC makes a fork bomb fail with EAGAIN inside;
				// pids.max alone would take the sentry down.
				{Type: "RLIMIT_NPROC", Hard: nproc, Soft: nproc},
			},
			NoNewPrivileges: true,
		},
		Root:     &specs.Root{Path: s.RootfsDir, Readonly: false},
		Hostname: hostname,
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", shmSize(lim.ShmBytes)}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
			{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "nodev", "mode=1777", fmt.Sprintf("size=%d", lim.TmpBytes)}},
		},
		Linux: &specs.Linux{
			CgroupsPath: path.Join(cgroupParent, s.ID),
			Resources:   res,
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace},
				{Type: specs.IPCNamespace},
				{Type: specs.UTSNamespace},
				{Type: specs.MountNamespace},
				{Type: specs.NetworkNamespace, Path: s.NetworkNS},
			},
		},
	}
	for _, b := range s.Binds {
		sp.Mounts = append(sp.Mounts, specs.Mount{Destination: b.Destination, Type: "bind", Source: b.Source,
			Options: []string{"rbind", "ro", "nosuid", "nodev"}})
	}
	b, err := json.MarshalIndent(sp, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encoding OCI spec: %w", err)
	}
	return b, nil
}

// shmSize is /dev/shm's size option. The default keeps the text earlier
// versions wrote: a restore's mounts must match its image's.
func shmSize(b int64) string {
	if b == defaultShm {
		return "size=65536k"
	}
	return fmt.Sprintf("size=%d", b)
}
