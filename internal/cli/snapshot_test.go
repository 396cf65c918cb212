package cli

import (
	"testing"
)

// snapshotCommandTests covers snapshots, fork, pause and resume; TestCommands
// runs them.
var snapshotCommandTests = []commandTest{
	{
		name:     "create from a snapshot, pausing at the TTL",
		args:     []string{"sandbox", "create", "--snapshot", "snap-1", "--on-timeout", "pause"},
		wantOut:  "sb-new\n",
		wantReqs: []string{`POST /v1/sandboxes {"snapshot_id":"snap-1","on_timeout":"pause"}`},
	},
	{
		name:       "create from a snapshot --json",
		args:       []string{"sandbox", "create", "--snapshot", "snap-1", "--json"},
		wantOutHas: []string{`"id": "sb-new"`, `"template": "base"`},
	},
	{
		name:    "create from an unknown snapshot",
		args:    []string{"sandbox", "create", "--snapshot", "snap-x"},
		wantErr: `snapshot "snap-x" not found`,
	},
	{
		name:     "create with a bad --on-timeout",
		args:     []string{"sandbox", "create", "--on-timeout", "sleep"},
		wantErr:  `--on-timeout must be "kill" or "pause", got "sleep"`,
		wantReqs: []string{},
	},
	{
		name:       "get leaves a paused sandbox paused",
		args:       []string{"sandbox", "get", "sb-p"},
		wantOutHas: []string{`"state": "paused"`, `"paused_bytes": 3145728`, `"on_timeout": "pause"`},
		wantReqs:   []string{"GET /v1/sandboxes/sb-p"},
	},
	{
		name:     "kill a paused sandbox without resuming it",
		args:     []string{"sandbox", "kill", "sb-p"},
		wantReqs: []string{"GET /v1/sandboxes/sb-p", "DELETE /v1/sandboxes/sb-p"},
	},
	{
		name:    "exec resumes a paused sandbox",
		args:    []string{"sandbox", "exec", "sb-p", "--", "true"},
		wantOut: "",
		wantReqs: []string{
			"GET /v1/sandboxes/sb-p",
			"POST /v1/sandboxes/sb-p/resume",
			`POST /v1/sandboxes/sb-p/exec {"cmd":"true"}`,
		},
	},
	{
		name:     "snapshot prints the snapshot id",
		args:     []string{"sandbox", "snapshot", "sb-1"},
		wantOut:  "snap-new\n",
		wantReqs: []string{"GET /v1/sandboxes/sb-1", "POST /v1/sandboxes/sb-1/snapshot"},
	},
	{
		name:       "snapshot --json",
		args:       []string{"sandbox", "snapshot", "sb-1", "--json"},
		wantOutHas: []string{`"id": "snap-new"`, `"source_sandbox": "sb-1"`, `"size_bytes": 1234`, `"created_at": "2026-01-02T03:04:05Z"`},
	},
	{
		name:     "snapshot an unknown sandbox",
		args:     []string{"sandbox", "snapshot", "sb-x"},
		wantErr:  `sandbox "sb-x" not found`,
		wantReqs: []string{"GET /v1/sandboxes/sb-x"},
	},
	{
		name:     "fork prints the new ids",
		args:     []string{"sandbox", "fork", "sb-1", "--count", "3", "--ttl", "30"},
		wantOut:  "sb-fork-1\nsb-fork-2\nsb-fork-3\n",
		wantReqs: []string{"GET /v1/sandboxes/sb-1", `POST /v1/sandboxes/sb-1/fork {"count":3,"ttl_seconds":30}`},
	},
	{
		name:     "fork one by default",
		args:     []string{"sandbox", "fork", "sb-1"},
		wantOut:  "sb-fork-1\n",
		wantReqs: []string{"GET /v1/sandboxes/sb-1", `POST /v1/sandboxes/sb-1/fork {"count":1}`},
	},
	{
		name:       "fork --json",
		args:       []string{"sandbox", "fork", "sb-1", "--count", "2", "--json"},
		wantOutHas: []string{"[\n  {\n", `"id": "sb-fork-1"`, `"id": "sb-fork-2"`, `"state": "running"`},
	},
	{
		name:     "fork needs a positive --count",
		args:     []string{"sandbox", "fork", "sb-1", "--count", "0"},
		wantErr:  "--count must be at least 1",
		wantReqs: []string{},
	},
	{
		name:    "fork past the server's limit",
		args:    []string{"sandbox", "fork", "sb-1", "--count", "17"},
		wantErr: "count must be 1 to 16",
	},
	{
		name:     "pause",
		args:     []string{"sandbox", "pause", "sb-1"},
		wantOut:  "sb-1 paused (1.0 MiB saved)\n",
		wantReqs: []string{"GET /v1/sandboxes/sb-1", "POST /v1/sandboxes/sb-1/pause"},
	},
	{
		name:       "pause --json",
		args:       []string{"sandbox", "pause", "sb-1", "--json"},
		wantOutHas: []string{`"state": "paused"`, `"paused_bytes": 1048576`},
	},
	{
		name:     "resume",
		args:     []string{"sandbox", "resume", "sb-p"},
		wantOut:  "sb-p resumed, expires at 2026-01-02T03:09:05Z\n",
		wantReqs: []string{"GET /v1/sandboxes/sb-p", "POST /v1/sandboxes/sb-p/resume"},
	},
	{
		name:       "resume --json",
		args:       []string{"sandbox", "resume", "sb-p", "--json"},
		wantOutHas: []string{`"state": "running"`, `"paused_bytes": 0`},
	},
	{
		name:    "resume an unknown sandbox",
		args:    []string{"sandbox", "resume", "sb-x"},
		wantErr: `sandbox "sb-x" not found`,
	},
	{
		name: "snapshot list prints a table",
		args: []string{"snapshot", "list"},
		wantOut: "ID       SOURCE   TEMPLATE   SIZE      CREATED\n" +
			"snap-1   sb-1     base       2.5 MiB   2026-01-02T03:04:05Z\n",
		wantReqs: []string{"GET /v1/snapshots"},
	},
	{
		name:       "snapshot list --json",
		args:       []string{"snapshot", "list", "--json"},
		wantOutHas: []string{"[\n  {\n", `"id": "snap-1"`, `"size_bytes": 2621440`},
	},
	{
		name:       "snapshot get",
		args:       []string{"snapshot", "get", "snap-1"},
		wantOutHas: []string{`"id": "snap-1"`, `"source_sandbox": "sb-1"`, `"template": "base"`},
		wantReqs:   []string{"GET /v1/snapshots/snap-1"},
	},
	{
		name:    "snapshot get an unknown one",
		args:    []string{"snapshot", "get", "snap-x"},
		wantErr: `snapshot "snap-x" not found`,
	},
	{
		name:     "snapshot delete goes on past a missing one",
		args:     []string{"snapshot", "delete", "snap-x", "snap-1"},
		wantErr:  `snapshot "snap-x" not found`,
		wantReqs: []string{"DELETE /v1/snapshots/snap-x", "DELETE /v1/snapshots/snap-1"},
	},
}

func TestFormatBytes(t *testing.T) {
	tests := []struct {
		n    int64
		want string
	}{
		{0, "0 B"},
		{1023, "1023 B"},
		{1024, "1.0 KiB"},
		{1536, "1.5 KiB"},
		{5 << 19, "2.5 MiB"},
		{3 << 30, "3.0 GiB"},
		{1 << 62, "4.0 EiB"},
	}
	for _, tt := range tests {
		if got := formatBytes(tt.n); got != tt.want {
			t.Errorf("formatBytes(%d): got %q, want %q", tt.n, got, tt.want)
		}
	}
}
