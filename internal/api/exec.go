package api

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"unicode/utf8"

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
	if err := decode(r, &req); err != nil {
		return err
	}
	id := r.PathValue("id")
	mode := negotiate(r)
	if mode == modeBlocking {
		return s.execBlocking(w, r, tenant, id, req)
	}
	return s.execStream(w, r, tenant, id, req, mode)
}

// capped collects one output stream up to a limit.
type capped struct {
	sb        strings.Builder
	carry     utf8Carry
	max       int
	truncated bool
}

// add appends b. The collected text never exceeds max bytes: bytes held
// back for an incomplete character count too, and the cut falls on a
// character boundary.
func (c *capped) add(b []byte) {
	if c.truncated {
		return
	}
	text := c.carry.next(b)
	room := c.max - c.sb.Len()
	if len(text)+len(c.carry.rest) <= room {
		c.sb.WriteString(text)
		return
	}
	c.truncated = true
	c.carry.rest = nil
	cut := min(max(room, 0), len(text))
	for cut > 0 && cut < len(text) && !utf8.RuneStart(text[cut]) {
		cut--
	}
	c.sb.WriteString(text[:cut])
}

func (s *Server) execBlocking(w http.ResponseWriter, r *http.Request, tenant, id string, req wire.ExecRequest) error {
	stdout := &capped{max: s.cfg.MaxOutputBytes}
	stderr := &capped{max: s.cfg.MaxOutputBytes}
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
	res.Stdout = stdout.sb.String() + stdout.carry.flush()
	res.Stderr = stderr.sb.String() + stderr.carry.flush()
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
		_ = ew.send(wire.ExecEvent{Type: wire.EventError, Error: wireError(err)})
		return nil
	}
	for stream, c := range map[string]*utf8Carry{wire.EventStdout: &outC, wire.EventStderr: &errC} {
		if rest := c.flush(); rest != "" {
			_ = ew.send(wire.ExecEvent{Type: stream, Data: rest})
		}
	}
	return ew.send(wire.ExecEvent{Type: wire.EventExit, Result: &res})
}
