package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

// Client is the daemon's side of one agent session. It is safe for
// concurrent use: each call opens its own stream.
type Client struct {
	sess *yamux.Session
}

// NewClient starts a session over conn (the agent's stdio, seen from the host).
func NewClient(conn io.ReadWriteCloser) (*Client, error) {
	sess, err := yamux.Client(newHeaderJoiner(conn), yamuxConfig())
	if err != nil {
		return nil, fmt.Errorf("starting yamux session: %w", err)
	}
	return &Client{sess: sess}, nil
}

// Close ends the session.
func (c *Client) Close() error { return c.sess.Close() }

// Closed returns a channel that is closed when the session ends.
func (c *Client) Closed() <-chan struct{} { return c.sess.CloseChan() }

// IsClosed reports whether the session has ended.
func (c *Client) IsClosed() bool { return c.sess.IsClosed() }

func (c *Client) open(ctx context.Context, req Request) (*yamux.Stream, func(), error) {
	st, err := c.sess.OpenStream()
	if err != nil {
		return nil, nil, fmt.Errorf("opening agent stream: %w", err)
	}
	// Cancelling ctx must also unblock a read waiting on an agent that
	// does not answer: Close alone only half-closes the stream.
	stop := context.AfterFunc(ctx, func() {
		_ = st.SetDeadline(time.Now())
		st.Close()
	})
	cleanup := func() {
		stop()
		st.Close()
	}
	if err := WriteJSON(st, FrameRequest, req); err != nil {
		cleanup()
		return nil, nil, fmt.Errorf("sending %s request: %w", req.Op, err)
	}
	return st, cleanup, nil
}

// Ping checks that the agent answers.
func (c *Client) Ping(ctx context.Context) (Pong, error) {
	st, cleanup, err := c.open(ctx, Request{Op: OpPing})
	if err != nil {
		return Pong{}, err
	}
	defer cleanup()
	typ, payload, err := ReadFrame(st)
	if err != nil {
		return Pong{}, ctxErr(ctx, fmt.Errorf("reading ping reply: %w", err))
	}
	if typ != FrameReply {
		return Pong{}, fmt.Errorf("unexpected frame %q in reply to ping", typ)
	}
	var p Pong
	if err := json.Unmarshal(payload, &p); err != nil {
		return Pong{}, fmt.Errorf("decoding ping reply: %w", err)
	}
	return p, nil
}

// Reclaim asks the agent to kill the process using the most memory: the
// sandbox is at its memory limit.
func (c *Client) Reclaim(ctx context.Context, limitMB int) (Reclaimed, error) {
	st, cleanup, err := c.open(ctx, Request{Op: OpReclaim, Reclaim: &Reclaim{LimitMB: limitMB}})
	if err != nil {
		return Reclaimed{}, err
	}
	defer cleanup()
	typ, payload, err := ReadFrame(st)
	if err != nil {
		return Reclaimed{}, ctxErr(ctx, fmt.Errorf("reading reclaim reply: %w", err))
	}
	if typ != FrameReply {
		return Reclaimed{}, fmt.Errorf("unexpected frame %q in reply to reclaim", typ)
	}
	var r Reclaimed
	if err := json.Unmarshal(payload, &r); err != nil {
		return Reclaimed{}, fmt.Errorf("decoding reclaim reply: %w", err)
	}
	return r, nil
}

// ExecIO connects an exec to its caller. Any field may be nil.
type ExecIO struct {
	// Stdin, when set, is copied to the process; its EOF closes the
	// process's stdin.
	Stdin io.Reader
	// Stdout and Stderr receive output as it arrives. An error from either
	// kills the process.
	Stdout func([]byte) error
	Stderr func([]byte) error
	// Signals, when set, carries signals for the process group.
	Signals <-chan int
}

// ErrSessionClosed reports that the agent session ended (the sandbox died or
// was stopped) before the call finished.
var ErrSessionClosed = errors.New("agent session closed")

// Exec runs one process and blocks until it exits. Cancelling ctx kills the
// process group.
func (c *Client) Exec(ctx context.Context, req ExecRequest, eio ExecIO) (Exit, error) {
	req.Stdin = eio.Stdin != nil
	st, cleanup, err := c.open(ctx, Request{Op: OpExec, Exec: &req})
	if err != nil {
		return Exit{}, err
	}
	defer cleanup()

	var wmu sync.Mutex
	send := func(typ byte, p []byte) error {
		wmu.Lock()
		defer wmu.Unlock()
		return WriteFrame(st, typ, p)
	}
	if eio.Stdin != nil {
		go func() {
			buf := make([]byte, 32<<10)
			for {
				n, err := eio.Stdin.Read(buf)
				if n > 0 && sendStdin(send, buf[:n]) != nil {
					return
				}
				if err != nil {
					_ = send(FrameStdinEOF, nil)
					return
				}
			}
		}()
	}
	if eio.Signals != nil {
		done := make(chan struct{})
		defer close(done)
		go func() {
			for {
				select {
				case <-done:
					return
				case sig := <-eio.Signals:
					b, _ := json.Marshal(Signal{Signal: sig})
					_ = send(FrameSignal, b)
				}
			}
		}()
	}

	for {
		typ, payload, err := ReadFrame(st)
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || c.sess.IsClosed() {
				err = ErrSessionClosed
			}
			return Exit{}, ctxErr(ctx, fmt.Errorf("reading exec output: %w", err))
		}
		switch typ {
		case FrameStarted:
		case FrameStdout, FrameStderr:
			fn := eio.Stdout
			if typ == FrameStderr {
				fn = eio.Stderr
			}
			if fn != nil {
				if err := fn(payload); err != nil {
					return Exit{}, fmt.Errorf("delivering output: %w", err)
				}
			}
		case FrameExit:
			var ex Exit
			if err := json.Unmarshal(payload, &ex); err != nil {
				return Exit{}, fmt.Errorf("decoding exit: %w", err)
			}
			return ex, nil
		default:
			return Exit{}, fmt.Errorf("unexpected frame %q during exec", typ)
		}
	}
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%w)", ctx.Err(), err)
	}
	return err
}

// sendStdin sends stdin bytes, never letting a whole resync marker stand
// contiguously in one frame: the agent scans its raw input for markers, and
// a caller's data must not be able to end the session. A frame boundary (a
// yamux header falls between frames) inside the magic breaks the match.
func sendStdin(send func(byte, []byte) error, b []byte) error {
	for len(b) > 0 {
		i := bytes.Index(b, []byte(syncMagic))
		if i < 0 {
			return send(FrameStdin, b)
		}
		if err := send(FrameStdin, b[:i+1]); err != nil {
			return err
		}
		b = b[i+1:]
	}
	return nil
}
