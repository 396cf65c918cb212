package wire

import "time"

// SandboxMetrics is GET /v1/sandboxes/{id}/metrics: the recent samples of
// what a sandbox used, oldest first, taken by the server every
// IntervalSeconds while the sandbox runs (none while it is paused).
type SandboxMetrics struct {
	SandboxID       string          `json:"sandbox_id"`
	IntervalSeconds float64         `json:"interval_seconds"`
	Samples         []MetricsSample `json:"samples"`
}

// MetricsSample is one sample of a sandbox's usage.
type MetricsSample struct {
	Time time.Time `json:"time"`
	// CPUSeconds is the CPU time used since the sandbox started;
	// CPUPercent the share of one CPU used since the previous sample
	// (100 = one CPU busy; 0 in the first sample).
	CPUSeconds float64 `json:"cpu_seconds"`
	CPUPercent float64 `json:"cpu_percent"`
	// MemoryBytes is the memory its processes use; DiskBytes the host
	// disk its writable layer takes.
	MemoryBytes int64 `json:"memory_bytes"`
	DiskBytes   int64 `json:"disk_bytes"`
	// Processes is the number of processes inside; -1 when the sandbox's
	// agent did not answer in time.
	Processes int `json:"processes"`
}

// AuditEntry is one recorded action of a tenant.
type AuditEntry struct {
	ID   int64     `json:"id"`
	Time time.Time `json:"time"`
	// KeyID names the API key that made the request: the first 12 hex
	// digits of its SHA-256 (the form the server stores).
	KeyID     string `json:"key_id"`
	RequestID string `json:"request_id,omitempty"`
	// Action is create, exec, kill, pause, resume, fork, snapshot,
	// delete_snapshot, timeout or process.
	Action    string `json:"action"`
	SandboxID string `json:"sandbox_id,omitempty"`
	// Target is what the action made or touched besides the sandbox: a
	// snapshot id, the ids of forks (comma-separated), the snapshot a
	// sandbox was created from.
	Target string `json:"target,omitempty"`
	// Command is an exec's command, cut at 1024 bytes; its input and
	// output are never recorded.
	Command  string `json:"command,omitempty"`
	ExitCode *int   `json:"exit_code,omitempty"`
	// DurationMS is how long the action took.
	DurationMS int64 `json:"duration_ms"`
	// Outcome is "ok" or the error code of a refused or failed action.
	Outcome string `json:"outcome"`
}

// AuditList is GET /v1/audit: the tenant's entries, newest first.
type AuditList struct {
	Entries []AuditEntry `json:"entries"`
}
