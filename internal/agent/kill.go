package agent

import (
	"bytes"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// An exec's processes, for a timeout or a caller that went away, are found
// three ways, because each alone misses some:
//
//   - its process group (every command gets one): all that did not call
//     setpgid or setsid;
//   - the descendants of its process or of any process found, following
//     parent links in /proc: also those that moved to a group or session of
//     their own (`setsid cmd &`) while the process that started them lives;
//   - the holders of its stdin, stdout or stderr pipe among the orphans: a
//     double-forked child whose parent exited is reparented to the agent
//     (the sandbox's init, or a child subreaper), and is found as long as
//     it kept the exec's stdio.
//
// Only the agent's own processes are ever looked at for pipes, and only
// the orphans among them: the processes in the tree of a child of the agent
// that is neither this exec's process nor another live exec's. A process
// born in another exec's tree could hold this exec's pipe only by opening
// it through /proc or receiving it over a socket; it is that exec's, and
// left alone. Processes outside the agent's tree (the host's, when the
// agent runs in a bigger process) are never looked at.
//
// No process being started is ever taken: between fork and execve a child
// is a copy of its parent and holds every descriptor the parent holds,
// close-on-exec ones included, so a child of the agent being started for
// another exec holds this exec's pipes until its execve. The look at /proc
// therefore holds Server.mu, across which the agent starts its commands
// (cmd.Start returns only once the child has exec'd), and
// syscall.ForkLock, which every fork of Go code in the process holds until
// the child has exec'd (it is a vfork).
//
// What it costs is bounded: every round reads /proc/<pid>/stat of every
// process (the sandbox's pids limit bounds them, maxKillRounds the rounds),
// each orphan (zombies aside) is looked at once per kill, not once per
// round, on descriptors 0, 1 and 2 first (three readlinks), and all the
// orphans' other descriptors together are read up to pipeScanBudget, parents
// before children. So an orphan that has the pipe only on a descriptor above
// 2, behind more descriptors than the budget reaches, is not found, nor one
// that gets the pipe (from a process not yet stopped) after it was looked
// at.
//
// So a kill touches only the exec's own processes, with two exceptions that
// need the tenant's hand or a wrapped pid space: a process of another exec
// that joined this exec's process group (setpgid, same session), and, in
// theory, a process that got the pid of the exec's process when that exited
// on its own, and was reaped, just as the kill began (pids are handed out
// in turn, so the whole pid space would have to be used up in between).
//
// What leaves the tree and drops the pipes (a classic daemon: double fork,
// stdio to /dev/null) is not found; the sandbox's TTL bounds it. A marker in
// each command's environment would find most of those too, but every
// command would see it in its environment, and one that scrubs its
// environment would escape all the same.

// maxKillRounds bounds the stop-and-rescan loop of killExec. Every round
// stops all processes found so far, so only processes forked in between
// are new; a fork bomb still converges, and if it does not, what was found
// is killed anyway.
const maxKillRounds = 50

// pipeScanBudget bounds how many descriptors above 2 one kill reads, over
// all orphans and rounds: a tenant can have thousands of processes with
// thousands of descriptors each, and the exec (and its slot) waits for the
// kill. Reading them costs a few microseconds each (directory and link):
// the whole budget, some tens of milliseconds on Linux (TestKillCostBounded
// logs it).
const pipeScanBudget = 1 << 13

// procEntry is what killExec needs of one /proc/<pid>/stat.
type procEntry struct {
	ppid, pgid int
	// zombie: it has exited and holds no descriptors.
	zombie bool
}

// readProcs reads the parent and process group of every process.
func readProcs() map[int]procEntry {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	procs := make(map[int]procEntry, len(entries))
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // gone in between
		}
		if p, ok := parseStat(b); ok {
			procs[pid] = p
		}
	}
	return procs
}

// parseStat extracts the parent and process group from /proc/<pid>/stat:
// "pid (comm) state ppid pgrp ...", where comm may hold spaces and
// parentheses, so the fields are counted from the last ')'.
func parseStat(b []byte) (procEntry, bool) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procEntry{}, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 3 {
		return procEntry{}, false
	}
	ppid, err1 := strconv.Atoi(f[1])
	pgid, err2 := strconv.Atoi(f[2])
	if err1 != nil || err2 != nil {
		return procEntry{}, false
	}
	return procEntry{ppid: ppid, pgid: pgid, zombie: f[0] == "Z"}, true
}

// procFDLink returns what descriptor fd of pid refers to, such as
// "pipe:[1234]", or "" if it cannot be read.
func procFDLink(pid int, fd string) string {
	l, _ := os.Readlink("/proc/" + strconv.Itoa(pid) + "/fd/" + fd)
	return l
}

// procEachFD calls f with the descriptors of pid, as names, until f returns
// false. It reads the directory in chunks, so that stopping early also
// stops the reading.
func procEachFD(pid int, f func(fd string) bool) {
	d, err := os.Open("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		return
	}
	defer d.Close()
	for {
		names, err := d.Readdirnames(256)
		for _, n := range names {
			if !f(n) {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// stdioFDs are looked at first, and on every orphan.
var stdioFDs = [...]string{"0", "1", "2"}

// execKill is what one kill of an exec's processes knows across its
// rounds (see killExec).
type execKill struct {
	leader, self int
	// links are the exec's pipes as /proc/<pid>/fd links show them.
	links map[string]bool
	// holders were found holding one of the pipes.
	holders map[int]bool
	// quick and full hold the orphans whose descriptors 0-2, and all of
	// whose descriptors, were looked at.
	quick, full map[int]bool
	// budget is what is left of pipeScanBudget.
	budget int
	// link and eachFD read a process's descriptors: procFDLink and
	// procEachFD, replaced in tests.
	link   func(pid int, fd string) string
	eachFD func(pid int, f func(fd string) bool)
	// stats counts the work done.
	stats killStats
}

// killStats is the work one kill did.
type killStats struct {
	// rounds is how many times /proc was read.
	rounds int
	// procs is how many process entries were read, over all rounds.
	procs int
	// orphans is how many processes were looked at for pipes.
	orphans int
	// fdLinks is how many descriptor links were read.
	fdLinks int
	// killed is how many processes were stopped and killed.
	killed int
	// took is how long the kill took.
	took time.Duration
}

func newExecKill(leader, self int, pipeInodes []uint64) *execKill {
	links := make(map[string]bool, len(pipeInodes))
	for _, ino := range pipeInodes {
		links["pipe:["+strconv.FormatUint(ino, 10)+"]"] = true
	}
	return &execKill{
		leader: leader, self: self, links: links,
		holders: make(map[int]bool), quick: make(map[int]bool), full: make(map[int]bool),
		budget: pipeScanBudget, link: procFDLink, eachFD: procEachFD,
	}
}

// find returns the processes of the exec found the three ways described
// above. others are the processes of the agent's other live execs. self and
// PID 1 are never part of it.
func (k *execKill) find(procs map[int]procEntry, others map[int]bool) map[int]bool {
	k.stats.rounds++
	k.stats.procs += len(procs)
	found := make(map[int]bool)
	children := make(map[int][]int, len(procs))
	var queue []int
	add := func(pid int) {
		if pid > 1 && pid != k.self && !found[pid] {
			found[pid] = true
			queue = append(queue, pid)
		}
	}
	// walk adds the descendants of what was added.
	walk := func() {
		for len(queue) > 0 {
			pid := queue[0]
			queue = queue[1:]
			for _, c := range children[pid] {
				add(c)
			}
		}
	}
	if _, ok := procs[k.leader]; ok {
		add(k.leader)
	}
	for pid, p := range procs {
		children[p.ppid] = append(children[p.ppid], pid)
		if p.pgid == k.leader || k.holders[pid] {
			add(pid)
		}
	}
	walk()
	if len(k.links) == 0 {
		return found
	}

	// The orphans: the trees of the agent's children that are neither
	// this exec's (found by now) nor another exec's, parents first.
	var orphans []int
	seen := make(map[int]bool)
	var next []int
	for _, c := range children[k.self] {
		if !others[c] && !found[c] {
			next = append(next, c)
		}
	}
	for len(next) > 0 {
		pid := next[0]
		next = next[1:]
		if seen[pid] || found[pid] || pid <= 1 || pid == k.self {
			continue
		}
		seen[pid] = true
		if !procs[pid].zombie {
			orphans = append(orphans, pid)
		}
		next = append(next, children[pid]...)
	}
	// A holder's descendants are the exec's and need no look of their
	// own: the orphans come parents first.
	holds := func(pid int) {
		k.holders[pid] = true
		add(pid)
		walk()
	}
	// Descriptors 0-2 of each, once per kill.
	for _, pid := range orphans {
		if found[pid] || k.quick[pid] {
			continue
		}
		k.quick[pid] = true
		k.stats.orphans++
		for _, fd := range stdioFDs {
			k.stats.fdLinks++
			if k.links[k.link(pid, fd)] {
				holds(pid)
				break
			}
		}
	}
	// The other descriptors, within the budget.
	for _, pid := range orphans {
		if k.budget <= 0 {
			break
		}
		if found[pid] || k.full[pid] {
			continue
		}
		k.full[pid] = true
		k.eachFD(pid, func(fd string) bool {
			if fd == "0" || fd == "1" || fd == "2" {
				return true
			}
			if k.budget <= 0 {
				return false
			}
			k.budget--
			k.stats.fdLinks++
			if k.links[k.link(pid, fd)] {
				holds(pid)
				return false
			}
			return true
		})
	}
	return found
}

// killExec SIGKILLs every process of an exec that can be found (see above).
// It first stops what it finds and looks again, until a look finds nothing
// new: a stopped process cannot fork, and a process killed while its child
// is being forked would leave that child to the agent, outside the tree.
// pipeInodes are the inodes of the exec's stdio pipes. The caller must not
// hold s.mu.
func (s *Server) killExec(leader int, pipeInodes []uint64) {
	start := time.Now()
	k := newExecKill(leader, os.Getpid(), pipeInodes)
	_ = unix.Kill(-leader, unix.SIGSTOP)
	stopped := make(map[int]bool)
	for range maxKillRounds {
		fresh := false
		// No command starts, and no Go code in the process forks, while
		// the processes are looked at and stopped (see above).
		s.mu.Lock()
		syscall.ForkLock.RLock()
		others := make(map[int]bool, len(s.waiters))
		for pid := range s.waiters {
			if pid != leader {
				others[pid] = true
			}
		}
		for pid := range k.find(readProcs(), others) {
			if !stopped[pid] {
				stopped[pid] = true
				fresh = true
				_ = unix.Kill(pid, unix.SIGSTOP)
			}
		}
		syscall.ForkLock.RUnlock()
		s.mu.Unlock()
		if !fresh {
			break
		}
	}
	// The group first: its leader is stopped, not yet killed, so the group
	// still is the exec's.
	_ = unix.Kill(-leader, unix.SIGKILL)
	for pid := range stopped {
		_ = unix.Kill(pid, unix.SIGKILL)
	}
	k.stats.killed = len(stopped)
	k.stats.took = time.Since(start)
	if s.onKill != nil {
		s.onKill(k.stats)
	}
}

// pipeInodes returns the inodes of pipe ends (nil ones skipped). Stat, not
// Fd: Fd would put the files into blocking mode, and the exec relies on
// read deadlines.
func pipeInodes(files ...*os.File) []uint64 {
	var inos []uint64
	for _, f := range files {
		if f == nil {
			continue
		}
		if fi, err := f.Stat(); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				inos = append(inos, st.Ino)
			}
		}
	}
	return inos
}
