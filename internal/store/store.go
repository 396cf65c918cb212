// Package store keeps PandaStack's state in one SQLite file (pure-Go driver,
// modernc.org/sqlite): sandboxes and API keys. Every query is scoped by
// tenant where the object belongs to one.
package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// Store is safe for concurrent use.
type Store struct {
	db *sql.DB
}

const schema = `
CREATE TABLE IF NOT EXISTS sandboxes (
	id          TEXT PRIMARY KEY,
	tenant      TEXT NOT NULL,
	template    TEXT NOT NULL,
	state       TEXT NOT NULL,
	created_at  INTEGER NOT NULL,
	expires_at  INTEGER NOT NULL,
	ended_at    INTEGER,
	metadata    TEXT NOT NULL DEFAULT '{}',
	cpu         REAL NOT NULL,
	memory_mb   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sandboxes_tenant_state ON sandboxes(tenant, state);
CREATE TABLE IF NOT EXISTS api_keys (
	hash        TEXT PRIMARY KEY,
	tenant      TEXT NOT NULL,
	created_at  INTEGER NOT NULL
);
`

// Open opens (creating if needed) the database at path.
func Open(ctx context.Context, path string) (*Store, error) {
	dsn := "file:" + path + "?_pragma=busy_timeout(5000)&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_pragma=foreign_keys(1)"
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("opening database %q: %w", path, err)
	}
	// One writer at a time is all SQLite allows; a single connection also
	// keeps the pragmas in force.
	db.SetMaxOpenConns(1)
	if _, err := db.ExecContext(ctx, schema); err != nil {
		db.Close()
		return nil, fmt.Errorf("creating schema in %q: %w", path, err)
	}
	return &Store{db: db}, nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// Sandbox is the stored record of one sandbox.
type Sandbox struct {
	ID        string
	Tenant    string
	Template  string
	State     string
	CreatedAt time.Time
	ExpiresAt time.Time
	Metadata  map[string]string
	CPU       float64
	MemoryMB  int
}

const sandboxCols = `id, tenant, template, state, created_at, expires_at, metadata, cpu, memory_mb`

// CreateSandbox inserts a new record.
func (s *Store) CreateSandbox(ctx context.Context, sb Sandbox) error {
	md, err := json.Marshal(sb.Metadata)
	if err != nil {
		return fmt.Errorf("encoding metadata: %w", err)
	}
	_, err = s.db.ExecContext(ctx, `INSERT INTO sandboxes (`+sandboxCols+`) VALUES (?,?,?,?,?,?,?,?,?)`,
		sb.ID, sb.Tenant, sb.Template, sb.State, sb.CreatedAt.UnixNano(), sb.ExpiresAt.UnixNano(), string(md), sb.CPU, sb.MemoryMB)
	if err != nil {
		return fmt.Errorf("inserting sandbox %s: %w", sb.ID, err)
	}
	return nil
}

func scanSandbox(row interface{ Scan(...any) error }) (Sandbox, error) {
	var sb Sandbox
	var created, expires int64
	var md string
	if err := row.Scan(&sb.ID, &sb.Tenant, &sb.Template, &sb.State, &created, &expires, &md, &sb.CPU, &sb.MemoryMB); err != nil {
		return Sandbox{}, err
	}
	sb.CreatedAt = time.Unix(0, created).UTC()
	sb.ExpiresAt = time.Unix(0, expires).UTC()
	if err := json.Unmarshal([]byte(md), &sb.Metadata); err != nil {
		return Sandbox{}, fmt.Errorf("decoding metadata of %s: %w", sb.ID, err)
	}
	if sb.Metadata == nil {
		sb.Metadata = map[string]string{}
	}
	return sb, nil
}

// GetSandbox returns the tenant's sandbox; another tenant's is ErrNotFound.
func (s *Store) GetSandbox(ctx context.Context, tenant, id string) (Sandbox, error) {
	row := s.db.QueryRowContext(ctx, `SELECT `+sandboxCols+` FROM sandboxes WHERE id = ? AND tenant = ?`, id, tenant)
	sb, err := scanSandbox(row)
	if errors.Is(err, sql.ErrNoRows) {
		return Sandbox{}, errdefs.NotFound("sandbox %q not found", id)
	}
	if err != nil {
		return Sandbox{}, fmt.Errorf("reading sandbox %s: %w", id, err)
	}
	return sb, nil
}

// ListSandboxes returns the sandboxes in any of the given states, oldest
// first; an empty tenant means every tenant.
func (s *Store) ListSandboxes(ctx context.Context, tenant string, states ...string) ([]Sandbox, error) {
	q := `SELECT ` + sandboxCols + ` FROM sandboxes WHERE (? = '' OR tenant = ?)`
	args := []any{tenant, tenant}
	if len(states) > 0 {
		q += ` AND state IN (?` + repeat(",?", len(states)-1) + `)`
		for _, st := range states {
			args = append(args, st)
		}
	}
	q += ` ORDER BY created_at, id`
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("listing sandboxes: %w", err)
	}
	defer rows.Close()
	var out []Sandbox
	for rows.Next() {
		sb, err := scanSandbox(rows)
		if err != nil {
			return nil, fmt.Errorf("listing sandboxes: %w", err)
		}
		out = append(out, sb)
	}
	return out, rows.Err()
}

func repeat(s string, n int) string {
	out := ""
	for range n {
		out += s
	}
	return out
}

// SetSandboxState records a state change; ended states also record when.
func (s *Store) SetSandboxState(ctx context.Context, id, state string, ended bool) error {
	var endedAt any
	if ended {
		endedAt = time.Now().UnixNano()
	}
	res, err := s.db.ExecContext(ctx, `UPDATE sandboxes SET state = ?, ended_at = COALESCE(?, ended_at) WHERE id = ?`, state, endedAt, id)
	if err != nil {
		return fmt.Errorf("updating state of sandbox %s: %w", id, err)
	}
	return mustAffect(res, id)
}

// SetSandboxExpiry records a new expiry time.
func (s *Store) SetSandboxExpiry(ctx context.Context, id string, expires time.Time) error {
	res, err := s.db.ExecContext(ctx, `UPDATE sandboxes SET expires_at = ? WHERE id = ?`, expires.UnixNano(), id)
	if err != nil {
		return fmt.Errorf("updating expiry of sandbox %s: %w", id, err)
	}
	return mustAffect(res, id)
}

// PruneEnded deletes records of sandboxes that ended before t.
func (s *Store) PruneEnded(ctx context.Context, before time.Time) (int64, error) {
	res, err := s.db.ExecContext(ctx, `DELETE FROM sandboxes WHERE ended_at IS NOT NULL AND ended_at < ?`, before.UnixNano())
	if err != nil {
		return 0, fmt.Errorf("pruning ended sandboxes: %w", err)
	}
	return res.RowsAffected()
}

func mustAffect(res sql.Result, id string) error {
	n, err := res.RowsAffected()
	if err != nil {
		return err
	}
	if n == 0 {
		return errdefs.NotFound("sandbox %q not found", id)
	}
	return nil
}

// AddAPIKey stores the hash of a new key for tenant.
func (s *Store) AddAPIKey(ctx context.Context, hash, tenant string) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO api_keys (hash, tenant, created_at) VALUES (?,?,?)`, hash, tenant, time.Now().UnixNano())
	if err != nil {
		return fmt.Errorf("storing api key: %w", err)
	}
	return nil
}

// TenantForKey returns the tenant of the key with that hash, or ErrNotFound.
func (s *Store) TenantForKey(ctx context.Context, hash string) (string, error) {
	var tenant string
	err := s.db.QueryRowContext(ctx, `SELECT tenant FROM api_keys WHERE hash = ?`, hash).Scan(&tenant)
	if errors.Is(err, sql.ErrNoRows) {
		return "", errdefs.NotFound("api key not found")
	}
	if err != nil {
		return "", fmt.Errorf("looking up api key: %w", err)
	}
	return tenant, nil
}

// CountAPIKeys returns how many keys exist.
func (s *Store) CountAPIKeys(ctx context.Context) (int, error) {
	var n int
	if err := s.db.QueryRowContext(ctx, `SELECT count(*) FROM api_keys`).Scan(&n); err != nil {
		return 0, fmt.Errorf("counting api keys: %w", err)
	}
	return n, nil
}
