package agent

import (
	"context"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// killStressRounds is how many rounds TestKillSparesConcurrentExecs runs;
// PANDASTACK_KILL_STRESS_ROUNDS raises it for a long stress run.
func killStressRounds(t *testing.T, def int) int {
	if s := os.Getenv("PANDASTACK_KILL_STRESS_ROUNDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("PANDASTACK_KILL_STRESS_ROUNDS: %v", err)
		}
		return n
	}
	return def
}

func TestKillSparesConcurrentExecs(t *testing.T) {
	// Regression: the kill of an exec whose caller went away (or that
	// timed out) ran while the agent started another exec. Between fork
	// and execve the new child is a copy of the agent and holds every
	// descriptor the agent holds, the dying exec's pipes among them
	// (close-on-exec closes them only at execve), so the kill took it for
	// a holder of those pipes and SIGKILLed it: `echo again` ended with
	// SIGKILL, no output, and no error.
	var killMu sync.Mutex
	var kills []killStats
	c, _ := startAgent(t, func(s *Server) {
		s.onKill = func(st killStats) {
			killMu.Lock()
			kills = append(kills, st)
			killMu.Unlock()
		}
	})
	// A large environment makes execve slow to copy it, and the child
	// holds the agent's descriptors until execve is past that: it widens
	// the window in which a kill could mistake it for a holder.
	var bigEnv []string
	for i := range 9 {
		bigEnv = append(bigEnv, fmt.Sprintf("PANDASTACK_PAD%d=%s", i, strings.Repeat("x", 100<<10)))
	}
	// Short execs start all the time, on every core, while execs are
	// killed, and every one of them must report its output.
	stop := make(chan struct{})
	var shorts sync.WaitGroup
	stopShorts := sync.OnceFunc(func() {
		close(stop)
		shorts.Wait()
	})
	defer stopShorts()
	var shortMu sync.Mutex
	var bad []string
	var nshort int
	for g := range max(2, 2*runtime.NumCPU()) {
		shorts.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				want := fmt.Sprintf("again %d %d\n", g, i)
				r := runExec(context.Background(), c, ExecRequest{Argv: []string{"echo", "again", strconv.Itoa(g), strconv.Itoa(i)}, Env: bigEnv, TimeoutMS: neverMS}, ExecIO{})
				shortMu.Lock()
				nshort++
				if r.err != nil || r.stdout != want || r.exit.ExitCode != 0 || r.exit.Signal != 0 {
					bad = append(bad, fmt.Sprintf("got %q, %+v, %v, want %q and exit 0", r.stdout, r.exit, r.err, want))
				}
				shortMu.Unlock()
			}
		})
	}
	const long = 3
	rounds := killStressRounds(t, 40)
	wantKills := 0
	for range rounds {
		ctx, cancel := context.WithCancel(context.Background())
		var longs sync.WaitGroup
		ready := make([]*lineWaiter, long)
		ended := make([]chan execResult, long)
		for i := range long {
			ready[i] = newLineWaiter("ready\n")
			ended[i] = make(chan execResult, 1)
			longs.Go(func() {
				ended[i] <- runExec(ctx, c, ExecRequest{Argv: sh("echo ready; exec sleep 30"), TimeoutMS: neverMS}, ExecIO{Stdout: ready[i].write})
			})
		}
		for i, r := range ready {
			select {
			case <-r.seen:
				wantKills++
			case res := <-ended[i]:
				// Killed before it got to run: by another exec's kill.
				shortMu.Lock()
				bad = append(bad, fmt.Sprintf("long exec ended before it was cancelled: got %q, %+v, %v", res.stdout, res.exit, res.err))
				shortMu.Unlock()
			case <-time.After(patience):
				t.Fatalf("output %q never contained %q", r.String(), "ready\n")
			}
		}
		cancel()
		longs.Wait()
		// The Exec calls return at once; the kills run on in the agent.
		// The next round starts when they are over.
		deadline := time.Now().Add(patience)
		for {
			killMu.Lock()
			n := len(kills)
			killMu.Unlock()
			if n >= wantKills {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d kills, want %d", n, wantKills)
			}
			time.Sleep(time.Millisecond)
		}
	}
	stopShorts()
	killMu.Lock()
	var took, worst time.Duration
	for _, k := range kills {
		took += k.took
		worst = max(worst, k.took)
	}
	t.Logf("%d kills (%v on average, %v at most), %d short execs", len(kills), took/time.Duration(max(1, len(kills))), worst, nshort)
	killMu.Unlock()
	for i, b := range bad {
		if i == 10 {
			t.Errorf("... and %d more", len(bad)-10)
			break
		}
		t.Error(b)
	}
}

func TestKillWaitsForForks(t *testing.T) {
	// What TestKillSparesConcurrentExecs shows by chance, made certain:
	// a kill looks at /proc only while no Go code in the process is
	// forking. A fork holds syscall.ForkLock until its child has exec'd,
	// and until then the child holds every descriptor of the agent. Here
	// the test holds it, as a fork would, while an exec times out.
	killed := make(chan killStats, 1)
	c, _ := startAgent(t, func(s *Server) {
		s.onKill = func(st killStats) { killed <- st }
	})
	ready := newLineWaiter("ready\n")
	done := make(chan execResult, 1)
	const timeout = 200 * time.Millisecond
	var forking sync.Once
	release := func() { forking.Do(syscall.ForkLock.Unlock) }
	go func() {
		done <- runExec(context.Background(), c, ExecRequest{Argv: sh("echo ready; exec sleep 1000"), TimeoutMS: timeout.Milliseconds()}, ExecIO{Stdout: func(p []byte) error {
			return ready.write(p)
		}})
	}()
	ready.waitFor(t, patience)
	syscall.ForkLock.Lock()
	defer release()
	// Long enough for the timeout to fire and a kill that did not wait
	// to end; a kill that waits cannot end, however long this is.
	select {
	case st := <-killed:
		t.Fatalf("the kill looked at /proc while a fork was in progress: %+v", st)
	case <-time.After(timeout + time.Second):
	}
	release()
	select {
	case st := <-killed:
		if st.killed != 1 {
			t.Errorf("killed %d processes, want 1", st.killed)
		}
	case <-time.After(patience):
		t.Fatal("the kill did not end after the fork did")
	}
	if r := <-done; r.err != nil || !r.exit.TimedOut {
		t.Errorf("got %+v, %v, want a timeout", r.exit, r.err)
	}
}

// startFDHolders starts, through the agent, n processes that each hold
// about fds open descriptors (none of them a pipe of another exec) and run
// until the test ends: a big process table for a kill to look through.
// They are one exec's tree, so that the test process's reaper collects
// them; the exec is cancelled at cleanup.
func startFDHolders(t testing.TB, c *Client, n, fds int) {
	t.Helper()
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("bash not found:", err)
	}
	script := fmt.Sprintf(`for i in $(seq %d); do exec {fd}</dev/null; done
for i in $(seq %d); do sleep 1000 & done
echo ready
wait`, fds, n)
	ctx, cancel := context.WithCancel(context.Background())
	ready := newLineWaiter("ready\n")
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = runExec(ctx, c, ExecRequest{Argv: []string{bash, "-c", script}, TimeoutMS: neverMS}, ExecIO{Stdout: ready.write})
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	select {
	case <-ready.seen:
	case <-time.After(patience):
		t.Fatalf("the descriptor holders never got ready: %q", ready.String())
	}
}

// fakeFDs are the descriptors of fake processes: pid -> fd -> link.
type fakeFDs map[int]map[string]string

// kill returns an execKill of leader (self is 1) that reads these
// descriptors, and counts the reads per process in reads.
func (f fakeFDs) kill(leader int, pipeInodes []uint64, reads map[int]int) *execKill {
	k := newExecKill(leader, 1, pipeInodes)
	k.link = func(pid int, fd string) string {
		reads[pid]++
		return f[pid][fd]
	}
	k.eachFD = func(pid int, each func(string) bool) {
		var fds []string
		for fd := range f[pid] {
			fds = append(fds, fd)
		}
		slices.Sort(fds)
		for _, fd := range fds {
			if !each(fd) {
				return
			}
		}
	}
	return k
}

func TestExecKillFind(t *testing.T) {
	// 10 is the exec's process, 20 another live exec's; 1 the agent (self)
	// and init. The exec's pipes are 100 (stdout) and 101 (stderr).
	procs := map[int]procEntry{
		1:  {ppid: 0, pgid: 1},
		10: {ppid: 1, pgid: 10},
		11: {ppid: 10, pgid: 10}, // in the group
		12: {ppid: 10, pgid: 12}, // own session, child of the exec
		13: {ppid: 12, pgid: 12}, // its child
		14: {ppid: 1, pgid: 10},  // orphan still in the group
		15: {ppid: 1, pgid: 15},  // orphan of another exec
		16: {ppid: 15, pgid: 15},
		20: {ppid: 1, pgid: 20}, // another exec
		21: {ppid: 20, pgid: 20},
		30: {ppid: 1, pgid: 30},  // double-forked, kept stdout
		31: {ppid: 30, pgid: 30}, // its child
		40: {ppid: 1, pgid: 40},  // double-forked, stdout moved to fd 7
		50: {ppid: 1, pgid: 50},  // orphan, dropped stdio
		51: {ppid: 50, pgid: 51}, // its child kept stderr
		60: {ppid: 1, pgid: 1},   // a child of the agent being started
		70: {ppid: 5, pgid: 70},  // outside the agent's tree
		80: {ppid: 1, pgid: 80, zombie: true},
	}
	fds := fakeFDs{
		// Another exec's process that opened this exec's pipe through
		// /proc: that exec's, left alone.
		21: {"0": "/dev/null", "1": "pipe:[200]", "5": "pipe:[100]"},
		30: {"0": "/dev/null", "1": "pipe:[100]", "2": "pipe:[101]"},
		40: {"0": "/dev/null", "1": "/dev/null", "2": "/dev/null", "7": "pipe:[100]"},
		50: {"0": "/dev/null", "1": "/dev/null", "2": "/dev/null"},
		51: {"0": "/dev/null", "1": "/dev/null", "2": "pipe:[101]"},
		// Started while the kill looked (which killExec's locks rule
		// out): between fork and execve it holds every descriptor the
		// agent holds. It is an orphan to find, so it is found here.
		60: {"0": "/dev/null", "1": "/dev/null", "2": "/dev/null", "9": "pipe:[100]"},
		70: {"1": "pipe:[100]"},
		// Exited: /proc shows no descriptors, and none is read.
		80: {"1": "pipe:[100]"},
	}
	reads := make(map[int]int)
	k := fds.kill(10, []uint64{100, 101}, reads)
	got := k.find(procs, map[int]bool{20: true})
	want := []int{10, 11, 12, 13, 14, 30, 31, 40, 51, 60}
	if !slices.Equal(slices.Sorted(maps.Keys(got)), want) {
		t.Errorf("found %v, want %v", slices.Sorted(maps.Keys(got)), want)
	}
	// Only orphans are looked at, and a holder's children not at all.
	for pid := range reads {
		if !slices.Contains([]int{15, 16, 30, 40, 50, 51, 60}, pid) {
			t.Errorf("descriptors of %d read: it is not an orphan", pid)
		}
	}
	if reads[31] != 0 {
		t.Errorf("descriptors of 31 read: its parent was found")
	}
	// A second round looks at nobody again, and finds the same.
	clear(reads)
	got = k.find(procs, map[int]bool{20: true})
	if !slices.Equal(slices.Sorted(maps.Keys(got)), want) {
		t.Errorf("second round found %v, want %v", slices.Sorted(maps.Keys(got)), want)
	}
	if len(reads) > 0 {
		t.Errorf("second round read descriptors again: %v", reads)
	}
	// Without pipes, nothing is looked at.
	clear(reads)
	got = fds.kill(10, nil, reads).find(procs, map[int]bool{20: true})
	if want := []int{10, 11, 12, 13, 14}; !slices.Equal(slices.Sorted(maps.Keys(got)), want) {
		t.Errorf("without pipes: found %v, want %v", slices.Sorted(maps.Keys(got)), want)
	}
	// The agent is never part of it, even as its own process group.
	clear(reads)
	k = fds.kill(1, nil, reads)
	if got := k.find(map[int]procEntry{1: {pgid: 1}, 2: {ppid: 1, pgid: 1}}, nil); got[1] || !got[2] {
		t.Errorf("exec led by the agent's pid: got %v, want only 2", got)
	}
}

func TestExecKillFindBudget(t *testing.T) {
	// 1000 orphans of 100 descriptors each, the pipe on descriptor 99 of
	// the last and on descriptor 1 of another.
	procs := map[int]procEntry{1: {pgid: 1}, 10: {ppid: 1, pgid: 10}}
	fds := fakeFDs{}
	for pid := 100; pid < 1100; pid++ {
		procs[pid] = procEntry{ppid: 1, pgid: pid}
		m := make(map[string]string)
		for fd := range 100 {
			m[strconv.Itoa(fd)] = "/dev/null"
		}
		fds[pid] = m
	}
	fds[1099]["99"] = "pipe:[100]"
	fds[500]["1"] = "pipe:[100]"
	reads := make(map[int]int)
	k := fds.kill(10, []uint64{100}, reads)
	for range 3 {
		got := k.find(procs, nil)
		if !got[500] {
			t.Errorf("the orphan with the pipe on stdout not found")
		}
	}
	// Descriptors 0-2 of every orphan, and the budget; over all rounds.
	if max := 3*1000 + pipeScanBudget; k.stats.fdLinks > max {
		t.Errorf("read %d links, want at most %d", k.stats.fdLinks, max)
	}
	if k.stats.orphans != 1000 {
		t.Errorf("looked at %d orphans, want each of the 1000 once", k.stats.orphans)
	}
}

// startFDOrphans starts, through the agent, n orphans (double-forked, so
// reparented to the agent) that each hold about fds open descriptors, none
// of them the pipe of an exec, and run until the test ends.
func startFDOrphans(t *testing.T, c *Client, n, fds int) {
	t.Helper()
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("bash not found:", err)
	}
	script := fmt.Sprintf(`for i in $(seq %d); do exec {fd}</dev/null; done
for i in $(seq %d); do (sleep 1000 </dev/null >/dev/null 2>&1 & echo $!); done`, fds, n)
	r := runExec(context.Background(), c, ExecRequest{Argv: []string{bash, "-c", script}, TimeoutMS: neverMS}, ExecIO{})
	var pids []int
	for _, f := range strings.Fields(r.stdout) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	t.Cleanup(func() {
		for _, pid := range pids {
			_ = unix.Kill(pid, unix.SIGKILL)
		}
		for _, pid := range pids {
			waitProcessGone(pid, patience)
		}
	})
	if r.err != nil || r.exit.ExitCode != 0 || len(pids) != n {
		t.Fatalf("starting %d orphans: got %d, %+v, %v, stderr %q", n, len(pids), r.exit, r.err, r.stderr)
	}
}

func TestKillCostBounded(t *testing.T) {
	// Regression: every round of a kill read /proc/<pid>/fd of every
	// process there was, and a kill with a few hundred processes around
	// (a host's, a tenant's) took seconds, holding the exec and its slot.
	// Now only the agent's orphans are looked at, each once, at most
	// pipeScanBudget descriptors past 0-2 in all.
	var killMu sync.Mutex
	var kills []killStats
	c, _ := startAgent(t, func(s *Server) {
		s.onKill = func(st killStats) {
			killMu.Lock()
			kills = append(kills, st)
			killMu.Unlock()
		}
	})
	const n, fds = 300, 500
	kill := func(name string) killStats {
		t.Helper()
		killMu.Lock()
		kills = nil
		killMu.Unlock()
		r := runExec(context.Background(), c, ExecRequest{Argv: sh("exec sleep 1000"), TimeoutMS: 200}, ExecIO{})
		if r.err != nil || !r.exit.TimedOut {
			t.Fatalf("%s: got %+v, %v, want a timeout", name, r.exit, r.err)
		}
		killMu.Lock()
		defer killMu.Unlock()
		if len(kills) != 1 {
			t.Fatalf("%s: got %d kills, want 1", name, len(kills))
		}
		k := kills[0]
		t.Logf("%s: exec took %v with its timeout of 200ms; kill took %v: %d rounds, %d /proc entries, %d orphans looked at, %d descriptor links read, %d killed",
			name, r.dur, k.took, k.rounds, k.procs, k.orphans, k.fdLinks, k.killed)
		if k.killed != 1 {
			t.Errorf("%s: killed %d processes, want the exec's 1", name, k.killed)
		}
		return k
	}
	kill("alone")
	// Another exec's processes are never looked at. (Orphans that
	// earlier tests left may be: a few, with few descriptors.)
	startFDHolders(t, c, n, fds)
	if k := kill(fmt.Sprintf("with another exec of %d processes of %d descriptors", n, fds)); k.orphans >= n || k.fdLinks >= fds {
		t.Errorf("looked at %d processes, %d descriptors, want none of another exec's", k.orphans, k.fdLinks)
	}
	// Orphans are, each once, within the budget.
	startFDOrphans(t, c, n, fds)
	k := kill(fmt.Sprintf("and %d orphans of %d descriptors", n, fds))
	if k.orphans < n {
		t.Errorf("looked at %d orphans, want each of the %d", k.orphans, n)
	}
	if limit := 3*k.orphans + pipeScanBudget; k.fdLinks > limit {
		t.Errorf("read %d descriptor links, want at most %d", k.fdLinks, limit)
	}
}
