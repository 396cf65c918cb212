package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/pandastack/pandastack/internal/metrics"
	"github.com/pandastack/pandastack/internal/sandbox"
)

// DefaultMetricsListen is where `pandastack serve` serves /metrics unless
// told otherwise: loopback only, apart from the API's port, so that a proxy
// in front of the API never exposes it. The metrics name tenants and their
// usage: they are for the operator, never for a tenant.
const DefaultMetricsListen = "127.0.0.1:7424"

// census adapts the sandbox manager to the metrics' census.
func census(mgr *sandbox.Manager) func() metrics.Census {
	return func() metrics.Census {
		sbs, pool, hits, misses := mgr.Census()
		c := metrics.Census{Pool: pool, PoolHits: int64(hits), PoolMisses: int64(misses)}
		for _, s := range sbs {
			c.Sandboxes = append(c.Sandboxes, metrics.SandboxInfo{Tenant: s.Tenant, Template: s.Template, State: s.State, CPU: s.CPU, MemoryBytes: int64(s.MemoryMB) << 20})
		}
		return c
	}
}

// serveMetrics serves GET /metrics on cfg.MetricsListen until ctx ends;
// nothing when it is empty. It returns once the listener is open.
func serveMetrics(ctx context.Context, cfg Config, m *metrics.Metrics, log *slog.Logger) error {
	if cfg.MetricsListen == "" {
		return nil
	}
	ln, err := net.Listen("tcp", cfg.MetricsListen)
	if err != nil {
		return fmt.Errorf("listening for metrics on %s: %w", cfg.MetricsListen, err)
	}
	if ap, err := netipAddr(ln.Addr()); err == nil && !ap.IsLoopback() {
		log.Warn("metrics are served beyond loopback, unauthenticated: they name tenants and their usage", "addr", ln.Addr().String())
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m.Handler())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 120 * time.Second,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("serving metrics", "err", err)
		}
	}()
	context.AfterFunc(ctx, func() { _ = srv.Close() })
	log.Info("serving metrics", "addr", ln.Addr().String())
	if cfg.MetricsReady != nil {
		cfg.MetricsReady(ln.Addr().String())
	}
	return nil
}

func netipAddr(a net.Addr) (net.IP, error) {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return nil, fmt.Errorf("not a TCP address: %v", a)
	}
	return ta.IP, nil
}
