package store

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/pandastack/pandastack/wire"
)

// AuditFilter selects a tenant's audit entries; zero fields select all.
type AuditFilter struct {
	SandboxID string
	Action    string
	Since     time.Time
	// Limit caps the entries returned (newest first); 100 when zero.
	Limit int
}

// AddAudit records one audit entry of tenant; e.ID and e.Time are set by
// the store when zero.
func (s *Store) AddAudit(ctx context.Context, tenant string, e wire.AuditEntry) error {
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	var exit sql.NullInt64
	if e.ExitCode != nil {
		exit = sql.NullInt64{Int64: int64(*e.ExitCode), Valid: true}
	}
	if _, err := s.exec(ctx, `INSERT INTO audit (at, tenant, key_id, request_id, action, sandbox_id, target, command, exit_code, duration_ms, outcome)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		e.Time.UnixNano(), tenant, e.KeyID, e.RequestID, e.Action, e.SandboxID, e.Target, e.Command, exit, e.DurationMS, e.Outcome); err != nil {
		return fmt.Errorf("recording audit entry: %w", err)
	}
	return nil
}

// ListAudit returns the tenant's audit entries that match f, newest first.
func (s *Store) ListAudit(ctx context.Context, tenant string, f AuditFilter) ([]wire.AuditEntry, error) {
	q := `SELECT id, at, key_id, request_id, action, sandbox_id, target, command, exit_code, duration_ms, outcome FROM audit WHERE tenant = ?`
	args := []any{tenant}
	if f.SandboxID != "" {
		q += ` AND sandbox_id = ?`
		args = append(args, f.SandboxID)
	}
	if f.Action != "" {
		q += ` AND action = ?`
		args = append(args, f.Action)
	}
	if !f.Since.IsZero() {
		q += ` AND at >= ?`
		args = append(args, f.Since.UnixNano())
	}
	if f.Limit <= 0 {
		f.Limit = 100
	}
	q += ` ORDER BY id DESC LIMIT ?`
	args = append(args, f.Limit)
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("listing audit entries: %w", err)
	}
	defer rows.Close()
	out := []wire.AuditEntry{}
	for rows.Next() {
		var e wire.AuditEntry
		var at int64
		var exit sql.NullInt64
		if err := rows.Scan(&e.ID, &at, &e.KeyID, &e.RequestID, &e.Action, &e.SandboxID, &e.Target, &e.Command, &exit, &e.DurationMS, &e.Outcome); err != nil {
			return nil, fmt.Errorf("reading audit entry: %w", err)
		}
		e.Time = time.Unix(0, at).UTC()
		if exit.Valid {
			c := int(exit.Int64)
			e.ExitCode = &c
		}
		out = append(out, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("listing audit entries: %w", err)
	}
	return out, nil
}

// PruneAudit deletes audit entries recorded before before and returns how
// many it deleted.
func (s *Store) PruneAudit(ctx context.Context, before time.Time) (int64, error) {
	res, err := s.exec(ctx, `DELETE FROM audit WHERE at < ?`, before.UnixNano())
	if err != nil {
		return 0, fmt.Errorf("pruning audit entries: %w", err)
	}
	return res.RowsAffected()
}
