package api

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/wire"
)

// utf8Carry turns a byte stream cut at arbitrary points into valid UTF-8
// strings: an incomplete character at the end of one chunk waits for the
// rest of it in the next; bytes that can never be valid become U+FFFD.
type utf8Carry struct{ rest []byte }

func (c *utf8Carry) next(b []byte) string {
	if len(c.rest) > 0 {
		b = append(c.rest, b...)
		c.rest = nil
	}
	// Keep back at most 3 trailing bytes that could start a character.
	cut := len(b)
	for i := len(b) - 1; i >= 0 && i >= len(b)-3; i-- {
		if utf8.RuneStart(b[i]) {
			if !utf8.FullRune(b[i:]) {
				cut = i
			}
			break
		}
	}
	c.rest = append([]byte(nil), b[cut:]...)
	return strings.ToValidUTF8(string(b[:cut]), "\uFFFD")
}

func (c *utf8Carry) flush() string {
	s := strings.ToValidUTF8(string(c.rest), "\uFFFD")
	c.rest = nil
	return s
}

type execMode int

const (
	modeBlocking execMode = iota
	modeNDJSON
	modeSSE
)

func negotiate(r *http.Request) execMode {
	acc := r.Header.Get("Accept")
	switch {
	case strings.Contains(acc, "application/x-ndjson"):
		return modeNDJSON
	case strings.Contains(acc, "text/event-stream"):
		return modeSSE
	default:
		return modeBlocking
	}
}

func (s *Server) exec(w http.ResponseWriter, r *http.Request, tenant string) error {
	var req wire.ExecRequest
	if err := s.decode(w, r, &req); err != nil {
		return err
	}
	// Every exec holds a goroutine, an agent stream and (blocking) output
	// buffers in the daemon: past the cap, refuse before the command
	// starts rather than let the daemon grow without bound.
	if n := s.execs.Add(1); n > int64(s.cfg.MaxConcurrentExecs) {
		s.execs.Add(-1)
		return errdefs.Quota("this server runs at most %d commands at once; try again when some have finished", s.cfg.MaxConcurrentExecs)
	}
	defer s.execs.Add(-1)
	id := r.PathValue("id")
	mode := negotiate(r)
	if mode == modeBlocking {
		return s.execBlocking(w, r, tenant, id, req)
	}
	return s.execStream(w, r, tenant, id, req, mode)
}

// byteBudget is a number of bytes that concurrent requests share: each
// reserves what it is about to hold and releases it when it is done.
type byteBudget struct {
	mu   sync.Mutex
	max  int64
	used int64
	// peak is the most ever reserved at once.
	peak int64
}

// reserve takes up to n bytes of the budget and returns how many it got.
func (b *byteBudget) reserve(n int64) int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	got := min(n, b.max-b.used)
	if got <= 0 {
		return 0
	}
	b.used += got
	b.peak = max(b.peak, b.used)
	return got
}

func (b *byteBudget) release(n int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.used -= n
}

// stats returns the bytes reserved now and the most ever reserved at once.
func (b *byteBudget) stats() (used, peak int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used, b.peak
}

// budgetChunk is the least a capped buffer reserves at a time: few trips to
// the shared budget, little of it reserved and unused.
const budgetChunk = 64 << 10

// capped collects one output stream up to a limit: max, and, with a
// budget, what the server-wide budget grants.
type capped struct {
	buf       []byte
	carry     utf8Carry
	max       int
	truncated bool
	budget    *byteBudget
	reserved  int
}

// limit returns the most the buffer may hold once it needs need bytes. With
// a budget it reserves more as the buffer grows, doubling (one allocation
// and copy each time), and gives buf exactly the reserved capacity, so that
// the budget counts the memory the buffer really holds.
func (c *capped) limit(need int) int {
	if c.budget == nil {
		return c.max
	}
	if need > c.reserved && c.reserved < c.max {
		want := min(max(need-c.reserved, c.reserved, budgetChunk), c.max-c.reserved)
		if got := int(c.budget.reserve(int64(want))); got > 0 {
			c.reserved += got
			grown := make([]byte, len(c.buf), c.reserved)
			copy(grown, c.buf)
			c.buf = grown
		}
	}
	return min(c.max, c.reserved)
}

// release gives the buffer's reservation back to the budget.
func (c *capped) release() {
	if c.budget != nil {
		c.budget.release(int64(c.reserved))
		c.reserved = 0
	}
}

// add appends b. The collected text never exceeds the limit: bytes held
// back for an incomplete character count too, and the cut falls on a
// character boundary. Once cut, the rest of the stream is dropped.
func (c *capped) add(b []byte) {
	if c.truncated {
		return
	}
	text := c.carry.next(b)
	room := c.limit(len(c.buf)+len(text)+len(c.carry.rest)) - len(c.buf)
	if len(text)+len(c.carry.rest) <= room {
		c.buf = append(c.buf, text...)
		return
	}
	c.truncated = true
	c.carry.rest = nil
	cut := min(max(room, 0), len(text))
	for cut > 0 && cut < len(text) && !utf8.RuneStart(text[cut]) {
		cut--
	}
	c.buf = append(c.buf, text[:cut]...)
}

// text returns what was collected.
func (c *capped) text() string {
	return string(c.buf) + c.carry.flush()
}

// execBlocking runs the command and answers with its whole output. The
// output is held in memory until the answer is written, so all blocking
// execs together share the server's MaxBufferedOutputBytes; large outputs
// are for streamed execs, which hold none.
func (s *Server) execBlocking(w http.ResponseWriter, r *http.Request, tenant, id string, req wire.ExecRequest) error {
	stdout := &capped{max: s.cfg.MaxOutputBytes, budget: s.output}
	stderr := &capped{max: s.cfg.MaxOutputBytes, budget: s.output}
	// Released when the answer has been written, not before: until then
	// the output is still in memory.
	defer stdout.release()
	defer stderr.release()
	var mu sync.Mutex
	res, err := s.cfg.Sandboxes.Exec(r.Context(), tenant, id, req, func(stream string, data []byte) error {
		mu.Lock()
		defer mu.Unlock()
		if stream == wire.EventStderr {
			stderr.add(data)
		} else {
			stdout.add(data)
		}
		return nil
	})
	if err != nil {
		return err
	}
	res.Stdout = stdout.text()
	res.Stderr = stderr.text()
	res.Truncated = res.Truncated || stdout.truncated || stderr.truncated
	writeJSON(w, http.StatusOK, res)
	return nil
}

// eventWriter writes exec events as NDJSON lines or SSE events, sending
// the response header with the first event so that errors found before any
// output still get their proper status.
type eventWriter struct {
	w       http.ResponseWriter
	rc      *http.ResponseController
	mode    execMode
	mu      sync.Mutex
	started bool
}

func (e *eventWriter) send(ev wire.ExecEvent) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.started {
		e.started = true
		ct := "application/x-ndjson"
		if e.mode == modeSSE {
			ct = "text/event-stream"
		}
		e.w.Header().Set("Content-Type", ct)
		e.w.Header().Set("Cache-Control", "no-cache")
		e.w.Header().Set("X-Accel-Buffering", "no")
		e.w.WriteHeader(http.StatusOK)
	}
	b, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	if e.mode == modeSSE {
		_, err = fmt.Fprintf(e.w, "event: %s\ndata: %s\n\n", ev.Type, b)
	} else {
		_, err = fmt.Fprintf(e.w, "%s\n", b)
	}
	if err != nil {
		return fmt.Errorf("writing event: %w", err)
	}
	return e.rc.Flush()
}

func (s *Server) execStream(w http.ResponseWriter, r *http.Request, tenant, id string, req wire.ExecRequest, mode execMode) error {
	ew := &eventWriter{w: w, rc: http.NewResponseController(w), mode: mode}
	var outC, errC utf8Carry
	res, err := s.cfg.Sandboxes.Exec(r.Context(), tenant, id, req, func(stream string, data []byte) error {
		c := &outC
		if stream == wire.EventStderr {
			c = &errC
		}
		text := c.next(data)
		if text == "" {
			return nil
		}
		return ew.send(wire.ExecEvent{Type: stream, Data: text})
	})
	if err != nil {
		if !ew.started {
			return err
		}
		// The answer has started with 200: the error goes in an event,
		// classified and logged like any other.
		_, e := s.describe(r, tenant, err)
		_ = ew.send(wire.ExecEvent{Type: wire.EventError, Error: &e})
		return nil
	}
	for stream, c := range map[string]*utf8Carry{wire.EventStdout: &outC, wire.EventStderr: &errC} {
		if rest := c.flush(); rest != "" {
			_ = ew.send(wire.ExecEvent{Type: stream, Data: rest})
		}
	}
	return ew.send(wire.ExecEvent{Type: wire.EventExit, Result: &res})
}
