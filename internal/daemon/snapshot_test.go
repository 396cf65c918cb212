package daemon_test

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/internal/testenv"
	"github.com/pandastack/pandastack/wire"
)

// counterCmd starts a process that keeps a counter in its memory and
// writes it to /tmp/count every 50 ms, and returns once it has.
const counterCmd = "(setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done' >/dev/null 2>&1 &); until [ -s /tmp/count ]; do sleep 0.05; done"

// execCounter runs one of the counter's commands, which wait for it within
// the exec's timeout.
func execCounter(t *testing.T, s *daemontest.Server, id, cmd string) wire.ExecResult {
	t.Helper()
	return s.Exec(t, id, wire.ExecRequest{Cmd: cmd, TimeoutSeconds: patience.Seconds()})
}

func count(t *testing.T, s *daemontest.Server, id string) int {
	t.Helper()
	// The writer truncates before it writes: an empty read is retried.
	res := execCounter(t, s, id, "until c=$(cat /tmp/count) && [ -n \"$c\" ]; do sleep 0.01; done; echo $c")
	n, err := strconv.Atoi(strings.TrimSpace(res.Stdout))
	if err != nil {
		t.Fatalf("reading counter of %s: %q (%+v)", id, res.Stdout, res)
	}
	return n
}

// counting checks that the counter process runs and kept its memory: the
// counter is at least min and goes on (within patience).
func counting(t *testing.T, s *daemontest.Server, id string, min int) {
	t.Helper()
	a := count(t, s, id)
	if a < min {
		t.Errorf("%s: counter %d, want ≥ %d", id, a, min)
	}
	waitUntil(t, id+": counter growing from "+strconv.Itoa(a), func() (bool, string) {
		b := count(t, s, id)
		return b > a, "counter " + strconv.Itoa(b)
	})
}

func post[T any](t *testing.T, s *daemontest.Server, path string, body any, want int) T {
	t.Helper()
	resp, b := s.Do(t, "POST", path, body)
	if resp.StatusCode != want {
		t.Fatalf("POST %s: %d %s, want %d", path, resp.StatusCode, b, want)
	}
	var v T
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestSnapshotAndCreateFromIt(t *testing.T) {
	s := daemontest.Start(t, nil)
	src := s.Create(t, wire.CreateSandboxRequest{Env: map[string]string{"ORIGIN": "src"}})
	execCounter(t, s, src.ID, "echo saved > $HOME/f; "+counterCmd)
	before := count(t, s, src.ID)

	snap := post[wire.Snapshot](t, s, "/v1/sandboxes/"+src.ID+"/snapshot", nil, http.StatusCreated)
	if snap.SourceSandbox != src.ID || snap.Template != "base" || snap.SizeBytes <= 0 || !strings.HasPrefix(snap.ID, "snap-") {
		t.Fatalf("snapshot: %+v", snap)
	}
	counting(t, s, src.ID, before) // the source keeps running

	sb := s.Create(t, wire.CreateSandboxRequest{SnapshotID: snap.ID, TTLSeconds: 900})
	if sb.ID == src.ID || sb.Template != "base" {
		t.Fatalf("created from snapshot: %+v", sb)
	}
	res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "cat $HOME/f; hostname; echo $ORIGIN"})
	if want := "saved\n" + sb.ID + "\nsrc\n"; res.Stdout != want {
		t.Errorf("restored sandbox: got %q, want %q", res.Stdout, want)
	}
	counting(t, s, sb.ID, before)

	resp, b := s.Do(t, "GET", "/v1/snapshots", nil)
	var list wire.SnapshotList
	if err := json.Unmarshal(b, &list); err != nil || resp.StatusCode != 200 || len(list.Snapshots) != 1 || list.Snapshots[0].ID != snap.ID {
		t.Errorf("list: %d %s (%v)", resp.StatusCode, b, err)
	}
	other := s.WithTenant(t, "other")
	for _, c := range []struct{ method, path string }{{"GET", "/v1/snapshots/" + snap.ID}, {"DELETE", "/v1/snapshots/" + snap.ID}} {
		if resp, b := other.Do(t, c.method, c.path, nil); resp.StatusCode != 404 {
			t.Errorf("other tenant %s %s: %d %s", c.method, c.path, resp.StatusCode, b)
		}
	}
	if resp, b := other.Do(t, "POST", "/v1/sandboxes", wire.CreateSandboxRequest{SnapshotID: snap.ID}); resp.StatusCode != 404 {
		t.Errorf("other tenant create from snapshot: %d %s", resp.StatusCode, b)
	}
	if resp, b := s.Do(t, "DELETE", "/v1/snapshots/"+snap.ID, nil); resp.StatusCode != 204 {
		t.Fatalf("delete snapshot: %d %s", resp.StatusCode, b)
	}
	if resp, _ := s.Do(t, "DELETE", "/v1/snapshots/"+snap.ID, nil); resp.StatusCode != 404 {
		t.Errorf("second delete: %d, want 404", resp.StatusCode)
	}
	if resp, _ := s.Do(t, "POST", "/v1/sandboxes", wire.CreateSandboxRequest{SnapshotID: snap.ID}); resp.StatusCode != 404 {
		t.Errorf("create from deleted snapshot: %d, want 404", resp.StatusCode)
	}
	// The sandbox made from it does not depend on the snapshot's files.
	counting(t, s, sb.ID, before)
}

func TestFork(t *testing.T) {
	s := daemontest.Start(t, nil)
	parent := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 900})
	execCounter(t, s, parent.ID, "echo parent > $HOME/f; "+counterCmd)
	before := count(t, s, parent.ID)

	forkedAt := time.Now()
	fr := post[wire.ForkResponse](t, s, "/v1/sandboxes/"+parent.ID+"/fork", wire.ForkRequest{Count: 2, TTLSeconds: 600}, http.StatusCreated)
	forkedBy := time.Now()
	if len(fr.Sandboxes) != 2 {
		t.Fatalf("fork: got %d sandboxes", len(fr.Sandboxes))
	}
	t.Cleanup(func() {
		for _, c := range fr.Sandboxes {
			s.Do(t, "DELETE", "/v1/sandboxes/"+c.ID, nil)
		}
	})
	random := map[string]bool{}
	for i, c := range fr.Sandboxes {
		// Each fork expires 600 s after its fork request.
		if c.ID == parent.ID || c.ExpiresAt.Before(forkedAt.Add(599*time.Second)) || c.ExpiresAt.After(forkedBy.Add(601*time.Second)) {
			t.Errorf("fork %d: %+v, want a new id and a TTL of 600 s from %v", i, c, forkedAt)
		}
		res := s.Exec(t, c.ID, wire.ExecRequest{Cmd: "cat $HOME/f; hostname; echo child" + strconv.Itoa(i) + " > $HOME/f; head -c 16 /dev/urandom | od -An -x"})
		lines := strings.Split(strings.TrimSpace(res.Stdout), "\n")
		if len(lines) != 3 || lines[0] != "parent" || lines[1] != c.ID {
			t.Errorf("fork %d: got %q", i, res.Stdout)
			continue
		}
		random[lines[2]] = true
		counting(t, s, c.ID, before)
	}
	if len(random) != 2 {
		t.Errorf("forks share /dev/urandom output: %v", random)
	}
	// Each fork's writes are its own.
	for i, c := range fr.Sandboxes {
		if res := s.Exec(t, c.ID, wire.ExecRequest{Cmd: "cat $HOME/f"}); res.Stdout != "child"+strconv.Itoa(i)+"\n" {
			t.Errorf("fork %d sees %q", i, res.Stdout)
		}
	}
	if res := s.Exec(t, parent.ID, wire.ExecRequest{Cmd: "cat $HOME/f"}); res.Stdout != "parent\n" {
		t.Errorf("parent sees %q", res.Stdout)
	}
	counting(t, s, parent.ID, before)

	for _, c := range []struct {
		body string
		want int // status; on 201, one fork
	}{
		{`{"count":0}`, http.StatusCreated}, // 0 means 1
		{`{"count":17}`, http.StatusBadRequest},
		{`{"count":-1}`, http.StatusBadRequest},
	} {
		resp, b := s.Do(t, "POST", "/v1/sandboxes/"+parent.ID+"/fork", c.body)
		if resp.StatusCode != c.want {
			t.Errorf("fork %s: %d %s, want %d", c.body, resp.StatusCode, b, c.want)
			continue
		}
		if c.want != http.StatusCreated {
			continue
		}
		var one wire.ForkResponse
		if err := json.Unmarshal(b, &one); err != nil {
			t.Fatalf("fork %s: %v: %s", c.body, err, b)
		}
		for _, sb := range one.Sandboxes {
			s.Do(t, "DELETE", "/v1/sandboxes/"+sb.ID, nil)
		}
		if len(one.Sandboxes) != 1 {
			t.Errorf("fork %s: got %d sandboxes, want 1", c.body, len(one.Sandboxes))
		}
	}
}

func TestPauseResumeThreeTimes(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 900})
	execCounter(t, s, sb.ID, counterCmd)
	last := count(t, s, sb.ID)
	for round := 1; round <= 3; round++ {
		s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "echo " + strconv.Itoa(round) + " > $HOME/file" + strconv.Itoa(round)})
		p := post[wire.Sandbox](t, s, "/v1/sandboxes/"+sb.ID+"/pause", nil, http.StatusOK)
		if p.State != wire.StatePaused || p.PausedBytes <= 0 {
			t.Fatalf("round %d: paused %+v", round, p)
		}
		if procs := runscProcs(sb.ID); procs != "" {
			t.Errorf("round %d: processes of a paused sandbox: %s", round, procs)
		}
		resp, b := s.Do(t, "GET", "/v1/sandboxes/"+sb.ID, nil)
		if resp.StatusCode != 200 || !strings.Contains(string(b), `"state":"paused"`) {
			t.Errorf("round %d: get while paused: %d %s", round, resp.StatusCode, b)
		}
		if round == 2 {
			// An exec resumes a paused sandbox by itself.
			if res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "true"}); res.ExitCode != 0 {
				t.Errorf("exec on paused: %+v", res)
			}
		} else {
			r := post[wire.Sandbox](t, s, "/v1/sandboxes/"+sb.ID+"/resume", nil, http.StatusOK)
			if r.State != wire.StateRunning || r.PausedBytes != 0 {
				t.Errorf("round %d: resumed %+v", round, r)
			}
		}
		var want strings.Builder
		for i := 1; i <= round; i++ {
			want.WriteString(strconv.Itoa(i) + "\n")
		}
		if res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "cat $HOME/file*"}); res.Stdout != want.String() {
			t.Errorf("round %d: files %q, want %q", round, res.Stdout, want.String())
		}
		counting(t, s, sb.ID, last)
		last = count(t, s, sb.ID)
	}
	// Pausing twice and resuming a running sandbox are no-ops.
	post[wire.Sandbox](t, s, "/v1/sandboxes/"+sb.ID+"/resume", nil, http.StatusOK)
	post[wire.Sandbox](t, s, "/v1/sandboxes/"+sb.ID+"/pause", nil, http.StatusOK)
	post[wire.Sandbox](t, s, "/v1/sandboxes/"+sb.ID+"/pause", nil, http.StatusOK)
	// Killing a paused sandbox frees its saved state.
	if resp, b := s.Do(t, "DELETE", "/v1/sandboxes/"+sb.ID, nil); resp.StatusCode != 204 {
		t.Fatalf("kill paused: %d %s", resp.StatusCode, b)
	}
	if resp, _ := s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/resume", nil); resp.StatusCode != 404 {
		t.Errorf("resume after kill: %d, want 404", resp.StatusCode)
	}
}

func TestOnTimeoutPause(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 2, OnTimeout: "pause"})
	if sb.OnTimeout != "pause" {
		t.Fatalf("created %+v", sb)
	}
	s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "echo kept > $HOME/f"})
	paused := func() (bool, string) {
		resp, b := s.Do(t, "GET", "/v1/sandboxes/"+sb.ID, nil)
		if resp.StatusCode != 200 {
			t.Fatalf("get: %d %s", resp.StatusCode, b)
		}
		return strings.Contains(string(b), `"state":"paused"`), string(b)
	}
	waitUntil(t, "paused at its TTL", paused)
	// An exec resumes it, and the resume restarts its 2 s TTL. A slow
	// machine may take longer than that to look, and find it paused
	// again; then it tries again.
	for deadline := time.Now().Add(patience); ; {
		start := time.Now()
		if res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "cat $HOME/f"}); res.Stdout != "kept\n" {
			t.Errorf("after auto-resume: %+v", res)
		}
		resp, b := s.Do(t, "GET", "/v1/sandboxes/"+sb.ID, nil)
		var got wire.Sandbox
		if err := json.Unmarshal(b, &got); err != nil || resp.StatusCode != 200 {
			t.Fatalf("after resume: %d %s (%v)", resp.StatusCode, b, err)
		}
		if got.State == wire.StateRunning {
			if lo := start.Add(time.Second); got.ExpiresAt.Before(lo) {
				t.Errorf("after resume: expires at %v, want the 2 s TTL restarted at the resume (after %v)", got.ExpiresAt, lo)
			}
			break
		}
		if got.State != wire.StatePaused || time.Since(start) < 2*time.Second {
			t.Fatalf("%v after the exec that resumed it: %s; want running with its TTL restarted", time.Since(start), b)
		}
		if time.Now().After(deadline) {
			t.Fatalf("never seen running after a resume within its 2 s TTL in %v", patience)
		}
		t.Logf("paused again %v after the resume (a slow machine): again", time.Since(start))
		waitUntil(t, "paused at its TTL", paused)
	}
	if resp, b := s.Do(t, "POST", "/v1/sandboxes", `{"on_timeout":"sleep"}`); resp.StatusCode != 400 {
		t.Errorf("bad on_timeout: %d %s", resp.StatusCode, b)
	}
}

// TestForkLargeMemory forks a sandbox whose Python process holds 200 MB.
func TestForkLargeMemory(t *testing.T) {
	testenv.Template(t, "code-interpreter")
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{Template: "code-interpreter", MemoryMB: 2048, TTLSeconds: 900})
	// A server process holding 200 MB answers checksums of it through files.
	py := `import hashlib, os, time
data = bytearray(os.urandom(1 << 20)) * 200
open("/tmp/sum", "w").write(hashlib.sha256(data).hexdigest())
while True:
    if os.path.exists("/tmp/ask"):
        os.remove("/tmp/ask")
        data[0] = (data[0] + 1) % 256
        open("/tmp/answer", "w").write(hashlib.sha256(data).hexdigest())
    time.sleep(0.02)
`
	s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "cat > /tmp/srv.py; (setsid python3 /tmp/srv.py >/dev/null 2>&1 &); while [ ! -s /tmp/sum ]; do sleep 0.1; done; cat /tmp/sum", Stdin: py, TimeoutSeconds: patience.Seconds()})
	ask := func(id string) string {
		t.Helper()
		res := s.Exec(t, id, wire.ExecRequest{Cmd: "rm -f /tmp/answer; touch /tmp/ask; while [ ! -s /tmp/answer ]; do sleep 0.02; done; cat /tmp/answer", TimeoutSeconds: patience.Seconds()})
		return res.Stdout
	}
	fr := post[wire.ForkResponse](t, s, "/v1/sandboxes/"+sb.ID+"/fork", wire.ForkRequest{Count: 2}, http.StatusCreated)
	t.Cleanup(func() {
		for _, c := range fr.Sandboxes {
			s.Do(t, "DELETE", "/v1/sandboxes/"+c.ID, nil)
		}
	})
	// Every copy holds the same 200 MB and mutates it the same way: the
	// first mutation gives the same checksum in each.
	a, b, p := ask(fr.Sandboxes[0].ID), ask(fr.Sandboxes[1].ID), ask(sb.ID)
	if a == "" || a != b || a != p {
		t.Errorf("checksums after one mutation: fork0 %q fork1 %q parent %q", a, b, p)
	}
	// They diverge independently: a second mutation in one fork only.
	if a2 := ask(fr.Sandboxes[0].ID); a2 == a {
		t.Errorf("fork 0 did not change")
	}
	if b1 := s.Exec(t, fr.Sandboxes[1].ID, wire.ExecRequest{Cmd: "cat /tmp/answer"}).Stdout; b1 != b {
		t.Errorf("fork 1 changed with fork 0: %q vs %q", b1, b)
	}
}

// TestPausedSandboxesDoNotCount: the server's sandbox limit counts running
// sandboxes only; a resume that would pass it is refused and the sandbox
// stays paused.
func TestPausedSandboxesDoNotCount(t *testing.T) {
	s := daemontest.Start(t, func(c *daemon.Config) { c.Sandbox.MaxSandboxes = 2 })
	a := s.Create(t, wire.CreateSandboxRequest{})
	s.Create(t, wire.CreateSandboxRequest{})
	if resp, b := s.Do(t, "POST", "/v1/sandboxes", wire.CreateSandboxRequest{}); resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("third create: %d %s, want 429", resp.StatusCode, b)
	}
	post[wire.Sandbox](t, s, "/v1/sandboxes/"+a.ID+"/pause", nil, http.StatusOK)
	c := s.Create(t, wire.CreateSandboxRequest{})
	if resp, b := s.Do(t, "POST", "/v1/sandboxes/"+a.ID+"/resume", nil); resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("resume past the limit: %d %s, want 429", resp.StatusCode, b)
	}
	if resp, b := s.Do(t, "GET", "/v1/sandboxes/"+a.ID, nil); !strings.Contains(string(b), `"state":"paused"`) {
		t.Fatalf("after a refused resume: %d %s", resp.StatusCode, b)
	}
	s.Do(t, "DELETE", "/v1/sandboxes/"+c.ID, nil)
	post[wire.Sandbox](t, s, "/v1/sandboxes/"+a.ID+"/resume", nil, http.StatusOK)
}
