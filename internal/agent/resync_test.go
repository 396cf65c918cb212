package agent

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestMarkerMatcherSplits(t *testing.T) {
	nonce := []byte("0123456789abcdef")
	marker := append([]byte(syncMagic), nonce...)
	tests := []struct {
		name   string
		before []byte
	}{
		{"alone", nil},
		{"after data", []byte("some yamux bytes")},
		{"after a partial magic", []byte(syncMagic[:7])},
		{"after a magic-start byte", []byte{0xfe, 0xfe}},
	}
	for _, tt := range tests {
		stream := append(append(append([]byte{}, tt.before...), marker...), []byte("after")...)
		// Feed the stream cut at every position into two chunks.
		for cut := 0; cut <= len(stream); cut++ {
			var m markerMatcher
			var got []byte
			rest := -1
			for ci, chunk := range [][]byte{stream[:cut], stream[cut:]} {
				if end, n := m.feed(chunk); end >= 0 {
					got = n
					if ci == 0 {
						rest = end
					} else {
						rest = cut + end
					}
				}
			}
			if !bytes.Equal(got, nonce) || string(stream[rest:]) != "after" {
				t.Errorf("%s, cut %d: got nonce %q rest %q, want %q %q", tt.name, cut, got, stream[max(rest, 0):], nonce, "after")
			}
		}
	}
}

func TestMarkerMatcherIgnoresNearMisses(t *testing.T) {
	var m markerMatcher
	for _, b := range [][]byte{
		[]byte(syncMagic[:len(syncMagic)-1] + "x" + "0123456789abcdef"),
		[]byte("\xfePANDASTACK"),
		[]byte("-RESYNC-2\xfd0123456789abcdef"),
	} {
		if end, _ := m.feed(b); end >= 0 {
			t.Errorf("feed(%q) found a marker", b)
		}
	}
}

func TestSendStdinBreaksMarkers(t *testing.T) {
	m := []byte(syncMagic + "0123456789abcdef")
	tests := [][]byte{
		[]byte("plain"),
		m,
		append(append([]byte("x"), m...), m...),
		append(append([]byte{}, m...), []byte("tail")...),
	}
	for _, in := range tests {
		var frames [][]byte
		err := sendStdin(func(typ byte, p []byte) error {
			if typ != FrameStdin {
				t.Fatalf("frame type %q", typ)
			}
			frames = append(frames, append([]byte(nil), p...))
			return nil
		}, in)
		if err != nil {
			t.Fatal(err)
		}
		if got := bytes.Join(frames, nil); !bytes.Equal(got, in) {
			t.Errorf("frames of %q join to %q", in, got)
		}
		for _, f := range frames {
			if bytes.Contains(f, []byte(syncMagic)) {
				t.Errorf("frame %q holds the whole magic", f)
			}
		}
	}
}

// fifoStdio is an agent's stdio as the runtime makes it: two FIFOs that the
// agent holds open read-write, and that each daemon connection opens anew.
type fifoStdio struct {
	dir     string
	in, out *os.File // the agent's ends
}

func newFIFOStdio(t *testing.T) *fifoStdio {
	t.Helper()
	dir := t.TempDir()
	f := &fifoStdio{dir: dir}
	for _, name := range []string{"in", "out"} {
		if err := unix.Mkfifo(filepath.Join(dir, name), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	var err error
	if f.in, err = os.OpenFile(filepath.Join(dir, "in"), os.O_RDWR, 0); err != nil {
		t.Fatal(err)
	}
	if f.out, err = os.OpenFile(filepath.Join(dir, "out"), os.O_RDWR, 0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.in.Close(); f.out.Close() })
	return f
}

// connect opens the daemon's ends, as the runtime's Connect does.
func (f *fifoStdio) connect() (*pipeConn, error) {
	w, err := os.OpenFile(filepath.Join(f.dir, "in"), os.O_WRONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	r, err := os.OpenFile(filepath.Join(f.dir, "out"), os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		w.Close()
		return nil, err
	}
	return &pipeConn{r: r, w: w}, nil
}

// waitGoroutines waits until at most n goroutines run and returns the
// last count.
func waitGoroutines(n int, timeout time.Duration) int {
	deadline := time.Now().Add(timeout)
	for {
		got := runtime.NumGoroutine()
		if got <= n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestServeStdioReconnectsDoNotLeak(t *testing.T) {
	// Regression: Serve closed its session from a goroutine that waited
	// for a context that is never cancelled in the agent, so every daemon
	// reconnect left a goroutine (and its yamux session) behind.
	h := startServer(t)
	stdio := newFIFOStdio(t)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- h.srv.ServeStdio(ctx, stdio.in, stdio.out) }()
	t.Cleanup(func() {
		cancel()
		stdio.in.Close() // ends ServeStdio's read
		select {
		case <-served:
		case <-time.After(patience):
			t.Error("ServeStdio did not return after its input closed")
		}
		if err := h.stop(); err != nil {
			t.Error(err)
		}
	})

	session := func() error {
		conn, err := stdio.connect()
		if err != nil {
			return err
		}
		dctx, dcancel := context.WithTimeout(context.Background(), patience)
		defer dcancel()
		c, err := Dial(dctx, conn)
		if err != nil {
			conn.Close()
			return err
		}
		defer c.Close()
		_, err = c.Ping(dctx)
		return err
	}
	// The first sessions settle what runs once per process (the poller,
	// signal handling).
	for range 3 {
		if err := session(); err != nil {
			t.Fatal(err)
		}
	}
	base := runtime.NumGoroutine()
	const reconnects = 40
	for i := range reconnects {
		if err := session(); err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
	}
	// The last session stays open on the agent's side until the next
	// marker; everything of the earlier ones is gone.
	if got := waitGoroutines(base+2, patience); got > base+2 {
		t.Errorf("goroutines after %d reconnects: got %d, want at most %d; the agent's:\n%s",
			reconnects, got, base+2, strings.Join(goroutinesMatching("internal/agent."), "\n\n"))
	}
	if got := len(goroutinesMatching("internal/agent.(*Server).Serve(")); got > 1 {
		t.Errorf("Serve goroutines: got %d, want at most 1", got)
	}
	if err := session(); err != nil {
		t.Fatalf("session after the reconnects: %v", err)
	}
}
