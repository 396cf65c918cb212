package daemon

import (
	"context"
	"path/filepath"

	"github.com/pandastack/pandastack/internal/api"
	"github.com/pandastack/pandastack/internal/store"
)

// addKey adds an API key for tenant to a running server's store.
func addKey(dataDir, key, tenant string) error {
	st, err := store.Open(context.Background(), filepath.Join(dataDir, "state.db"))
	if err != nil {
		return err
	}
	defer st.Close()
	return st.AddAPIKey(context.Background(), api.HashKey(key), tenant)
}
