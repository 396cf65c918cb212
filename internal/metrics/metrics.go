// Package metrics is the daemon's Prometheus instrumentation: a registry
// owned by the daemon (no global state), the latency histograms of sandbox
// operations, error and runsc failure counters, and collectors that read the
// sandboxes, the warm pool and the host's headroom at scrape time.
//
// A nil *Metrics is valid and records nothing, so that parts built without
// metrics (tests, tools) need no special case.
package metrics

import (
	"bufio"
	"bytes"
	"net/http"
	"os"
	goruntime "runtime"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"
)

// Operations whose latency is measured.
const (
	OpCreate   = "create"
	OpExec     = "exec"
	OpSnapshot = "snapshot"
	OpFork     = "fork"
	OpPause    = "pause"
	OpResume   = "resume"
)

// OutcomeOK is the outcome label of an operation that succeeded; a failed
// one is labelled with its error code (not_found, quota, …).
const OutcomeOK = "ok"

// Metrics holds the daemon's registry and the metrics recorded as things
// happen. Create it with New.
type Metrics struct {
	reg       *prometheus.Registry
	ops       *prometheus.HistogramVec
	errors    *prometheus.CounterVec
	runsc     *prometheus.CounterVec
	startTime time.Time
}

// New returns Metrics with a fresh registry holding the Go runtime and
// process collectors and the daemon's own metrics.
func New() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		ops: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "pandastack_operation_duration_seconds",
			Help: "Latency of sandbox operations as the API served them, by operation and outcome (ok or the error code).",
			// From a warm-pool create (~15 ms) to a large fork or a
			// checkpoint (minutes).
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300},
		}, []string{"operation", "outcome"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pandastack_errors_total",
			Help: "Error answers of the API, by error code.",
		}, []string{"code"}),
		runsc: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pandastack_runsc_failures_total",
			Help: "runsc commands that failed, by subcommand.",
		}, []string{"command"}),
		startTime: time.Now(),
	}
	m.reg.MustRegister(m.ops, m.errors, m.runsc,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Registry returns the daemon's registry, for collectors of other parts.
func (m *Metrics) Registry() *prometheus.Registry {
	if m == nil {
		return nil
	}
	return m.reg
}

// Handler serves the registry in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}

// ObserveOp records one operation's latency and outcome.
func (m *Metrics) ObserveOp(op, outcome string, d time.Duration) {
	if m == nil {
		return
	}
	m.ops.WithLabelValues(op, outcome).Observe(d.Seconds())
}

// Error counts one error answer of the given code.
func (m *Metrics) Error(code string) {
	if m == nil {
		return
	}
	m.errors.WithLabelValues(code).Inc()
}

// RunscFailure counts one failed runsc command.
func (m *Metrics) RunscFailure(command string) {
	if m == nil {
		return
	}
	m.runsc.WithLabelValues(command).Inc()
}

// SandboxInfo is what the census says of one sandbox.
type SandboxInfo struct {
	Tenant, Template, State string
	// CPU and MemoryBytes are its reserved limits.
	CPU         float64
	MemoryBytes int64
}

// Census is the state of the server's sandboxes at one moment.
type Census struct {
	Sandboxes []SandboxInfo
	// Pool is the number of ready warm sandboxes per template.
	Pool map[string]int
	// PoolHits and PoolMisses count creates that could take a warm
	// sandbox and did, or found none ready.
	PoolHits, PoolMisses int64
}

// Host says where the host's headroom is measured.
type Host struct {
	// DataDir is the directory whose file system holds sandboxes' state.
	DataDir string
}

var (
	descSandboxes   = prometheus.NewDesc("pandastack_sandboxes", "Sandboxes by state and template.", []string{"state", "template"}, nil)
	descPoolDepth   = prometheus.NewDesc("pandastack_pool_ready", "Warm, unclaimed sandboxes ready, by template.", []string{"template"}, nil)
	descPoolHits    = prometheus.NewDesc("pandastack_pool_hits_total", "Creates served from the warm pool.", nil, nil)
	descPoolMisses  = prometheus.NewDesc("pandastack_pool_misses_total", "Creates that could have taken a warm sandbox but found none ready.", nil, nil)
	descTenantSbx   = prometheus.NewDesc("pandastack_tenant_sandboxes", "A tenant's sandboxes by state.", []string{"tenant", "state"}, nil)
	descTenantMem   = prometheus.NewDesc("pandastack_tenant_memory_reserved_bytes", "Memory reserved by a tenant's running sandboxes.", []string{"tenant"}, nil)
	descTenantCPU   = prometheus.NewDesc("pandastack_tenant_cpu_reserved", "CPUs reserved by a tenant's running sandboxes.", []string{"tenant"}, nil)
	descHostCPUs    = prometheus.NewDesc("pandastack_host_cpus", "CPUs of the host.", nil, nil)
	descHostLoad    = prometheus.NewDesc("pandastack_host_load1", "The host's one-minute load average.", nil, nil)
	descHostCPURes  = prometheus.NewDesc("pandastack_host_cpu_reserved", "CPUs reserved by running sandboxes.", nil, nil)
	descHostMemTot  = prometheus.NewDesc("pandastack_host_memory_total_bytes", "The host's memory.", nil, nil)
	descHostMemAv   = prometheus.NewDesc("pandastack_host_memory_available_bytes", "Memory the host can still give (MemAvailable).", nil, nil)
	descHostMemRes  = prometheus.NewDesc("pandastack_host_memory_reserved_bytes", "Memory reserved by running sandboxes.", nil, nil)
	descHostDiskTot = prometheus.NewDesc("pandastack_host_disk_total_bytes", "Size of the data directory's file system.", nil, nil)
	descHostDiskAv  = prometheus.NewDesc("pandastack_host_disk_available_bytes", "Free space of the data directory's file system.", nil, nil)
)

// censusCollector reads a census and the host at each scrape.
type censusCollector struct {
	census func() Census
	host   Host
}

// RegisterCensus adds the sandbox, pool, tenant and host gauges, read from
// census and the host at each scrape.
func (m *Metrics) RegisterCensus(census func() Census, host Host) {
	if m == nil {
		return
	}
	m.reg.MustRegister(&censusCollector{census: census, host: host})
}

func (c *censusCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSandboxes, descPoolDepth, descPoolHits, descPoolMisses, descTenantSbx, descTenantMem, descTenantCPU,
		descHostCPUs, descHostLoad, descHostCPURes, descHostMemTot, descHostMemAv, descHostMemRes, descHostDiskTot, descHostDiskAv} {
		ch <- d
	}
}

func (c *censusCollector) Collect(ch chan<- prometheus.Metric) {
	cs := c.census()
	type st struct{ state, template string }
	byState := map[st]int{}
	type ts struct{ tenant, state string }
	byTenant := map[ts]int{}
	tenantMem := map[string]int64{}
	tenantCPU := map[string]float64{}
	var cpuRes float64
	var memRes int64
	for _, s := range cs.Sandboxes {
		byState[st{s.State, s.Template}]++
		byTenant[ts{s.Tenant, s.State}]++
		if _, ok := tenantMem[s.Tenant]; !ok {
			tenantMem[s.Tenant], tenantCPU[s.Tenant] = 0, 0
		}
		if s.State == "running" {
			tenantMem[s.Tenant] += s.MemoryBytes
			tenantCPU[s.Tenant] += s.CPU
			memRes += s.MemoryBytes
			cpuRes += s.CPU
		}
	}
	for k, n := range byState {
		ch <- prometheus.MustNewConstMetric(descSandboxes, prometheus.GaugeValue, float64(n), k.state, k.template)
	}
	for k, n := range byTenant {
		ch <- prometheus.MustNewConstMetric(descTenantSbx, prometheus.GaugeValue, float64(n), k.tenant, k.state)
	}
	for t, b := range tenantMem {
		ch <- prometheus.MustNewConstMetric(descTenantMem, prometheus.GaugeValue, float64(b), t)
		ch <- prometheus.MustNewConstMetric(descTenantCPU, prometheus.GaugeValue, tenantCPU[t], t)
	}
	for t, n := range cs.Pool {
		ch <- prometheus.MustNewConstMetric(descPoolDepth, prometheus.GaugeValue, float64(n), t)
	}
	ch <- prometheus.MustNewConstMetric(descPoolHits, prometheus.CounterValue, float64(cs.PoolHits))
	ch <- prometheus.MustNewConstMetric(descPoolMisses, prometheus.CounterValue, float64(cs.PoolMisses))

	ch <- prometheus.MustNewConstMetric(descHostCPUs, prometheus.GaugeValue, float64(goruntime.NumCPU()))
	ch <- prometheus.MustNewConstMetric(descHostCPURes, prometheus.GaugeValue, cpuRes)
	ch <- prometheus.MustNewConstMetric(descHostMemRes, prometheus.GaugeValue, float64(memRes))
	if l, err := load1(); err == nil {
		ch <- prometheus.MustNewConstMetric(descHostLoad, prometheus.GaugeValue, l)
	}
	if tot, av, err := meminfo(); err == nil {
		ch <- prometheus.MustNewConstMetric(descHostMemTot, prometheus.GaugeValue, float64(tot))
		ch <- prometheus.MustNewConstMetric(descHostMemAv, prometheus.GaugeValue, float64(av))
	}
	if c.host.DataDir != "" {
		var fs unix.Statfs_t
		if err := unix.Statfs(c.host.DataDir, &fs); err == nil {
			ch <- prometheus.MustNewConstMetric(descHostDiskTot, prometheus.GaugeValue, float64(fs.Blocks)*float64(fs.Bsize))
			ch <- prometheus.MustNewConstMetric(descHostDiskAv, prometheus.GaugeValue, float64(fs.Bavail)*float64(fs.Bsize))
		}
	}
}

func load1() (float64, error) {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0, err
	}
	f, _, _ := strings.Cut(string(b), " ")
	return strconv.ParseFloat(f, 64)
}

// meminfo returns MemTotal and MemAvailable in bytes.
func meminfo() (total, avail int64, err error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if err != nil {
			continue
		}
		switch k {
		case "MemTotal":
			total = n << 10
		case "MemAvailable":
			avail = n << 10
		}
	}
	return total, avail, sc.Err()
}
