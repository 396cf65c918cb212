package sandbox

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/store"
)

// TestDeleteSnapshotWhileRestoring: a snapshot that a create is restoring
// cannot be deleted (409) until the restore is done; then its record and
// files go. The store is real SQLite; no sandbox is involved.
func TestDeleteSnapshotWhileRestoring(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(ctx, filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	m := NewManager(Options{Store: st, StateDir: t.TempDir()})
	sn := store.Snapshot{ID: "snap-0000000000000001", Tenant: "t", SourceSandbox: "sb-1", Template: "base", CreatedAt: time.Now(), CPU: 1, MemoryMB: 64}
	if err := st.CreateSnapshot(ctx, sn); err != nil {
		t.Fatal(err)
	}
	dir := m.snapshotDir(sn.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if !m.pin(sn.ID) {
		t.Fatal("pin failed")
	}
	if err := m.DeleteSnapshot(ctx, "t", sn.ID); !errors.Is(err, errdefs.ErrConflict) {
		t.Fatalf("delete while restoring: got %v, want ErrConflict", err)
	}
	if err := m.DeleteSnapshot(ctx, "other", sn.ID); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("delete by another tenant: got %v, want ErrNotFound", err)
	}
	m.unpin(sn.ID)
	if err := m.DeleteSnapshot(ctx, "t", sn.ID); err != nil {
		t.Fatalf("delete after the restore: %v", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("snapshot files left: %v", err)
	}
}
