package daemon

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pandastack/pandastack/internal/store"
)

// TestFirstAPIKeyIsNeverPrinted: the server's output usually ends up in a
// log file others can read (install.sh appends it to a 0644 file): the
// first key goes only to the 0600 key file, whose path is printed (issue
// 7, B5).
func TestFirstAPIKeyIsNeverPrinted(t *testing.T) {
	dir := t.TempDir()
	st, err := store.Open(context.Background(), filepath.Join(dir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var out bytes.Buffer
	if err := ensureAPIKey(context.Background(), st, dir, &out); err != nil {
		t.Fatal(err)
	}
	key, err := os.ReadFile(KeyFile(dir))
	if err != nil {
		t.Fatal(err)
	}
	k := strings.TrimSpace(string(key))
	if len(k) < 20 {
		t.Fatalf("key file holds %q, want a key", k)
	}
	if strings.Contains(out.String(), k) {
		t.Errorf("output %q contains the key", out.String())
	}
	if !strings.Contains(out.String(), KeyFile(dir)) {
		t.Errorf("output %q does not say where the key is", out.String())
	}
	if fi, err := os.Stat(KeyFile(dir)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("key file mode: got %v, %v, want 0600", fi.Mode().Perm(), err)
	}
	out.Reset()
	if err := ensureAPIKey(context.Background(), st, dir, &out); err != nil || out.Len() != 0 {
		t.Errorf("second start: got output %q, %v, want none", out.String(), err)
	}
}
