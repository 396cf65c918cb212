package agent

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Reclaim asks the agent to free memory: the sandbox has reached its memory
// limit. gVisor has no OOM killer of its own — past the host cgroup's hard
// limit the host kills the whole sandbox — so the daemon watches the
// sandbox's memory and, at the limit it promised, asks the agent to kill
// the process using the most, as Linux's OOM killer would.
type Reclaim struct {
	// LimitMB is the sandbox's memory limit, for the message the killed
	// command's caller gets.
	LimitMB int `json:"limit_mb"`
}

// Reclaimed reports what a reclaim killed.
type Reclaimed struct {
	// PID is the killed process, 0 when there was none to kill.
	PID  int    `json:"pid"`
	Comm string `json:"comm,omitempty"`
	// RSSBytes is what it had resident.
	RSSBytes int64 `json:"rss_bytes"`
}

// reclaim kills the process with the largest resident set, never the agent
// (or PID 1). The process group it led is remembered, so that the exec it
// belongs to tells its caller why it died.
func (s *Server) reclaim(req Reclaim) Reclaimed {
	self := os.Getpid()
	page := int64(os.Getpagesize())
	var best Reclaimed
	bestPgid := 0
	// No half-started command while /proc is read: until it runs its
	// program a new child is a copy of the agent, with its memory (see
	// killExec). Commands start under s.mu; Go forks hold ForkLock.
	s.mu.Lock()
	syscall.ForkLock.RLock()
	procs := readProcs()
	syscall.ForkLock.RUnlock()
	s.mu.Unlock()
	for pid, p := range procs {
		if pid <= 1 || pid == self {
			continue
		}
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/statm")
		if err != nil {
			continue
		}
		f := strings.Fields(string(b))
		if len(f) < 2 {
			continue
		}
		pages, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil || pages*page <= best.RSSBytes {
			continue
		}
		best = Reclaimed{PID: pid, RSSBytes: pages * page}
		bestPgid = p.pgid
	}
	if best.PID == 0 {
		return best
	}
	if comm, err := os.ReadFile("/proc/" + strconv.Itoa(best.PID) + "/comm"); err == nil {
		best.Comm = strings.TrimSpace(string(comm))
	}
	s.mu.Lock()
	if s.oomKilled == nil {
		s.oomKilled = make(map[int]int)
	}
	s.oomKilled[bestPgid] = req.LimitMB
	s.mu.Unlock()
	_ = unix.Kill(best.PID, unix.SIGKILL)
	s.log.Warn("out of memory: killed the largest process", "pid", best.PID, "comm", best.Comm, "rss", best.RSSBytes)
	return best
}

// oomNote returns the line an exec whose process group is pgid adds to its
// stderr when a reclaim killed one of its processes, or "".
func (s *Server) oomNote(pgid int) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	limit, ok := s.oomKilled[pgid]
	if !ok {
		return ""
	}
	delete(s.oomKilled, pgid)
	return fmt.Sprintf("pandastack: a process of this command was killed: the sandbox reached its memory limit (%d MiB)\n", limit)
}
