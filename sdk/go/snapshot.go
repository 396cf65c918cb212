package pandastack

import (
	"context"
	"fmt"
	"net/http"
	"net/url"

	"github.com/pandastack/pandastack/wire"
)

// snapshotPath returns the API path of snapshot id.
func snapshotPath(id string) string {
	return "/snapshots/" + url.PathEscape(id)
}

// Snapshots lists the caller's snapshots.
func (c *Client) Snapshots(ctx context.Context) ([]wire.Snapshot, error) {
	var l wire.SnapshotList
	if err := c.do(ctx, http.MethodGet, "/snapshots", nil, &l, http.StatusOK); err != nil {
		return nil, fmt.Errorf("listing snapshots: %w", err)
	}
	return l.Snapshots, nil
}

// Snapshot describes snapshot id; it fails with ErrNotFound when there is
// none (or it belongs to another tenant).
func (c *Client) Snapshot(ctx context.Context, id string) (wire.Snapshot, error) {
	var snap wire.Snapshot
	if err := c.do(ctx, http.MethodGet, snapshotPath(id), nil, &snap, http.StatusOK); err != nil {
		return wire.Snapshot{}, fmt.Errorf("getting snapshot %q: %w", id, err)
	}
	return snap, nil
}

// DeleteSnapshot deletes snapshot id; it fails with ErrConflict while a
// create from it is in progress.
func (c *Client) DeleteSnapshot(ctx context.Context, id string) error {
	if err := c.do(ctx, http.MethodDelete, snapshotPath(id), nil, nil, http.StatusNoContent); err != nil {
		return fmt.Errorf("deleting snapshot %q: %w", id, err)
	}
	return nil
}
