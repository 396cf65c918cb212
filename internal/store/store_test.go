package store

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
)

func openTest(t *testing.T) *Store {
	t.Helper()
	s, err := Open(context.Background(), filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestSandboxLifecycle(t *testing.T) {
	ctx := context.Background()
	s := openTest(t)
	now := time.Now().UTC().Truncate(time.Microsecond)
	sb := Sandbox{ID: "sb-1", Tenant: "t1", Template: "base", State: "running", CreatedAt: now, ExpiresAt: now.Add(time.Minute), Metadata: map[string]string{"k": "v"}, CPU: 1, MemoryMB: 512}
	if err := s.CreateSandbox(ctx, sb); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateSandbox(ctx, sb); err == nil {
		t.Fatal("duplicate insert succeeded")
	}
	got, err := s.GetSandbox(ctx, "t1", "sb-1")
	if err != nil {
		t.Fatal(err)
	}
	if !got.ExpiresAt.Equal(sb.ExpiresAt) || got.Metadata["k"] != "v" || got.MemoryMB != 512 {
		t.Fatalf("got %+v, want %+v", got, sb)
	}
	if _, err := s.GetSandbox(ctx, "t2", "sb-1"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("other tenant: got %v, want ErrNotFound", err)
	}
	if err := s.SetSandboxExpiry(ctx, "sb-1", now.Add(time.Hour), 60); err != nil {
		t.Fatal(err)
	}
	if err := s.SetSandboxState(ctx, "sb-1", "stopped", true); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		tenant string
		states []string
		want   int
	}{
		{"t1", nil, 1},
		{"t1", []string{"running"}, 0},
		{"t1", []string{"running", "stopped"}, 1},
		{"t2", nil, 0},
		{"", []string{"stopped"}, 1},
	}
	for _, tt := range tests {
		l, err := s.ListSandboxes(ctx, tt.tenant, tt.states...)
		if err != nil {
			t.Fatal(err)
		}
		if len(l) != tt.want {
			t.Errorf("ListSandboxes(%q, %v): got %d, want %d", tt.tenant, tt.states, len(l), tt.want)
		}
	}
	if err := s.SetSandboxState(ctx, "nope", "stopped", true); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("got %v, want ErrNotFound", err)
	}
	n, err := s.PruneEnded(ctx, time.Now().Add(time.Second))
	if err != nil || n != 1 {
		t.Fatalf("PruneEnded: got %d, %v, want 1", n, err)
	}
}

func TestAPIKeys(t *testing.T) {
	ctx := context.Background()
	s := openTest(t)
	if n, _ := s.CountAPIKeys(ctx); n != 0 {
		t.Fatalf("got %d keys, want 0", n)
	}
	if err := s.AddAPIKey(ctx, "h1", "default"); err != nil {
		t.Fatal(err)
	}
	if tn, err := s.TenantForKey(ctx, "h1"); err != nil || tn != "default" {
		t.Fatalf("got %q, %v", tn, err)
	}
	if _, err := s.TenantForKey(ctx, "h2"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("got %v, want ErrNotFound", err)
	}
}

func TestReopenKeepsState(t *testing.T) {
	ctx := context.Background()
	p := filepath.Join(t.TempDir(), "state.db")
	s, err := Open(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.AddAPIKey(ctx, "h", "t"); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = Open(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if n, _ := s.CountAPIKeys(ctx); n != 1 {
		t.Fatalf("got %d keys after reopen, want 1", n)
	}
}

func TestSnapshots(t *testing.T) {
	ctx := context.Background()
	s := openTest(t)
	sn := Snapshot{ID: "snap-1", Tenant: "t1", SourceSandbox: "sb-1", Template: "base", SizeBytes: 42,
		CreatedAt: time.Now().UTC().Truncate(time.Microsecond), Env: map[string]string{"A": "b"}, CPU: 1, MemoryMB: 256}
	if err := s.CreateSnapshot(ctx, sn); err != nil {
		t.Fatal(err)
	}
	got, err := s.GetSnapshot(ctx, "t1", "snap-1")
	if err != nil || got.SizeBytes != 42 || got.Env["A"] != "b" || !got.CreatedAt.Equal(sn.CreatedAt) {
		t.Fatalf("got %+v, %v", got, err)
	}
	if _, err := s.GetSnapshot(ctx, "t2", "snap-1"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("other tenant: got %v, want ErrNotFound", err)
	}
	if l, _ := s.ListSnapshots(ctx, "t1"); len(l) != 1 {
		t.Errorf("list: got %d, want 1", len(l))
	}
	if err := s.DeleteSnapshot(ctx, "t2", "snap-1"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("delete by other tenant: got %v, want ErrNotFound", err)
	}
	if err := s.DeleteSnapshot(ctx, "t1", "snap-1"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot(ctx, "t1", "snap-1"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("second delete: got %v, want ErrNotFound", err)
	}
}

func TestPauseRecord(t *testing.T) {
	ctx := context.Background()
	s := openTest(t)
	now := time.Now().UTC()
	if err := s.CreateSandbox(ctx, Sandbox{ID: "sb-1", Tenant: "t", Template: "base", State: "running", CreatedAt: now,
		ExpiresAt: now, Env: map[string]string{"K": "v"}, OnTimeout: "pause", TTLSeconds: 30, CPU: 1, MemoryMB: 64}); err != nil {
		t.Fatal(err)
	}
	if err := s.SetSandboxPaused(ctx, "sb-1", true, 1234, now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	got, err := s.GetSandbox(ctx, "t", "sb-1")
	if err != nil || got.State != "paused" || got.PausedBytes != 1234 || got.OnTimeout != "pause" || got.TTLSeconds != 30 || got.Env["K"] != "v" {
		t.Fatalf("got %+v, %v", got, err)
	}
}
