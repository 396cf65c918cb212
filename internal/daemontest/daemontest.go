// Package daemontest starts real PandaStack servers for tests: a daemon on
// a loopback port with a fresh data directory, the shared template cache and
// real gVisor sandboxes.
package daemontest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/api"
	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/sandbox"
	"github.com/pandastack/pandastack/internal/store"
	"github.com/pandastack/pandastack/internal/testenv"
	pandastack "github.com/pandastack/pandastack/sdk/go"
	"github.com/pandastack/pandastack/wire"
)

// Server is a real daemon on a loopback port with a fresh data directory.
type Server struct {
	URL, Key string
	DataDir  string
	// CgroupParent is the cgroup under which its sandboxes get theirs.
	CgroupParent string
	// MetricsURL is where its /metrics is served (http://host:port).
	MetricsURL string
}

// Start starts a server; mut may adjust its configuration. The server and
// its sandboxes are gone when the test ends.
func Start(t testing.TB, mut func(*daemon.Config)) *Server {
	t.Helper()
	runsc := testenv.Runsc(t)
	testenv.Template(t, "base")
	dataDir := t.TempDir()
	addrc := make(chan string, 1)
	metricsAddr := make(chan string, 1)
	var logs bytes.Buffer
	logw := &syncWriter{w: &logs}
	cfg := daemon.Config{
		DataDir: dataDir, Listen: "127.0.0.1:0", Runsc: runsc, AgentBinary: testenv.Agent(t),
		TemplateDir: testenv.TemplateDir(), Version: "test",
		// Its own cgroup parent, so tests can count what it leaves.
		CgroupParent: fmt.Sprintf("/pandastack-test-%d-%d", os.Getpid(), time.Now().UnixNano()),
		Sandbox:      testSandboxConfig(),
		Log:          slog.New(slog.NewTextHandler(logw, nil)),
		Ready:        func(a string) { addrc <- a },
		// Its own loopback port, so tests can scrape it.
		MetricsListen: "127.0.0.1:0",
		MetricsReady:  func(a string) { metricsAddr <- a },
	}
	if mut != nil {
		mut(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- daemon.Run(ctx, cfg) }()
	var addr string
	select {
	case addr = <-addrc:
	case err := <-errc:
		cancel()
		t.Fatalf("server exited: %v", err)
	case <-time.After(3 * time.Minute):
		// Generous: the start reconciles and prepares, and machines
		// differ several-fold in speed.
		cancel()
		t.Fatal("server did not start within 3 minutes")
	}
	t.Cleanup(func() {
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("server: %v", err)
		}
		// The server's (now empty) cgroup parents.
		if ctls, err := os.ReadDir("/sys/fs/cgroup"); err == nil {
			for _, c := range ctls {
				_ = os.Remove(filepath.Join("/sys/fs/cgroup", c.Name(), cfg.CgroupParent))
			}
			_ = os.Remove(filepath.Join("/sys/fs/cgroup", cfg.CgroupParent))
		}
		if t.Failed() {
			logw.mu.Lock()
			t.Logf("server log:\n%s", logs.String())
			logw.mu.Unlock()
		}
	})
	key, err := os.ReadFile(daemon.KeyFile(cfg.DataDir))
	if err != nil {
		t.Fatal(err)
	}
	srv := &Server{URL: "http://" + addr, Key: strings.TrimSpace(string(key)), DataDir: cfg.DataDir, CgroupParent: cfg.CgroupParent}
	select {
	case a := <-metricsAddr:
		srv.MetricsURL = "http://" + a
	default: // a test turned metrics off
	}
	return srv
}

// testSandboxConfig is the server's own default configuration (`serve`
// without flags, warm pool included), with a faster reaper so that TTL
// tests end sooner, and a pool for the base template only, which is the
// one tests use. Tests that count host resources turn the pool off: a pool
// refilling in the background would blur their counts.
func testSandboxConfig() sandbox.Config {
	c := sandbox.DefaultConfig()
	c.ReapInterval = 200 * time.Millisecond
	c.PoolTemplates = []string{"base"}
	// Samples often enough for tests to see usage change.
	c.MetricsInterval = 250 * time.Millisecond
	return c
}

// syncWriter serialises writes from the server's goroutines.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

// Do sends one request with the server's key; body is nil, a string (sent
// as is) or a value (sent as JSON); hdr are header name/value pairs.
func (s *Server) Do(t testing.TB, method, path string, body any, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		j, _ := json.Marshal(b)
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, s.URL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+s.Key)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

// Create creates a sandbox, failing the test on error; it is killed when
// the test ends.
func (s *Server) Create(t testing.TB, req wire.CreateSandboxRequest) wire.Sandbox {
	t.Helper()
	resp, b := s.Do(t, "POST", "/v1/sandboxes", req)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("create: status %d: %s", resp.StatusCode, b)
	}
	var sb wire.Sandbox
	if err := json.Unmarshal(b, &sb); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Best effort: the test may have stopped this server already.
		req, _ := http.NewRequest("DELETE", s.URL+"/v1/sandboxes/"+sb.ID, nil)
		req.Header.Set("Authorization", "Bearer "+s.Key)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
		}
	})
	return sb
}

// Exec runs a blocking exec, failing the test on an HTTP error.
func (s *Server) Exec(t testing.TB, id string, req wire.ExecRequest) wire.ExecResult {
	t.Helper()
	resp, b := s.Do(t, "POST", "/v1/sandboxes/"+id+"/exec", req)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("exec: status %d: %s", resp.StatusCode, b)
	}
	var res wire.ExecResult
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatal(err)
	}
	return res
}

// WithTenant returns a view of the server with a new API key of another
// tenant, added straight to the store.
func (s *Server) WithTenant(t testing.TB, tenant string) *Server {
	t.Helper()
	key := fmt.Sprintf("ps_test_%s_%d", tenant, time.Now().UnixNano())
	st, err := store.Open(context.Background(), filepath.Join(s.DataDir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := st.AddAPIKey(context.Background(), api.HashKey(key), tenant); err != nil {
		t.Fatal(err)
	}
	return &Server{URL: s.URL, Key: key, DataDir: s.DataDir, CgroupParent: s.CgroupParent, MetricsURL: s.MetricsURL}
}

// Client returns a Go SDK client for the server.
func (s *Server) Client(t testing.TB) *pandastack.Client {
	t.Helper()
	c, err := pandastack.NewClient(pandastack.WithURL(s.URL), pandastack.WithAPIKey(s.Key))
	if err != nil {
		t.Fatal(err)
	}
	return c
}
