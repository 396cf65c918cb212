package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/runtime"
	"github.com/pandastack/pandastack/internal/store"
	"github.com/pandastack/pandastack/internal/template"
	"github.com/pandastack/pandastack/wire"
)

// These tests cover the manager's validation only: every request here is
// refused before a sandbox would start. The runtime and store below are
// hand-written fakes that record being called, so a test can check that
// validation happens before anything is touched. Tests with real sandboxes
// live with the daemon.

// untouchable records every call made to it; it implements both
// runtime.Runtime and Store.
type untouchable struct {
	mu    sync.Mutex
	calls []string
}

var (
	_ runtime.Runtime = (*untouchable)(nil)
	_ Store           = (*untouchable)(nil)
)

func (u *untouchable) record(call string) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.calls = append(u.calls, call)
	return fmt.Errorf("%s called during validation", call)
}

func (u *untouchable) called() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return slices.Clone(u.calls)
}

func (u *untouchable) Name() string                              { return "untouchable" }
func (u *untouchable) Start(context.Context, runtime.Spec) error { return u.record("runtime.Start") }
func (u *untouchable) Delete(context.Context, string) error      { return u.record("runtime.Delete") }
func (u *untouchable) List(context.Context) ([]string, error)    { return nil, u.record("runtime.List") }
func (u *untouchable) CreateSandbox(context.Context, store.Sandbox) error {
	return u.record("store.CreateSandbox")
}
func (u *untouchable) Connect(context.Context, string) (io.ReadWriteCloser, error) {
	return nil, u.record("runtime.Connect")
}
func (u *untouchable) GetSandbox(context.Context, string, string) (store.Sandbox, error) {
	return store.Sandbox{}, u.record("store.GetSandbox")
}
func (u *untouchable) ListSandboxes(context.Context, string, ...string) ([]store.Sandbox, error) {
	return nil, u.record("store.ListSandboxes")
}
func (u *untouchable) SetSandboxState(context.Context, string, string, bool) error {
	return u.record("store.SetSandboxState")
}
func (u *untouchable) SetSandboxExpiry(context.Context, string, time.Time, int) error {
	return u.record("store.SetSandboxExpiry")
}
func (u *untouchable) StoredBytes(context.Context, string) (int64, error) {
	return 0, u.record("store.StoredBytes")
}
func (u *untouchable) SetSandboxNetwork(context.Context, string, string, int) error {
	return u.record("store.SetSandboxNetwork")
}
func (u *untouchable) PruneEnded(context.Context, time.Time) (int64, error) {
	return 0, u.record("store.PruneEnded")
}

// newValidatingManager returns a Manager with default limits whose runtime
// and store must not be touched, and a real template store in which no
// template is built.
func newValidatingManager(t *testing.T) (*Manager, *untouchable) {
	t.Helper()
	templates, err := template.NewStore(filepath.Join(t.TempDir(), "templates"), "", template.Builtin(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	u := &untouchable{}
	m := NewManager(Options{
		Runtime:     u,
		Store:       u,
		Templates:   templates,
		AgentBinary: filepath.Join(t.TempDir(), "no-agent"),
	})
	return m, u
}

func TestExecRequest(t *testing.T) {
	m, _ := newValidatingManager(t)
	def := DefaultConfig()
	defMS := def.DefaultExecTimeout.Milliseconds()
	tests := []struct {
		name     string
		req      wire.ExecRequest
		wantArgv []string
		wantEnv  []string
		wantMS   int64
		wantErr  bool
	}{
		{name: "cmd", req: wire.ExecRequest{Cmd: "echo hi"}, wantArgv: []string{"/bin/sh", "-c", "echo hi"}, wantMS: defMS},
		{name: "argv", req: wire.ExecRequest{Argv: []string{"ls", "-l", ""}}, wantArgv: []string{"ls", "-l", ""}, wantMS: defMS},
		{name: "cmd and argv", req: wire.ExecRequest{Cmd: "ls", Argv: []string{"ls"}}, wantErr: true},
		{name: "neither", req: wire.ExecRequest{}, wantErr: true},
		{name: "empty argv", req: wire.ExecRequest{Argv: []string{}}, wantErr: true},
		{name: "empty argv[0]", req: wire.ExecRequest{Argv: []string{"", "x"}}, wantErr: true},
		{name: "NUL in cmd", req: wire.ExecRequest{Cmd: "echo \x00"}, wantErr: true},
		{name: "NUL in argv[0]", req: wire.ExecRequest{Argv: []string{"l\x00s"}}, wantErr: true},
		{name: "NUL in a later arg", req: wire.ExecRequest{Argv: []string{"ls", "a", "\x00"}}, wantErr: true},
		{name: "env sorted", req: wire.ExecRequest{Cmd: "env", Env: map[string]string{"B": "2", "A": "1", "_x9": ""}}, wantArgv: []string{"/bin/sh", "-c", "env"}, wantEnv: []string{"A=1", "B=2", "_x9="}, wantMS: defMS},
		{name: "env value with = and newline", req: wire.ExecRequest{Cmd: "env", Env: map[string]string{"A": "b=c\nd"}}, wantArgv: []string{"/bin/sh", "-c", "env"}, wantEnv: []string{"A=b=c\nd"}, wantMS: defMS},
		{name: "env name starting with a digit", req: wire.ExecRequest{Cmd: "env", Env: map[string]string{"1A": "x"}}, wantErr: true},
		{name: "env name with a dash", req: wire.ExecRequest{Cmd: "env", Env: map[string]string{"A-B": "x"}}, wantErr: true},
		{name: "env name with =", req: wire.ExecRequest{Cmd: "env", Env: map[string]string{"A=B": "x"}}, wantErr: true},
		{name: "empty env name", req: wire.ExecRequest{Cmd: "env", Env: map[string]string{"": "x"}}, wantErr: true},
		{name: "non-ASCII env name", req: wire.ExecRequest{Cmd: "env", Env: map[string]string{"Ä": "x"}}, wantErr: true},
		{name: "NUL in env value", req: wire.ExecRequest{Cmd: "env", Env: map[string]string{"A": "a\x00b"}}, wantErr: true},
		{name: "absolute cwd", req: wire.ExecRequest{Cmd: "pwd", Cwd: "/tmp"}, wantArgv: []string{"/bin/sh", "-c", "pwd"}, wantMS: defMS},
		{name: "relative cwd", req: wire.ExecRequest{Cmd: "pwd", Cwd: "tmp"}, wantErr: true},
		{name: "dot cwd", req: wire.ExecRequest{Cmd: "pwd", Cwd: "./"}, wantErr: true},
		{name: "timeout", req: wire.ExecRequest{Cmd: "x", TimeoutSeconds: 1.5}, wantArgv: []string{"/bin/sh", "-c", "x"}, wantMS: 1500},
		{name: "maximum timeout", req: wire.ExecRequest{Cmd: "x", TimeoutSeconds: def.MaxExecTimeout.Seconds()}, wantArgv: []string{"/bin/sh", "-c", "x"}, wantMS: def.MaxExecTimeout.Milliseconds()},
		{name: "sub-millisecond timeout", req: wire.ExecRequest{Cmd: "x", TimeoutSeconds: 0.0004}, wantArgv: []string{"/bin/sh", "-c", "x"}, wantMS: 1},
		{name: "nanosecond timeout", req: wire.ExecRequest{Cmd: "x", TimeoutSeconds: 1e-9}, wantArgv: []string{"/bin/sh", "-c", "x"}, wantMS: 1},
		{name: "smallest positive timeout", req: wire.ExecRequest{Cmd: "x", TimeoutSeconds: math.SmallestNonzeroFloat64}, wantArgv: []string{"/bin/sh", "-c", "x"}, wantMS: 1},
		{name: "negative zero timeout is the default", req: wire.ExecRequest{Cmd: "x", TimeoutSeconds: math.Copysign(0, -1)}, wantArgv: []string{"/bin/sh", "-c", "x"}, wantMS: defMS},
		{name: "negative timeout", req: wire.ExecRequest{Cmd: "x", TimeoutSeconds: -1}, wantErr: true},
		{name: "tiny negative timeout", req: wire.ExecRequest{Cmd: "x", TimeoutSeconds: -1e-12}, wantErr: true},
		{name: "timeout over the maximum", req: wire.ExecRequest{Cmd: "x", TimeoutSeconds: def.MaxExecTimeout.Seconds() + 0.001}, wantErr: true},
		{
			name: "timeout overflowing a Duration", req: wire.ExecRequest{Cmd: "x", TimeoutSeconds: 1e10}, wantErr: true,
		},
		{
			name: "huge timeout", req: wire.ExecRequest{Cmd: "x", TimeoutSeconds: 1e300}, wantErr: true,
		},
		// What can never run: one argument over Linux's 128 KiB, an
		// environment over 256 KiB, a cwd with NUL (issue 7, D15/D16).
		{name: "cmd of 300,000 bytes", req: wire.ExecRequest{Cmd: strings.Repeat("x", 300_000)}, wantErr: true},
		{name: "cmd of 128 KiB less a byte", req: wire.ExecRequest{Cmd: strings.Repeat("x", 128<<10-1)}, wantArgv: []string{"/bin/sh", "-c", strings.Repeat("x", 128<<10-1)}, wantMS: defMS},
		{name: "argv element over 128 KiB", req: wire.ExecRequest{Argv: []string{"echo", strings.Repeat("x", 128<<10)}}, wantErr: true},
		{name: "argv over 512 KiB in all", req: wire.ExecRequest{Argv: slices.Repeat([]string{strings.Repeat("x", 100<<10)}, 6)}, wantErr: true},
		{name: "env value of 200,000 <", req: wire.ExecRequest{Cmd: "env", Env: map[string]string{"A": strings.Repeat("<", 200_000)}}, wantErr: true},
		{name: "env over 256 KiB in all", req: wire.ExecRequest{Cmd: "env", Env: map[string]string{"A": strings.Repeat("a", 100<<10), "B": strings.Repeat("b", 100<<10), "C": strings.Repeat("c", 100<<10)}}, wantErr: true},
		{name: "NUL in cwd", req: wire.ExecRequest{Cmd: "pwd", Cwd: "/tmp\x00x"}, wantErr: true},
		{name: "cwd over 4096 bytes", req: wire.ExecRequest{Cmd: "pwd", Cwd: "/" + strings.Repeat("a", 4096)}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, _, err := m.execRequest(tt.req)
			if tt.wantErr {
				if !errors.Is(err, errdefs.ErrInvalid) {
					t.Fatalf("got %+v, %v, want ErrInvalid", got, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("got %v, want no error", err)
			}
			if !slices.Equal(got.Argv, tt.wantArgv) {
				t.Errorf("argv: got %q, want %q", got.Argv, tt.wantArgv)
			}
			if !slices.Equal(got.Env, tt.wantEnv) && (len(got.Env) != 0 || len(tt.wantEnv) != 0) {
				t.Errorf("env: got %q, want %q", got.Env, tt.wantEnv)
			}
			if got.Cwd != tt.req.Cwd {
				t.Errorf("cwd: got %q, want %q", got.Cwd, tt.req.Cwd)
			}
			if got.TimeoutMS != tt.wantMS {
				t.Errorf("timeout: got %d ms, want %d ms", got.TimeoutMS, tt.wantMS)
			}
			if got.TimeoutMS <= 0 {
				t.Errorf("timeout: got %d ms; 0 or less means none to the agent", got.TimeoutMS)
			}
			if got.MaxOutputBytes != int64(def.MaxOutputBytes) {
				t.Errorf("output cap: got %d, want %d", got.MaxOutputBytes, def.MaxOutputBytes)
			}
		})
	}
}

func TestExecValidatesBeforeLookup(t *testing.T) {
	m, u := newValidatingManager(t)
	out := func(string, []byte) error { return nil }
	ctx := context.Background()
	if _, err := m.Exec(ctx, "tenant", "sb-unknown", wire.ExecRequest{}, out); !errors.Is(err, errdefs.ErrInvalid) {
		t.Errorf("invalid request: got %v, want ErrInvalid", err)
	}
	if _, err := m.Exec(ctx, "tenant", "sb-unknown", wire.ExecRequest{Cmd: "true"}, out); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("unknown sandbox: got %v, want ErrNotFound", err)
	}
	if c := u.called(); len(c) > 0 {
		t.Errorf("runtime or store called: %v", c)
	}
}

func TestSetTimeoutValidation(t *testing.T) {
	m, u := newValidatingManager(t)
	maxTTL := int(DefaultConfig().MaxTTL / time.Second)
	tests := []struct {
		ttl     int
		wantErr error
	}{
		{ttl: 0, wantErr: errdefs.ErrInvalid},
		{ttl: -1, wantErr: errdefs.ErrInvalid},
		{ttl: maxTTL + 1, wantErr: errdefs.ErrInvalid},
		{ttl: math.MaxInt, wantErr: errdefs.ErrInvalid},
		// Valid TTLs get as far as looking the sandbox up.
		{ttl: 1, wantErr: errdefs.ErrNotFound},
		{ttl: maxTTL, wantErr: errdefs.ErrNotFound},
	}
	for _, tt := range tests {
		_, err := m.SetTimeout(context.Background(), "tenant", "sb-unknown", tt.ttl)
		if !errors.Is(err, tt.wantErr) {
			t.Errorf("SetTimeout(ttl %d): got %v, want %v", tt.ttl, err, tt.wantErr)
		}
	}
	if c := u.called(); len(c) > 0 {
		t.Errorf("runtime or store called: %v", c)
	}
}

func TestCreateValidation(t *testing.T) {
	m, u := newValidatingManager(t)
	def := DefaultConfig()
	maxTTL := int(def.MaxTTL / time.Second)
	// metadata returns n entries with keys of keyLen bytes (distinct when
	// keyLen >= 8) and values of valueLen bytes.
	metadata := func(n, keyLen, valueLen int) map[string]string {
		md := make(map[string]string, n)
		for i := range n {
			k := fmt.Sprintf("%08d", i) + strings.Repeat("k", max(keyLen-8, 0))
			md[k[:keyLen]] = strings.Repeat("v", valueLen)
		}
		return md
	}
	// A request that passes validation reaches the template store, where
	// no template is built: ErrUnavailable shows validation passed.
	passed := errdefs.ErrUnavailable
	tests := []struct {
		name    string
		req     wire.CreateSandboxRequest
		wantErr error
	}{
		{name: "defaults", req: wire.CreateSandboxRequest{}, wantErr: passed},
		{name: "unknown template", req: wire.CreateSandboxRequest{Template: "no-such-template"}, wantErr: errdefs.ErrNotFound},
		{name: "path-like template", req: wire.CreateSandboxRequest{Template: "../base"}, wantErr: errdefs.ErrNotFound},
		{name: "other builtin", req: wire.CreateSandboxRequest{Template: "code-interpreter"}, wantErr: passed},

		{name: "ttl 1", req: wire.CreateSandboxRequest{TTLSeconds: 1}, wantErr: passed},
		{name: "ttl at the maximum", req: wire.CreateSandboxRequest{TTLSeconds: maxTTL}, wantErr: passed},
		{name: "ttl over the maximum", req: wire.CreateSandboxRequest{TTLSeconds: maxTTL + 1}, wantErr: errdefs.ErrInvalid},
		{name: "negative ttl", req: wire.CreateSandboxRequest{TTLSeconds: -1}, wantErr: errdefs.ErrInvalid},
		{
			name: "ttl of MaxInt", req: wire.CreateSandboxRequest{TTLSeconds: math.MaxInt}, wantErr: errdefs.ErrInvalid,
		},
		{
			name: "ttl overflowing a Duration", req: wire.CreateSandboxRequest{TTLSeconds: 9_300_000_000}, wantErr: errdefs.ErrInvalid,
		},
		{
			name: "ttl wrapping to a small one", req: wire.CreateSandboxRequest{TTLSeconds: 18_446_744_074}, wantErr: errdefs.ErrInvalid,
		},

		{name: "minimum cpu", req: wire.CreateSandboxRequest{CPU: 0.05}, wantErr: passed},
		{name: "maximum cpu", req: wire.CreateSandboxRequest{CPU: def.MaxCPU}, wantErr: passed},
		{name: "cpu too small", req: wire.CreateSandboxRequest{CPU: 0.04}, wantErr: errdefs.ErrInvalid},
		{name: "cpu too large", req: wire.CreateSandboxRequest{CPU: def.MaxCPU + 0.5}, wantErr: errdefs.ErrInvalid},
		{name: "negative cpu", req: wire.CreateSandboxRequest{CPU: -1}, wantErr: errdefs.ErrInvalid},
		{name: "infinite cpu", req: wire.CreateSandboxRequest{CPU: math.Inf(1)}, wantErr: errdefs.ErrInvalid},

		{name: "minimum memory", req: wire.CreateSandboxRequest{MemoryMB: 64}, wantErr: passed},
		{name: "maximum memory", req: wire.CreateSandboxRequest{MemoryMB: def.MaxMemoryMB}, wantErr: passed},
		{name: "memory too small", req: wire.CreateSandboxRequest{MemoryMB: 63}, wantErr: errdefs.ErrInvalid},
		{name: "memory too large", req: wire.CreateSandboxRequest{MemoryMB: def.MaxMemoryMB + 1}, wantErr: errdefs.ErrInvalid},
		{name: "negative memory", req: wire.CreateSandboxRequest{MemoryMB: -64}, wantErr: errdefs.ErrInvalid},

		{name: "env", req: wire.CreateSandboxRequest{Env: map[string]string{"A": "1", "_B2": ""}}, wantErr: passed},
		{name: "env name with a dash", req: wire.CreateSandboxRequest{Env: map[string]string{"A-B": "1"}}, wantErr: errdefs.ErrInvalid},
		{name: "env name with a space", req: wire.CreateSandboxRequest{Env: map[string]string{"A B": "1"}}, wantErr: errdefs.ErrInvalid},
		{name: "empty env name", req: wire.CreateSandboxRequest{Env: map[string]string{"": "1"}}, wantErr: errdefs.ErrInvalid},
		{name: "NUL in env value", req: wire.CreateSandboxRequest{Env: map[string]string{"A": "\x00"}}, wantErr: errdefs.ErrInvalid},
		// Accepted before, then every exec failed (issue 7, D15).
		{name: "env value of 200,000 <", req: wire.CreateSandboxRequest{Env: map[string]string{"A": strings.Repeat("<", 200_000)}}, wantErr: errdefs.ErrInvalid},
		{name: "env of 100 KiB", req: wire.CreateSandboxRequest{Env: map[string]string{"A": strings.Repeat("<", 100<<10)}}, wantErr: passed},

		{name: "64 metadata keys", req: wire.CreateSandboxRequest{Metadata: metadata(64, 8, 8)}, wantErr: passed},
		{name: "65 metadata keys", req: wire.CreateSandboxRequest{Metadata: metadata(65, 8, 8)}, wantErr: errdefs.ErrInvalid},
		{name: "256-byte metadata key", req: wire.CreateSandboxRequest{Metadata: metadata(1, 256, 1)}, wantErr: passed},
		{name: "257-byte metadata key", req: wire.CreateSandboxRequest{Metadata: metadata(1, 257, 1)}, wantErr: errdefs.ErrInvalid},
		{name: "empty metadata key", req: wire.CreateSandboxRequest{Metadata: metadata(1, 0, 1)}, wantErr: errdefs.ErrInvalid},
		{name: "4096-byte metadata value", req: wire.CreateSandboxRequest{Metadata: metadata(1, 4, 4096)}, wantErr: passed},
		{name: "4097-byte metadata value", req: wire.CreateSandboxRequest{Metadata: metadata(1, 4, 4097)}, wantErr: errdefs.ErrInvalid},
		{name: "empty metadata value", req: wire.CreateSandboxRequest{Metadata: metadata(1, 4, 0)}, wantErr: passed},

		{name: "invalid beats unknown template", req: wire.CreateSandboxRequest{Template: "no-such-template", CPU: 100}, wantErr: errdefs.ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sb, err := m.Create(context.Background(), "tenant", tt.req)
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("Create(%+v): got %+v, %v, want %v", tt.req, sb, err, tt.wantErr)
			}
			if c := u.called(); len(c) > 0 {
				t.Fatalf("runtime or store called: %v", c)
			}
		})
	}
	if l, err := m.List(context.Background(), "tenant"); err != nil || len(l) != 0 {
		t.Errorf("List after refused creates: got %v, %v, want none", l, err)
	}
}

func (u *untouchable) SetSandboxPaused(context.Context, string, bool, int64, time.Time) error {
	return u.record("store.SetSandboxPaused")
}
func (u *untouchable) CreateSnapshot(context.Context, store.Snapshot) error {
	return u.record("store.CreateSnapshot")
}
func (u *untouchable) GetSnapshot(context.Context, string, string) (store.Snapshot, error) {
	return store.Snapshot{}, u.record("store.GetSnapshot")
}
func (u *untouchable) ListSnapshots(context.Context, string) ([]store.Snapshot, error) {
	return nil, u.record("store.ListSnapshots")
}
func (u *untouchable) DeleteSnapshot(context.Context, string, string) error {
	return u.record("store.DeleteSnapshot")
}
