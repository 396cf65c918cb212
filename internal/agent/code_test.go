package agent

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"testing"
	"unicode/utf8"
)

func TestReadLine(t *testing.T) {
	long := strings.Repeat("x", 100)
	tests := []struct {
		name  string
		input string
		limit int
		want  []string // "ERR" for a dropped line
	}{
		{"short lines", "a\nbc\n", 10, []string{"a\n", "bc\n"}},
		{"at the limit", "abcd\n", 5, []string{"abcd\n"}},
		{"over the limit is dropped, the next kept", long + "\nok\n", 50, []string{"ERR", "ok\n"}},
		{"over the reader's buffer", long + long + "\n", 1000, []string{long + long + "\n"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			br := bufio.NewReaderSize(strings.NewReader(tt.input), 16)
			var got []string
			for {
				line, err := readLine(br, tt.limit)
				if errors.Is(err, errLineTooLong) {
					got = append(got, "ERR")
					continue
				}
				if err != nil {
					break
				}
				got = append(got, string(line))
			}
			if strings.Join(got, "|") != strings.Join(tt.want, "|") {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestCodeEventFraming(t *testing.T) {
	big := strings.Repeat("é", MaxFrame) // 2 MiB of text: three frames
	tests := []struct {
		name string
		ev   CodeEvent
	}{
		{"small", CodeEvent{Type: CodeEventStdout, Text: "hi <&>"}},
		{"larger than a frame", CodeEvent{Type: CodeEventResult, Data: map[string]json.RawMessage{"text/plain": json.RawMessage(`"` + big + `"`)}, Main: true}},
		{"end", CodeEvent{Type: CodeEventEnd, Context: "python", ExecutionCount: 3, TimedOut: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			w := &codeWriter{st: &buf}
			w.send(tt.ev)
			if w.failed {
				t.Fatal("send failed")
			}
			got, err := ReadCodeEvent(&Stream{rw: &buf, close: func() {}}, 0)
			if err != nil {
				t.Fatal(err)
			}
			gb, _ := json.Marshal(got)
			wb, _ := json.Marshal(tt.ev)
			if !bytes.Equal(gb, wb) {
				t.Errorf("got %.200s, want %.200s", gb, wb)
			}
			if buf.Len() != 0 {
				t.Errorf("%d bytes left unread", buf.Len())
			}
		})
	}
	// A limit bounds what the reader joins.
	var buf bytes.Buffer
	(&codeWriter{st: &buf}).send(tests[1].ev)
	if _, err := ReadCodeEvent(&Stream{rw: &buf, close: func() {}}, MaxFrame); err == nil {
		t.Error("an event over the limit was read")
	}
	// An agent that does not know the operation answers FrameExit.
	buf.Reset()
	_ = WriteJSON(&buf, FrameExit, Exit{ExitCode: -1, Error: `unknown op "code.run"`})
	if _, err := ReadCodeEvent(&Stream{rw: &buf, close: func() {}}, 0); !errors.Is(err, ErrOpUnsupported) {
		t.Errorf("FrameExit: got %v, want ErrOpUnsupported", err)
	}
	// An operation error comes back as an *OpError.
	buf.Reset()
	_ = WriteJSON(&buf, FrameError, OpError{Kind: ErrKindContextDead, Message: "dead"})
	var oe *OpError
	if _, err := ReadCodeEvent(&Stream{rw: &buf, close: func() {}}, 0); !errors.As(err, &oe) || oe.Kind != ErrKindContextDead {
		t.Errorf("FrameError: got %v, want an OpError of kind %q", err, ErrKindContextDead)
	}
}

// failingWriter fails every write.
type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, io.ErrClosedPipe }

func TestCodeWriterStopsAfterAFailure(t *testing.T) {
	w := &codeWriter{st: failingWriter{}}
	w.send(CodeEvent{Type: CodeEventStdout, Text: "a"})
	if !w.failed {
		t.Fatal("got no failure, want one")
	}
	w.send(CodeEvent{Type: CodeEventStdout, Text: "b"}) // must not panic or block
}

func TestEnvSyncCode(t *testing.T) {
	tests := []struct {
		set   map[string]string
		unset []string
		want  string
	}{
		{map[string]string{"A": "1"}, nil, `environ.update({"A":"1"})` + "\nfor __pandastack_k in []:"},
		{map[string]string{"Q": `it's "quoted" <\>`}, []string{"GONE"}, `environ.update({"Q":"it's \"quoted\" \u003c\\\u003e"})` + "\nfor __pandastack_k in [\"GONE\"]:"},
		{map[string]string{}, []string{"X", "Y"}, `environ.update({})` + "\nfor __pandastack_k in [\"X\",\"Y\"]:"},
	}
	for _, tt := range tests {
		got := envSyncCode(tt.set, tt.unset)
		if !strings.Contains(got, tt.want) {
			t.Errorf("envSyncCode(%v, %v): got %q, want it to hold %q", tt.set, tt.unset, got, tt.want)
		}
	}
}

func TestTruncateUTF8(t *testing.T) {
	tests := []struct {
		s    string
		n    int
		want string
	}{
		{"abc", 5, "abc"},
		{"abc", 2, "ab"},
		{"aé", 2, "a"},
		{"€€", 4, "€"},
		{"€", 0, ""},
	}
	for _, tt := range tests {
		got := truncateUTF8(tt.s, tt.n)
		if got != tt.want || !utf8.ValidString(got) {
			t.Errorf("truncateUTF8(%q, %d): got %q, want %q", tt.s, tt.n, got, tt.want)
		}
	}
}

func TestRingLog(t *testing.T) {
	l := &ringLog{max: 8}
	for _, s := range []string{"hello ", "world", "!"} {
		if _, err := l.Write([]byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	if got := l.tail(100); got != "o world!"[0:8] {
		t.Errorf("tail: got %q, want %q", got, "o world!")
	}
	if got := l.tail(3); got != "ld!" {
		t.Errorf("tail(3): got %q, want %q", got, "ld!")
	}
}

func TestEnvMaps(t *testing.T) {
	m := envListMap([]string{"A=1", "B=x=y", "C="})
	if m["A"] != "1" || m["B"] != "x=y" || m["C"] != "" || len(m) != 3 {
		t.Errorf("envListMap: got %v", m)
	}
	if got := strings.Join(envMapList(m), ","); got != "A=1,B=x=y,C=" {
		t.Errorf("envMapList: got %q, want A=1,B=x=y,C=", got)
	}
}
