package daemon_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/wire"
)

// Regression tests for issue 7 against real sandboxes: what code inside a
// sandbox can do to its sandbox, to the host and to the server. Each test
// names the defect it reproduces. The lifecycle's locking and ordering are
// tested without gVisor in internal/sandbox.

// errorBody decodes an error answer.
func errorBody(t *testing.T, b []byte) wire.Error {
	t.Helper()
	var er wire.ErrorResponse
	if err := json.Unmarshal(b, &er); err != nil {
		t.Fatalf("decoding error body %q: %v", b, err)
	}
	return er.Error
}

// waitGone polls until the sandbox answers 404, with a generous deadline.
func waitGone(t *testing.T, s *daemontest.Server, id string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		resp, _ := s.Do(t, "GET", "/v1/sandboxes/"+id, nil)
		if resp.StatusCode == http.StatusNotFound {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("sandbox %s still there: status %d", id, resp.StatusCode)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// B1, C6: kill -STOP 1 (the agent) cannot freeze the server. The exec
// that stopped it answers once its timeout, the grace and a ping have
// passed — bounded by timers, not by the sandbox — naming the cause;
// meanwhile list, other sandboxes and TTL expiry go on; the sandbox ends.
// A paused sandbox saved with its agent stopped cannot hang a resume.
func TestStoppedAgentCannotFreezeTheServer(t *testing.T) {
	s := daemontest.Start(t, func(c *daemon.Config) {
		c.Sandbox.ExecGrace = time.Second
		c.Sandbox.AgentTimeout = 3 * time.Second
	})
	victim := s.Create(t, wire.CreateSandboxRequest{MemoryMB: 256})
	other := s.Create(t, wire.CreateSandboxRequest{MemoryMB: 256})
	short := s.Create(t, wire.CreateSandboxRequest{MemoryMB: 256, TTLSeconds: 1})

	type answer struct {
		status int
		body   []byte
	}
	done := make(chan answer, 1)
	go func() {
		resp, b := s.Do(t, "POST", "/v1/sandboxes/"+victim.ID+"/exec", wire.ExecRequest{Cmd: "kill -STOP 1; echo never", TimeoutSeconds: 10, User: wire.UserRoot})
		done <- answer{resp.StatusCode, b}
	}()
	// While the exec hangs (at least 10 s + 1 s + 3 s by the timers):
	// other work goes on.
	waitGone(t, s, short.ID)
	if res := s.Exec(t, other.ID, wire.ExecRequest{Cmd: "echo fine"}); res.Stdout != "fine\n" {
		t.Errorf("exec in another sandbox: got %q", res.Stdout)
	}
	if resp, b := s.Do(t, "GET", "/v1/sandboxes", nil); resp.StatusCode != http.StatusOK {
		t.Errorf("list: %d %s", resp.StatusCode, b)
	}
	select {
	case a := <-done:
		t.Fatalf("the exec answered before its own timeout: %d %s", a.status, a.body)
	default:
	}
	a := <-done
	if a.status != http.StatusServiceUnavailable || !strings.Contains(errorBody(t, a.body).Message, "stopped answering") {
		t.Errorf("exec that stopped the agent: got %d %s, want 503 saying the agent stopped answering", a.status, a.body)
	}
	waitGone(t, s, victim.ID)

	// Pause a sandbox whose agent is stopped, then resume it.
	paused := s.Create(t, wire.CreateSandboxRequest{MemoryMB: 256})
	s.Exec(t, paused.ID, wire.ExecRequest{Cmd: stopAgentCmd, User: wire.UserRoot})
	eventually(t, "the agent is stopped", func() (bool, string) { return agentStopped(t, s.DataDir, paused.ID) })
	if resp, b := s.Do(t, "POST", "/v1/sandboxes/"+paused.ID+"/pause", nil); resp.StatusCode != http.StatusOK {
		t.Fatalf("pause: %d %s", resp.StatusCode, b)
	}
	resumed := make(chan answer, 1)
	go func() {
		resp, b := s.Do(t, "POST", "/v1/sandboxes/"+paused.ID+"/resume", nil)
		resumed <- answer{resp.StatusCode, b}
	}()
	if resp, b := s.Do(t, "GET", "/v1/sandboxes", nil); resp.StatusCode != http.StatusOK {
		t.Errorf("list during the resume: %d %s", resp.StatusCode, b)
	}
	a = <-resumed
	if a.status != http.StatusServiceUnavailable || !strings.Contains(errorBody(t, a.body).Message, "did not answer") {
		t.Errorf("resume of a stopped agent: got %d %s, want 503 saying it did not answer", a.status, a.body)
	}
	waitGone(t, s, paused.ID)
}

// B2: init's stdout and stderr are no way to the host's disk: writing to
// /proc/1/fd/{1,2} fails (the agent is not dumpable) and the host's
// agent.log stays small; the sandbox lives on.
func TestInitStdioIsNotAHostFile(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{DiskMB: 64})
	res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "for fd in 1 2; do dd if=/dev/zero of=/proc/1/fd/$fd bs=1M count=200; done; printf garbage > /proc/1/fd/1; echo done", TimeoutSeconds: 60, User: wire.UserRoot})
	if !strings.Contains(res.Stdout, "done") {
		t.Fatalf("exec: %+v", res)
	}
	var logs []string
	_ = filepath.Walk(filepath.Join(s.DataDir, "runtime"), func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() && fi.Name() == "agent.log" {
			logs = append(logs, p)
			if fi.Size() > 1<<20 {
				t.Errorf("%s grew to %d bytes", p, fi.Size())
			}
		}
		return nil
	})
	if len(logs) == 0 {
		t.Error("no agent.log found: the test looks in the wrong place")
	}
	if res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "echo alive"}); res.Stdout != "alive\n" {
		t.Errorf("after the writes: got %q", res.Stdout)
	}
}

// C7: ordinary actions inside a sandbox: signals to init are survived;
// going over memory_mb kills the process, not the sandbox; what does end a
// sandbox (kill -9 1) is named in the error; a full /tmp is ENOSPC inside,
// /tmp being at most half of memory.
func TestWhatEndsASandboxIsNamed(t *testing.T) {
	s := daemontest.Start(t, nil)
	for _, tc := range []struct {
		name     string
		memoryMB int
		cmd      string
		// wantAlive: the sandbox answers afterwards; else wantCause is in
		// the exec's error.
		wantAlive bool
		wantOut   string
		wantCause string
	}{
		{name: "signals to init", cmd: "for s in TERM HUP INT USR1 USR2 QUIT ALRM PIPE; do kill -$s 1; done; sleep 0.2; echo sent", wantAlive: true, wantOut: "sent"},
		{name: "garbage to the transport", cmd: "printf garbage > /proc/1/fd/1; echo tried", wantAlive: true, wantOut: "tried"},
		{name: "full /tmp", memoryMB: 256, cmd: "head -c 400M /dev/zero > /tmp/x; echo rc=$?; rm /tmp/x", wantAlive: true, wantOut: "rc=1"},
		{name: "kill -9 1", cmd: "kill -9 1; sleep 5", wantCause: "init process"},
		// Over memory_mb, the memory guard kills the largest process, as
		// Linux's OOM killer would, and the command is told why; the host
		// would have killed the whole sandbox (gVisor has no OOM killer).
		// The allocation is paced (1 MiB every 10 ms at most) so that
		// the guard, not the machine's speed, decides; an unpaced one
		// can outrun it on a loaded machine (see the hostile suite).
		{name: "out of memory", memoryMB: 256, cmd: `perl -e 'my @a; for (1..1000) { push @a, "x" x (1<<20); select(undef, undef, undef, 0.01) } print "allocated\n"'; echo rc=$?`, wantAlive: true, wantOut: "reached its memory limit (256 MiB)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sb := s.Create(t, wire.CreateSandboxRequest{MemoryMB: tc.memoryMB})
			// As root: the worst a tenant can ask for.
			resp, b := s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/exec", wire.ExecRequest{Cmd: tc.cmd, TimeoutSeconds: 120, User: wire.UserRoot})
			if tc.wantAlive {
				if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), tc.wantOut) {
					t.Fatalf("exec: got %d %s, want 200 with %q", resp.StatusCode, b, tc.wantOut)
				}
				if res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "echo alive"}); res.Stdout != "alive\n" {
					t.Errorf("afterwards: got %q, want alive", res.Stdout)
				}
				return
			}
			if resp.StatusCode != http.StatusConflict || !strings.Contains(errorBody(t, b).Message, tc.wantCause) {
				t.Errorf("exec: got %d %s, want 409 naming %q", resp.StatusCode, b, tc.wantCause)
			}
			waitGone(t, s, sb.ID)
		})
	}
}

// C8: no output is lost under load: 200 concurrent commands in one sandbox
// each print their line (before, some returned exit 0 with empty stdout).
func TestManyConcurrentExecsKeepTheirOutput(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{})
	const n = 200
	var wg sync.WaitGroup
	var mu sync.Mutex
	var bad []string
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			want := fmt.Sprintf("ok %d\n", i)
			resp, b := s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/exec", wire.ExecRequest{Cmd: fmt.Sprintf("sleep 1; echo ok %d", i), TimeoutSeconds: 300})
			var res wire.ExecResult
			_ = json.Unmarshal(b, &res)
			if resp.StatusCode != http.StatusOK || res.Stdout != want || res.ExitCode != 0 {
				mu.Lock()
				bad = append(bad, fmt.Sprintf("%d: %d %s", i, resp.StatusCode, b))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(bad) > 0 {
		t.Errorf("%d of %d execs lost their output or failed, e.g. %s", len(bad), n, bad[0])
	}
}

// tmpfsDir mounts a tmpfs of sizeMB at a new directory, unmounted when the
// test ends (after everything registered later, the server included).
func tmpfsDir(t *testing.T, sizeMB int) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "pandastack-smalldisk-")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", fmt.Sprintf("size=%dm", sizeMB), "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mounting a tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() {
		_ = exec.Command("umount", "-l", dir).Run()
		_ = os.RemoveAll(dir)
	})
	return dir
}

// fill writes a file into dir until the disk is full, then frees keepMB.
func fill(t *testing.T, dir string, keepMB int) string {
	t.Helper()
	p := filepath.Join(dir, "filler")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for {
		if _, err := f.Write(buf); err != nil {
			break
		}
	}
	if st, err := f.Stat(); err == nil {
		_ = f.Truncate(max(st.Size()-int64(keepMB)<<20, 0))
	}
	f.Close()
	return p
}

// C13: the data disk is never filled by the server: a create whose disk_mb
// the disk cannot hold, a pause or snapshot whose image would not fit, and
// a create on a full disk are refused with 507 before anything is
// written, the sandbox stays running, and the store keeps working.
func TestFullDataDiskIsRefusedCleanly(t *testing.T) {
	dir := tmpfsDir(t, 600)
	s := daemontest.Start(t, func(c *daemon.Config) {
		noPool(c)
		c.DataDir = dir
		c.Sandbox.MinFreeDiskMB = 64
	})
	resp, b := s.Do(t, "POST", "/v1/sandboxes", wire.CreateSandboxRequest{DiskMB: 4096})
	if resp.StatusCode != http.StatusInsufficientStorage || errorBody(t, b).Code != "insufficient_storage" {
		t.Errorf("create with disk_mb over the free space: got %d %s, want 507", resp.StatusCode, b)
	}
	sb := s.Create(t, wire.CreateSandboxRequest{MemoryMB: 512, DiskMB: 64})
	// Hold ~200 MB of memory in the sandbox: its image would be as big.
	s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "((head -c 200M /dev/zero; sleep 1000) | tail -n 1 >/dev/null &) ; sleep 3"})
	filler := fill(t, dir, 150)
	for _, op := range []string{"pause", "snapshot", "fork"} {
		resp, b := s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/"+op, nil)
		if resp.StatusCode != http.StatusInsufficientStorage {
			t.Errorf("%s on a nearly full disk: got %d %s, want 507", op, resp.StatusCode, b)
		}
	}
	got, b := s.Do(t, "GET", "/v1/sandboxes/"+sb.ID, nil)
	if got.StatusCode != http.StatusOK || !strings.Contains(string(b), `"state":"running"`) {
		t.Errorf("after refused saves: got %d %s, want running", got.StatusCode, b)
	}
	if res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "echo alive"}); res.Stdout != "alive\n" {
		t.Errorf("exec after refused saves: got %q", res.Stdout)
	}
	// The disk fills up entirely: creates are 507, not 500; the store
	// still records a kill.
	_ = os.Remove(filler)
	fill(t, dir, 0)
	resp, b = s.Do(t, "POST", "/v1/sandboxes", wire.CreateSandboxRequest{DiskMB: 64})
	if resp.StatusCode != http.StatusInsufficientStorage {
		t.Errorf("create on a full disk: got %d %s, want 507", resp.StatusCode, b)
	}
	if resp, b := s.Do(t, "DELETE", "/v1/sandboxes/"+sb.ID, nil); resp.StatusCode != http.StatusNoContent {
		t.Errorf("kill on a full disk: got %d %s, want 204", resp.StatusCode, b)
	}
}

// C9: one checkpoint blocks no one else, against real sandboxes: while a
// sandbox holding 1 GiB is snapshotted, list and get answer and a TTL
// extension made meanwhile is kept. (The ordering is tested
// deterministically in internal/sandbox's TestCheckpointBlocksNobodyElse
// and TestReaperRechecksExpiryAfterWaiting.)
func TestCheckpointBlocksNobodyElseForReal(t *testing.T) {
	s := daemontest.Start(t, noPool)
	big := s.Create(t, wire.CreateSandboxRequest{MemoryMB: 2048, TTLSeconds: 2})
	holdMemory(t, s, big.ID, 1024)
	// The TTL (2 s) may already have passed: extend it at once, and again
	// during the snapshot below.
	s.Do(t, "POST", "/v1/sandboxes/"+big.ID+"/timeout", wire.SetTimeoutRequest{TTLSeconds: 2})
	done := make(chan int, 1)
	go func() {
		resp, _ := s.Do(t, "POST", "/v1/sandboxes/"+big.ID+"/snapshot", nil)
		done <- resp.StatusCode
	}()
	inFlight := 0
	for snapping := true; snapping; {
		select {
		case st := <-done:
			if st != http.StatusCreated {
				t.Fatalf("snapshot: %d", st)
			}
			snapping = false
			continue
		default:
		}
		if resp, b := s.Do(t, "GET", "/v1/sandboxes", nil); resp.StatusCode != http.StatusOK {
			t.Fatalf("list during a snapshot: %d %s", resp.StatusCode, b)
		}
		s.Do(t, "POST", "/v1/sandboxes/"+big.ID+"/timeout", wire.SetTimeoutRequest{TTLSeconds: 600})
		select {
		case st := <-done:
			if st != http.StatusCreated {
				t.Fatalf("snapshot: %d", st)
			}
			snapping = false
		default:
			inFlight++
		}
	}
	if inFlight == 0 {
		t.Error("no list and set-timeout answered while the snapshot ran; want them not to wait for it")
	}
	// The TTL (2 s) is long past; the extension made meanwhile holds.
	time.Sleep(3 * time.Second) // several reaper ticks; any wait longer than the old TTL works
	if resp, b := s.Do(t, "GET", "/v1/sandboxes/"+big.ID, nil); resp.StatusCode != http.StatusOK {
		t.Errorf("after a TTL extension during a snapshot: %d %s, want the sandbox alive", resp.StatusCode, b)
	}
}

// C10: concurrent resumes never exceed --max-sandboxes (limit 3, three
// concurrent resumes gave five running).
func TestConcurrentResumesRespectTheLimitForReal(t *testing.T) {
	s := daemontest.Start(t, func(c *daemon.Config) { noPool(c); c.Sandbox.MaxSandboxes = 3 })
	var paused []string
	for range 3 {
		sb := s.Create(t, wire.CreateSandboxRequest{})
		if resp, b := s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/pause", nil); resp.StatusCode != http.StatusOK {
			t.Fatalf("pause: %d %s", resp.StatusCode, b)
		}
		paused = append(paused, sb.ID)
	}
	s.Create(t, wire.CreateSandboxRequest{})
	s.Create(t, wire.CreateSandboxRequest{})
	var wg sync.WaitGroup
	codes := make([]int, len(paused))
	for i, id := range paused {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, _ := s.Do(t, "POST", "/v1/sandboxes/"+id+"/resume", nil)
			codes[i] = resp.StatusCode
		}()
	}
	wg.Wait()
	ok, refused := 0, 0
	for _, c := range codes {
		switch c {
		case http.StatusOK:
			ok++
		case http.StatusTooManyRequests:
			refused++
		}
	}
	if ok != 1 || refused != 2 {
		t.Errorf("resumes: got %v, want one 200 and two 429", codes)
	}
	_, b := s.Do(t, "GET", "/v1/sandboxes", nil)
	var l wire.SandboxList
	_ = json.Unmarshal(b, &l)
	running := 0
	for _, sb := range l.Sandboxes {
		if sb.State == wire.StateRunning {
			running++
		}
	}
	if running != 3 {
		t.Errorf("running: got %d, want 3", running)
	}
}

// rssKB is this process's resident memory.
func rssKB(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n := 0
			fmt.Sscanf(strings.TrimSpace(v), "%d", &n)
			return n
		}
	}
	return 0
}

// C11: the daemon's memory stays bounded under many blocking execs with
// big outputs (60 execs printing 12 MB per stream made it 1.5 GB): the
// buffered-output budget caps what they hold. The daemon runs in this
// process, so its RSS is this process's.
func TestBlockingExecsHoldBoundedMemory(t *testing.T) {
	const budget = 64 << 20
	s := daemontest.Start(t, func(c *daemon.Config) { noPool(c); c.MaxBufferedOutputBytes = budget })
	sb := s.Create(t, wire.CreateSandboxRequest{})
	before := rssKB(t)
	var peak int
	var mu sync.Mutex
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if r := rssKB(t); r > peak {
				mu.Lock()
				peak = r
				mu.Unlock()
			}
		}
	}()
	var wg sync.WaitGroup
	truncated := 0
	for range 60 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, b := s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/exec", wire.ExecRequest{Cmd: "head -c 12000000 /dev/zero | tr '\\0' a; head -c 12000000 /dev/zero | tr '\\0' b >&2", TimeoutSeconds: 600})
			var res wire.ExecResult
			_ = json.Unmarshal(b, &res)
			mu.Lock()
			defer mu.Unlock()
			if resp.StatusCode == http.StatusOK && res.Truncated {
				truncated++
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-sampled
	growth := (peak - before) / 1024
	t.Logf("RSS before %d MiB, peak %d MiB (+%d MiB); %d of 60 truncated", before/1024, peak/1024, growth, truncated)
	// The budget, the copies a JSON answer makes of it, and everything else
	// the server does: well under the 1.2 GB that 60 × 2 × 10 MiB would be.
	// Without the budget it was 1.5 GB (about 3× that under the race
	// detector, which multiplies resident memory: hence its own bound).
	limit := 6 * budget >> 20
	if raceDetector {
		limit = 15 * budget >> 20
	}
	if growth > limit {
		t.Errorf("daemon RSS grew by %d MiB; want at most %d (a %d MiB budget; race detector %v)", growth, limit, budget>>20, raceDetector)
	}
	if truncated != 60 {
		t.Errorf("truncated: got %d of 60, want all (each stream is over the per-stream cap)", truncated)
	}
}

// D14, C13 against real sandboxes: a sandbox created from a snapshot has
// the snapshot's disk (df agrees) and refuses other limits; the tenant's
// stored quota refuses a snapshot past it with 429.
func TestSnapshotLimitsAndQuotaForReal(t *testing.T) {
	s := daemontest.Start(t, func(c *daemon.Config) { noPool(c); c.Sandbox.MaxStoredMB = 200 })
	src := s.Create(t, wire.CreateSandboxRequest{DiskMB: 64, MemoryMB: 512})
	resp, b := s.Do(t, "POST", "/v1/sandboxes/"+src.ID+"/snapshot", nil)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("snapshot: %d %s", resp.StatusCode, b)
	}
	var sn wire.Snapshot
	_ = json.Unmarshal(b, &sn)
	if sn.DiskMB != 64 || sn.MemoryMB != 512 {
		t.Errorf("snapshot limits: got %+v, want disk 64, memory 512", sn)
	}
	resp, b = s.Do(t, "POST", "/v1/sandboxes", wire.CreateSandboxRequest{SnapshotID: sn.ID, DiskMB: 2048})
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(errorBody(t, b).Message, "disk_mb 2048") {
		t.Errorf("create from a snapshot with another disk_mb: got %d %s, want 400 naming it", resp.StatusCode, b)
	}
	c := s.Create(t, wire.CreateSandboxRequest{SnapshotID: sn.ID})
	if res := s.Exec(t, c.ID, wire.ExecRequest{Cmd: "df -m / | tail -1 | awk '{print $2}'"}); strings.TrimSpace(res.Stdout) != "64" {
		t.Errorf("df of a sandbox from a 64 MiB snapshot: got %q", res.Stdout)
	}
	// ~300 MB in use: the next snapshot would pass the 200 MiB quota.
	holdMemory(t, s, src.ID, 256)
	resp, b = s.Do(t, "POST", "/v1/sandboxes/"+src.ID+"/snapshot", nil)
	if resp.StatusCode != http.StatusTooManyRequests || errorBody(t, b).Code != "quota_exceeded" {
		t.Errorf("snapshot past the stored quota: got %d %s, want 429", resp.StatusCode, b)
	}
}

// Issue 8: commands run as the unprivileged user unless a call asks for
// root; an unknown user is a 400.
func TestDefaultUserIsUnprivileged(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{})
	for _, tc := range []struct {
		user, want string
	}{
		{"", "1000 1000 user /home/user /home/user"},
		{wire.UserDefault, "1000 1000 user /home/user /home/user"},
		{wire.UserRoot, "0 0 root /root /root"},
	} {
		res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: `echo $(id -u) $(id -g) $(id -un) $HOME $(pwd)`, User: tc.user})
		if got := strings.TrimSpace(res.Stdout); got != tc.want {
			t.Errorf("user %q: got %q, want %q", tc.user, got, tc.want)
		}
	}
	res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "touch /etc/x 2>&1; echo rc=$?"})
	if !strings.Contains(res.Stdout, "Permission denied") {
		t.Errorf("the default user wrote to /etc: %q", res.Stdout)
	}
	for _, u := range []string{"nobody-here", "Root", "../x"} {
		resp, b := s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/exec", wire.ExecRequest{Cmd: "true", User: u})
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("user %q: got %d %s, want 400", u, resp.StatusCode, b)
		}
	}
}
