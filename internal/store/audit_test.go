package store

import (
	"context"
	"testing"
	"time"

	"github.com/pandastack/pandastack/wire"
)

func TestAudit(t *testing.T) {
	ctx := context.Background()
	s := openTest(t)
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	zero, two := 0, 2
	entries := []struct {
		tenant string
		e      wire.AuditEntry
	}{
		{"t1", wire.AuditEntry{Time: base, Action: "create", SandboxID: "sb-1", KeyID: "k1", Outcome: "ok"}},
		{"t1", wire.AuditEntry{Time: base.Add(time.Minute), Action: "exec", SandboxID: "sb-1", Command: "echo hi", ExitCode: &zero, DurationMS: 5, Outcome: "ok"}},
		{"t1", wire.AuditEntry{Time: base.Add(2 * time.Minute), Action: "exec", SandboxID: "sb-2", Command: "false", ExitCode: &two, Outcome: "ok"}},
		{"t2", wire.AuditEntry{Time: base.Add(3 * time.Minute), Action: "exec", SandboxID: "sb-3", Outcome: "ok"}},
	}
	for _, x := range entries {
		if err := s.AddAudit(ctx, x.tenant, x.e); err != nil {
			t.Fatal(err)
		}
	}
	all, err := s.ListAudit(ctx, "t1", AuditFilter{})
	if err != nil || len(all) != 3 {
		t.Fatalf("t1's entries: %v, %v; want 3", all, err)
	}
	if all[0].SandboxID != "sb-2" || all[2].Action != "create" || all[0].ExitCode == nil || *all[0].ExitCode != 2 || all[2].ExitCode != nil {
		t.Errorf("not newest first with their fields: %+v", all)
	}
	for _, c := range []struct {
		f    AuditFilter
		want int
	}{
		{AuditFilter{SandboxID: "sb-1"}, 2},
		{AuditFilter{Action: "exec"}, 2},
		{AuditFilter{Action: "exec", SandboxID: "sb-1"}, 1},
		{AuditFilter{Since: base.Add(time.Minute)}, 2},
		{AuditFilter{Limit: 1}, 1},
		{AuditFilter{SandboxID: "sb-3"}, 0}, // another tenant's
	} {
		got, err := s.ListAudit(ctx, "t1", c.f)
		if err != nil || len(got) != c.want {
			t.Errorf("%+v: got %d entries (%v), want %d", c.f, len(got), err, c.want)
		}
	}
	n, err := s.PruneAudit(ctx, base.Add(90*time.Second))
	if err != nil || n != 2 {
		t.Fatalf("PruneAudit: %d, %v; want 2", n, err)
	}
	if got, _ := s.ListAudit(ctx, "t1", AuditFilter{}); len(got) != 1 || got[0].SandboxID != "sb-2" {
		t.Errorf("after pruning: %+v", got)
	}
}
