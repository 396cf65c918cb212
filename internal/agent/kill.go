package agent

import (
	"bytes"
	"os"
	"strconv"
	"strings"
	"syscall"

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
//   - the holders of its stdin, stdout or stderr pipe: also a double-forked
//     child whose parent exited (it is reparented to the agent), as long as
//     it kept the exec's stdio.
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

// procEntry is what killExec needs of one /proc/<pid>/stat.
type procEntry struct {
	ppid, pgid int
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
	return procEntry{ppid: ppid, pgid: pgid}, true
}

// holdsPipe reports whether pid has an open descriptor on one of the pipes
// whose inodes are given.
func holdsPipe(pid int, links map[string]bool) bool {
	dir := "/proc/" + strconv.Itoa(pid) + "/fd/"
	entries, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, e := range entries {
		if l, err := os.Readlink(dir + e.Name()); err == nil && links[l] {
			return true
		}
	}
	return false
}

// execProcesses returns the processes of the exec whose process (and
// process group) is leader, found the three ways described above. self and
// PID 1 are never part of it.
func execProcesses(procs map[int]procEntry, leader int, pipeLinks map[string]bool, self int) map[int]bool {
	found := make(map[int]bool)
	children := make(map[int][]int, len(procs))
	var queue []int
	add := func(pid int) {
		if pid > 1 && pid != self && !found[pid] {
			found[pid] = true
			queue = append(queue, pid)
		}
	}
	if _, ok := procs[leader]; ok {
		add(leader)
	}
	for pid, p := range procs {
		children[p.ppid] = append(children[p.ppid], pid)
		if p.pgid == leader || (len(pipeLinks) > 0 && pid != self && pid > 1 && holdsPipe(pid, pipeLinks)) {
			add(pid)
		}
	}
	for len(queue) > 0 {
		pid := queue[0]
		queue = queue[1:]
		for _, c := range children[pid] {
			add(c)
		}
	}
	return found
}

// killExec SIGKILLs every process of an exec that can be found (see above).
// It first stops what it finds and looks again, until a look finds nothing
// new: a stopped process cannot fork, and a process killed while its child
// is being forked would leave that child to the agent, outside the tree.
// pipeInodes are the inodes of the exec's stdio pipes.
func killExec(leader int, pipeInodes []uint64) {
	self := os.Getpid()
	links := make(map[string]bool, len(pipeInodes))
	for _, ino := range pipeInodes {
		links["pipe:["+strconv.FormatUint(ino, 10)+"]"] = true
	}
	_ = unix.Kill(-leader, unix.SIGSTOP)
	stopped := make(map[int]bool)
	for range maxKillRounds {
		fresh := false
		for pid := range execProcesses(readProcs(), leader, links, self) {
			if !stopped[pid] {
				stopped[pid] = true
				fresh = true
				_ = unix.Kill(pid, unix.SIGSTOP)
			}
		}
		if !fresh {
			break
		}
	}
	for pid := range stopped {
		_ = unix.Kill(pid, unix.SIGKILL)
	}
	_ = unix.Kill(-leader, unix.SIGKILL)
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
