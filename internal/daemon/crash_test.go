package daemon_test

// Regression tests for issue 7: daemon crashes, restarts and stops while
// sandboxes are stuck or busy. Most run the real daemon binary as its own
// process (startPatient, restart_test.go's harness with a longer start
// deadline) so that it can be killed with SIGKILL, and check what the next
// daemon shows against the store, runsc's processes and the data directory.
//
// The machine's speed varies several-fold from day to day: every wait here
// polls for a state with a generous deadline, and none sleeps a fixed time
// to synchronise.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/internal/testenv"
	"github.com/pandastack/pandastack/wire"
)

// long bounds every wait that involves sandboxes or a daemon's start or
// stop.
const long = 3 * time.Minute

// noWarmPool keeps the daemons of these tests without warm sandboxes: they
// have no record, and would blur the counts of processes and disk use.
var noWarmPool = []string{"--warm-pool", "0"}

// eventually polls cond until it reports true; after long the test fails
// with the last status cond gave.
func eventually(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(long)
	for {
		ok, status := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v; last: %s", what, long, status)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// crashDataDir returns a data directory for daemons that may be killed: when
// the test ends (after its daemons were stopped) whatever sandbox process is
// still left of it is killed, and runsc's network namespace mount released.
func crashDataDir(t *testing.T) string {
	t.Helper()
	dataDir := t.TempDir()
	t.Cleanup(func() {
		for pid, id := range sandboxProcs(dataDir) {
			t.Logf("killing process %d of sandbox %s left at the end of the test", pid, id)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		exec.Command("umount", "-l", filepath.Join(dataDir, "runtime", "runsc", "null-netns")).Run()
	})
	return dataDir
}

// startPatient is startProc (restart_test.go) with a deadline for the
// daemon to listen fit for these tests: the start settles what the earlier
// daemon left, and a sandbox whose agent does not answer costs it the
// agent timeout (10 s) on top of everything else; startProc allows about
// 15 s in all.
func startPatient(t *testing.T, dataDir string, extra ...string) *proc {
	t.Helper()
	runsc := testenv.Runsc(t)
	testenv.Template(t, "base")
	port := freePort(t)
	logPath := filepath.Join(t.TempDir(), "server.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	args := append([]string{"serve", "--listen", fmt.Sprintf("127.0.0.1:%d", port), "--data-dir", dataDir,
		"--template-dir", testenv.TemplateDir(), "--runsc", runsc, "--agent", testenv.Agent(t),
		"--build-templates=false", "--reap-interval", "200ms", "--metrics-listen", "127.0.0.1:0"}, extra...)
	cmd := exec.Command(testenv.Daemon(t), args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logf.Close()
	p := &proc{cmd: cmd, log: logPath}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Signal(syscall.SIGTERM)
			cmd.Wait()
		}
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("server log (%s):\n%s", dataDir, b)
		}
	})
	url := fmt.Sprintf("http://127.0.0.1:%d", port)
	eventually(t, "the daemon listens", func() (bool, string) {
		resp, err := http.Get(url + "/v1/health")
		if err != nil {
			if st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", cmd.Process.Pid)); strings.Contains(string(st), ") Z ") {
				b, _ := os.ReadFile(logPath)
				t.Fatalf("the daemon exited at its start:\n%s", b)
			}
			return false, err.Error()
		}
		resp.Body.Close()
		return true, ""
	})
	key, err := os.ReadFile(filepath.Join(dataDir, "api-key"))
	if err != nil {
		t.Fatal(err)
	}
	p.Server = &daemontest.Server{URL: url, Key: strings.TrimSpace(string(key)), DataDir: dataDir}
	return p
}

// stopWithin signals the daemon and waits at most d for it to exit; it
// returns how long the exit took.
func (p *proc) stopWithin(t *testing.T, sig syscall.Signal, d time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.cmd.Wait() }()
	select {
	case err := <-done:
		if sig != syscall.SIGKILL && err != nil {
			t.Errorf("daemon exited with %v after %v", err, sig)
		}
		return time.Since(start)
	case <-time.After(d):
		_ = p.cmd.Process.Kill()
		<-done
		t.Fatalf("daemon still running %v after %v (killed it)", d, sig)
		return 0
	}
}

// send sends one request with the server's key and returns the response
// with its body unread; unlike Server.Do it reports errors instead of
// failing the test, for requests that a killed daemon cuts.
func send(ctx context.Context, s *daemontest.Server, method, path string, body any, hdr ...string) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		j, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = strings.NewReader(string(j))
	}
	req, err := http.NewRequestWithContext(ctx, method, s.URL+path, rd)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+s.Key)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	return http.DefaultClient.Do(req)
}

// doWithin is Server.Do for a server that must answer within d: a server
// that hangs fails the test instead of hanging it.
func doWithin(t *testing.T, s *daemontest.Server, d time.Duration, method, path string) (int, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	start := time.Now()
	resp, err := send(ctx, s, method, path, nil)
	if err != nil {
		t.Fatalf("%s %s: no answer after %v: %v", method, path, time.Since(start).Round(time.Millisecond), err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the answer: %v", method, path, err)
	}
	return resp.StatusCode, b
}

// sandboxState returns the HTTP status of GET on the sandbox and the state
// it shows.
func sandboxState(t *testing.T, s *daemontest.Server, id string) (int, string) {
	t.Helper()
	code, b := doWithin(t, s, long, "GET", "/v1/sandboxes/"+id)
	var sb wire.Sandbox
	_ = json.Unmarshal(b, &sb)
	return code, sb.State
}

// listSandboxes returns the sandboxes the server shows, by id.
func listSandboxes(t *testing.T, s *daemontest.Server) map[string]wire.Sandbox {
	t.Helper()
	code, b := doWithin(t, s, long, "GET", "/v1/sandboxes")
	var l wire.SandboxList
	if err := json.Unmarshal(b, &l); code != http.StatusOK || err != nil {
		t.Fatalf("listing sandboxes: %d %s", code, b)
	}
	out := make(map[string]wire.Sandbox, len(l.Sandboxes))
	for _, sb := range l.Sandboxes {
		out[sb.ID] = sb
	}
	return out
}

// listSnapshots returns the ids of the snapshots the server shows.
func listSnapshots(t *testing.T, s *daemontest.Server) []string {
	t.Helper()
	code, b := doWithin(t, s, long, "GET", "/v1/snapshots")
	var l wire.SnapshotList
	if err := json.Unmarshal(b, &l); code != http.StatusOK || err != nil {
		t.Fatalf("listing snapshots: %d %s", code, b)
	}
	var ids []string
	for _, sn := range l.Snapshots {
		ids = append(ids, sn.ID)
	}
	sort.Strings(ids)
	return ids
}

// dirNames returns the sorted names in dir (none when it does not exist).
func dirNames(dir string) []string {
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	return names
}

var sandboxDirRE = regexp.MustCompile(`/runtime/sandboxes/(sb-[0-9a-f]+)`)

// sandboxProcs returns the host processes (runsc and the sandboxes'
// sentries and gofers) of sandboxes under dataDir, pid → sandbox id: every
// runsc call names the sandbox's directory on its command line.
func sandboxProcs(dataDir string) map[int]string {
	out := map[int]string{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !strings.Contains(string(b), dataDir+"/runtime/sandboxes/") {
			continue
		}
		if m := sandboxDirRE.FindStringSubmatch(string(b)); m != nil {
			out[pid] = m[1]
		}
	}
	return out
}

// diskUsage returns the bytes of disk that the files under dir use,
// leaving out the reserve file (64 MiB that the daemon keeps or gives
// back depending on free space).
func diskUsage(dir string) int64 {
	var n int64
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == filepath.Join(dir, "reserve") {
			return nil
		}
		if fi, err := d.Info(); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				n += st.Blocks * 512
			}
		}
		return nil
	})
	return n
}

// duSummary lists the largest entries under dir, for failure messages.
func duSummary(dir string) string {
	out, _ := exec.Command("sh", "-c", "du -a -k "+dir+" | sort -n -r | head -n 15").CombinedOutput()
	return string(out)
}

// checkConsistent checks the data directory of a daemon that has started
// against what its API shows: no checkpoint in progress in tmp/, a
// snapshot directory for every snapshot record and no directory without a
// record, no fork image or half-written snapshot of the older layout
// anywhere, a pause image for every paused sandbox and none other, and no
// sandbox directory or host process of a sandbox the API does not show
// running.
func checkConsistent(t *testing.T, s *daemontest.Server) {
	t.Helper()
	dataDir := s.DataDir
	if names := dirNames(filepath.Join(dataDir, "tmp")); len(names) > 0 {
		t.Errorf("tmp/ holds %v after the restart, want nothing", names)
	}
	if got, want := dirNames(filepath.Join(dataDir, "snapshots")), listSnapshots(t, s); !slices.Equal(got, want) {
		t.Errorf("snapshot directories %v, records %v: want the same", got, want)
	}
	_ = filepath.WalkDir(dataDir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && (strings.HasPrefix(d.Name(), ".fork-") || strings.HasSuffix(d.Name(), ".saving")) {
			t.Errorf("leftover %s", p)
		}
		return nil
	})
	sbs := listSandboxes(t, s)
	var paused []string
	for id, sb := range sbs {
		if sb.State == wire.StatePaused {
			paused = append(paused, id)
		}
	}
	sort.Strings(paused)
	if got := dirNames(filepath.Join(dataDir, "paused")); !slices.Equal(got, paused) {
		t.Errorf("pause images %v, paused sandboxes %v: want the same", got, paused)
	}
	for _, id := range dirNames(filepath.Join(dataDir, "runtime", "sandboxes")) {
		if sbs[id].State != wire.StateRunning {
			t.Errorf("sandbox directory %s left of a sandbox the API shows as %q", id, sbs[id].State)
		}
	}
	// Processes SIGKILLed at the start may take a moment to go.
	eventually(t, "no process of a sandbox the API does not show running", func() (bool, string) {
		var stray []string
		for pid, id := range sandboxProcs(dataDir) {
			if sbs[id].State != wire.StateRunning {
				stray = append(stray, fmt.Sprintf("%d (%s)", pid, id))
			}
		}
		return len(stray) == 0, fmt.Sprintf("processes %v", stray)
	})
}

// holdMemory makes a process in the sandbox hold mb MiB of memory and waits
// until it does, so that checkpoints of the sandbox take a while.
func holdMemory(t *testing.T, s *daemontest.Server, id string, mb int) {
	t.Helper()
	startHolder(t, s, id, mb)
	waitHeld(t, s, id, mb)
}

// startHolder starts the memory holder of holdMemory. The memory is not
// zeros: a checkpoint leaves out pages that are.
func startHolder(t *testing.T, s *daemontest.Server, id string, mb int) {
	t.Helper()
	cmd := fmt.Sprintf(`perl -e '@a = map { "m" x (64<<20) } 1..%d; open(F, ">$ENV{HOME}/held"); close(F); sleep 1e6' </dev/null >/dev/null 2>&1 &`, mb/64)
	if res := s.Exec(t, id, wire.ExecRequest{Cmd: cmd}); res.ExitCode != 0 {
		t.Fatalf("starting the memory holder: %+v", res)
	}
}

// waitHeld waits until the holder started by startHolder holds its memory.
func waitHeld(t *testing.T, s *daemontest.Server, id string, mb int) {
	t.Helper()
	eventually(t, "the sandbox holds its memory", func() (bool, string) {
		kb, status := heldKB(t, s, id)
		return kb >= mb*1024*9/10, status
	})
}

// heldKB returns the memory (KiB) the holder of holdMemory has in use once
// it holds all of it, else 0.
func heldKB(t *testing.T, s *daemontest.Server, id string) (int, string) {
	t.Helper()
	res := s.Exec(t, id, wire.ExecRequest{Cmd: "test -e $HOME/held && ps -C perl -o rss="})
	kb, _ := strconv.Atoi(strings.TrimSpace(res.Stdout))
	return kb, fmt.Sprintf("holder: %+v", res)
}

// checkKeeps checks that the sandbox still has its marker file and, when
// heldMB > 0, its memory holder with all its memory (a paused sandbox is
// resumed by the exec).
func checkKeeps(t *testing.T, s *daemontest.Server, id, marker string, heldMB int) {
	t.Helper()
	res := s.Exec(t, id, wire.ExecRequest{Cmd: "cat $HOME/marker"})
	if res.Stdout != marker+"\n" {
		t.Errorf("%s: marker: got %q, want %q (%+v)", id, res.Stdout, marker+"\n", res)
	}
	if heldMB > 0 {
		if kb, status := heldKB(t, s, id); kb < heldMB*1024*9/10 {
			t.Errorf("%s: memory holder: got %d KiB, want ≥ %d (%s)", id, kb, heldMB*1024*9/10, status)
		}
	}
}

// agentStopped reports whether the sandbox's PID 1, its agent, is stopped,
// asking gVisor itself (runsc exec), not the agent.
func agentStopped(t *testing.T, dataDir, id string) (bool, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, testenv.Runsc(t), "--root="+filepath.Join(dataDir, "runtime", "runsc"),
		"exec", id, "cat", "/proc/1/status").CombinedOutput()
	if err != nil {
		return false, fmt.Sprintf("runsc exec: %v: %s", err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "State:") {
			return strings.Contains(l, "T (stopped)"), l
		}
	}
	return false, string(out)
}

// stopAgentCmd stops the sandbox's agent half a second after the exec that
// runs it has returned.
const stopAgentCmd = "(sleep 0.5; kill -STOP 1) >/dev/null 2>&1 &"

// TestStoppedAgent reproduces B1: a sandbox whose agent was stopped from
// inside (SIGSTOP to PID 1) froze the server (list and get waited on it)
// and blocked a restart (the next daemon waited for its agent for ever).
// Now the server keeps answering; after a kill -9 the next daemon listens
// within a bounded time, ends the stopped sandbox as failed with nothing of
// it left, and re-adopts the healthy one; a graceful stop that destroys
// sandboxes exits in bounded time.
func TestStoppedAgent(t *testing.T) {
	for _, tc := range []struct {
		name string
		sig  syscall.Signal
		// flags of the first daemon.
		flags []string
	}{
		{"kill -9 and restart", syscall.SIGKILL, nil},
		{"SIGTERM with --on-shutdown kill", syscall.SIGTERM, []string{"--on-shutdown", "kill"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dataDir := crashDataDir(t)
			p1 := startPatient(t, dataDir, append(slices.Clone(noWarmPool), tc.flags...)...)
			healthy := p1.Create(t, wire.CreateSandboxRequest{TTLSeconds: 600})
			p1.Exec(t, healthy.ID, wire.ExecRequest{Cmd: "echo healthy > $HOME/marker"})
			stuck := p1.Create(t, wire.CreateSandboxRequest{TTLSeconds: 600})
			if res := p1.Exec(t, stuck.ID, wire.ExecRequest{Cmd: stopAgentCmd, User: wire.UserRoot}); res.ExitCode != 0 {
				t.Fatalf("stopping the agent: %+v", res)
			}
			eventually(t, "the agent is stopped", func() (bool, string) { return agentStopped(t, dataDir, stuck.ID) })

			// A command sent to the stopped agent hangs (its timeout is
			// long); the server must go on answering around it.
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			execDone := make(chan struct{})
			go func() {
				defer close(execDone)
				if resp, err := send(ctx, p1.Server, "POST", "/v1/sandboxes/"+stuck.ID+"/exec", wire.ExecRequest{Cmd: "true", TimeoutSeconds: 600}); err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}()
			for _, path := range []string{"/v1/health", "/v1/sandboxes", "/v1/sandboxes/" + stuck.ID, "/v1/sandboxes/" + healthy.ID} {
				if code, b := doWithin(t, p1.Server, long, "GET", path); code != http.StatusOK {
					t.Errorf("GET %s with a stopped agent: %d %s, want 200", path, code, b)
				}
			}

			took := p1.stopWithin(t, tc.sig, long)
			t.Logf("daemon exited %v after %v", took.Round(time.Millisecond), tc.sig)
			<-execDone

			if tc.sig == syscall.SIGTERM {
				// --on-shutdown kill destroyed both.
				for _, id := range []string{stuck.ID, healthy.ID} {
					if s := recordState(t, dataDir, id); s != wire.StateStopped {
						t.Errorf("%s: record after SIGTERM: got %q, want %q", id, s, wire.StateStopped)
					}
					if procs := runscProcs(id); procs != "" {
						t.Errorf("%s: processes left after SIGTERM: %s", id, procs)
					}
				}
				return
			}

			start := time.Now()
			p2 := startPatient(t, dataDir, noWarmPool...)
			t.Logf("next daemon listened after %v", time.Since(start).Round(time.Millisecond))
			if code, _ := sandboxState(t, p2.Server, stuck.ID); code != http.StatusNotFound {
				t.Errorf("stopped sandbox after restart: GET %d, want 404", code)
			}
			if s := recordState(t, dataDir, stuck.ID); s != wire.StateFailed {
				t.Errorf("stopped sandbox's record: got %q, want %q", s, wire.StateFailed)
			}
			eventually(t, "no process of the stopped sandbox", func() (bool, string) {
				procs := runscProcs(stuck.ID)
				return procs == "", "processes " + procs
			})
			if _, err := os.Stat(filepath.Join(dataDir, "runtime", "sandboxes", stuck.ID)); !os.IsNotExist(err) {
				t.Errorf("stopped sandbox's directory: %v, want it gone", err)
			}
			if code, state := sandboxState(t, p2.Server, healthy.ID); code != http.StatusOK || state != wire.StateRunning {
				t.Errorf("healthy sandbox after restart: %d %q, want 200 %q", code, state, wire.StateRunning)
			}
			checkKeeps(t, p2.Server, healthy.ID, "healthy", 0)
			checkConsistent(t, p2.Server)
		})
	}
}

// opResult is what a request cut by a kill -9 got.
type opResult struct {
	status int
	body   string
	err    error
}

func (r opResult) String() string {
	if r.err != nil {
		return "cut (" + r.err.Error() + ")"
	}
	return fmt.Sprintf("completed before the kill (%d)", r.status)
}

// TestCrashMidCheckpoint reproduces B4: a kill -9 of the daemon during a
// pause, a snapshot and a fork lost sandboxes (a pause half-way left a
// sandbox recorded running without processes, or paused without a
// complete image) and leaked disk (checkpoints in progress, fork images,
// snapshot directories without a record). Each sandbox holds a GiB of
// memory so that its checkpoint takes a while; the kill comes while
// checkpoints are written, as the pause completes, or while the fork's copy
// is restored. After the restart nothing that existed is lost, every
// sandbox keeps its files and processes, the data directory matches the
// API, and once everything is deleted the disk use is back to that of an
// empty server.
//
// It also caught the runsc commands the killed daemon left running: a
// checkpoint whose runsc had not yet created its image went on after the
// next daemon had emptied tmp/, and left a GiB there for good (the runtime
// now waits for, or kills, such commands before the start settles
// anything).
func TestCrashMidCheckpoint(t *testing.T) {
	const heldMB = 1024
	for _, tc := range []struct {
		name string
		// killNow reports, from the data directory and the operations
		// done, that it is time for the kill.
		killNow func(dataDir string, done map[string]bool) bool
	}{
		{"while checkpointing", func(dataDir string, done map[string]bool) bool {
			// As soon as all three have their checkpoint directories
			// (their runsc commands may not even have started), or one
			// is done.
			n := 0
			for _, name := range dirNames(filepath.Join(dataDir, "tmp")) {
				if strings.HasPrefix(name, "ckpt-") {
					n++
				}
			}
			return n >= 3 || len(done) > 0
		}},
		{"as the pause completes", func(dataDir string, done map[string]bool) bool {
			// Its image is in place; its record and runtime follow.
			return len(dirNames(filepath.Join(dataDir, "paused"))) > 0 || done["pause"]
		}},
		{"while the fork restores", func(dataDir string, done map[string]bool) bool {
			// The fork's image is complete and its copy is starting.
			return slices.ContainsFunc(dirNames(filepath.Join(dataDir, "tmp")), func(n string) bool { return strings.HasPrefix(n, "fork-") }) || done["fork"]
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dataDir := crashDataDir(t)
			p1 := startPatient(t, dataDir, noWarmPool...)
			emptyUsage := diskUsage(dataDir)

			// One sandbox for each operation, each with a marker file
			// and a GiB of memory in use.
			ops := []string{"pause", "snapshot", "fork"}
			sbs := map[string]wire.Sandbox{}
			for _, op := range ops {
				sb := p1.Create(t, wire.CreateSandboxRequest{TTLSeconds: 900, MemoryMB: 2048, Metadata: map[string]string{"op": op}})
				sbs[op] = sb
				p1.Exec(t, sb.ID, wire.ExecRequest{Cmd: "echo " + op + " > $HOME/marker"})
				startHolder(t, p1.Server, sb.ID, heldMB)
			}
			for _, op := range ops {
				waitHeld(t, p1.Server, sbs[op].ID, heldMB)
			}

			// The three operations at once; the daemon is killed while
			// they run.
			paths := map[string]string{
				"pause":    "/v1/sandboxes/" + sbs["pause"].ID + "/pause",
				"snapshot": "/v1/sandboxes/" + sbs["snapshot"].ID + "/snapshot",
				"fork":     "/v1/sandboxes/" + sbs["fork"].ID + "/fork",
			}
			var (
				wg      sync.WaitGroup
				mu      sync.Mutex
				results = map[string]opResult{}
			)
			for _, op := range ops {
				wg.Add(1)
				go func() {
					defer wg.Done()
					var r opResult
					resp, err := send(context.Background(), p1.Server, "POST", paths[op], nil)
					if err == nil {
						b, rerr := io.ReadAll(resp.Body)
						resp.Body.Close()
						r = opResult{status: resp.StatusCode, body: string(b), err: rerr}
					} else {
						r.err = err
					}
					mu.Lock()
					results[op] = r
					mu.Unlock()
				}()
			}
			deadline := time.Now().Add(long)
			for {
				done := map[string]bool{}
				mu.Lock()
				for op := range results {
					done[op] = true
				}
				mu.Unlock()
				if tc.killNow(dataDir, done) {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the moment for the kill did not come within %v", long)
				}
				time.Sleep(2 * time.Millisecond)
			}
			p1.stopWithin(t, syscall.SIGKILL, long)
			t.Logf("killed the daemon; tmp/ holds %v, paused/ %v, snapshots/ %v", dirNames(filepath.Join(dataDir, "tmp")),
				dirNames(filepath.Join(dataDir, "paused")), dirNames(filepath.Join(dataDir, "snapshots")))
			wg.Wait()
			cut := 0
			for _, op := range ops {
				t.Logf("%s: %v", op, results[op])
				if results[op].err != nil {
					cut++
				}
			}
			if cut == 0 {
				t.Logf("every operation completed before the kill: this run proves less")
			}

			p2 := startPatient(t, dataDir, noWarmPool...)
			if b, err := os.ReadFile(p2.log); err == nil {
				for _, l := range strings.Split(string(b), "\n") {
					if strings.Contains(l, "left by an earlier run") {
						t.Logf("next daemon: %s", l)
					}
				}
			}
			// Nothing that existed is lost: each sandbox runs or is
			// paused, and keeps its marker and its memory holder.
			for _, op := range ops {
				code, state := sandboxState(t, p2.Server, sbs[op].ID)
				t.Logf("%s sandbox after the restart: %d %s", op, code, state)
				if code != http.StatusOK || (state != wire.StateRunning && state != wire.StatePaused) {
					t.Errorf("%s sandbox after the restart: %d %q, want 200 running or paused", op, code, state)
				}
			}
			if results["pause"].err == nil && results["pause"].status == http.StatusOK {
				if _, state := sandboxState(t, p2.Server, sbs["pause"].ID); state != wire.StatePaused {
					t.Errorf("sandbox paused before the kill: state %q after the restart, want %q", state, wire.StatePaused)
				}
			}
			checkConsistent(t, p2.Server)
			for _, op := range ops {
				checkKeeps(t, p2.Server, sbs[op].ID, op, heldMB)
			}
			// A snapshot made before the kill is kept and restores.
			snaps := listSnapshots(t, p2.Server)
			if r := results["snapshot"]; r.err == nil && r.status == http.StatusCreated {
				var sn wire.Snapshot
				_ = json.Unmarshal([]byte(r.body), &sn)
				if !slices.Contains(snaps, sn.ID) {
					t.Errorf("snapshot %s taken before the kill: missing after the restart (have %v)", sn.ID, snaps)
				}
			}
			for _, id := range snaps {
				sb := p2.Create(t, wire.CreateSandboxRequest{SnapshotID: id, TTLSeconds: 300})
				checkKeeps(t, p2.Server, sb.ID, "snapshot", heldMB)
			}
			// A fork that completed left running copies; one cut short may
			// have left a copy it had made (running, with the parent's
			// files) or none.
			for id, sb := range listSandboxes(t, p2.Server) {
				if sb.Metadata["op"] == "fork" && id != sbs["fork"].ID {
					t.Logf("fork copy %s: %s", id, sb.State)
					checkKeeps(t, p2.Server, id, "fork", heldMB)
				}
			}
			if r := results["fork"]; r.err == nil && r.status == http.StatusCreated {
				var fr wire.ForkResponse
				_ = json.Unmarshal([]byte(r.body), &fr)
				for _, c := range fr.Sandboxes {
					if code, state := sandboxState(t, p2.Server, c.ID); code != http.StatusOK {
						t.Errorf("fork copy %s made before the kill: %d %q after the restart, want 200", c.ID, code, state)
					}
				}
			}

			// Deleting everything gives the disk back.
			for id := range listSandboxes(t, p2.Server) {
				if code, b := doWithin(t, p2.Server, long, "DELETE", "/v1/sandboxes/"+id); code != http.StatusNoContent {
					t.Errorf("deleting sandbox %s: %d %s", id, code, b)
				}
			}
			for _, id := range listSnapshots(t, p2.Server) {
				if code, b := doWithin(t, p2.Server, long, "DELETE", "/v1/snapshots/"+id); code != http.StatusNoContent {
					t.Errorf("deleting snapshot %s: %d %s", id, code, b)
				}
			}
			checkConsistent(t, p2.Server)
			// Deletes free their files before they answer. The slack covers
			// the store's growth and the agent binary (installed at the
			// first create); a leaked image is a GiB.
			const slack = 32 << 20
			if n := diskUsage(dataDir); n > emptyUsage+slack {
				t.Errorf("disk use after deleting everything: got %d MiB, want at most %d MiB (an empty server's %d MiB + %d MiB):\n%s",
					n>>20, (emptyUsage+slack)>>20, emptyUsage>>20, slack>>20, duSummary(dataDir))
			}
		})
	}
}

// TestShutdownPauseWithStream reproduces B3: with --on-shutdown pause, a
// streaming exec that outlives the 10 s given to in-flight requests used up
// the one context that the pauses shared with them, so the pause failed and
// the sandbox was destroyed. Now the daemon exits in bounded time and the
// next one finds the sandbox paused, with its files.
func TestShutdownPauseWithStream(t *testing.T) {
	dataDir := crashDataDir(t)
	p1 := startPatient(t, dataDir, append(slices.Clone(noWarmPool), "--on-shutdown", "pause")...)
	sb := p1.Create(t, wire.CreateSandboxRequest{TTLSeconds: 600})
	p1.Exec(t, sb.ID, wire.ExecRequest{Cmd: "echo kept > $HOME/marker"})

	// A stream that would last ten minutes, kept open by the test.
	resp, err := send(context.Background(), p1.Server, "POST", "/v1/sandboxes/"+sb.ID+"/exec",
		wire.ExecRequest{Cmd: "echo started; sleep 600", TimeoutSeconds: 900}, "Accept", "application/x-ndjson")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	events := bufio.NewScanner(resp.Body)
	if !events.Scan() || !strings.Contains(events.Text(), "started") {
		t.Fatalf("stream: got %q (%v), want the command's first output", events.Text(), events.Err())
	}
	streamEnded := make(chan struct{})
	go func() {
		defer close(streamEnded)
		for events.Scan() {
		}
	}()

	took := p1.stopWithin(t, syscall.SIGTERM, long)
	t.Logf("daemon exited %v after SIGTERM", took.Round(time.Millisecond))
	select {
	case <-streamEnded:
	case <-time.After(long):
		t.Errorf("the stream did not end within %v of the daemon's exit", long)
	}
	if s := recordState(t, dataDir, sb.ID); s != wire.StatePaused {
		t.Errorf("record after SIGTERM: got %q, want %q", s, wire.StatePaused)
	}
	if procs := runscProcs(sb.ID); procs != "" {
		t.Errorf("processes of the paused sandbox left: %s", procs)
	}

	p2 := startPatient(t, dataDir, noWarmPool...)
	if code, state := sandboxState(t, p2.Server, sb.ID); code != http.StatusOK || state != wire.StatePaused {
		t.Errorf("after restart: %d %q, want 200 %q", code, state, wire.StatePaused)
	}
	checkKeeps(t, p2.Server, sb.ID, "kept", 0)
}

// TestPauseOutlivesClient reproduces B3: a pause whose client hung up
// half-way was cancelled with the request, and the sandbox destroyed. Now
// the pause completes without the client: the sandbox shows running, then
// paused, never gone, and resumes with its files and memory.
func TestPauseOutlivesClient(t *testing.T) {
	const heldMB = 1024
	s := daemontest.Start(t, func(c *daemon.Config) { c.Sandbox.PoolSize = 0 })
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 600, MemoryMB: 2048})
	s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "echo kept > $HOME/marker"})
	holdMemory(t, s, sb.ID, heldMB)

	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	resp, err := send(ctx, s, "POST", "/v1/sandboxes/"+sb.ID+"/pause", nil)
	if err == nil {
		_, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Logf("the pause answered within 500 ms (%v): this run proves less", err)
	}

	var seen []string
	eventually(t, "the sandbox is paused", func() (bool, string) {
		code, state := sandboxState(t, s, sb.ID)
		if code != http.StatusOK || (state != wire.StateRunning && state != wire.StatePaused) {
			t.Fatalf("while pausing without its client: %d %q, want 200 running or paused (seen %v)", code, state, seen)
		}
		if len(seen) == 0 || seen[len(seen)-1] != state {
			seen = append(seen, state)
		}
		return state == wire.StatePaused, state
	})
	t.Logf("states seen: %v", seen)
	checkKeeps(t, s, sb.ID, "kept", heldMB)
}

// TestSnapshotRecordsMatchFiles reproduces B4: snapshot records and files
// drifted apart across restarts (a record whose files were gone failed at
// restore; files without a record were never freed). The next daemon drops
// a record whose directory is gone, removes directories and pause images
// nobody owns (also names of the older layout), and keeps the rest usable.
func TestSnapshotRecordsMatchFiles(t *testing.T) {
	dataDir := crashDataDir(t)
	p1 := startPatient(t, dataDir, noWarmPool...)
	src := p1.Create(t, wire.CreateSandboxRequest{TTLSeconds: 600})
	p1.Exec(t, src.ID, wire.ExecRequest{Cmd: "echo snapped > $HOME/marker"})
	var snaps []string
	for range 3 {
		sn := post[wire.Snapshot](t, p1.Server, "/v1/sandboxes/"+src.ID+"/snapshot", nil, http.StatusCreated)
		snaps = append(snaps, sn.ID)
	}
	p1.stopWithin(t, syscall.SIGKILL, long)

	lost := snaps[1]
	if err := os.RemoveAll(filepath.Join(dataDir, "snapshots", lost)); err != nil {
		t.Fatal(err)
	}
	strays := []struct{ dir, name string }{
		{"snapshots", "snap-00000000000000ff"},        // files without a record
		{"snapshots", "snap-00000000000000fe.saving"}, // a snapshot half-written by an older daemon
		{"snapshots", ".fork-00000000000000fd"},       // a fork image of an older daemon
		{"paused", "sb-00000000000000fc"},             // a pause image without a sandbox
	}
	for _, s := range strays {
		p := filepath.Join(dataDir, s.dir, s.name)
		if err := os.MkdirAll(p, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(p, "pages"), []byte("stray"), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	p2 := startPatient(t, dataDir, noWarmPool...)
	want := []string{snaps[0], snaps[2]}
	sort.Strings(want)
	if got := listSnapshots(t, p2.Server); !slices.Equal(got, want) {
		t.Errorf("snapshots after restart: got %v, want %v (%s lost its files)", got, want, lost)
	}
	if code, _ := doWithin(t, p2.Server, long, "GET", "/v1/snapshots/"+lost); code != http.StatusNotFound {
		t.Errorf("snapshot without files: GET %d, want 404", code)
	}
	for _, s := range strays {
		if _, err := os.Stat(filepath.Join(dataDir, s.dir, s.name)); !os.IsNotExist(err) {
			t.Errorf("stray %s/%s: %v, want it removed", s.dir, s.name, err)
		}
	}
	checkConsistent(t, p2.Server)
	for _, id := range want {
		sb := p2.Create(t, wire.CreateSandboxRequest{SnapshotID: id, TTLSeconds: 300})
		checkKeeps(t, p2.Server, sb.ID, "snapped", 0)
	}
	checkKeeps(t, p2.Server, src.ID, "snapped", 0)
}
