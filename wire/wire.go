// Package wire holds the JSON types that cross PandaStack's HTTP API. The
// server, the Go SDK and the CLI share them, and api/openapi.json describes
// the same shapes; a test checks the two agree.
package wire

import "time"

// APIVersion is the path prefix of every endpoint.
const APIVersion = "/v1"

// Sandbox states.
const (
	StateCreating = "creating"
	StateRunning  = "running"
	StatePaused   = "paused"
	StateStopped  = "stopped"
	StateExpired  = "expired"
	StateFailed   = "failed"
)

// CreateSandboxRequest is the body of POST /v1/sandboxes.
type CreateSandboxRequest struct {
	// Template names the template to start from; "base" when empty.
	Template string `json:"template,omitempty"`
	// TTLSeconds is the sandbox's lifetime; the server default when zero.
	TTLSeconds int               `json:"ttl_seconds,omitempty"`
	Env        map[string]string `json:"env,omitempty"`
	Metadata   map[string]string `json:"metadata,omitempty"`
	// CPU is the number of CPUs (fractions allowed); server default when zero.
	CPU float64 `json:"cpu,omitempty"`
	// MemoryMB is the memory limit in MiB; server default when zero.
	MemoryMB int `json:"memory_mb,omitempty"`
	// DiskMB caps the sandbox's writable root layer in MiB; server default
	// when zero.
	DiskMB int `json:"disk_mb,omitempty"`
	// Pids caps the processes (and threads) inside; server default when
	// zero.
	Pids int `json:"pids,omitempty"`
	// SnapshotID starts the sandbox from a snapshot instead of a fresh
	// boot: its processes continue where the snapshot left them. Template
	// must then be empty or the snapshot's template.
	SnapshotID string `json:"snapshot_id,omitempty"`
	// OnTimeout is what happens at the TTL: "kill" (default) or "pause".
	OnTimeout string `json:"on_timeout,omitempty"`
	// Network gives the sandbox a network (see Network); none at all
	// when absent. A sandbox created from a snapshot has the snapshot's
	// network unless this says otherwise.
	Network *Network `json:"network,omitempty"`
}

// What happens to a sandbox when its TTL ends.
const (
	OnTimeoutKill  = "kill"
	OnTimeoutPause = "pause"
)

// Sandbox describes one sandbox.
type Sandbox struct {
	ID        string            `json:"id"`
	Template  string            `json:"template"`
	State     string            `json:"state"`
	CreatedAt time.Time         `json:"created_at"`
	ExpiresAt time.Time         `json:"expires_at"`
	Metadata  map[string]string `json:"metadata"`
	CPU       float64           `json:"cpu"`
	MemoryMB  int               `json:"memory_mb"`
	DiskMB    int               `json:"disk_mb"`
	Pids      int               `json:"pids"`
	// OnTimeout is "kill" or "pause".
	OnTimeout string `json:"on_timeout"`
	// PausedBytes is the size on disk of a paused sandbox's saved state;
	// 0 unless paused.
	PausedBytes int64 `json:"paused_bytes"`
	// Network is the sandbox's network and the access token of its
	// exposed ports; absent for a sandbox without network.
	Network *SandboxNetwork `json:"network,omitempty"`
}

// ForkRequest is the body of POST /v1/sandboxes/{id}/fork.
type ForkRequest struct {
	// Count is how many forks to create; 1 when zero.
	Count int `json:"count,omitempty"`
	// TTLSeconds of each fork; the parent's TTL setting when zero.
	TTLSeconds int `json:"ttl_seconds,omitempty"`
}

// ForkResponse is the answer to a fork: the new sandboxes, all running.
type ForkResponse struct {
	Sandboxes []Sandbox `json:"sandboxes"`
}

// SnapshotRequest is the (optional) body of POST /v1/sandboxes/{id}/snapshot.
type SnapshotRequest struct {
	// TTLSeconds is how long the snapshot is kept; the server's snapshot
	// TTL (also the most allowed) when zero.
	TTLSeconds int `json:"ttl_seconds,omitempty"`
}

// Snapshot is a saved sandbox: memory of every process and the writable
// filesystem.
type Snapshot struct {
	ID            string    `json:"id"`
	SourceSandbox string    `json:"source_sandbox"`
	Template      string    `json:"template"`
	SizeBytes     int64     `json:"size_bytes"`
	CreatedAt     time.Time `json:"created_at"`
	// ExpiresAt is when the snapshot is deleted; absent for snapshots
	// made before snapshots expired.
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	// The limits every sandbox created from the snapshot has.
	CPU      float64 `json:"cpu"`
	MemoryMB int     `json:"memory_mb"`
	DiskMB   int     `json:"disk_mb"`
	Pids     int     `json:"pids"`
}

// SnapshotList is the body of GET /v1/snapshots.
type SnapshotList struct {
	Snapshots []Snapshot `json:"snapshots"`
}

// SandboxList is the body of GET /v1/sandboxes.
type SandboxList struct {
	Sandboxes []Sandbox `json:"sandboxes"`
}

// SetTimeoutRequest is the body of POST /v1/sandboxes/{id}/timeout: the
// sandbox now expires TTLSeconds from the time of the request.
type SetTimeoutRequest struct {
	TTLSeconds int `json:"ttl_seconds"`
}

// ExecRequest is the body of POST /v1/sandboxes/{id}/exec. Exactly one of
// Cmd (run by /bin/sh -c) and Argv must be set.
type ExecRequest struct {
	Cmd            string            `json:"cmd,omitempty"`
	Argv           []string          `json:"argv,omitempty"`
	Env            map[string]string `json:"env,omitempty"`
	Cwd            string            `json:"cwd,omitempty"`
	Stdin          string            `json:"stdin,omitempty"`
	TimeoutSeconds float64           `json:"timeout_seconds,omitempty"`
	// User runs the command as that user of the sandbox: "user" (the
	// default: unprivileged, uid 1000, home /home/user, which is also the
	// default cwd) or "root".
	User string `json:"user,omitempty"`
}

// Users a command, file operation or terminal can run as.
const (
	UserDefault = "user"
	UserRoot    = "root"
)

// ExecResult is the response of a blocking exec and the last event of a
// streamed one.
type ExecResult struct {
	Stdout   string `json:"stdout"`
	Stderr   string `json:"stderr"`
	ExitCode int    `json:"exit_code"`
	// TimedOut reports whether the command was killed at its timeout.
	TimedOut bool `json:"timed_out"`
	// Truncated reports whether stdout or stderr hit the server's output cap.
	Truncated  bool    `json:"truncated"`
	DurationMS float64 `json:"duration_ms"`
}

// ExecEvent is one line of a streamed exec (NDJSON line or SSE event).
// Type is "stdout", "stderr" (Data set), "exit" (Result set) or "error"
// (Error set).
type ExecEvent struct {
	Type   string      `json:"type"`
	Data   string      `json:"data,omitempty"`
	Result *ExecResult `json:"result,omitempty"`
	Error  *Error      `json:"error,omitempty"`
}

// Exec event types.
const (
	EventStdout = "stdout"
	EventStderr = "stderr"
	EventExit   = "exit"
	EventError  = "error"
)

// Template describes a template a sandbox can start from: a built-in one
// (shared by every tenant) or one the tenant built from a Dockerfile.
type Template struct {
	Name string `json:"name"`
	// Tag is a built template's tag ("latest" unless the build named one);
	// empty for built-in templates.
	Tag string `json:"tag,omitempty"`
	// Ref is what CreateSandboxRequest.Template takes: the name of a
	// built-in template, "NAME:TAG" of a built one.
	Ref         string   `json:"ref"`
	Description string   `json:"description"`
	Packages    []string `json:"packages"`
	Ready       bool     `json:"ready"`
	Builtin     bool     `json:"builtin"`
	// Hash identifies the current build; sandboxes keep the build they
	// were created from.
	Hash string `json:"hash,omitempty"`
	// Base is what a built template was built FROM.
	Base string `json:"base,omitempty"`
	// SizeBytes is a built template's root file system size.
	SizeBytes int64      `json:"size_bytes,omitempty"`
	BuiltAt   *time.Time `json:"built_at,omitempty"`
	// Env, WorkingDir and User are the defaults of commands in its
	// sandboxes (from the Dockerfile's ENV, WORKDIR and USER).
	Env          []string `json:"env,omitempty"`
	WorkingDir   string   `json:"working_dir,omitempty"`
	User         string   `json:"user,omitempty"`
	Cmd          []string `json:"cmd,omitempty"`
	Entrypoint   []string `json:"entrypoint,omitempty"`
	ExposedPorts []string `json:"exposed_ports,omitempty"`
}

// Template build event types (TemplateBuildEvent.Type), in the NDJSON
// stream of POST /v1/templates.
const (
	BuildEventStep     = "step"     // a step begins: Step/Steps, Line, Instruction
	BuildEventCached   = "cached"   // the step's result came from the cache
	BuildEventOutput   = "output"   // output of a RUN step (Text)
	BuildEventDone     = "done"     // the step finished (ElapsedMS)
	BuildEventTemplate = "template" // last: the build succeeded (Template)
	BuildEventError    = "error"    // last: the build failed (Error)
)

// TemplateBuildEvent is one line of a template build's NDJSON stream.
type TemplateBuildEvent struct {
	Type        string    `json:"type"`
	Step        int       `json:"step,omitempty"`
	Steps       int       `json:"steps,omitempty"`
	Line        int       `json:"line,omitempty"`
	Instruction string    `json:"instruction,omitempty"`
	Text        string    `json:"text,omitempty"`
	ElapsedMS   float64   `json:"elapsed_ms,omitempty"`
	Template    *Template `json:"template,omitempty"`
	Error       *Error    `json:"error,omitempty"`
}

// TemplateList is the body of GET /v1/templates.
type TemplateList struct {
	Templates []Template `json:"templates"`
}

// Health is the body of GET /v1/health.
type Health struct {
	Status  string `json:"status"`
	Version string `json:"version"`
	Runtime string `json:"runtime"`
	// Network says whether sandboxes may have a network (serve --network).
	Network bool `json:"network"`
	// Domain, when the server has one (serve --domain), serves sandboxes'
	// exposed ports at {port}-{id}.{domain} too, on the API's own port
	// and scheme.
	Domain string `json:"domain,omitempty"`
}

// Error is the body of every error response.
type Error struct {
	// Code is a stable machine-readable kind: invalid_argument, not_found,
	// conflict, unauthenticated, unavailable, quota_exceeded, too_large,
	// insufficient_storage, timeout, internal.
	Code string `json:"code"`
	// Message is written for the tenant; it never holds the server's
	// internal details (those are in the server's log, under RequestID).
	Message string `json:"message"`
	// RequestID is the request's id, also sent as the X-Request-Id header:
	// quote it when reporting a problem.
	RequestID string `json:"request_id,omitempty"`
}

// ErrorResponse wraps Error as {"error": {...}}.
type ErrorResponse struct {
	Error Error `json:"error"`
}

// Error codes.
const (
	CodeInvalid         = "invalid_argument"
	CodeNotFound        = "not_found"
	CodeConflict        = "conflict"
	CodeUnauthenticated = "unauthenticated"
	CodeUnavailable     = "unavailable"
	CodeQuota           = "quota_exceeded"
	CodeTooLarge        = "too_large"
	CodeInternal        = "internal"
	// CodeInsufficientStorage: the server's disk cannot take what the
	// request would write (507).
	CodeInsufficientStorage = "insufficient_storage"
	// CodeTimeout: something the request waited for inside the server did
	// not answer in time (504).
	CodeTimeout = "timeout"
)
