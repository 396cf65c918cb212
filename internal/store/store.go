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
	"strings"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// Store is safe for concurrent use.
type Store struct {
	db *sql.DB
	// onFull, when set, is called when a write finds the disk full; if it
	// reports that it freed space, the write is tried once more.
	onFull func() bool
}

// OnFull sets what a write that finds the disk full calls (the data
// disk's reserve); call it before using the store.
func (s *Store) OnFull(fn func() bool) { s.onFull = fn }

// isFull reports whether err is SQLite's "database or disk is full".
func isFull(err error) bool {
	return err != nil && (strings.Contains(err.Error(), "database or disk is full") || strings.Contains(err.Error(), "SQLITE_FULL"))
}

// exec runs a write. A full disk is a kind the API answers 507 to; with
// OnFull set, space is freed and the write tried once more.
func (s *Store) exec(ctx context.Context, q string, args ...any) (sql.Result, error) {
	res, err := s.db.ExecContext(ctx, q, args...)
	if isFull(err) && s.onFull != nil && s.onFull() {
		res, err = s.db.ExecContext(ctx, q, args...)
	}
	if isFull(err) {
		return nil, errdefs.Wrap(errdefs.ErrInsufficientStorage, err, "the server's disk is full")
	}
	return res, err
}

// migrations bring a database from user_version i to i+1. Append only.
var migrations = []string{
	// 1: the first schema.
	`
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
`,
	// 2: snapshots, pause and resume.
	`
ALTER TABLE sandboxes ADD COLUMN env TEXT NOT NULL DEFAULT '{}';
ALTER TABLE sandboxes ADD COLUMN on_timeout TEXT NOT NULL DEFAULT 'kill';
ALTER TABLE sandboxes ADD COLUMN ttl_seconds INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sandboxes ADD COLUMN paused_bytes INTEGER NOT NULL DEFAULT 0;
CREATE TABLE snapshots (
	id              TEXT PRIMARY KEY,
	tenant          TEXT NOT NULL,
	source_sandbox  TEXT NOT NULL,
	template        TEXT NOT NULL,
	size_bytes      INTEGER NOT NULL,
	created_at      INTEGER NOT NULL,
	env             TEXT NOT NULL DEFAULT '{}',
	cpu             REAL NOT NULL,
	memory_mb       INTEGER NOT NULL
);
CREATE INDEX snapshots_tenant ON snapshots(tenant);
`,
	// 3: per-sandbox disk and process limits.
	`
ALTER TABLE sandboxes ADD COLUMN disk_mb INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sandboxes ADD COLUMN pids INTEGER NOT NULL DEFAULT 0;
`,
	// 4: snapshots keep every limit they fix, and expire.
	`
ALTER TABLE snapshots ADD COLUMN disk_mb INTEGER NOT NULL DEFAULT 0;
ALTER TABLE snapshots ADD COLUMN pids INTEGER NOT NULL DEFAULT 0;
ALTER TABLE snapshots ADD COLUMN expires_at INTEGER NOT NULL DEFAULT 0;
`,
	// 5: the sandbox layout (1: agent inside the template; 2: agent on a
	// read-only mount), which restores must keep.
	`
ALTER TABLE sandboxes ADD COLUMN layout INTEGER NOT NULL DEFAULT 1;
ALTER TABLE snapshots ADD COLUMN layout INTEGER NOT NULL DEFAULT 1;
`,
	// 6: the template build (hash) a sandbox or snapshot was made from;
	// '' in older records, which were all made from the legacy build.
	`
ALTER TABLE sandboxes ADD COLUMN template_hash TEXT NOT NULL DEFAULT '';
ALTER TABLE snapshots ADD COLUMN template_hash TEXT NOT NULL DEFAULT '';
`,
	// 7: networking: the sandbox's network (JSON; '' for none), its slot
	// while it runs, and the access token of its exposed ports.
	`
ALTER TABLE sandboxes ADD COLUMN network TEXT NOT NULL DEFAULT '';
ALTER TABLE sandboxes ADD COLUMN net_slot INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sandboxes ADD COLUMN access_token TEXT NOT NULL DEFAULT '';
ALTER TABLE snapshots ADD COLUMN network TEXT NOT NULL DEFAULT '';
`,
	// 8: the audit log (audit.go).
	`
CREATE TABLE audit (
	id          INTEGER PRIMARY KEY AUTOINCREMENT,
	at          INTEGER NOT NULL,
	tenant      TEXT NOT NULL,
	key_id      TEXT NOT NULL DEFAULT '',
	request_id  TEXT NOT NULL DEFAULT '',
	action      TEXT NOT NULL,
	sandbox_id  TEXT NOT NULL DEFAULT '',
	target      TEXT NOT NULL DEFAULT '',
	command     TEXT NOT NULL DEFAULT '',
	exit_code   INTEGER,
	duration_ms INTEGER NOT NULL DEFAULT 0,
	outcome     TEXT NOT NULL
);
CREATE INDEX audit_tenant_id ON audit(tenant, id);
CREATE INDEX audit_at ON audit(at);
`,
}

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
	if err := migrate(ctx, db); err != nil {
		db.Close()
		return nil, fmt.Errorf("migrating %q: %w", path, err)
	}
	return &Store{db: db}, nil
}

// migrate applies the migrations the database has not seen, each in a
// transaction with its user_version bump.
func migrate(ctx context.Context, db *sql.DB) error {
	var v int
	if err := db.QueryRowContext(ctx, `PRAGMA user_version`).Scan(&v); err != nil {
		return fmt.Errorf("reading schema version: %w", err)
	}
	if v > len(migrations) {
		return fmt.Errorf("database schema version %d is newer than this build knows (%d)", v, len(migrations))
	}
	for i := v; i < len(migrations); i++ {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, migrations[i]); err != nil {
			tx.Rollback()
			return fmt.Errorf("applying migration %d: %w", i+1, err)
		}
		if _, err := tx.ExecContext(ctx, fmt.Sprintf(`PRAGMA user_version = %d`, i+1)); err != nil {
			tx.Rollback()
			return fmt.Errorf("recording migration %d: %w", i+1, err)
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("committing migration %d: %w", i+1, err)
		}
	}
	return nil
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
	// Env is the sandbox's own environment (from its create request).
	Env map[string]string
	// OnTimeout is what the TTL does: "kill" or "pause".
	OnTimeout string
	// TTLSeconds is the TTL the sandbox was created with; a resume
	// restarts it.
	TTLSeconds int
	// PausedBytes is the size of the saved state while paused.
	PausedBytes int64
	// DiskMB and Pids are the sandbox's disk and process limits; 0 in
	// records older than these columns (the server default then).
	DiskMB, Pids int
	// Layout is how the sandbox's file system is put together; a restore
	// of its image must use the same. 1 in records older than the column.
	Layout int
	// TemplateHash is the template build it was made from; "" in records
	// older than the column (the legacy build).
	TemplateHash string
	// Network is the sandbox's network as JSON ("" for none); NetSlot its
	// network slot while it runs (0: none); AccessToken opens its exposed
	// ports.
	Network     string
	NetSlot     int
	AccessToken string
}

const sandboxCols = `id, tenant, template, state, created_at, expires_at, metadata, cpu, memory_mb, env, on_timeout, ttl_seconds, paused_bytes, disk_mb, pids, layout, template_hash, network, net_slot, access_token`

// CreateSandbox inserts a new record.
func (s *Store) CreateSandbox(ctx context.Context, sb Sandbox) error {
	md, err := json.Marshal(sb.Metadata)
	if err != nil {
		return fmt.Errorf("encoding metadata: %w", err)
	}
	env, err := json.Marshal(sb.Env)
	if err != nil {
		return fmt.Errorf("encoding env: %w", err)
	}
	if sb.OnTimeout == "" {
		sb.OnTimeout = "kill"
	}
	if sb.Layout == 0 {
		sb.Layout = 1
	}
	_, err = s.exec(ctx, `INSERT INTO sandboxes (`+sandboxCols+`) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)`,
		sb.ID, sb.Tenant, sb.Template, sb.State, sb.CreatedAt.UnixNano(), sb.ExpiresAt.UnixNano(), string(md), sb.CPU, sb.MemoryMB,
		string(env), sb.OnTimeout, sb.TTLSeconds, sb.PausedBytes, sb.DiskMB, sb.Pids, sb.Layout, sb.TemplateHash,
		sb.Network, sb.NetSlot, sb.AccessToken)
	if err != nil {
		return fmt.Errorf("inserting sandbox %s: %w", sb.ID, err)
	}
	return nil
}

func scanSandbox(row interface{ Scan(...any) error }) (Sandbox, error) {
	var sb Sandbox
	var created, expires int64
	var md, env string
	if err := row.Scan(&sb.ID, &sb.Tenant, &sb.Template, &sb.State, &created, &expires, &md, &sb.CPU, &sb.MemoryMB,
		&env, &sb.OnTimeout, &sb.TTLSeconds, &sb.PausedBytes, &sb.DiskMB, &sb.Pids, &sb.Layout, &sb.TemplateHash,
		&sb.Network, &sb.NetSlot, &sb.AccessToken); err != nil {
		return Sandbox{}, err
	}
	if err := json.Unmarshal([]byte(env), &sb.Env); err != nil {
		return Sandbox{}, fmt.Errorf("decoding env of %s: %w", sb.ID, err)
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
		q += ` AND state IN (?` + strings.Repeat(",?", len(states)-1) + `)`
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

// SetSandboxState records a state change; ended states also record when.
func (s *Store) SetSandboxState(ctx context.Context, id, state string, ended bool) error {
	var endedAt any
	if ended {
		endedAt = time.Now().UnixNano()
	}
	res, err := s.exec(ctx, `UPDATE sandboxes SET state = ?, ended_at = COALESCE(?, ended_at) WHERE id = ?`, state, endedAt, id)
	if err != nil {
		return fmt.Errorf("updating state of sandbox %s: %w", id, err)
	}
	return mustAffect(res, id)
}

// SetSandboxExpiry records a new expiry time and the TTL a resume restarts.
func (s *Store) SetSandboxExpiry(ctx context.Context, id string, expires time.Time, ttlSeconds int) error {
	res, err := s.exec(ctx, `UPDATE sandboxes SET expires_at = ?, ttl_seconds = ? WHERE id = ?`, expires.UnixNano(), ttlSeconds, id)
	if err != nil {
		return fmt.Errorf("updating expiry of sandbox %s: %w", id, err)
	}
	return mustAffect(res, id)
}

// SetSandboxPaused records a pause (bytes > 0, state paused) or a resume
// (state running, new expiry).
func (s *Store) SetSandboxPaused(ctx context.Context, id string, paused bool, bytes int64, expires time.Time) error {
	state := "running"
	if paused {
		state = "paused"
	}
	res, err := s.exec(ctx, `UPDATE sandboxes SET state = ?, paused_bytes = ?, expires_at = ? WHERE id = ?`,
		state, bytes, expires.UnixNano(), id)
	if err != nil {
		return fmt.Errorf("recording pause state of sandbox %s: %w", id, err)
	}
	return mustAffect(res, id)
}

// PruneEnded deletes records of sandboxes that ended before t.
func (s *Store) PruneEnded(ctx context.Context, before time.Time) (int64, error) {
	res, err := s.exec(ctx, `DELETE FROM sandboxes WHERE ended_at IS NOT NULL AND ended_at < ?`, before.UnixNano())
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
	_, err := s.exec(ctx, `INSERT INTO api_keys (hash, tenant, created_at) VALUES (?,?,?)`, hash, tenant, time.Now().UnixNano())
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

// Snapshot is the stored record of one snapshot.
type Snapshot struct {
	ID            string
	Tenant        string
	SourceSandbox string
	Template      string
	SizeBytes     int64
	CreatedAt     time.Time
	// ExpiresAt is when the snapshot is deleted; zero in records older
	// than expiry (they are kept).
	ExpiresAt time.Time
	// Env and the limits are the source sandbox's, for sandboxes created
	// from the snapshot. DiskMB and Pids are 0 in records older than these
	// columns (the server default then).
	Env          map[string]string
	CPU          float64
	MemoryMB     int
	DiskMB, Pids int
	// Layout, TemplateHash and Network are the source sandbox's (see
	// Sandbox).
	Layout       int
	TemplateHash string
	Network      string
}

const snapshotCols = `id, tenant, source_sandbox, template, size_bytes, created_at, env, cpu, memory_mb, disk_mb, pids, expires_at, layout, template_hash, network`

// CreateSnapshot inserts a snapshot record.
func (s *Store) CreateSnapshot(ctx context.Context, sn Snapshot) error {
	env, err := json.Marshal(sn.Env)
	if err != nil {
		return fmt.Errorf("encoding env: %w", err)
	}
	var expires int64
	if !sn.ExpiresAt.IsZero() {
		expires = sn.ExpiresAt.UnixNano()
	}
	if sn.Layout == 0 {
		sn.Layout = 1
	}
	_, err = s.exec(ctx, `INSERT INTO snapshots (`+snapshotCols+`) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)`,
		sn.ID, sn.Tenant, sn.SourceSandbox, sn.Template, sn.SizeBytes, sn.CreatedAt.UnixNano(), string(env), sn.CPU, sn.MemoryMB,
		sn.DiskMB, sn.Pids, expires, sn.Layout, sn.TemplateHash, sn.Network)
	if err != nil {
		return fmt.Errorf("inserting snapshot %s: %w", sn.ID, err)
	}
	return nil
}

func scanSnapshot(row interface{ Scan(...any) error }) (Snapshot, error) {
	var sn Snapshot
	var created, expires int64
	var env string
	if err := row.Scan(&sn.ID, &sn.Tenant, &sn.SourceSandbox, &sn.Template, &sn.SizeBytes, &created, &env, &sn.CPU, &sn.MemoryMB,
		&sn.DiskMB, &sn.Pids, &expires, &sn.Layout, &sn.TemplateHash, &sn.Network); err != nil {
		return Snapshot{}, err
	}
	sn.CreatedAt = time.Unix(0, created).UTC()
	if expires != 0 {
		sn.ExpiresAt = time.Unix(0, expires).UTC()
	}
	if err := json.Unmarshal([]byte(env), &sn.Env); err != nil {
		return Snapshot{}, fmt.Errorf("decoding env of %s: %w", sn.ID, err)
	}
	return sn, nil
}

// GetSnapshot returns the tenant's snapshot; another tenant's is ErrNotFound.
func (s *Store) GetSnapshot(ctx context.Context, tenant, id string) (Snapshot, error) {
	sn, err := scanSnapshot(s.db.QueryRowContext(ctx, `SELECT `+snapshotCols+` FROM snapshots WHERE id = ? AND tenant = ?`, id, tenant))
	if errors.Is(err, sql.ErrNoRows) {
		return Snapshot{}, errdefs.NotFound("snapshot %q not found", id)
	}
	if err != nil {
		return Snapshot{}, fmt.Errorf("reading snapshot %s: %w", id, err)
	}
	return sn, nil
}

// ListSnapshots returns the tenant's snapshots, oldest first; an empty
// tenant means every tenant.
func (s *Store) ListSnapshots(ctx context.Context, tenant string) ([]Snapshot, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+snapshotCols+` FROM snapshots WHERE (? = '' OR tenant = ?) ORDER BY created_at, id`, tenant, tenant)
	if err != nil {
		return nil, fmt.Errorf("listing snapshots: %w", err)
	}
	defer rows.Close()
	var out []Snapshot
	for rows.Next() {
		sn, err := scanSnapshot(rows)
		if err != nil {
			return nil, fmt.Errorf("listing snapshots: %w", err)
		}
		out = append(out, sn)
	}
	return out, rows.Err()
}

// DeleteSnapshot removes the tenant's snapshot record.
func (s *Store) DeleteSnapshot(ctx context.Context, tenant, id string) error {
	res, err := s.exec(ctx, `DELETE FROM snapshots WHERE id = ? AND tenant = ?`, id, tenant)
	if err != nil {
		return fmt.Errorf("deleting snapshot %s: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return errdefs.NotFound("snapshot %q not found", id)
	}
	return nil
}

// StoredBytes is what the tenant keeps on disk: its snapshots and the saved
// state of its paused sandboxes.
func (s *Store) StoredBytes(ctx context.Context, tenant string) (int64, error) {
	var n int64
	err := s.db.QueryRowContext(ctx, `SELECT
		COALESCE((SELECT SUM(size_bytes) FROM snapshots WHERE tenant = ?), 0) +
		COALESCE((SELECT SUM(paused_bytes) FROM sandboxes WHERE tenant = ? AND state = 'paused'), 0)`, tenant, tenant).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("summing stored bytes of tenant %s: %w", tenant, err)
	}
	return n, nil
}

// SetSandboxNetwork records a sandbox's network (JSON, "" for none) and
// its slot (0 for none).
func (s *Store) SetSandboxNetwork(ctx context.Context, id, network string, slot int) error {
	res, err := s.exec(ctx, `UPDATE sandboxes SET network = ?, net_slot = ? WHERE id = ?`, network, slot, id)
	if err != nil {
		return fmt.Errorf("recording the network of sandbox %s: %w", id, err)
	}
	return mustAffect(res, id)
}
