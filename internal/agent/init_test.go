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
		{in: "47 (sleep) Z 1 47 47 0", want: procEntry{ppid: 1, pgid: 47, zombie: true}, wantOK: true},
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
