package agent

import (
	"bytes"
	"testing"
)

func TestBoundedWriter(t *testing.T) {
	const note = "agent log limit reached; further log lines are dropped\n"
	tests := []struct {
		name   string
		limit  int
		writes []string
		want   string
	}{
		{name: "under the limit", limit: 10, writes: []string{"abc\n", "def\n"}, want: "abc\ndef\n"},
		{name: "exactly the limit", limit: 8, writes: []string{"abc\n", "def\n"}, want: "abc\ndef\n"},
		{name: "a write that does not fit is dropped whole", limit: 6, writes: []string{"abc\n", "def\n"}, want: "abc\n" + note},
		{name: "nothing after the limit", limit: 6, writes: []string{"abc\n", "def\n", "g\n", "h\n"}, want: "abc\n" + note},
		{name: "zero limit", limit: 0, writes: []string{"abc\n"}, want: note},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			w := NewBoundedWriter(&buf, tt.limit)
			for _, s := range tt.writes {
				// Dropped writes report success: a logger must not fail
				// because the log is full.
				if n, err := w.Write([]byte(s)); n != len(s) || err != nil {
					t.Errorf("Write(%q): got %d, %v, want %d, nil", s, n, err, len(s))
				}
			}
			if got := buf.String(); got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestParseStat(t *testing.T) {
	tests := []struct {
		in     string
		want   procEntry
		wantOK bool
	}{
		{in: "42 (sleep) S 7 42 42 0 -1 4194304 ...", want: procEntry{ppid: 7, pgid: 42}, wantOK: true},
		// The command name may hold spaces and parentheses.
		{in: "43 (a) b (c) R 1 9 9 0", want: procEntry{ppid: 1, pgid: 9}, wantOK: true},
		{in: "44 (x", wantOK: false},
		{in: "45 (x) S", wantOK: false},
		{in: "46 (x) S y 1", wantOK: false},
	}
	for _, tt := range tests {
		got, ok := parseStat([]byte(tt.in))
		if ok != tt.wantOK || (ok && got != tt.want) {
			t.Errorf("parseStat(%q): got %+v, %v, want %+v, %v", tt.in, got, ok, tt.want, tt.wantOK)
		}
	}
}

func TestExecProcesses(t *testing.T) {
	// 10 is the exec's process; 1 the agent (self) and init.
	procs := map[int]procEntry{
		1:  {ppid: 0, pgid: 1},
		10: {ppid: 1, pgid: 10},
		11: {ppid: 10, pgid: 10}, // in the group
		12: {ppid: 10, pgid: 12}, // own session, child of the exec
		13: {ppid: 12, pgid: 12}, // its child
		14: {ppid: 1, pgid: 10},  // orphan still in the group
		15: {ppid: 1, pgid: 15},  // orphan of another exec
		16: {ppid: 15, pgid: 15},
		20: {ppid: 1, pgid: 20}, // another exec
	}
	got := execProcesses(procs, 10, nil, 1)
	want := map[int]bool{10: true, 11: true, 12: true, 13: true, 14: true}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for pid := range want {
		if !got[pid] {
			t.Errorf("got %v, want %v", got, want)
		}
	}
	// The agent is never part of it, even as its own process group.
	if got := execProcesses(map[int]procEntry{1: {pgid: 1}, 2: {ppid: 1, pgid: 1}}, 1, nil, 1); got[1] || !got[2] {
		t.Errorf("exec led by the agent's pid: got %v, want only 2", got)
	}
}
