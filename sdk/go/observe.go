package pandastack

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/pandastack/pandastack/wire"
)

// Metrics returns the sandbox's recent usage samples (CPU, memory, disk,
// processes), oldest first, as the server sampled them.
func (s *Sandbox) Metrics(ctx context.Context) (wire.SandboxMetrics, error) {
	var m wire.SandboxMetrics
	if err := s.c.do(ctx, http.MethodGet, s.path("/metrics"), nil, &m, http.StatusOK); err != nil {
		return wire.SandboxMetrics{}, fmt.Errorf("reading metrics of sandbox %q: %w", s.id, err)
	}
	return m, nil
}

// AuditOptions filter Client.Audit; zero fields select everything.
type AuditOptions struct {
	SandboxID string
	// Action is one of create, exec, process, kill, pause, resume, fork,
	// snapshot, delete_snapshot, timeout.
	Action string
	Since  time.Time
	// Limit caps the entries (1–1000; the server's default 100 when 0).
	Limit int
}

// Audit returns the tenant's audit log entries, newest first.
func (c *Client) Audit(ctx context.Context, o AuditOptions) ([]wire.AuditEntry, error) {
	q := url.Values{}
	if o.SandboxID != "" {
		q.Set("sandbox", o.SandboxID)
	}
	if o.Action != "" {
		q.Set("action", o.Action)
	}
	if !o.Since.IsZero() {
		q.Set("since", o.Since.UTC().Format(time.RFC3339Nano))
	}
	if o.Limit != 0 {
		q.Set("limit", strconv.Itoa(o.Limit))
	}
	path := "/audit"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	var l wire.AuditList
	if err := c.do(ctx, http.MethodGet, path, nil, &l, http.StatusOK); err != nil {
		return nil, fmt.Errorf("reading the audit log: %w", err)
	}
	return l.Entries, nil
}
