package pandastack_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/internal/testenv"
	pandastack "github.com/pandastack/pandastack/sdk/go"
)

// TestRealServer runs the SDK's whole surface against a real server.
func TestRealServer(t *testing.T) {
	s := daemontest.Start(t, nil)
	c := s.Client(t)
	ctx := context.Background()

	h, err := c.Health(ctx)
	if err != nil || h.Status != "ok" || h.Runtime != "gvisor" {
		t.Fatalf("health: %+v %v", h, err)
	}
	sb, err := c.Create(ctx, pandastack.CreateOptions{
		TTL: 10 * time.Minute, Env: map[string]string{"WHO": "sdk"}, Metadata: map[string]string{"k": "v"}, MemoryMB: 512,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sb.Close()
	if info := sb.Info(); info.MemoryMB != 512 || info.Metadata["k"] != "v" || info.State != "running" {
		t.Errorf("info: %+v", info)
	}

	// The command writes stderr only once the test, having seen its
	// stdout in the callback, creates a file (it gives up after 60 s):
	// the callbacks come in order and while the command runs, however
	// fast the machine.
	var mu sync.Mutex
	var chunks []string
	var once sync.Once
	touched := make(chan error, 1)
	res, err := sb.Exec(ctx, "echo $WHO; i=0; until [ -e /tmp/go ] || [ $i -ge 1200 ]; do sleep 0.05; i=$((i+1)); done; [ -e /tmp/go ] && echo done >&2", pandastack.ExecOptions{
		Timeout: 5 * time.Minute,
		OnStdout: func(s string) {
			mu.Lock()
			chunks = append(chunks, "out:"+s)
			mu.Unlock()
			once.Do(func() {
				go func() {
					_, err := sb.ExecArgv(ctx, []string{"touch", "/tmp/go"}, pandastack.ExecOptions{})
					touched <- err
				}()
			})
		},
		OnStderr: func(s string) { mu.Lock(); chunks = append(chunks, "err:"+s); mu.Unlock() },
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := <-touched; err != nil {
		t.Fatalf("touch: %v", err)
	}
	if res.Stdout != "sdk\n" || res.Stderr != "done\n" || res.ExitCode != 0 {
		t.Errorf("streamed exec: %+v", res)
	}
	if got := strings.Join(chunks, "|"); got != "out:sdk\n|err:done\n" {
		t.Errorf("callbacks: got %q", got)
	}
	res, err = sb.ExecArgv(ctx, []string{"cat"}, pandastack.ExecOptions{Stdin: "piped", Cwd: "/tmp"})
	if err != nil || res.Stdout != "piped" {
		t.Errorf("argv with stdin: %+v %v", res, err)
	}
	res, err = sb.Exec(ctx, "sleep 1000", pandastack.ExecOptions{Timeout: 300 * time.Millisecond})
	if err != nil || !res.TimedOut || res.ExitCode != 124 {
		t.Errorf("timeout: %+v %v", res, err)
	}

	again, err := c.Connect(ctx, sb.ID())
	if err != nil || again.ID() != sb.ID() {
		t.Fatalf("connect: %v", err)
	}
	list, err := c.List(ctx)
	if err != nil || len(list) != 1 || list[0].ID != sb.ID() {
		t.Errorf("list: %+v %v", list, err)
	}
	// The new expiry is 10 min from the request, whenever it is handled.
	before := time.Now()
	err = sb.SetTimeout(ctx, 10*time.Minute)
	after := time.Now()
	if exp := sb.Info().ExpiresAt; err != nil || exp.Before(before.Add(10*time.Minute-time.Second)) || exp.After(after.Add(10*time.Minute+time.Second)) {
		t.Errorf("set timeout: %v, expires %v, want 10 min after %v", err, exp, before)
	}
	if err := sb.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	if err := sb.Kill(ctx); !errors.Is(err, pandastack.ErrNotFound) {
		t.Errorf("second kill: got %v, want ErrNotFound", err)
	}
	if _, err := sb.Exec(ctx, "true", pandastack.ExecOptions{}); !errors.Is(err, pandastack.ErrNotFound) {
		t.Errorf("exec after kill: got %v, want ErrNotFound", err)
	}

	tests := []struct {
		name string
		opts pandastack.CreateOptions
		want error
	}{
		{"unknown template", pandastack.CreateOptions{Template: "nope"}, pandastack.ErrNotFound},
		{"ttl too long", pandastack.CreateOptions{TTL: 1000 * time.Hour}, pandastack.ErrInvalidArgument},
		{"too much memory", pandastack.CreateOptions{MemoryMB: 1 << 20}, pandastack.ErrInvalidArgument},
	}
	for _, tt := range tests {
		if _, err := c.Create(ctx, tt.opts); !errors.Is(err, tt.want) {
			t.Errorf("%s: got %v, want %v", tt.name, err, tt.want)
		}
	}
	bad, err := pandastack.NewClient(pandastack.WithURL(s.URL), pandastack.WithAPIKey("wrong"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bad.List(ctx); !errors.Is(err, pandastack.ErrUnauthenticated) {
		t.Errorf("wrong key: got %v, want ErrUnauthenticated", err)
	}
}

// TestCodeInterpreter checks the code-interpreter template's Python stack.
func TestCodeInterpreter(t *testing.T) {
	testenv.Template(t, "code-interpreter")
	s := daemontest.Start(t, nil)
	c := s.Client(t)
	ctx := context.Background()
	sb, err := c.Create(ctx, pandastack.CreateOptions{Template: "code-interpreter"})
	if err != nil {
		t.Fatal(err)
	}
	defer sb.Close()
	// Generous: the imports take seconds on a quick machine.
	res, err := sb.Exec(ctx, `python3 -c 'import numpy, pandas, matplotlib; print(sum(range(100)), numpy.arange(4).sum(), len(pandas.DataFrame({"a": [1, 2]})))'`, pandastack.ExecOptions{Timeout: 10 * time.Minute})
	if err != nil || res.Stdout != "4950 6 2\n" || res.ExitCode != 0 {
		t.Errorf("python: %+v %v", res, err)
	}
}
