package agent

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"
)

// A daemon starts every session with a resync marker: syncMagic followed by
// a fresh random nonce. The agent ends whatever session it had, echoes the
// marker on its stdout and serves a new session from the next byte on. The
// daemon discards everything it reads before the echo.
//
// This is what lets a session start on a byte stream with history: after a
// daemon restart (the old daemon may have left half-written frames in the
// FIFOs, and the agent still holds the old session's state) and after a
// checkpoint is restored (the agent's memory holds a session whose peer
// never existed). No other channel into the sandbox is needed.
//
// The magic's first byte occurs nowhere else in it, so matching needs no
// backtracking. The daemon's own stream never contains the marker: JSON
// requests cannot hold its bytes (0xfe is never valid UTF-8), and the
// client splits stdin data so that no frame holds the whole magic.
const syncMagic = "\xfePANDASTACK-RESYNC-1\xfd"

const nonceLen = 16

// markerMatcher finds magic+nonce in a byte stream fed in arbitrary chunks.
type markerMatcher struct {
	matched int // bytes of syncMagic matched so far
	nonce   []byte
}

// feed consumes b and reports the index just past a complete marker and its
// nonce, or -1 when b holds no marker end.
func (m *markerMatcher) feed(b []byte) (end int, nonce []byte) {
	for i := 0; i < len(b); i++ {
		if m.matched == len(syncMagic) {
			m.nonce = append(m.nonce, b[i])
			if len(m.nonce) == nonceLen {
				nonce = m.nonce
				m.matched, m.nonce = 0, nil
				return i + 1, nonce
			}
			continue
		}
		if b[i] == syncMagic[m.matched] {
			m.matched++
			continue
		}
		m.matched = 0
		if b[i] == syncMagic[0] {
			m.matched = 1
		}
	}
	return -1, nil
}

// lockedWriter serialises the agent's stdout between sessions and markers.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

// sessionWriter is one session's view of stdout; once cut, its writes fail,
// so an old session can never write after the marker that replaced it.
type sessionWriter struct {
	out *lockedWriter
	cut bool // guarded by out.mu
}

var errSessionCut = errors.New("session replaced by a newer one")

func (w *sessionWriter) Write(p []byte) (int, error) {
	w.out.mu.Lock()
	defer w.out.mu.Unlock()
	if w.cut {
		return 0, errSessionCut
	}
	return w.out.w.Write(p)
}

// sessionConn is one session's connection: input forwarded by ServeStdio's
// pump, output through its sessionWriter.
type sessionConn struct {
	*io.PipeReader
	w *sessionWriter
}

func (c sessionConn) Write(p []byte) (int, error) { return c.w.Write(p) }
func (c sessionConn) Close() error                { return c.PipeReader.Close() }

// ServeStdio serves sessions over a byte stream with history (the agent's
// transport, which was its stdin and stdout): every resync marker on in
// starts a new session and ends the previous one. It returns when in fails
// or ctx ends, once its sessions are over.
func (s *Server) ServeStdio(ctx context.Context, in io.Reader, out io.Writer) error {
	lw := &lockedWriter{w: out}
	var (
		curW  *sessionWriter
		curPW *io.PipeWriter
		// sessions are the Serve calls started here; an ended session's
		// Serve returns on its own once its calls are done.
		sessions sync.WaitGroup
	)
	defer sessions.Wait()
	endSession := func() {
		if curW == nil {
			return
		}
		lw.mu.Lock()
		curW.cut = true
		lw.mu.Unlock()
		curPW.CloseWithError(errSessionCut)
		curW, curPW = nil, nil
	}
	defer endSession()
	var m markerMatcher
	buf := make([]byte, 64<<10)
	for {
		n, err := in.Read(buf)
		data := buf[:n]
		for len(data) > 0 {
			end, nonce := m.feed(data)
			if end < 0 {
				if curPW != nil {
					// A write error means the session is gone; its input
					// is dropped until the next marker.
					_, _ = curPW.Write(data)
				}
				break
			}
			// Bytes before the marker (and the marker's own first bytes)
			// belong to the old session, which is ending anyway.
			endSession()
			lw.mu.Lock()
			_, werr := lw.w.Write(append([]byte(syncMagic), nonce...))
			lw.mu.Unlock()
			if werr != nil {
				return fmt.Errorf("echoing resync marker: %w", werr)
			}
			pr, pw := io.Pipe()
			curW, curPW = &sessionWriter{out: lw}, pw
			conn := sessionConn{PipeReader: pr, w: curW}
			sessions.Go(func() {
				if err := s.Serve(ctx, conn); err != nil {
					s.log.Warn("agent session ended", "err", err)
				}
			})
			data = data[end:]
		}
		if err != nil {
			return fmt.Errorf("reading agent input: %w", err)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// prefixedConn yields leftover bytes before reading from the connection.
type prefixedConn struct {
	io.ReadWriteCloser
	prefix []byte
}

func (c *prefixedConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.ReadWriteCloser.Read(p)
}

// deadliner is implemented by connections (os.File on a FIFO, net.Conn)
// whose reads can time out.
type deadliner interface {
	SetReadDeadline(t time.Time) error
}

// writeDeadliner is implemented by connections whose writes can time out.
type writeDeadliner interface {
	SetWriteDeadline(t time.Time) error
}

// Dial starts a new session with the agent on conn, whatever the stream
// carried before: it sends a resync marker, skips everything until the
// agent's echo, then runs the session on what follows. ctx bounds the
// handshake.
func Dial(ctx context.Context, conn io.ReadWriteCloser) (*Client, error) {
	nonce := make([]byte, nonceLen)
	if _, err := rand.Read(nonce); err != nil {
		return nil, fmt.Errorf("generating resync nonce: %w", err)
	}
	marker := append([]byte(syncMagic), nonce...)
	// Bound the handshake on both directions: an agent that is stopped
	// neither reads its stdin (the FIFO fills and the marker's write
	// blocks) nor writes its echo.
	setDeadlines := func(t time.Time) {
		if d, ok := conn.(deadliner); ok {
			_ = d.SetReadDeadline(t)
		}
		if d, ok := conn.(writeDeadliner); ok {
			_ = d.SetWriteDeadline(t)
		}
	}
	if dl, ok := ctx.Deadline(); ok {
		setDeadlines(dl)
	}
	defer setDeadlines(time.Time{})
	stop := context.AfterFunc(ctx, func() { setDeadlines(time.Now()) })
	defer stop()
	if _, err := conn.Write(marker); err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, fmt.Errorf("sending resync marker: %w", err)
	}
	var m markerMatcher
	buf := make([]byte, 32<<10)
	for {
		n, err := conn.Read(buf)
		data := buf[:n]
		for len(data) > 0 {
			end, got := m.feed(data)
			if end < 0 {
				break
			}
			data = data[end:]
			if string(got) != string(nonce) {
				continue // an echo for an earlier daemon's marker
			}
			return NewClient(&prefixedConn{ReadWriteCloser: conn, prefix: append([]byte(nil), data...)})
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() != nil {
				err = ctx.Err()
			}
			return nil, fmt.Errorf("waiting for the agent's resync echo: %w", err)
		}
	}
}
