// Package runtimetest is the conformance suite every runtime.Runtime
// implementation must pass. It drives the runtime through the in-sandbox
// agent, as the sandbox manager does.
package runtimetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/agent"
	"github.com/pandastack/pandastack/internal/runtime"
)

// Harness supplies what the suite needs from one implementation.
type Harness struct {
	// Runtime is the implementation under test.
	Runtime runtime.Runtime
	// Spec returns a startable spec (root filesystem with the agent as
	// init) for the given id.
	Spec func(id string) runtime.Spec
	// Leftovers lists what of the sandbox still exists on the host
	// (processes, directories, cgroups): empty after Delete.
	Leftovers func(id string) []string
}

// patience bounds every wait in the suite for something that must happen:
// a sandbox starting, a command ending, a session closing. It is generous
// because the suite must never assume how fast the machine is, only that it
// gets there.
const patience = 2 * time.Minute

// NewID returns a fresh fixed-length sandbox id.
func NewID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return "sb-" + hex.EncodeToString(b)
}

func start(t *testing.T, h Harness, spec runtime.Spec) *agent.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	if err := h.Runtime.Start(ctx, spec); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { _ = h.Runtime.Delete(context.Background(), spec.ID) })
	conn, err := h.Runtime.Connect(ctx, spec.ID)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	c, err := agent.Dial(ctx, conn)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Ping(ctx); err != nil {
		t.Fatalf("Ping: %v", err)
	}
	return c
}

func run(t *testing.T, c *agent.Client, argv ...string) (string, agent.Exit) {
	t.Helper()
	var out bytes.Buffer
	ex, err := c.Exec(context.Background(), agent.ExecRequest{Argv: argv, TimeoutMS: patience.Milliseconds()}, agent.ExecIO{
		Stdout: func(b []byte) error { out.Write(b); return nil },
		Stderr: func(b []byte) error { out.Write(b); return nil },
	})
	if err != nil {
		t.Fatalf("Exec %v: %v", argv, err)
	}
	return out.String(), ex
}

// Run runs the suite.
func Run(t *testing.T, h Harness) {
	t.Run("StartExecDelete", func(t *testing.T) {
		spec := h.Spec(NewID())
		spec.Env = append(spec.Env, "GREETING=hello")
		c := start(t, h, spec)
		tests := []struct {
			argv []string
			want string
		}{
			{[]string{"/bin/sh", "-c", "echo $GREETING"}, "hello\n"},
			{[]string{"hostname"}, spec.ID + "\n"},
			{[]string{"/bin/sh", "-c", "echo data > /root/f && cat /root/f"}, "data\n"},
			{[]string{"/bin/sh", "-c", "ls /host /var/lib/pandastack 2>&1 >/dev/null | wc -l"}, "2\n"},
		}
		for _, tt := range tests {
			got, ex := run(t, c, tt.argv...)
			if got != tt.want || ex.ExitCode != 0 {
				t.Errorf("%v: got %q (exit %d), want %q (exit 0)", tt.argv, got, ex.ExitCode, tt.want)
			}
		}
		// No host environment leaks in: only what the spec set.
		env, _ := run(t, c, "env")
		for _, line := range strings.Split(strings.TrimSpace(env), "\n") {
			k, _, _ := strings.Cut(line, "=")
			found := false
			for _, kv := range spec.Env {
				if strings.HasPrefix(kv, k+"=") {
					found = true
				}
			}
			if !found && k != "PWD" && k != "SHLVL" && k != "_" {
				t.Errorf("unexpected environment variable %q in sandbox", line)
			}
		}
		if err := h.Runtime.Delete(context.Background(), spec.ID); err != nil {
			t.Fatalf("Delete: %v", err)
		}
		if left := h.Leftovers(spec.ID); len(left) > 0 {
			t.Errorf("left after Delete: %v", left)
		}
		if err := h.Runtime.Delete(context.Background(), spec.ID); err != nil {
			t.Errorf("second Delete: got %v, want nil", err)
		}
		select {
		case <-c.Closed():
		case <-time.After(patience):
			t.Errorf("agent session still open %v after Delete", patience)
		}
	})

	t.Run("WritableLayersAreSeparate", func(t *testing.T) {
		a := start(t, h, h.Spec(NewID()))
		b := start(t, h, h.Spec(NewID()))
		run(t, a, "/bin/sh", "-c", "echo a > /etc/mine")
		if got, ex := run(t, b, "/bin/sh", "-c", "cat /etc/mine 2>/dev/null || echo absent"); got != "absent\n" {
			t.Errorf("other sandbox sees the file: got %q (exit %d)", got, ex.ExitCode)
		}
	})

	t.Run("ListAndReconnect", func(t *testing.T) {
		spec := h.Spec(NewID())
		c := start(t, h, spec)
		ids, err := h.Runtime.List(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, id := range ids {
			found = found || id == spec.ID
		}
		if !found {
			t.Fatalf("List: %v lacks %s", ids, spec.ID)
		}
		// A second connection, as after a daemon crash, reaches the same
		// agent: the first goes away with an exec in flight and frames
		// half-sent, and the new session starts clean all the same.
		run(t, c, "/bin/sh", "-c", "echo 41 > /tmp/state")
		// The exec is running (it printed) when the session goes away.
		started := make(chan struct{})
		var once sync.Once
		inflight := make(chan error, 1)
		go func() {
			_, err := c.Exec(context.Background(), agent.ExecRequest{Argv: []string{"/bin/sh", "-c", "echo started; exec sleep 1000"}}, agent.ExecIO{
				Stdout: func([]byte) error { once.Do(func() { close(started) }); return nil },
			})
			inflight <- err
		}()
		select {
		case <-started:
		case err := <-inflight:
			t.Fatalf("exec ended before the session was closed: %v", err)
		case <-time.After(patience):
			t.Fatalf("exec printed nothing within %v", patience)
		}
		c.Close()
		if err := <-inflight; err == nil {
			t.Error("exec of the closed session succeeded")
		}
		for i := range 2 {
			ctx, cancel := context.WithTimeout(context.Background(), patience)
			conn, err := h.Runtime.Connect(ctx, spec.ID)
			if err != nil {
				cancel()
				t.Fatal(err)
			}
			// Garbage left in the stream by the "crashed" daemon.
			if _, err := conn.Write([]byte{0, 0, 0, 42, 0xfe, 'P', 'A'}); err != nil {
				cancel()
				t.Fatalf("reconnect %d: writing garbage into the stream: %v", i, err)
			}
			c2, err := agent.Dial(ctx, conn)
			cancel()
			if err != nil {
				t.Fatalf("reconnect %d: %v", i, err)
			}
			if got, _ := run(t, c2, "cat", "/tmp/state"); got != "41\n" {
				t.Errorf("after reconnect %d: got %q, want %q", i, got, "41\n")
			}
			c2.Close()
		}
		ctx, cancel := context.WithTimeout(context.Background(), patience)
		defer cancel()
		conn, err := h.Runtime.Connect(ctx, spec.ID)
		if err != nil {
			t.Fatal(err)
		}
		c3, err := agent.Dial(ctx, conn)
		if err != nil {
			t.Fatal(err)
		}
		defer c3.Close()
		// The exec of the abandoned session was killed with it (the kill
		// may still be under way: wait for it, within patience).
		for deadline := time.Now().Add(patience); ; {
			got, _ := run(t, c3, "/bin/sh", "-c", "ps -eo args | grep -c '^sleep 1000' || true")
			if got == "0\n" {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("exec of the abandoned session still runs %v after a new session started: %q", patience, got)
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	})

	if cp, ok := h.Runtime.(runtime.Checkpointer); ok {
		t.Run("CheckpointRestore", func(t *testing.T) { checkpointRestore(t, h, cp) })
	}

	t.Run("DeathClosesSession", func(t *testing.T) {
		spec := h.Spec(NewID())
		c := start(t, h, spec)
		if err := h.Runtime.Delete(context.Background(), spec.ID); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), patience)
		defer cancel()
		_, err := c.Exec(ctx, agent.ExecRequest{Argv: []string{"true"}}, agent.ExecIO{})
		if err == nil {
			t.Fatal("exec in a deleted sandbox succeeded")
		}
		if ctx.Err() != nil {
			t.Fatalf("exec in a deleted sandbox still waiting after %v: the session did not notice the death", patience)
		}
	})
}

// checkpointRestore forks a sandbox through a checkpoint left running, then
// pauses one (checkpoint, delete) and brings it back under the same id.
func checkpointRestore(t *testing.T, h Harness, cp runtime.Checkpointer) {
	ctx := context.Background()
	parent := h.Spec(NewID())
	c := start(t, h, parent)
	// A counter keeps running in the background; the command returns once
	// it has counted (waiting within the exec's timeout).
	run(t, c, "/bin/sh", "-c", "echo before > /root/f; (setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.05; done' >/dev/null 2>&1 &); "+
		"until [ -s /tmp/count ]; do sleep 0.05; done")

	image := t.TempDir()
	if err := cp.Checkpoint(ctx, parent.ID, image, true); err != nil {
		t.Fatalf("Checkpoint: %v", err)
	}
	if got, _ := run(t, c, "cat", "/root/f"); got != "before\n" {
		t.Errorf("parent after checkpoint: got %q", got)
	}
	fork := h.Spec(NewID())
	if err := cp.Restore(ctx, fork, image); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	t.Cleanup(func() { _ = h.Runtime.Delete(context.Background(), fork.ID) })
	conn, err := h.Runtime.Connect(ctx, fork.ID)
	if err != nil {
		t.Fatal(err)
	}
	fc, err := agent.Dial(ctx, conn)
	if err != nil {
		t.Fatalf("Dial restored sandbox: %v", err)
	}
	defer fc.Close()
	// The restored counter goes on: wait for it to move, within the exec's
	// timeout.
	got, _ := run(t, fc, "/bin/sh", "-c", "cat /root/f; hostname; a=$(cat /tmp/count); until [ $(cat /tmp/count) -gt $a ]; do sleep 0.05; done; echo counting")
	if want := "before\n" + fork.ID + "\ncounting\n"; got != want {
		t.Errorf("restored sandbox: got %q, want %q", got, want)
	}
	run(t, fc, "/bin/sh", "-c", "echo fork > /root/f")
	if got, _ := run(t, c, "cat", "/root/f"); got != "before\n" {
		t.Errorf("parent sees the fork's write: %q", got)
	}

	// Pause: checkpoint without leaving it running, delete, restore the
	// same id.
	pauseImg := t.TempDir()
	if err := cp.Checkpoint(ctx, parent.ID, pauseImg, false); err != nil {
		t.Fatalf("Checkpoint (stop): %v", err)
	}
	c.Close()
	if err := h.Runtime.Delete(ctx, parent.ID); err != nil {
		t.Fatal(err)
	}
	if err := cp.Restore(ctx, parent, pauseImg); err != nil {
		t.Fatalf("Restore under the same id: %v", err)
	}
	conn, err = h.Runtime.Connect(ctx, parent.ID)
	if err != nil {
		t.Fatal(err)
	}
	pc, err := agent.Dial(ctx, conn)
	if err != nil {
		t.Fatalf("Dial resumed sandbox: %v", err)
	}
	defer pc.Close()
	if got, _ := run(t, pc, "cat", "/root/f"); got != "before\n" {
		t.Errorf("resumed sandbox: got %q, want %q", got, "before\n")
	}
}
