package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/wire"
)

// carryAll feeds chunks through a utf8Carry and returns every piece it
// produced, the flushed tail last.
func carryAll(chunks [][]byte) []string {
	var c utf8Carry
	var out []string
	for _, b := range chunks {
		out = append(out, c.next(b))
	}
	return append(out, c.flush())
}

func TestUTF8CarryReassemblesValidText(t *testing.T) {
	texts := []string{
		"",
		"plain ascii",
		"héllo wörld",
		"€",
		"a€b€c",
		"日本語のテキスト",
		"😀 emoji 👍🏽 and flags 🇩🇪",
		"\u0000\u007f\u0080\u07ff\u0800\uffff\U00010000\U0010ffff",
	}
	for _, s := range texts {
		t.Run(s, func(t *testing.T) {
			check := func(desc string, chunks [][]byte) {
				t.Helper()
				pieces := carryAll(chunks)
				for _, p := range pieces {
					if !utf8.ValidString(p) || strings.ContainsRune(p, utf8.RuneError) {
						t.Fatalf("%s: piece %q is not clean UTF-8", desc, p)
					}
				}
				if got := strings.Join(pieces, ""); got != s {
					t.Fatalf("%s: got %q, want %q", desc, got, s)
				}
			}
			b := []byte(s)
			// Two chunks, cut at every byte offset.
			for i := 0; i <= len(b); i++ {
				check(fmt.Sprintf("cut at %d", i), [][]byte{b[:i], b[i:]})
			}
			// Three chunks, cut at every pair of offsets.
			for i := 0; i <= len(b); i++ {
				for j := i; j <= len(b); j++ {
					check(fmt.Sprintf("cut at %d and %d", i, j), [][]byte{b[:i], b[i:j], b[j:]})
				}
			}
			// One byte at a time.
			var bytewise [][]byte
			for i := range b {
				bytewise = append(bytewise, b[i:i+1])
			}
			check("bytewise", bytewise)
		})
	}
}

func TestUTF8CarryDoesNotAliasInput(t *testing.T) {
	// Callers reuse their read buffers: a held-back tail must be a copy.
	var c utf8Carry
	buf := []byte("ab\xe2\x82")
	got := c.next(buf)
	copy(buf, "zzzz")
	got += c.next([]byte("\xac")) + c.flush()
	if want := "ab€"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

func TestUTF8CarryInvalidAndIncomplete(t *testing.T) {
	tests := []struct {
		name   string
		chunks []string
		want   []string // one piece per chunk, then the flushed tail
	}{
		{name: "invalid byte", chunks: []string{"a\xffb"}, want: []string{"a\uFFFDb", ""}},
		{name: "invalid byte at the end", chunks: []string{"ab\xff"}, want: []string{"ab\uFFFD", ""}},
		{name: "run of invalid bytes", chunks: []string{"\xff\xfe\xfd"}, want: []string{"\uFFFD", ""}},
		{name: "lone continuation bytes", chunks: []string{"x\x80\x80"}, want: []string{"x\uFFFD", ""}},
		{name: "overlong encoding", chunks: []string{"\xc0\xaf!"}, want: []string{"\uFFFD!", ""}},
		{name: "surrogate half", chunks: []string{"\xed\xa0\x80."}, want: []string{"\uFFFD.", ""}},
		{name: "incomplete start then ASCII", chunks: []string{"a\xe2\x82", "x"}, want: []string{"a", "\uFFFDx", ""}},
		{name: "incomplete 4-byte then ASCII", chunks: []string{"\xf0\x9f\x98", "A"}, want: []string{"", "\uFFFDA", ""}},
		{name: "incomplete tail flushed", chunks: []string{"ok\xf0\x9f"}, want: []string{"ok", "\uFFFD"}},
		{name: "single start byte flushed", chunks: []string{"\xe2"}, want: []string{"", "\uFFFD"}},
		{name: "completed across three chunks", chunks: []string{"\xf0", "\x9f\x98", "\x80"}, want: []string{"", "", "😀", ""}},
		{name: "empty chunks keep the tail", chunks: []string{"\xe2", "", "\x82\xac"}, want: []string{"", "", "€", ""}},
		{name: "flush after complete text is empty", chunks: []string{"€"}, want: []string{"€", ""}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var chunks [][]byte
			for _, c := range tt.chunks {
				chunks = append(chunks, []byte(c))
			}
			got := carryAll(chunks)
			if fmt.Sprintf("%q", got) != fmt.Sprintf("%q", tt.want) {
				t.Errorf("got %q, want %q", got, tt.want)
			}
			for _, p := range got {
				if !utf8.ValidString(p) {
					t.Errorf("piece %q is not valid UTF-8", p)
				}
			}
		})
	}
}

// cappedOutput runs chunks through capped and assembles the result the way
// execBlocking does.
func cappedOutput(max int, chunks []string) (string, bool) {
	c := &capped{max: max}
	for _, b := range chunks {
		c.add([]byte(b))
	}
	return c.text(), c.truncated
}

func TestCapped(t *testing.T) {
	tests := []struct {
		name          string
		max           int
		chunks        []string
		want          string
		wantTruncated bool
	}{
		{name: "under the cap", max: 10, chunks: []string{"hello"}, want: "hello"},
		{name: "exactly the cap", max: 5, chunks: []string{"hello"}, want: "hello"},
		{name: "exactly the cap in pieces", max: 5, chunks: []string{"he", "llo", ""}, want: "hello"},
		{name: "one byte over", max: 5, chunks: []string{"hello!"}, want: "hello", wantTruncated: true},
		{name: "over in a later chunk", max: 5, chunks: []string{"hel", "lo", "!"}, want: "hello", wantTruncated: true},
		{name: "cut inside a chunk", max: 4, chunks: []string{"ab", "cdef", "gh"}, want: "abcd", wantTruncated: true},
		{name: "zero cap", max: 0, chunks: []string{"x"}, want: "", wantTruncated: true},
		{name: "nothing written", max: 5, chunks: nil, want: ""},
		{name: "multi-byte text that fits", max: 6, chunks: []string{"€", "€"}, want: "€€"},
		{name: "multi-byte char split across chunks, fits", max: 6, chunks: []string{"€\xe2", "\x82\xac"}, want: "€€"},
		{
			name: "cap cuts a multi-byte char", max: 4, chunks: []string{"€€"}, want: "€", wantTruncated: true,
		},
		{
			name: "held-back bytes are not counted", max: 3, chunks: []string{"ab\xe2", "\x82\xac"}, want: "ab", wantTruncated: true,
		},
		{
			name: "replacement characters are not counted", max: 4, chunks: []string{"\xffa\xffa"}, want: "\uFFFDa", wantTruncated: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, truncated := cappedOutput(tt.max, tt.chunks)
			if got != tt.want {
				t.Errorf("output: got %q, want %q", got, tt.want)
			}
			if truncated != tt.wantTruncated {
				t.Errorf("truncated: got %v, want %v", truncated, tt.wantTruncated)
			}
			if len(got) > tt.max {
				t.Errorf("output has %d bytes, over the cap of %d", len(got), tt.max)
			}
			if !utf8.ValidString(got) {
				t.Errorf("output %q is not valid UTF-8", got)
			}
		})
	}
}

func TestNegotiate(t *testing.T) {
	tests := []struct {
		accept []string
		want   execMode
	}{
		{accept: nil, want: modeBlocking},
		{accept: []string{""}, want: modeBlocking},
		{accept: []string{"application/json"}, want: modeBlocking},
		{accept: []string{"*/*"}, want: modeBlocking},
		{accept: []string{"text/plain"}, want: modeBlocking},
		{accept: []string{"application/x-ndjson"}, want: modeNDJSON},
		{accept: []string{"application/json, application/x-ndjson"}, want: modeNDJSON},
		{accept: []string{"application/x-ndjson; charset=utf-8"}, want: modeNDJSON},
		{accept: []string{"text/event-stream"}, want: modeSSE},
		{accept: []string{"text/event-stream;q=0.9, */*;q=0.1"}, want: modeSSE},
		// With both, NDJSON wins whatever the order.
		{accept: []string{"text/event-stream, application/x-ndjson"}, want: modeNDJSON},
		{accept: []string{"application/x-ndjson, text/event-stream"}, want: modeNDJSON},
	}
	for _, tt := range tests {
		r := httptest.NewRequest(http.MethodPost, "/v1/sandboxes/sb-1/exec", nil)
		for _, a := range tt.accept {
			r.Header.Add("Accept", a)
		}
		if got := negotiate(r); got != tt.want {
			t.Errorf("negotiate(Accept: %q): got %v, want %v", tt.accept, got, tt.want)
		}
	}
}

func TestClassify(t *testing.T) {
	leaky := errors.New("runsc: exit status 1: open /var/lib/pandastack/runtime/sandboxes/sb-1/log: no such file")
	tests := []struct {
		name       string
		err        error
		wantStatus int
		wantCode   string
		wantMsg    string
	}{
		{"invalid", errdefs.Invalid("bad %s", "x"), http.StatusBadRequest, wire.CodeInvalid, "bad x"},
		{"unauthorized", errdefs.New(errdefs.ErrUnauthorized, "who"), http.StatusUnauthorized, wire.CodeUnauthenticated, "who"},
		{"not found", errdefs.NotFound("gone"), http.StatusNotFound, wire.CodeNotFound, "gone"},
		{"conflict", errdefs.Conflict("busy"), http.StatusConflict, wire.CodeConflict, "busy"},
		{"too large", errdefs.New(errdefs.ErrTooLarge, "big"), http.StatusRequestEntityTooLarge, wire.CodeTooLarge, "big"},
		{"quota", errdefs.New(errdefs.ErrQuota, "full"), http.StatusTooManyRequests, wire.CodeQuota, "full"},
		{"unavailable", errdefs.Unavailable("down"), http.StatusServiceUnavailable, wire.CodeUnavailable, "down"},
		{"insufficient storage", errdefs.InsufficientStorage("disk full"), http.StatusInsufficientStorage, wire.CodeInsufficientStorage, "disk full"},
		{"timeout", errdefs.New(errdefs.ErrTimeout, "agent did not answer"), http.StatusGatewayTimeout, wire.CodeTimeout, "agent did not answer"},
		{"bare sentinel", errdefs.ErrNotFound, http.StatusNotFound, wire.CodeNotFound, "not found"},
		{"wrapped kind", fmt.Errorf("creating sandbox: %w", errdefs.Conflict("x")), http.StatusConflict, wire.CodeConflict, "x"},
		{"doubly wrapped kind", fmt.Errorf("a: %w", fmt.Errorf("b: %w", errdefs.Invalid("x"))), http.StatusBadRequest, wire.CodeInvalid, "x"},
		{"joined with a plain error", errors.Join(errors.New("plain"), errdefs.NotFound("x")), http.StatusNotFound, wire.CodeNotFound, "x"},
		{"max bytes error", &http.MaxBytesError{Limit: 10}, http.StatusRequestEntityTooLarge, wire.CodeTooLarge, "request body exceeds 10 bytes"},
		{"wrapped max bytes error", fmt.Errorf("reading body: %w", &http.MaxBytesError{Limit: 10}), http.StatusRequestEntityTooLarge, wire.CodeTooLarge, "request body exceeds 10 bytes"},
		{"deadline exceeded", context.DeadlineExceeded, http.StatusGatewayTimeout, wire.CodeTimeout, "timed out"},
		{"wrapped deadline exceeded", fmt.Errorf("running command in /var/lib/pandastack: %w", context.DeadlineExceeded), http.StatusGatewayTimeout, wire.CodeTimeout, "timed out"},
		{"plain error", errors.New("boom"), http.StatusInternalServerError, wire.CodeInternal, "internal error"},
		{"kind text without the kind", errors.New("not found"), http.StatusInternalServerError, wire.CodeInternal, "internal error"},
		// The public message only, whatever the cause says.
		{"wrapped cause", errdefs.Wrap(errdefs.ErrUnavailable, leaky, "sandbox failed to start"), http.StatusServiceUnavailable, wire.CodeUnavailable, "sandbox failed to start"},
		{"wrapped cause in fmt", fmt.Errorf("start %s: %w", "/var/lib/pandastack", errdefs.Wrap(errdefs.ErrInsufficientStorage, leaky, "no disk space left for the sandbox")), http.StatusInsufficientStorage, wire.CodeInsufficientStorage, "no disk space left for the sandbox"},
		{"kind wrapped in a plain error", fmt.Errorf("runsc at /var/lib/pandastack: %w", errdefs.ErrUnavailable), http.StatusServiceUnavailable, wire.CodeUnavailable, "unavailable"},
		// The outermost kind wins over a kind inside its cause.
		{"outer kind wins", errdefs.Wrap(errdefs.ErrUnavailable, errdefs.NotFound("row in /var/lib/pandastack/db"), "store is down"), http.StatusServiceUnavailable, wire.CodeUnavailable, "store is down"},
		{"timeout around a deadline", errdefs.Wrap(errdefs.ErrTimeout, context.DeadlineExceeded, "sandbox did not start in time"), http.StatusGatewayTimeout, wire.CodeTimeout, "sandbox did not start in time"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, e := classify(tt.err)
			want := wire.Error{Code: tt.wantCode, Message: tt.wantMsg}
			if status != tt.wantStatus || e != want {
				t.Errorf("classify(%v): got %d %+v, want %d %+v", tt.err, status, e, tt.wantStatus, want)
			}
			for _, secret := range []string{"/var/lib/pandastack", "runsc"} {
				if strings.Contains(e.Message, secret) {
					t.Errorf("message %q holds %q", e.Message, secret)
				}
			}
		})
	}
}
