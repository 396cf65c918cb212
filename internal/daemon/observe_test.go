package daemon_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemon"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/internal/testenv"
	pandastack "github.com/pandastack/pandastack/sdk/go"
	"github.com/pandastack/pandastack/wire"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// scrape reads the server's /metrics with the Prometheus text parser.
func scrape(t *testing.T, s *daemontest.Server) map[string]*dto.MetricFamily {
	t.Helper()
	if s.MetricsURL == "" {
		t.Fatal("the server serves no metrics")
	}
	resp, err := http.Get(s.MetricsURL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %d", resp.StatusCode)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	return fams
}

// metricValue returns the value of the family's metric with exactly the
// given labels (a histogram's sample count), and whether there is one.
func metricValue(fams map[string]*dto.MetricFamily, name string, labels ...string) (float64, bool) {
	f, ok := fams[name]
	if !ok {
		return 0, false
	}
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		if len(have) != len(labels)/2 {
			continue
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if have[labels[i]] != labels[i+1] {
				continue next
			}
		}
		switch {
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount()), true
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		}
	}
	return 0, false
}

func value(fams map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	v, _ := metricValue(fams, name, labels...)
	return v
}

// TestMetrics scrapes a real server after a known set of operations: the
// latency histograms count exactly what was done, by outcome; errors are
// counted by code; the sandboxes-by-state gauges match the API's list; the
// pool's hits and misses add up to the creates that could use it; the host
// gauges are there. The API's own port does not serve the metrics.
func TestMetrics(t *testing.T) {
	s := daemontest.Start(t, nil)
	before := scrape(t, s)
	for _, op := range []string{"create", "exec", "pause"} {
		if n := value(before, "pandastack_operation_duration_seconds", "operation", op, "outcome", "ok"); n != 0 {
			t.Errorf("%s count before anything was done: %v", op, n)
		}
	}
	const creates, execs = 3, 4
	var ids []string
	for range creates {
		ids = append(ids, s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 600}).ID)
	}
	for i := range execs {
		res := s.Exec(t, ids[i%len(ids)], wire.ExecRequest{Cmd: fmt.Sprintf("exit %d", i)})
		if res.ExitCode != i {
			t.Fatalf("exec %d: %+v", i, res)
		}
	}
	// An exec of a sandbox that does not exist: counted by its outcome.
	if resp, b := s.Do(t, "POST", "/v1/sandboxes/sb-0000000000000000/exec", wire.ExecRequest{Cmd: "true"}); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("exec of a missing sandbox: %d %s", resp.StatusCode, b)
	}
	if resp, b := s.Do(t, "POST", "/v1/sandboxes/"+ids[0]+"/pause", nil); resp.StatusCode != http.StatusOK {
		t.Fatalf("pause: %d %s", resp.StatusCode, b)
	}
	// Another tenant's sandbox counts under its own name.
	other := s.WithTenant(t, "tenant-b")
	other.Create(t, wire.CreateSandboxRequest{TTLSeconds: 600, MemoryMB: 512})

	m := scrape(t, s)
	for _, c := range []struct {
		op, outcome string
		want        float64
	}{
		{"create", "ok", creates + 1}, {"exec", "ok", execs}, {"exec", "not_found", 1}, {"pause", "ok", 1},
		{"resume", "ok", 0}, {"fork", "ok", 0}, {"snapshot", "ok", 0},
	} {
		if got := value(m, "pandastack_operation_duration_seconds", "operation", c.op, "outcome", c.outcome); got != c.want {
			t.Errorf("%s/%s count = %v, want %v", c.op, c.outcome, got, c.want)
		}
	}
	if d := value(m, "pandastack_errors_total", "code", "not_found") - value(before, "pandastack_errors_total", "code", "not_found"); d != 1 {
		t.Errorf("not_found errors rose by %v, want 1", d)
	}
	// The gauges match the API's lists, tenant by tenant and in all.
	byState := map[string]int{}
	for _, srv := range []*daemontest.Server{s, other} {
		var l wire.SandboxList
		resp, b := srv.Do(t, "GET", "/v1/sandboxes", nil)
		if resp.StatusCode != http.StatusOK || json.Unmarshal(b, &l) != nil {
			t.Fatalf("list: %d %s", resp.StatusCode, b)
		}
		tenant := map[*daemontest.Server]string{s: "default", other: "tenant-b"}[srv]
		mine := map[string]int{}
		var mem int64
		for _, sb := range l.Sandboxes {
			byState[sb.State]++
			mine[sb.State]++
			if sb.State == wire.StateRunning {
				mem += int64(sb.MemoryMB) << 20
			}
		}
		for _, st := range []string{wire.StateRunning, wire.StatePaused} {
			if got := value(m, "pandastack_tenant_sandboxes", "tenant", tenant, "state", st); got != float64(mine[st]) {
				t.Errorf("tenant %s %s = %v, the API lists %d", tenant, st, got, mine[st])
			}
		}
		if got := value(m, "pandastack_tenant_memory_reserved_bytes", "tenant", tenant); got != float64(mem) {
			t.Errorf("tenant %s memory reserved = %v, want %d", tenant, got, mem)
		}
	}
	if byState[wire.StateRunning] != creates || byState[wire.StatePaused] != 1 {
		t.Fatalf("the API lists %v, want %d running and 1 paused", byState, creates)
	}
	for _, st := range []string{wire.StateRunning, wire.StatePaused} {
		if got := value(m, "pandastack_sandboxes", "state", st, "template", "base"); got != float64(byState[st]) {
			t.Errorf("pandastack_sandboxes{state=%s,template=base} = %v, the API lists %d", st, got, byState[st])
		}
	}
	// Every create with default limits of a pooled template is a hit or a
	// miss; the other tenant's asked for other limits.
	if h, ms := value(m, "pandastack_pool_hits_total"), value(m, "pandastack_pool_misses_total"); h+ms != creates {
		t.Errorf("pool hits %v + misses %v, want %d", h, ms, creates)
	}
	if _, ok := metricValue(m, "pandastack_pool_ready", "template", "base"); !ok {
		t.Error("no pool depth for base")
	}
	for _, name := range []string{"pandastack_host_cpus", "pandastack_host_memory_available_bytes", "pandastack_host_memory_total_bytes", "pandastack_host_disk_available_bytes", "pandastack_host_disk_total_bytes"} {
		if v := value(m, name); v <= 0 {
			t.Errorf("%s = %v, want > 0", name, v)
		}
	}
	if v := value(m, "pandastack_host_cpu_reserved"); v < creates {
		t.Errorf("reserved CPUs %v, want at least %d", v, creates)
	}
	if _, ok := m["pandastack_runsc_failures_total"]; ok {
		// A counter vector appears once a failure happened; none should.
		t.Errorf("runsc failures: %v", m["pandastack_runsc_failures_total"])
	}

	// The API's port serves no metrics, with a key or without.
	for _, key := range []string{s.Key, ""} {
		req, _ := http.NewRequest("GET", s.URL+"/metrics", nil)
		if key != "" {
			req.Header.Set("Authorization", "Bearer "+key)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET /metrics on the API port: %d, want 404", resp.StatusCode)
		}
	}
	if !strings.HasPrefix(daemon.DefaultMetricsListen, "127.0.0.1:") {
		t.Errorf("the default metrics address %q is not loopback", daemon.DefaultMetricsListen)
	}
}

// sandboxMetrics reads a sandbox's samples.
func sandboxMetrics(t *testing.T, s *daemontest.Server, id string) wire.SandboxMetrics {
	t.Helper()
	resp, b := s.Do(t, "GET", "/v1/sandboxes/"+id+"/metrics", nil)
	var sm wire.SandboxMetrics
	if resp.StatusCode != http.StatusOK || json.Unmarshal(b, &sm) != nil {
		t.Fatalf("metrics of %s: %d %s", id, resp.StatusCode, b)
	}
	return sm
}

// waitSample polls a sandbox's metrics until a sample taken after since
// satisfies ok, within a generous deadline.
func waitSample(t *testing.T, s *daemontest.Server, id string, since time.Time, what string, ok func(wire.MetricsSample) bool) wire.MetricsSample {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	var last wire.SandboxMetrics
	for time.Now().Before(deadline) {
		last = sandboxMetrics(t, s, id)
		for _, x := range last.Samples {
			if x.Time.After(since) && ok(x) {
				return x
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("no sample shows %s within 2 minutes; last samples: %+v", what, last.Samples)
	return wire.MetricsSample{}
}

// TestSandboxMetrics: a sandbox's samples show CPU rising while it spins,
// memory while it holds memory, disk while it keeps a file, and its
// processes; another tenant gets 404.
func TestSandboxMetrics(t *testing.T) {
	s := daemontest.Start(t, nil)
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 600})
	idle := waitSample(t, s, sb.ID, time.Time{}, "an idle sample", func(x wire.MetricsSample) bool { return x.Processes > 0 })
	if sm := sandboxMetrics(t, s, sb.ID); sm.SandboxID != sb.ID || sm.IntervalSeconds <= 0 {
		t.Errorf("metrics header: %+v", sm)
	}

	// CPU: a spinning process.
	spin := post[wire.Process](t, s, "/v1/sandboxes/"+sb.ID+"/processes", wire.StartProcessRequest{Cmd: "while :; do :; done"}, http.StatusCreated)
	start := time.Now()
	busy := waitSample(t, s, sb.ID, start, "CPU rising by a second", func(x wire.MetricsSample) bool {
		return x.CPUSeconds >= idle.CPUSeconds+1 && x.CPUPercent > 20
	})
	if busy.Processes <= idle.Processes {
		t.Errorf("processes while spinning %d, idle %d", busy.Processes, idle.Processes)
	}
	if resp, b := s.Do(t, "POST", fmt.Sprintf("/v1/sandboxes/%s/processes/%d/signal", sb.ID, spin.PID), wire.SignalRequest{Signal: "KILL"}); resp.StatusCode != http.StatusNoContent {
		t.Fatalf("signal: %d %s", resp.StatusCode, b)
	}

	// Memory: 300 MiB held in /tmp (a tmpfs inside: the sandbox's own
	// memory); disk: 100 MiB in a file of the writable layer.
	const held = 300 << 20
	s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "head -c 300M /dev/urandom > /tmp/hold"})
	start = time.Now()
	waitSample(t, s, sb.ID, start, "300 MiB more memory", func(x wire.MetricsSample) bool { return x.MemoryBytes >= idle.MemoryBytes+held*9/10 })
	s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "head -c 100M /dev/urandom > $HOME/blob && sync"})
	start = time.Now()
	waitSample(t, s, sb.ID, start, "100 MiB more disk", func(x wire.MetricsSample) bool { return x.DiskBytes >= idle.DiskBytes+90<<20 })

	// The samples are kept oldest first, at most the configured number.
	sm := sandboxMetrics(t, s, sb.ID)
	for i := 1; i < len(sm.Samples); i++ {
		if sm.Samples[i].Time.Before(sm.Samples[i-1].Time) {
			t.Fatalf("samples out of order at %d", i)
		}
	}

	// The Go SDK reads the same.
	h, err := s.Client(t).Get(context.Background(), sb.ID)
	if err != nil {
		t.Fatal(err)
	}
	if gm, err := h.Metrics(context.Background()); err != nil || gm.SandboxID != sb.ID || len(gm.Samples) == 0 {
		t.Errorf("SDK Metrics: %+v, %v", gm, err)
	}

	// Another tenant: 404, as if it did not exist.
	other := s.WithTenant(t, "tenant-b")
	resp, b := other.Do(t, "GET", "/v1/sandboxes/"+sb.ID+"/metrics", nil)
	var e wire.ErrorResponse
	if resp.StatusCode != http.StatusNotFound || json.Unmarshal(b, &e) != nil || e.Error.Code != "not_found" {
		t.Errorf("other tenant: %d %s, want 404 not_found", resp.StatusCode, b)
	}
}

// audit reads the tenant's audit entries with the query q.
func audit(t *testing.T, s *daemontest.Server, q url.Values) []wire.AuditEntry {
	t.Helper()
	resp, b := s.Do(t, "GET", "/v1/audit?"+q.Encode(), nil)
	var l wire.AuditList
	if resp.StatusCode != http.StatusOK || json.Unmarshal(b, &l) != nil {
		t.Fatalf("audit %s: %d %s", q.Encode(), resp.StatusCode, b)
	}
	return l.Entries
}

// TestAudit: each action of a tenant is recorded with who, what and its
// outcome, commands cut and never their input or output; filters work;
// another tenant sees none of it; bad queries are 400s naming the problem.
func TestAudit(t *testing.T) {
	s := daemontest.Start(t, nil)
	t0 := time.Now().UTC()
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 600})
	long := "echo " + strings.Repeat("x", 5000)
	s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "cat; exit 7", Stdin: "secret-input"})
	s.Exec(t, sb.ID, wire.ExecRequest{Cmd: long})
	post[wire.Process](t, s, "/v1/sandboxes/"+sb.ID+"/processes", wire.StartProcessRequest{Cmd: "sleep 600"}, http.StatusCreated)
	post[wire.Sandbox](t, s, "/v1/sandboxes/"+sb.ID+"/timeout", wire.SetTimeoutRequest{TTLSeconds: 900}, http.StatusOK)
	snap := post[wire.Snapshot](t, s, "/v1/sandboxes/"+sb.ID+"/snapshot", nil, http.StatusCreated)
	forks := post[wire.ForkResponse](t, s, "/v1/sandboxes/"+sb.ID+"/fork", wire.ForkRequest{Count: 1}, http.StatusCreated)
	post[wire.Sandbox](t, s, "/v1/sandboxes/"+sb.ID+"/pause", nil, http.StatusOK)
	post[wire.Sandbox](t, s, "/v1/sandboxes/"+sb.ID+"/resume", nil, http.StatusOK)
	fromSnap := s.Create(t, wire.CreateSandboxRequest{SnapshotID: snap.ID, TTLSeconds: 600})
	for _, id := range []string{forks.Sandboxes[0].ID, fromSnap.ID, sb.ID} {
		if resp, b := s.Do(t, "DELETE", "/v1/sandboxes/"+id, nil); resp.StatusCode != http.StatusNoContent {
			t.Fatalf("kill: %d %s", resp.StatusCode, b)
		}
	}
	if resp, b := s.Do(t, "DELETE", "/v1/snapshots/"+snap.ID, nil); resp.StatusCode != http.StatusNoContent {
		t.Fatalf("delete snapshot: %d %s", resp.StatusCode, b)
	}
	// A refused action is recorded with its outcome.
	if resp, _ := s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/exec", wire.ExecRequest{Cmd: "true"}); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("exec of a killed sandbox: %d", resp.StatusCode)
	}

	all := audit(t, s, url.Values{"sandbox": {sb.ID}, "limit": {"1000"}})
	// Newest first; turned oldest first to read in order.
	var got []string
	for i := len(all) - 1; i >= 0; i-- {
		e := all[i]
		got = append(got, e.Action+":"+e.Outcome)
		if e.KeyID == "" || len(e.KeyID) != 12 || strings.Contains(s.Key, e.KeyID) || e.RequestID == "" || e.Time.Before(t0.Add(-time.Second)) {
			t.Errorf("entry without who or when (or with part of the key): %+v", e)
		}
	}
	want := []string{"create:ok", "exec:ok", "exec:ok", "process:ok", "timeout:ok", "snapshot:ok", "fork:ok", "pause:ok", "resume:ok", "kill:ok", "exec:not_found"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("audit of %s:\n got %v\nwant %v", sb.ID, got, want)
	}
	byAction := func(a string) []wire.AuditEntry { return audit(t, s, url.Values{"sandbox": {sb.ID}, "action": {a}}) }
	execs := byAction("exec")
	first := execs[len(execs)-1]
	if first.Command != "cat; exit 7" || first.ExitCode == nil || *first.ExitCode != 7 {
		t.Errorf("first exec: %+v", first)
	}
	if c := execs[1].Command; len(c) > 1100 || !strings.HasPrefix(c, "echo xxx") {
		t.Errorf("a long command is kept as %d bytes", len(c))
	}
	raw, _ := json.Marshal(all)
	if strings.Contains(string(raw), "secret-input") {
		t.Error("the audit keeps a command's input")
	}
	if e := byAction("snapshot"); len(e) != 1 || e[0].Target != snap.ID {
		t.Errorf("snapshot entry: %+v", e)
	}
	if e := byAction("fork"); len(e) != 1 || e[0].Target != forks.Sandboxes[0].ID {
		t.Errorf("fork entry: %+v", e)
	}
	if e := audit(t, s, url.Values{"sandbox": {fromSnap.ID}, "action": {"create"}}); len(e) != 1 || e[0].Target != snap.ID {
		t.Errorf("create from a snapshot: %+v", e)
	}
	if e := audit(t, s, url.Values{"action": {"delete_snapshot"}}); len(e) != 1 || e[0].Target != snap.ID {
		t.Errorf("snapshot deletion: %+v", e)
	}
	if e := audit(t, s, url.Values{"limit": {"2"}}); len(e) != 2 {
		t.Errorf("limit 2: %d entries", len(e))
	}
	if e := audit(t, s, url.Values{"since": {time.Now().Add(time.Hour).UTC().Format(time.RFC3339)}}); len(e) != 0 {
		t.Errorf("since an hour ahead: %d entries", len(e))
	}

	// The Go SDK's filters.
	if ge, err := s.Client(t).Audit(context.Background(), pandastack.AuditOptions{SandboxID: sb.ID, Action: "exec", Limit: 10}); err != nil || len(ge) != len(execs) {
		t.Errorf("SDK Audit: %d entries, %v; want %d", len(ge), err, len(execs))
	}

	// Another tenant sees none of it, whatever it asks for.
	other := s.WithTenant(t, "tenant-b")
	for _, q := range []url.Values{{}, {"sandbox": {sb.ID}}, {"action": {"exec"}}} {
		if e := audit(t, other, q); len(e) != 0 {
			t.Errorf("other tenant %v sees %d entries", q, len(e))
		}
	}

	// Bad queries: 400 naming the problem.
	for q, word := range map[string]string{
		"action=launch": "action", "limit=0": "limit", "limit=x": "limit", "limit=100000": "limit",
		"since=yesterday": "since", "color=red": "color",
	} {
		resp, b := s.Do(t, "GET", "/v1/audit?"+q, nil)
		var e wire.ErrorResponse
		if resp.StatusCode != http.StatusBadRequest || json.Unmarshal(b, &e) != nil || e.Error.Code != "invalid_argument" || !strings.Contains(e.Error.Message, word) {
			t.Errorf("GET /v1/audit?%s: %d %s, want 400 naming %s", q, resp.StatusCode, b, word)
		}
	}
}

// TestAuditRetention: the reaper deletes entries older than the retention.
func TestAuditRetention(t *testing.T) {
	const retention = 10 * time.Second
	s := daemontest.Start(t, func(c *daemon.Config) { c.Sandbox.AuditRetention = retention })
	sb := s.Create(t, wire.CreateSandboxRequest{TTLSeconds: 600})
	s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "true"})
	done := time.Now()
	q := url.Values{"sandbox": {sb.ID}}
	if e := audit(t, s, q); len(e) != 2 && time.Since(done) < retention {
		t.Fatalf("entries right after the actions: %+v", e)
	}
	deadline := time.Now().Add(retention + 2*time.Minute)
	for {
		e := audit(t, s, q)
		if len(e) == 0 {
			if time.Since(done) < retention-time.Second {
				t.Fatalf("entries pruned after %s, before the retention of %s", time.Since(done), retention)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("entries still there %s after the actions (retention %s): %+v", time.Since(done), retention, e)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// New actions are recorded again.
	s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "true"})
	if e := audit(t, s, q); len(e) != 1 {
		t.Errorf("after pruning, a new exec: %+v", e)
	}
}

// A metrics address that cannot be opened (another server on the machine
// holds the default port) fails the start when the operator chose it, and
// is a logged error when it was the default (MetricsOptional): the API is
// served either way or not at all, never half.
func TestMetricsAddressTaken(t *testing.T) {
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	s := daemontest.Start(t, func(c *daemon.Config) {
		noPool(c)
		c.MetricsListen = held.Addr().String()
		c.MetricsOptional = true
	})
	if s.MetricsURL != "" {
		t.Errorf("metrics served at %s on a held address", s.MetricsURL)
	}
	if resp, b := s.Do(t, "GET", "/v1/sandboxes", nil); resp.StatusCode != http.StatusOK {
		t.Errorf("the API without metrics: %d %s", resp.StatusCode, b)
	}

	cfg := daemon.Config{DataDir: t.TempDir(), Listen: "127.0.0.1:0", MetricsListen: held.Addr().String(),
		Runsc: testenv.Runsc(t), AgentBinary: testenv.Agent(t), TemplateDir: testenv.TemplateDir()}
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	err = daemon.Run(ctx, cfg)
	if err == nil || !strings.Contains(err.Error(), "metrics") {
		t.Errorf("a chosen metrics address that is held: Run returned %v, want the listen error", err)
	}
}
