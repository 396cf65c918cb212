package gvisor

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// staleGrace is how long New lets runsc commands of an earlier runtime
// finish before it kills them; staleWait bounds the wait for the killed
// ones to be gone.
const (
	staleGrace = time.Minute
	staleWait  = 10 * time.Second
)

// stopStaleCommands waits (bounded) for the runsc commands that an earlier
// runtime on the same state directory left running, killing those that do
// not finish in time; it returns how many there were.
//
// runsc commands run in process groups of their own, so a daemon killed
// with SIGKILL leaves those in progress behind: a checkpoint, a restore, a
// delete. They must not go on after the next daemon's start has settled
// what it found: a checkpoint that had not yet created its image, for one,
// would then write a GiB into a tmp directory the start had just emptied,
// never to be removed. They are given time to finish rather than killed at
// once because a checkpoint's sandbox saves itself whatever its runsc
// command does, its processes stopped meanwhile: the start would take it
// for a sandbox whose agent does not answer. The sandboxes' own processes
// (runsc-sandbox, runsc-gofer) are not commands: the start re-adopts or
// deletes their sandboxes.
func (r *Runtime) stopStaleCommands() int {
	pids := r.staleCommands()
	if len(pids) == 0 {
		return 0
	}
	r.cfg.Log.Warn("waiting for runsc commands left by an earlier run", "pids", pids, "at_most", staleGrace)
	start := time.Now()
	for _, pid := range pids {
		for !exited(pid) && time.Since(start) < staleGrace {
			time.Sleep(20 * time.Millisecond)
		}
	}
	r.cfg.Log.Info("runsc commands left by an earlier run waited for", "took", time.Since(start).Round(time.Millisecond))
	var killed []int
	for _, pid := range pids {
		if !exited(pid) {
			r.cfg.Log.Warn("killing a runsc command left by an earlier run", "pid", pid)
			if unix.Kill(pid, unix.SIGKILL) == nil {
				killed = append(killed, pid)
			}
		}
	}
	deadline := time.Now().Add(staleWait)
	for _, pid := range killed {
		for !exited(pid) {
			if time.Now().After(deadline) {
				r.cfg.Log.Error("a killed runsc command is still there", "pid", pid)
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return len(pids)
}

// staleCommands returns the runsc commands running on the state directory.
func (r *Runtime) staleCommands() []int {
	root := []byte("--root=" + filepath.Join(r.cfg.StateDir, "runsc"))
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := bytes.Split(bytes.TrimRight(b, "\x00"), []byte{0})
		if name := string(args[0]); name == "runsc-sandbox" || name == "runsc-gofer" {
			continue
		}
		for _, a := range args[1:] {
			if bytes.Equal(a, root) {
				r.cfg.Log.Info("found a runsc command left by an earlier run", "pid", pid, "cmd", strings.Join(strings.Fields(string(bytes.ReplaceAll(b, []byte{0}, []byte{' '}))), " "))
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}

// exited reports whether process pid is gone or a zombie.
func exited(pid int) bool {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return true
	}
	// The state follows the command name, which is in parentheses and may
	// itself hold any character.
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] == 'Z' || b[i+2] == 'X'
}
