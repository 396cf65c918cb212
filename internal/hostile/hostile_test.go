package hostile

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/internal/sandbox"
	"github.com/pandastack/pandastack/internal/testenv"
	"github.com/pandastack/pandastack/wire"
)

// Suite-wide settings.
const (
	// outputCap is the server's cap on each stream of a blocking exec.
	outputCap = 1 << 20
	// diskMB is each sandbox's root overlay; small so the disk fill is quick.
	diskMB = 512
	// neighbourP99 bounds the neighbour's exec latency during any case on
	// a quick machine; on a slower one the bound is neighbourFactor times
	// the neighbour's own latency measured before the cases.
	neighbourP99    = 2 * time.Second
	neighbourFactor = 25
	// patience bounds every wait for a state that must come (a sandbox
	// answering again, processes gone, the host cleaned up): generous,
	// because these tests never assume how fast the machine is.
	patience = 2 * time.Minute
	// rssGrowth bounds how much the daemon (this process) may grow.
	rssGrowth = 100 << 20
	// filestoreSlack is what a full overlay may hold beyond its cap
	// (metadata, the files the template's own writes made).
	filestoreSlack = 64 << 20
)

// hostileCase is one hostile workload: cmd runs by blocking exec in a fresh
// sandbox made from create, with timeout as its exec timeout; check asserts
// the safe outcome.
type hostileCase struct {
	name    string
	create  wire.CreateSandboxRequest
	cmd     string
	timeout time.Duration
	// before runs on the host after the sandbox is created, before cmd.
	before func(t *testing.T, r *run)
	check  func(t *testing.T, r *run)
	// watchProcs makes the harness sample the sandbox's process count from
	// the host (runsc ps) from before the command starts until the check
	// stops it (r.procs).
	watchProcs bool
}

func TestHostile(t *testing.T) {
	cgroupParent := "/pandastack" // the runtime's default
	s := daemontest.Start(t, func(c *daemon.Config) {
		c.MaxOutputBytes = outputCap
		c.Sandbox.DiskMB = diskMB
		if c.CgroupParent != "" {
			cgroupParent = c.CgroupParent
		}
	})
	h := &harness{
		s:      s,
		cgroup: strings.Trim(cgroupParent, "/"),
		http:   &http.Client{},
		runsc:  testenv.Runsc(t),
		tpl:    testenv.Template(t, "base").Rootfs,
	}
	// The neighbour lives through every case, however slow the machine.
	h.neighbour = s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 3600}).ID
	// The neighbour's latency with nothing hostile around: on a slow
	// machine the bound on its latency during the cases scales with it.
	var base []time.Duration
	for range 11 {
		start := time.Now()
		if err := h.neighbourOK(); err != nil {
			t.Fatalf("neighbour: %v", err)
		}
		base = append(base, time.Since(start))
	}
	slices.Sort(base)
	h.neighbourBase = base[len(base)/2]
	t.Logf("neighbour exec latency before the cases: median %v", h.neighbourBase)
	for _, tc := range cases() {
		t.Run(tc.name, func(t *testing.T) { h.run(t, tc) })
	}
	if err := h.neighbourOK(); err != nil {
		t.Errorf("neighbour after the suite: %v", err)
	}
}

func cases() []hostileCase {
	const mem = 256 // MiB, for the memory cases
	return []hostileCase{
		{
			name: "fork bomb",
			// exec keeps the command in the foreground without a fork, so
			// the exec's timeout kills the bomb's process group; the sleep
			// outlasts every timeout the case gives it.
			cmd:        `bash -c ':(){ :|:& };:'; exec sleep 1000`,
			timeout:    5 * time.Second,
			watchProcs: true,
			// RLIMIT_NPROC is the sandbox's pids.
			check: forkBomb(func(sb wire.Sandbox) int { return sb.Pids }),
		},
		{
			// The same bomb under a lower RLIMIT_NPROC of its own: the shape
			// a fixed spec gives (NPROC well below pids.max/3).
			name:       "fork bomb under ulimit -u 128",
			cmd:        `bash -c 'ulimit -u 128; :(){ :|:& };:'; exec sleep 1000`,
			timeout:    5 * time.Second,
			watchProcs: true,
			check:      forkBomb(func(wire.Sandbox) int { return 128 }),
		},
		{
			name:    "memory balloon: anonymous",
			create:  wire.CreateSandboxRequest{MemoryMB: mem},
			cmd:     `perl -e 'my @a; for my $i (1..4096) { push @a, "x" x (1<<20) } print "allocated 4 GiB\n"'; echo rc=$?`,
			timeout: 30 * time.Second,
			check: func(t *testing.T, r *run) {
				// The memory guard kills the process at memory_mb (the
				// host's hard limit is above it) and the sandbox lives
				// on. perl allocates as fast as the CPU lets it; on a
				// loaded machine it can outrun the guard to the hard
				// limit, and then the sandbox ends — named, and nothing
				// else is harmed. (TestWhatEndsASandboxIsNamed paces its
				// allocation and requires the sandbox to live.)
				if strings.Contains(r.res.Stdout, "allocated 4 GiB") {
					t.Errorf("a %d MiB sandbox allocated 4 GiB", mem)
				}
				if r.status == http.StatusConflict {
					if !strings.Contains(string(r.body), "ran out of memory") {
						t.Errorf("sandbox ended without naming the cause: %s", r.body)
					}
					r.settle(patience)
					r.observe("perl outran the memory guard: the host's hard limit ended the sandbox, 409 \"ran out of memory\"")
					return
				}
				r.wantOK()
				if !strings.Contains(r.res.Stderr, "reached its memory limit") || !strings.Contains(r.res.Stdout, "rc=137") {
					t.Errorf("got stdout %q, stderr %q; want the process killed (rc=137) and the memory limit named", tail(r.res.Stdout), tail(r.res.Stderr))
				}
				if !r.settle(patience) {
					t.Error("the sandbox died; want only the process killed")
				}
				r.observe("the memory guard kills perl at 256 MiB (SIGKILL, rc=137) and tells the command why on stderr; the sandbox lives on")
			},
		},
		{
			name:    "memory balloon: /tmp",
			create:  wire.CreateSandboxRequest{MemoryMB: mem},
			cmd:     `dd if=/dev/zero of=/tmp/fill bs=1M count=1024 2>&1; echo rc=$?`,
			timeout: 30 * time.Second,
			check: func(t *testing.T, r *run) {
				// /tmp is at most half of memory_mb: ENOSPC, not an OOM.
				r.wantOK()
				if !strings.Contains(r.res.Stdout, "No space left on device") || strings.Contains(r.res.Stdout, "rc=0") {
					t.Errorf("/tmp fill did not end in ENOSPC: %q", tail(r.res.Stdout))
				}
				if !r.settle(patience) {
					t.Error("sandbox died filling /tmp")
				}
				r.observe("ENOSPC at 128 MiB (/tmp is half of memory_mb); the sandbox lives on")
			},
		},
		{
			name:    "memory balloon: /dev/shm",
			create:  wire.CreateSandboxRequest{MemoryMB: mem},
			cmd:     `dd if=/dev/zero of=/dev/shm/fill bs=1M count=1024 2>&1; echo rc=$?`,
			timeout: 120 * time.Second,
			check: func(t *testing.T, r *run) {
				r.wantOK()
				if !strings.Contains(r.res.Stdout, "No space left on device") || strings.Contains(r.res.Stdout, "rc=0") {
					t.Errorf("/dev/shm fill did not end in ENOSPC: %q", tail(r.res.Stdout))
				}
				if !r.settle(patience) {
					t.Error("sandbox died filling its 64 MiB /dev/shm")
				}
			},
		},
		{
			name:    "CPU spin on every core",
			cmd:     `p=; for i in 1 2 3 4; do (while :; do :; done) & p="$p $!"; done; sleep 5; kill $p; echo spun`,
			timeout: 120 * time.Second,
			before: func(t *testing.T, r *run) {
				r.cpuStart = cgroupCPU(t, r.h.cgroup, r.sb.ID)
				r.cpuAt = time.Now()
			},
			check: func(t *testing.T, r *run) {
				r.wantOK()
				used := cgroupCPU(t, r.h.cgroup, r.sb.ID) - r.cpuStart
				wall := time.Since(r.cpuAt)
				t.Logf("hostile sandbox used %.2f CPU-s in %.2f s (limit %.2g CPU)", used.Seconds(), wall.Seconds(), r.sb.CPU)
				if limit := time.Duration(float64(wall) * r.sb.CPU * 1.2); used > limit {
					t.Errorf("sandbox used %v of CPU in %v, over its quota of %g CPU", used, wall, r.sb.CPU)
				}
				r.observe("used %.1f CPU-s in %.1f s (quota 1 CPU)", used.Seconds(), wall.Seconds())
			},
		},
		{
			name:    "disk fill: bytes",
			cmd:     `dd if=/dev/zero of=/big bs=1M 2>&1; echo rc=$?; df -k /`,
			timeout: 300 * time.Second,
			check: func(t *testing.T, r *run) {
				r.wantOK()
				if !strings.Contains(r.res.Stdout, "No space left on device") || strings.Contains(r.res.Stdout, "rc=0") {
					t.Errorf("disk fill did not end in ENOSPC: %q", tail(r.res.Stdout))
				}
				// What the sandbox holds of the host's disk is its overlay's
				// filestore (a deleted file its runsc processes keep open):
				// measured there, not as the host's free space, which other
				// tests running beside this one change.
				dir := filepath.Join(r.h.s.DataDir, "runtime", "sandboxes", r.sb.ID)
				held, files := filestoreBytes(t, dir)
				t.Logf("the sandbox's filestore holds %d MiB of the host's disk in %d file(s) while full (cap %d MiB)", held>>20, files, diskMB)
				if files == 0 {
					t.Errorf("no open filestore under %s: the overlay is not where the runtime puts it", dir)
				}
				if held > diskMB<<20+filestoreSlack {
					t.Errorf("the sandbox holds %d MiB of the host's disk for a %d MiB disk cap", held>>20, diskMB)
				}
				if !r.settle(patience) {
					t.Error("sandbox died filling its disk")
				}
				r.kill()
				full := held
				deadline := time.Now().Add(patience)
				for {
					held, files = filestoreBytes(t, dir)
					if files == 0 || time.Now().After(deadline) {
						break
					}
					time.Sleep(100 * time.Millisecond)
				}
				if files != 0 {
					t.Errorf("%d MiB of the killed sandbox's filestore still held open on the host", held>>20)
				}
				if _, err := os.Stat(dir); !os.IsNotExist(err) {
					t.Errorf("the killed sandbox's directory is still on the host (%v)", err)
				}
				r.observe("ENOSPC at the %d MiB cap; the sandbox's filestore held %d MiB of the host while full, freed after kill", diskMB, full>>20)
			},
		},
		{
			name:    "disk fill: inodes",
			create:  wire.CreateSandboxRequest{MemoryMB: mem},
			cmd:     `mkdir /many && cd /many && seq 1 300000 | xargs touch; echo rc=$?; ls | wc -l`,
			timeout: 30 * time.Second,
			check: func(t *testing.T, r *run) {
				r.endedOrDied()
				if r.status == http.StatusOK {
					r.observe("exec ended (exit %d, timed out %v): %q", r.res.ExitCode, r.res.TimedOut, tail(r.res.Stdout))
				}
				r.settle(patience)
			},
		},
		{
			name:    "stdout flood without newlines",
			cmd:     `head -c 200M /dev/zero | tr '\0' x`,
			timeout: 120 * time.Second,
			check: func(t *testing.T, r *run) {
				r.wantOK()
				if !r.res.Truncated || len(r.res.Stdout) > outputCap {
					t.Errorf("got truncated %v and %d bytes of stdout, want truncated and at most %d", r.res.Truncated, len(r.res.Stdout), outputCap)
				}
				grew := r.mon.peakRSS() - r.rss0
				t.Logf("daemon RSS grew by %d MiB at peak", grew>>20)
				if grew > rssGrowth {
					t.Errorf("daemon RSS grew by %d MiB", grew>>20)
				}
				r.observe("truncated=%v, stdout %d bytes (cap %d), daemon RSS +%d MiB at peak, %.1f s",
					r.res.Truncated, len(r.res.Stdout), outputCap, max(grew, 0)>>20, r.elapsed.Seconds())
			},
		},
		{
			name:    "SIGTERM-immune double-forked session, killed",
			cmd:     immortalCmd,
			timeout: 120 * time.Second,
			check: func(t *testing.T, r *run) {
				r.wantOK()
				if !running(r.res.Stdout, "hostile-immortal") {
					t.Fatalf("immortal process not running after SIGTERM: %q", r.res.Stdout)
				}
				r.kill()
				r.observe("survived SIGTERM inside; DELETE removed every host process, the sandbox dir and its cgroups")
			},
		},
		{
			name: "SIGTERM-immune double-forked session, TTL expiry",
			// The TTL is cut to 3 s once the immortal runs: however slow
			// the machine, the sandbox lives until then.
			create:  wire.CreateSandboxRequest{TTLSeconds: 600},
			cmd:     immortalCmd,
			timeout: 120 * time.Second,
			check: func(t *testing.T, r *run) {
				r.wantOK()
				if !running(r.res.Stdout, "hostile-immortal") {
					t.Fatalf("immortal process not running after SIGTERM: %q", r.res.Stdout)
				}
				if st, b := r.h.call(t, patience, "POST", "/v1/sandboxes/"+r.sb.ID+"/timeout", wire.SetTimeoutRequest{TTLSeconds: 3}); st != http.StatusOK {
					t.Fatalf("setting the TTL to 3 s: status %d: %s", st, b)
				}
				if !r.waitGone(patience) {
					t.Fatalf("sandbox still there %v after its TTL was set to 3 s", patience)
				}
				if left := r.waitNoLeftovers(patience); len(left) > 0 {
					t.Errorf("left after TTL expiry: %v", left)
				}
				r.observe("expired at its 3 s TTL; no host process, dir or cgroup left")
			},
		},
		{
			name:    "kill -9 -1",
			cmd:     killAllCmd,
			timeout: 120 * time.Second,
			check: func(t *testing.T, r *run) {
				r.wantOK()
				if running(r.res.Stdout, "sleep") {
					t.Errorf("kill -9 -1 left processes: %q", r.res.Stdout)
				}
				if !r.settle(patience) {
					t.Error("kill -9 -1 took the sandbox down; init should be spared")
				}
				r.observe("every process but init (the agent) and the caller killed; sandbox keeps answering")
			},
		},
		{
			name:    "kill -9 1 (the agent)",
			cmd:     `kill -9 1; echo rc=$?; sleep 1; echo survived`,
			timeout: 60 * time.Second,
			check: func(t *testing.T, r *run) {
				r.endedOrDied()
				if r.settle(patience) {
					r.observe("agent survived")
				} else {
					r.observe("gVisor delivers SIGKILL to init from inside (Linux would not): the agent dies, " +
						"the sandbox ends; the daemon answers 409, then 404, and cleans up")
				}
			},
		},
		{
			name:    "garbage into the agent channel",
			cmd:     `head -c 10000000 /dev/urandom > /proc/1/fd/1; echo rc=$?`,
			timeout: 10 * time.Second,
			check: func(t *testing.T, r *run) {
				r.endedOrDied()
				alive := r.settle(patience)
				grew := r.mon.peakRSS() - r.rss0
				if grew > rssGrowth {
					t.Errorf("daemon RSS grew by %d MiB", grew>>20)
				}
				r.observe("sandbox alive afterwards: %v; daemon RSS +%d MiB at peak", alive, max(grew, 0)>>20)
			},
		},
		{
			name:    "probes for host data",
			cmd:     probeCmd,
			timeout: 120 * time.Second,
			check: func(t *testing.T, r *run) {
				r.wantOK()
				out := r.res.Stdout + r.res.Stderr
				// The agent is not dumpable: its environ is closed to
				// commands (gVisor checks ptrace access), which is better
				// still than a clean one.
				if environ := section(out, "environ"); !strings.Contains(environ, "Permission denied") {
					checkEnv(t, environ, "/proc/1/environ")
				}
				checkEnv(t, section(out, "env"), "env")
				for _, p := range r.h.hostPaths() {
					if strings.Contains(out, p) {
						t.Errorf("host path %q visible in the probes", p)
					}
				}
				if host, err := os.Hostname(); err == nil && strings.TrimSpace(section(out, "hostname")) == host {
					t.Errorf("sandbox has the host's hostname %q", host)
				}
				if dmi := section(out, "dmi"); !strings.Contains(dmi, "No such file") {
					t.Errorf("/sys/class/dmi present: %q", dmi)
				}
				if v := section(out, "version"); !strings.Contains(v, "gvisor") {
					t.Errorf("/proc/version is not gVisor's: %q", v)
				}
				if cg := section(out, "cgroup"); strings.Contains(cg, r.h.cgroup) || strings.Contains(cg, r.sb.ID) {
					t.Errorf("/proc/self/cgroup shows the host cgroup path: %q", cg)
				}
				// Host paths must not exist inside: test -e for each.
				script := ""
				for i, p := range r.h.hostPaths() {
					script += fmt.Sprintf("test -e '%s' && echo visible-%d; ", p, i)
				}
				res := r.exec(script+"echo done", time.Minute)
				if res.Stdout != "done\n" {
					t.Errorf("host paths visible: %q (paths %v)", res.Stdout, r.h.hostPaths())
				}
				r.observe("env = the base env only; /proc/1/environ permission denied (the agent is not dumpable); no host path; /sys/class/dmi absent; /proc/version and dmesg are gVisor's; cgroups show /")
			},
		},
		{
			name:    "mount, unshare, ptrace, raw sockets, kernel modules",
			cmd:     privCmd,
			timeout: 120 * time.Second,
			before: func(t *testing.T, r *run) {
				r.mounts = hostMounts(t)
			},
			check: func(t *testing.T, r *run) {
				r.wantOK()
				out := r.res.Stdout
				for _, want := range []string{
					"mount=fail", "unshare-m=fail", "mount-outside-userns=absent",
					"init_module=-1 Operation not permitted", "finit_module=-1 Operation not permitted",
					"delete_module=-1 Operation not permitted", "kexec_load=-1 Operation not permitted",
					"iopl=-1 Operation not permitted", "bpf=-1 Operation not permitted",
					"ptrace-init=-1 Operation not permitted",
					"raw=Operation not permitted", "packet=Operation not permitted",
				} {
					if !strings.Contains(out, want) {
						t.Errorf("want %q in the probe output:\n%s", want, out)
					}
				}
				// Whatever succeeded stays inside: the host's mount table
				// has nothing new of it.
				for _, m := range hostMounts(t) {
					if strings.Contains(m, "pshostile") || (strings.Contains(m, r.sb.ID) && !slices.Contains(r.mounts, m)) {
						t.Errorf("new host mount: %s", m)
					}
				}
				r.observe("%s", strings.Join(strings.Fields(strings.ReplaceAll(out, "\n", "; ")), " "))
			},
		},
		{
			name:    "overwrite /proc/self/exe and the agent binary",
			cmd:     exeCmd,
			timeout: 120 * time.Second,
			before: func(t *testing.T, r *run) {
				agent := strings.TrimSpace(r.exec(`tr '\0' '\n' </proc/1/cmdline | head -1`, time.Minute).Stdout)
				if !strings.HasPrefix(agent, "/.pandastack/agent-") {
					t.Fatalf("agent path %q", agent)
				}
				r.agent = agent
				r.hashes = map[string]string{}
				for _, p := range r.h.protected(agent) {
					r.hashes[p] = sha256File(t, p)
				}
			},
			check: func(t *testing.T, r *run) {
				r.endedOrDied()
				// The agent is on a read-only mount: writing it fails and
				// the sandbox lives on.
				if strings.Contains(r.res.Stdout, "agent-rc=0") || !strings.Contains(r.res.Stderr, "Read-only file system") {
					t.Errorf("overwriting the agent: got %q %q, want it refused: Read-only file system", r.res.Stdout, r.res.Stderr)
				}
				if !r.settle(patience) {
					t.Errorf("sandbox gone after an attempt to overwrite its agent; want it alive")
				}
				for p, want := range r.hashes {
					if got := sha256File(t, p); got != want {
						t.Errorf("host file %s changed: sha256 %s, want %s", p, got, want)
					}
				}
				// A fresh sandbox of the same template still sees the
				// pristine files.
				fresh := r.h.s.Create(t, wire.CreateSandboxRequest{})
				res := r.h.execIn(t, fresh.ID, "sha256sum "+r.agent+" /bin/true /bin/bash", time.Minute)
				for _, p := range []string{r.agent, "/bin/true", "/bin/bash"} {
					if want := r.hashes[r.h.hostPath(p)]; !strings.Contains(res.Stdout, want+"  "+p) {
						t.Errorf("fresh sandbox sees a changed %s: %q", p, res.Stdout)
					}
				}
				r.h.s.Do(t, "DELETE", "/v1/sandboxes/"+fresh.ID, nil)
				r.observe("the agent is on a read-only mount: writing or removing it fails (EROFS) and the sandbox lives on; /proc/1/exe is closed (agent not dumpable); writes to /bin land in the sandbox's own overlay; host runsc, agent, bash and true unchanged; a fresh sandbox sees pristine files")
			},
		},
		{
			name:    "cwd escape through /proc",
			timeout: 120 * time.Second,
			before: func(t *testing.T, r *run) {
				r.marker = randHex(16)
				dir := t.TempDir()
				r.markerPath = filepath.Join(dir, "host-marker-"+r.marker)
				if err := os.WriteFile(r.markerPath, []byte(r.marker+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
				r.cmd = strings.NewReplacer("MARKER_PATH", r.markerPath, "MARKER_NAME", filepath.Base(r.markerPath)).Replace(escapeCmd)
			},
			check: func(t *testing.T, r *run) {
				r.wantOK()
				out := r.res.Stdout + r.res.Stderr
				// The command mentions the marker's path; only its content
				// proves a read.
				if strings.Contains(out, r.marker+"\n") || strings.Contains(out, "FOUND") {
					t.Errorf("host marker reachable from inside:\n%s", out)
				}
				if !strings.Contains(out, "climbed-to=/\n") {
					t.Errorf("climb did not stop at the sandbox root:\n%s", out)
				}
				r.observe("/proc/1/root, /proc/self/root, /proc/self/fd/N/.. climbing and chroot+climb all stay in the sandbox root; host marker unreadable")
			},
		},
	}
}

// immortalCmd starts a session that ignores SIGTERM/SIGHUP, double-forked
// and setsid()ed, waits until it runs (its signals are ignored by then),
// sends SIGTERM to everything, and lists what is left.
const immortalCmd = `(setsid bash -c 'trap "" TERM HUP INT; (trap "" TERM HUP INT; exec -a hostile-immortal sleep 1000) & while :; do sleep 1; done' </dev/null >/dev/null 2>&1 &)
until ps -eo args | grep -q '^hostile-immortal'; do sleep 0.05; done
kill -TERM -1; sleep 0.3; ps -eo pid,args`

// killAllCmd starts two sleeps, waits until both run, kills every process
// it may with kill -9 -1, waits until the signal has taken effect and
// lists what is left.
const killAllCmd = `sleep 100 & sleep 100 &
until [ "$(ps -eo args | grep -c '^sleep 100$')" = 2 ]; do sleep 0.05; done
kill -9 -1; echo rc=$?
while ps -eo args | grep -q '^sleep 100$'; do sleep 0.05; done
ps -eo pid,args`

// running reports whether a `ps -eo pid,args` listing shows a process
// whose argv[0] is name.
func running(ps, name string) bool {
	for _, l := range strings.Split(ps, "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[1] == name {
			return true
		}
	}
	return false
}

// probeCmd prints sections, each after a line "== name".
const probeCmd = `
echo == environ; { tr '\0' '\n' </proc/1/environ; } 2>&1
echo == env; env
echo == mounts; cat /proc/mounts /proc/self/mountinfo
echo == cmdline; tr '\0' ' ' </proc/1/cmdline; echo; cat /proc/cmdline
echo == dmi; ls /sys/class/dmi/id 2>&1; cat /sys/class/dmi/id/product_uuid 2>&1
echo == version; cat /proc/version
echo == hostname; hostname
echo == cgroup; cat /proc/self/cgroup; ls /sys/fs/cgroup 2>&1
echo == dmesg; dmesg 2>&1 | head -5
echo == fds; ls -l /proc/1/fd 2>&1
echo == end`

// privCmd tries privileged operations and prints one result per line.
const privCmd = `
mkdir -p /mnt/pshostile
mount -t tmpfs none /mnt/pshostile 2>/dev/null && echo mount=ok || echo mount=fail
unshare -m sh -c 'mount -t tmpfs none /mnt/pshostile' 2>/dev/null && echo unshare-m=ok || echo unshare-m=fail
unshare -Urm sh -c 'mount -t tmpfs none /mnt/pshostile && grep -q pshostile /proc/mounts' 2>/dev/null && echo userns-mount=ok-inside || echo userns-mount=fail
grep -q pshostile /proc/mounts && echo mount-outside-userns=visible || echo mount-outside-userns=absent
unshare -Urn true 2>/dev/null && echo userns-netns=ok-inside || echo userns-netns=fail
perl -e '
  use Socket;
  my $pid = fork(); if ($pid == 0) { sleep 30; exit 0 }
  my $r = syscall(101, 16, $pid, 0, 0); print "ptrace-child=$r\n";
  $! = 0; $r = syscall(101, 16, 1, 0, 0); print "ptrace-init=$r $!\n";
  kill 9, $pid;
  my ($a, $b, $c) = ("", "", "ext4");
  $! = 0; $r = syscall(175, 0, 0, $a); print "init_module=$r $!\n";
  $! = 0; $r = syscall(313, 0, $b, 0); print "finit_module=$r $!\n";
  $! = 0; $r = syscall(176, $c, 0); print "delete_module=$r $!\n";
  $! = 0; $r = syscall(246, 0, 0, 0, 0); print "kexec_load=$r $!\n";
  $! = 0; $r = syscall(172, 3); print "iopl=$r $!\n";
  $! = 0; $r = syscall(321, 0, 0, 0); print "bpf=$r $!\n";
  $! = 0; $r = syscall(298, 0, 0, -1, -1, 0); print "perf_event_open=$r $!\n";
  print "raw=", (socket(my $s, PF_INET, SOCK_RAW, 1) ? "ok" : "$!"), "\n";
  print "packet=", (socket(my $p, 17, SOCK_RAW, 0x0300) ? "ok" : "$!"), "\n";
'`

// exeCmd tries the runc CVE-2019-5736 pattern and writes over binaries,
// the running agent last.
const exeCmd = `
bash -c 'exec 3>/proc/self/exe; echo hacked >&3'; echo self-exe-rc=$?
echo hacked > /bin/true; echo bin-true-rc=$?
echo hacked > /proc/1/exe; echo proc-1-exe-rc=$?
A=$(tr '\0' '\n' </proc/1/cmdline | head -1); echo hacked > "$A"; echo agent-rc=$?`

// escapeCmd tries to reach a host file from inside through /proc and
// chroot; MARKER_PATH and MARKER_NAME are replaced with the host marker.
const escapeCmd = `
cat MARKER_PATH 2>/dev/null
cd /proc/1/root && cat .MARKER_PATH 2>/dev/null
cd /proc/self/root && cat .MARKER_PATH 2>/dev/null
cd /
perl -e '
  use Cwd;
  opendir(my $d, "/tmp") or die "opendir: $!";
  chdir("/proc/self/fd/" . fileno($d)) or die "chdir: $!";
  chdir("..") for 1..64;
  print "climbed-to=", getcwd(), "\n";
  print "FOUND via climb\n" if -e ".MARKER_PATH";
  chroot("/tmp") and do { chdir("..") for 1..64; print "FOUND via chroot\n" if -e ".MARKER_PATH" or -e "MARKER_PATH" };
'
find / -xdev -name MARKER_NAME 2>/dev/null | sed s/^/FOUND-by-find:/
echo done`

// harness holds what the cases share: the server, the neighbour sandbox
// and host paths that must stay out of reach.
type harness struct {
	s         *daemontest.Server
	http      *http.Client
	runsc     string
	tpl       string // the base template's rootfs on the host
	cgroup    string // the server's cgroup parent, relative to a hierarchy's root
	neighbour string
	// neighbourBase is the neighbour's median exec latency before the cases.
	neighbourBase time.Duration
}

// neighbourLimit is the bound on the neighbour's p99 exec latency during a
// case: neighbourP99, or neighbourFactor times its latency before the
// cases on a machine where that is more.
func (h *harness) neighbourLimit() time.Duration {
	return max(neighbourP99, neighbourFactor*h.neighbourBase)
}

// run is one case's state.
type run struct {
	t   *testing.T
	h   *harness
	tc  hostileCase
	sb  wire.Sandbox
	mon *monitor
	cmd string

	status  int
	body    []byte
	res     wire.ExecResult
	elapsed time.Duration
	rss0    int64
	notes   []string
	killed  bool
	// aliveSeen is set once the sandbox answered after the hostile command.
	aliveSeen bool

	// Per-case state set by before hooks.
	cpuStart   time.Duration
	cpuAt      time.Time
	mounts     []string
	agent      string
	hashes     map[string]string
	marker     string
	markerPath string
	// procs samples the sandbox's processes while the case runs, for
	// cases with watchProcs.
	procs *procWatch
}

func (h *harness) run(t *testing.T, tc hostileCase) {
	if tc.create.TTLSeconds == 0 {
		// Not the server's default: the case must not outlive its sandbox
		// on a slow machine.
		tc.create.TTLSeconds = 3600
	}
	sb := h.s.Create(t, tc.create)
	r := &run{t: t, h: h, tc: tc, sb: sb, cmd: tc.cmd}
	h.checkLimits(t, sb)
	if tc.before != nil {
		tc.before(t, r)
	}
	var cpu0 syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &cpu0)
	r.rss0 = rss()
	r.mon = h.startMonitor()
	stopped := false
	stop := func() monitorStats {
		stopped = true
		return r.mon.stop()
	}
	defer func() {
		if !stopped {
			stop()
		}
	}()

	if tc.watchProcs {
		r.procs = h.watchProcs(sb.ID)
		defer r.procs.stop()
	}
	r.hostileExec(tc.timeout)
	tc.check(t, r)

	st := stop()
	var cpu1 syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &cpu1)
	daemonCPU := time.Duration(cpu1.Utime.Nano()+cpu1.Stime.Nano()-cpu0.Utime.Nano()-cpu0.Stime.Nano()) * time.Nanosecond
	t.Logf("neighbour: %d execs, p50 %v, p99 %v, max %v; health %d/%d ok; daemon CPU %v, RSS peak +%d MiB",
		len(st.lat), st.p(0.50), st.p(0.99), st.p(1), st.healthOK, st.health, daemonCPU.Round(time.Millisecond), max(st.peakRSS-r.rss0, 0)>>20)
	if len(st.errs) > 0 {
		t.Errorf("neighbour failed %d times during the case: %v", len(st.errs), st.errs[:min(len(st.errs), 3)])
	}
	if p, limit := st.p(0.99), h.neighbourLimit(); p > limit {
		t.Errorf("neighbour p99 latency %v, want under %v (%v, or %d times its %v before the cases)", p, limit, neighbourP99, neighbourFactor, h.neighbourBase)
	}
	if st.healthOK != st.health {
		t.Errorf("health answered %d of %d times", st.healthOK, st.health)
	}

	if !r.killed {
		r.kill()
	}
	if err := h.healthy(); err != nil {
		t.Errorf("daemon after the case: %v", err)
	}
	if err := h.neighbourOK(); err != nil {
		t.Errorf("neighbour after the case: %v", err)
	}
	if left := r.waitNoLeftovers(patience); len(left) > 0 {
		t.Errorf("left on the host after the kill: %v", left)
	}
	outcome := strings.Join(r.notes, "; ")
	if outcome == "" {
		outcome = r.describe()
	}
	t.Logf("OBSERVED | %s | %s | neighbour p99 %v", tc.name, outcome, st.p(0.99).Round(time.Millisecond))
}

// hostileExec runs the case's command by blocking exec with the given
// timeout and records its outcome in r.
func (r *run) hostileExec(timeout time.Duration) {
	r.t.Helper()
	r.res = wire.ExecResult{}
	start := time.Now()
	r.status, r.body = r.h.call(r.t, timeout+patience, "POST", "/v1/sandboxes/"+r.sb.ID+"/exec",
		wire.ExecRequest{Cmd: r.cmd, TimeoutSeconds: timeout.Seconds(), User: wire.UserRoot})
	r.elapsed = time.Since(start)
	if r.status == http.StatusOK {
		if err := json.Unmarshal(r.body, &r.res); err != nil {
			r.t.Fatalf("decoding exec result: %v", err)
		}
	}
	// The timeout ends the command; killing what it left may take a while
	// on a slow machine, but not for ever.
	if r.elapsed > timeout+patience/2 {
		r.t.Errorf("hostile exec took %v, over its %v timeout", r.elapsed, timeout)
	}
	r.t.Logf("hostile exec (timeout %v): status %d in %v, exit %d, timed out %v, truncated %v, stdout %d B, stderr %d B",
		timeout, r.status, r.elapsed.Round(time.Millisecond), r.res.ExitCode, r.res.TimedOut, r.res.Truncated, len(r.res.Stdout), len(r.res.Stderr))
}

// describe summarises the hostile exec's outcome.
func (r *run) describe() string {
	switch r.status {
	case http.StatusOK:
		return fmt.Sprintf("exec returned exit %d (timed out %v) in %.1f s; sandbox alive after: %v",
			r.res.ExitCode, r.res.TimedOut, r.elapsed.Seconds(), r.aliveSeen)
	case http.StatusConflict:
		return fmt.Sprintf("sandbox died during the command (409 after %.1f s); daemon cleaned it up", r.elapsed.Seconds())
	default:
		return fmt.Sprintf("exec status %d", r.status)
	}
}

func (r *run) observe(format string, args ...any) {
	r.notes = append(r.notes, fmt.Sprintf(format, args...))
}

// wantOK fails unless the hostile exec answered 200.
func (r *run) wantOK() {
	r.t.Helper()
	if r.status != http.StatusOK {
		r.t.Fatalf("hostile exec: status %d: %s", r.status, r.body)
	}
}

// endedOrDied accepts an exec that ended (200) or a sandbox that died
// under it (409); anything else is a daemon failure.
func (r *run) endedOrDied() {
	r.t.Helper()
	if r.status != http.StatusOK && r.status != http.StatusConflict {
		r.t.Fatalf("hostile exec: status %d: %s", r.status, r.body)
	}
}

// settle waits until the hostile sandbox either answers an exec or is gone
// from the API; it reports whether it is alive. A sandbox that neither
// answers nor goes away within d is a zombie and fails the test.
func (r *run) settle(d time.Duration) bool {
	r.t.Helper()
	deadline := time.Now().Add(d)
	for {
		st, b := r.h.call(r.t, time.Minute, "POST", "/v1/sandboxes/"+r.sb.ID+"/exec", wire.ExecRequest{Cmd: "echo ok", TimeoutSeconds: 30})
		if st == http.StatusOK && strings.Contains(string(b), `"stdout":"ok\n"`) {
			r.aliveSeen = true
			return true
		}
		if gs, _ := r.h.call(r.t, 30*time.Second, "GET", "/v1/sandboxes/"+r.sb.ID, nil); gs == http.StatusNotFound {
			return false
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("sandbox neither answers nor is gone after %v: last exec %d %s", d, st, b)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitProcs waits until the sandbox runs at most n processes. While a
// bomb's leftovers still hold the process limit, the exec that counts may
// fail to start; it is retried.
func (r *run) waitProcs(n int, d time.Duration) {
	r.t.Helper()
	deadline := time.Now().Add(d)
	for {
		out := r.exec("ps -e --no-headers | wc -l", 30*time.Second).Stdout
		got, _ := strconv.Atoi(strings.TrimSpace(out))
		if got > 0 && got <= n {
			return
		}
		if time.Now().After(deadline) {
			r.t.Errorf("sandbox still runs %q processes, want at most %d", out, n)
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// eagain is how a failed fork (EAGAIN) reads in bash's error messages.
const eagain = "Resource temporarily unavailable"

// maxBombTimeout is the longest exec timeout forkBomb gives a bomb to reach
// its process limit.
const maxBombTimeout = 160 * time.Second

// forkBomb checks a fork bomb case, whatever the machine's speed: while
// the bomb runs, the sandbox's process count (sampled from the host) never
// exceeds limit; the exec ends at its timeout; the sandbox survives and
// answers; nothing of the bomb is left afterwards (the neighbour and the
// daemon are checked by the harness). A slow machine may not create
// processes fast enough to reach the limit within the case's timeout: the
// bomb then runs again with twice the timeout, until its forks fail with
// EAGAIN (the limit was reached and held) or maxBombTimeout is spent.
func forkBomb(limitOf func(wire.Sandbox) int) func(t *testing.T, r *run) {
	return func(t *testing.T, r *run) {
		limit := limitOf(r.sb)
		timeout := r.tc.timeout
		failed := "forks failed with EAGAIN"
		for {
			r.endedOrDied()
			if !r.settle(patience) {
				t.Fatal("the fork bomb killed the whole sandbox instead of failing forks with EAGAIN")
			}
			r.wantOK()
			if !r.res.TimedOut {
				t.Errorf("the bomb's exec ended before its %v timeout: exit %d, stderr %q", timeout, r.res.ExitCode, tail(r.res.Stderr))
			}
			// The timeout killed every process of the bomb.
			r.waitProcs(10, patience)
			if strings.Contains(r.res.Stderr, eagain) {
				break
			}
			if timeout >= maxBombTimeout {
				t.Errorf("the bomb's forks never failed with EAGAIN, with exec timeouts up to %v: the limit of %d processes was never reached (stderr %q)",
					timeout, limit, tail(r.res.Stderr))
				failed = "no EAGAIN seen"
				break
			}
			peak, _ := r.procs.peak()
			timeout *= 2
			t.Logf("no EAGAIN yet (at most %d processes seen, limit %d): a slow machine; the bomb runs again with a %v timeout", peak, limit, timeout)
			r.hostileExec(timeout)
		}
		st := r.procs.stop()
		t.Logf("sandbox processes sampled from the host: %d samples, at most %d, limit %d (%d failed samples, last error %v)",
			st.samples, st.max, limit, st.failed, st.lastErr)
		if st.samples == 0 {
			t.Fatalf("no sample of the sandbox's processes from the host: %v", st.lastErr)
		}
		if st.max > limit {
			t.Errorf("the sandbox ran %d processes at once, over its limit of %d", st.max, limit)
		}
		if st.max <= 2 {
			t.Errorf("the host saw at most %d processes in the sandbox: the bomb never ran?", st.max)
		}
		r.observe("at most %d processes seen from the host (limit %d); %s; timed out at %v; sandbox alive and back to under 10 processes",
			st.max, limit, failed, timeout)
	}
}

// procWatch samples a sandbox's process count from the host, with runsc
// ps, until it is stopped.
type procWatch struct {
	stopc chan struct{}
	done  chan struct{}
	once  sync.Once

	mu sync.Mutex
	st procStats
}

type procStats struct {
	samples, failed, max int
	lastErr              error
}

func (h *harness) watchProcs(id string) *procWatch {
	w := &procWatch{stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			n, err := h.sandboxProcs(id)
			w.mu.Lock()
			if err != nil {
				w.st.failed++
				w.st.lastErr = err
			} else {
				w.st.samples++
				w.st.max = max(w.st.max, n)
			}
			w.mu.Unlock()
			select {
			case <-w.stopc:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return w
}

// peak returns the most processes seen so far and the number of samples.
func (w *procWatch) peak() (int, int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.st.max, w.st.samples
}

// stop ends the sampling, waits for the last sample and returns the
// statistics; it may be called more than once.
func (w *procWatch) stop() procStats {
	w.once.Do(func() { close(w.stopc) })
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.st
}

// sandboxProcs counts the processes of a sandbox as its sentry reports
// them to `runsc ps`: independent of whether anything can still start
// inside.
func (h *harness) sandboxProcs(id string) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	cmd := exec.CommandContext(ctx, h.runsc, "--root="+filepath.Join(h.s.DataDir, "runtime", "runsc"), "ps", "--format=json", id)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return 0, fmt.Errorf("runsc ps: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	var procs []json.RawMessage
	if err := json.Unmarshal(out, &procs); err != nil {
		return 0, fmt.Errorf("runsc ps: %w: %.200q", err, out)
	}
	return len(procs), nil
}

// waitGone waits until the API no longer knows the sandbox.
func (r *run) waitGone(d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if st, _ := r.h.call(r.t, 30*time.Second, "GET", "/v1/sandboxes/"+r.sb.ID, nil); st == http.StatusNotFound {
			return true
		}
		time.Sleep(100 * time.Millisecond)
	}
	return false
}

// kill deletes the hostile sandbox: 204, or 404 if it ended on its own.
func (r *run) kill() {
	r.t.Helper()
	r.killed = true
	st, b := r.h.call(r.t, patience, "DELETE", "/v1/sandboxes/"+r.sb.ID, nil)
	if st != http.StatusNoContent && st != http.StatusNotFound {
		r.t.Errorf("kill: status %d: %s", st, b)
	}
}

// exec runs a follow-up command in the hostile sandbox.
func (r *run) exec(cmd string, timeout time.Duration) wire.ExecResult {
	r.t.Helper()
	return r.h.execIn(r.t, r.sb.ID, cmd, timeout)
}

// waitNoLeftovers waits until nothing of the sandbox is left on the host:
// no process naming it (as `pgrep -f <id>` would find), no directory under
// the runtime's state, no cgroup. It returns what is still there.
func (r *run) waitNoLeftovers(d time.Duration) []string {
	deadline := time.Now().Add(d)
	for {
		left := leftovers(r.h.s.DataDir, r.h.cgroup, r.sb.ID)
		if len(left) == 0 || time.Now().After(deadline) {
			return left
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func leftovers(dataDir, cgroup, id string) []string {
	var left []string
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && bytes.Contains(b, []byte(id)) {
			left = append(left, fmt.Sprintf("process %s: %.120s", filepath.Base(filepath.Dir(p)), bytes.ReplaceAll(b, []byte{0}, []byte{' '})))
		}
	}
	dir := filepath.Join(dataDir, "runtime", "sandboxes", id)
	if _, err := os.Stat(dir); err == nil {
		left = append(left, "directory "+dir)
	}
	cgs, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", cgroup, id))
	if _, err := os.Stat(filepath.Join("/sys/fs/cgroup", cgroup, id)); err == nil {
		cgs = append(cgs, filepath.Join("/sys/fs/cgroup", cgroup, id))
	}
	for _, c := range cgs {
		left = append(left, "cgroup "+c)
	}
	return left
}

// checkLimits asserts that the host cgroup of a sandbox carries its memory,
// CPU and pids limits. The memory limit there is the hard one, above
// memory_mb, where the memory guard acts.
func (h *harness) checkLimits(t *testing.T, sb wire.Sandbox) {
	t.Helper()
	// pids.max is the backstop above RLIMIT_NPROC (see gvisor/spec.go).
	pids := 3*sandbox.DefaultConfig().Pids + 256
	v2 := fileExists("/sys/fs/cgroup/cgroup.controllers")
	type lim struct{ path, want string }
	var lims []lim
	if v2 {
		d := filepath.Join("/sys/fs/cgroup", h.cgroup, sb.ID)
		lims = []lim{
			{filepath.Join(d, "memory.max"), strconv.FormatInt(sandbox.HardMemoryLimit(sb.MemoryMB), 10)},
			{filepath.Join(d, "cpu.max"), fmt.Sprintf("%d 100000", int(sb.CPU*100000))},
			{filepath.Join(d, "pids.max"), strconv.Itoa(pids)},
		}
	} else {
		cg := func(ctl, file string) string { return filepath.Join("/sys/fs/cgroup", ctl, h.cgroup, sb.ID, file) }
		lims = []lim{
			{cg("memory", "memory.limit_in_bytes"), strconv.FormatInt(sandbox.HardMemoryLimit(sb.MemoryMB), 10)},
			{cg("cpu", "cpu.cfs_quota_us"), strconv.Itoa(int(sb.CPU * 100000))},
			{cg("pids", "pids.max"), strconv.Itoa(pids)},
		}
	}
	for _, l := range lims {
		b, err := os.ReadFile(l.path)
		if err != nil {
			t.Errorf("reading sandbox limit: %v", err)
			continue
		}
		if got := strings.TrimSpace(string(b)); got != l.want {
			t.Errorf("%s = %s, want %s", l.path, got, l.want)
		}
	}
}

// cgroupCPU returns the CPU time the sandbox's cgroup has used.
func cgroupCPU(t *testing.T, cgroup, id string) time.Duration {
	t.Helper()
	if b, err := os.ReadFile(filepath.Join("/sys/fs/cgroup/cpuacct", cgroup, id, "cpuacct.usage")); err == nil {
		ns, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		return time.Duration(ns)
	}
	b, err := os.ReadFile(filepath.Join("/sys/fs/cgroup", cgroup, id, "cpu.stat"))
	if err != nil {
		t.Fatalf("reading the sandbox's CPU usage: %v", err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "usage_usec "); ok {
			us, _ := strconv.ParseInt(v, 10, 64)
			return time.Duration(us) * time.Microsecond
		}
	}
	t.Fatal("no usage_usec in cpu.stat")
	return 0
}

// hostPaths are host paths that must not be visible inside a sandbox.
func (h *harness) hostPaths() []string {
	_, file, _, _ := runtime.Caller(0)
	repo := filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
	paths := []string{daemon.DefaultDataDir, h.s.DataDir, repo, filepath.Dir(h.tpl), h.runsc}
	if home, err := os.UserHomeDir(); err == nil {
		paths = append(paths, filepath.Join(home, "go"))
	}
	if gp := os.Getenv("GOPATH"); gp != "" {
		paths = append(paths, gp)
	}
	return paths
}

// protected are the host files a sandbox must not be able to change.
func (h *harness) protected(agent string) []string {
	return []string{h.runsc, h.hostPath(agent), h.hostPath("/bin/true"), h.hostPath("/bin/bash")}
}

// hostPath is where a file the sandbox sees at p lives on the host: the
// agent's read-only mount of the data directory's agents/, or the template.
func (h *harness) hostPath(p string) string {
	if rest, ok := strings.CutPrefix(p, "/.pandastack/"); ok {
		return filepath.Join(h.s.DataDir, "agents", rest)
	}
	return filepath.Join(h.tpl, p)
}

// baseEnvNames are the variables a sandbox process may have: the base
// environment of every sandbox plus what a shell sets itself.
var baseEnvNames = map[string]bool{
	"PATH": true, "HOME": true, "LANG": true, "TERM": true, "PYTHONUNBUFFERED": true, "MPLBACKEND": true,
	"PWD": true, "SHLVL": true, "_": true, "OLDPWD": true,
	// Who the command runs as, set by the agent.
	"USER": true, "LOGNAME": true,
}

// checkEnv asserts that an environment listing from inside a sandbox holds
// only base variables and nothing of this (the daemon's) process.
func checkEnv(t *testing.T, listing, what string) {
	t.Helper()
	inside := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(listing), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			inside[k] = v
		}
	}
	if inside["PATH"] == "" {
		t.Errorf("%s: no PATH in %q", what, listing)
	}
	for k := range inside {
		if !baseEnvNames[k] {
			t.Errorf("%s: unexpected variable %s", what, k)
		}
	}
	for _, kv := range os.Environ() {
		k, v, _ := strings.Cut(kv, "=")
		if baseEnvNames[k] || v == "" {
			continue
		}
		if got, ok := inside[k]; ok {
			t.Errorf("%s: host variable %s=%q leaked in", what, k, got)
		}
	}
}

// section returns the lines after "== name" up to the next "== ".
func section(out, name string) string {
	_, rest, ok := strings.Cut(out, "== "+name+"\n")
	if !ok {
		return ""
	}
	body, _, _ := strings.Cut(rest, "\n== ")
	return body
}

func hostMounts(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(string(b), "\n")
}

// filestoreBytes is what the files under dir that host processes hold open
// (a sandbox's overlay filestore is created there and deleted at once) take
// of the host's disk, and how many there are.
func filestoreBytes(t *testing.T, dir string) (int64, int) {
	t.Helper()
	fds, _ := filepath.Glob("/proc/[0-9]*/fd/*")
	seen := map[uint64]bool{}
	var total int64
	for _, fd := range fds {
		target, err := os.Readlink(fd)
		if err != nil || !strings.HasPrefix(target, dir+"/runsc-filestore-") {
			continue
		}
		var st syscall.Stat_t
		if err := syscall.Stat(fd, &st); err != nil || seen[st.Ino] {
			continue
		}
		seen[st.Ino] = true
		total += st.Blocks * 512
	}
	return total, len(seen)
}

func sha256File(t *testing.T, p string) string {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func randHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// tail shortens output for messages.
func tail(s string) string {
	if len(s) > 400 {
		return "…" + s[len(s)-400:]
	}
	return s
}

// rss returns this process's resident set size; the daemon runs in it.
func rss() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// call sends one request with the server's key and a deadline; a
// transport error is reported as status 0.
func (h *harness) call(t *testing.T, timeout time.Duration, method, path string, body any) (int, []byte) {
	t.Helper()
	st, b, err := h.do(timeout, method, path, body)
	if err != nil {
		t.Logf("%s %s: %v", method, path, err)
	}
	return st, b
}

func (h *harness) do(timeout time.Duration, method, path string, body any) (int, []byte, error) {
	var rd io.Reader
	if body != nil {
		j, err := json.Marshal(body)
		if err != nil {
			return 0, nil, err
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, h.s.URL+path, rd)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+h.s.Key)
	c := *h.http
	c.Timeout = timeout
	resp, err := c.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// execIn runs a command in a sandbox and fails the test unless it answers.
func (h *harness) execIn(t *testing.T, id, cmd string, timeout time.Duration) wire.ExecResult {
	t.Helper()
	st, b := h.call(t, timeout+patience, "POST", "/v1/sandboxes/"+id+"/exec", wire.ExecRequest{Cmd: cmd, TimeoutSeconds: timeout.Seconds(), User: wire.UserRoot})
	if st != http.StatusOK {
		t.Fatalf("exec %q in %s: status %d: %s", cmd, id, st, b)
	}
	var res wire.ExecResult
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatal(err)
	}
	return res
}

func (h *harness) healthy() error {
	st, b, err := h.do(30*time.Second, "GET", "/v1/health", nil)
	if err != nil {
		return err
	}
	if st != http.StatusOK {
		return fmt.Errorf("health: status %d: %s", st, b)
	}
	return nil
}

// neighbourOK runs `echo ok` in the neighbour.
func (h *harness) neighbourOK() error {
	// Generous deadlines: a slow answer is for the latency bound to judge.
	st, b, err := h.do(time.Minute, "POST", "/v1/sandboxes/"+h.neighbour+"/exec", wire.ExecRequest{Cmd: "echo ok", TimeoutSeconds: 30})
	if err != nil {
		return err
	}
	var res wire.ExecResult
	if st != http.StatusOK || json.Unmarshal(b, &res) != nil || res.Stdout != "ok\n" {
		return fmt.Errorf("echo ok: status %d: %s", st, b)
	}
	return nil
}

// monitor keeps the neighbour and the health endpoint busy while a case
// runs and records latencies, failures and this process's peak RSS.
type monitor struct {
	h    *harness
	done chan struct{}
	wg   sync.WaitGroup

	mu sync.Mutex
	st monitorStats
}

type monitorStats struct {
	lat              []time.Duration
	errs             []error
	health, healthOK int
	peakRSS          int64
}

// p returns the q-quantile of the neighbour's latencies.
func (s monitorStats) p(q float64) time.Duration {
	if len(s.lat) == 0 {
		return 0
	}
	l := slices.Clone(s.lat)
	slices.Sort(l)
	i := int(float64(len(l))*q+0.999999) - 1
	return l[max(0, min(i, len(l)-1))]
}

// minSamples is how many neighbour execs every case waits for.
const minSamples = 5

func (h *harness) startMonitor() *monitor {
	m := &monitor{h: h, done: make(chan struct{})}
	m.wg.Add(1)
	go m.loop()
	return m
}

func (m *monitor) loop() {
	defer m.wg.Done()
	for {
		start := time.Now()
		err := m.h.neighbourOK()
		lat := time.Since(start)
		herr := m.h.healthy()
		r := rss()
		m.mu.Lock()
		m.st.lat = append(m.st.lat, lat)
		if err != nil {
			m.st.errs = append(m.st.errs, err)
		}
		m.st.health++
		if herr == nil {
			m.st.healthOK++
		} else {
			m.st.errs = append(m.st.errs, fmt.Errorf("health: %w", herr))
		}
		m.st.peakRSS = max(m.st.peakRSS, r)
		n := len(m.st.lat)
		m.mu.Unlock()
		select {
		case <-m.done:
			if n >= minSamples {
				return
			}
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (m *monitor) peakRSS() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return max(m.st.peakRSS, rss())
}

// stop ends the monitor once it has at least minSamples samples.
func (m *monitor) stop() monitorStats {
	close(m.done)
	m.wg.Wait()
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.st
}
