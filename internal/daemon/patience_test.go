package daemon_test

import (
	"strings"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/wire"
)

// patience bounds every wait in these tests for a state that must come: a
// sandbox answering, a TTL passing, a record written, a teardown done. It
// is generous: machines differ several-fold in speed from day to day, and
// the tests never assume how fast one is, only that it gets there.
const patience = 3 * time.Minute

// waitUntil polls cond until it reports true; after patience it fails the
// test with what, and what cond last said.
func waitUntil(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(patience)
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %v (last: %s)", what, patience, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitNoProcs waits until no process in sandbox id has a command line that
// starts with prefix.
func waitNoProcs(t *testing.T, s *daemontest.Server, id, prefix string) {
	t.Helper()
	waitUntil(t, "processes "+prefix+"… gone from "+id, func() (bool, string) {
		res := s.Exec(t, id, wire.ExecRequest{Argv: []string{"ps", "-eo", "args"}})
		for _, l := range strings.Split(res.Stdout, "\n") {
			if strings.HasPrefix(l, prefix) {
				return false, res.Stdout
			}
		}
		return true, ""
	})
}

// timedOutAfterSetUp runs cmd with a timeout of first seconds. The command
// prints ready once it has set up what the test is about (a background
// child, say); a timeout that fired before (a slow machine) proves nothing,
// and cmd runs again with twice the timeout, up to patience. It returns the
// result of the run that got ready, which must have timed out.
func timedOutAfterSetUp(t *testing.T, s *daemontest.Server, id, cmd, ready string, first float64) wire.ExecResult {
	t.Helper()
	for timeout := first; ; timeout *= 2 {
		res := s.Exec(t, id, wire.ExecRequest{Cmd: cmd, TimeoutSeconds: timeout})
		if !res.TimedOut || res.ExitCode != 124 {
			t.Fatalf("%q with a %g s timeout: got %+v, want a timeout (exit 124)", cmd, timeout, res)
		}
		if strings.Contains(res.Stdout, ready) {
			return res
		}
		if time.Duration(timeout*float64(time.Second)) >= patience {
			t.Fatalf("%q never printed %q before its timeout, up to %g s: %+v", cmd, ready, timeout, res)
		}
		t.Logf("%q timed out before it was set up (a slow machine): again with %g s", cmd, 2*timeout)
	}
}
