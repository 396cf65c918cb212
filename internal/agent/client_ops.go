package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
)

// Stream is the daemon's end of one operation (ops.go): frames both ways.
// Close it when done; cancelling the context the operation was started
// with also ends it.
type Stream struct {
	rw    io.ReadWriter
	close func()
}

// ReadFrame reads the next frame the agent sent. A FrameError comes back as
// an *OpError.
func (s *Stream) ReadFrame() (typ byte, payload []byte, err error) {
	typ, payload, err = ReadFrame(s.rw)
	if err != nil {
		return 0, nil, err
	}
	if typ == FrameError {
		var oe OpError
		if err := json.Unmarshal(payload, &oe); err != nil {
			return 0, nil, fmt.Errorf("decoding operation error: %w", err)
		}
		return 0, nil, &oe
	}
	return typ, payload, nil
}

// ReadJSON reads the next frame, which must be of type want, into v.
func (s *Stream) ReadJSON(want byte, v any) error {
	typ, payload, err := s.ReadFrame()
	if err != nil {
		return err
	}
	if typ != want {
		return fmt.Errorf("unexpected frame %q, want %q", typ, want)
	}
	return json.Unmarshal(payload, v)
}

// WriteFrame sends a frame to the agent.
func (s *Stream) WriteFrame(typ byte, p []byte) error { return WriteFrame(s.rw, typ, p) }

// WriteJSON sends a frame whose payload is v as JSON.
func (s *Stream) WriteJSON(typ byte, v any) error { return WriteJSON(s.rw, typ, v) }

// Close ends the operation's stream.
func (s *Stream) Close() { s.close() }

// Open starts operation op with args (JSON-encoded into Request.Args).
func (c *Client) Open(ctx context.Context, op string, args any) (*Stream, error) {
	b, err := json.Marshal(args)
	if err != nil {
		return nil, fmt.Errorf("encoding %s arguments: %w", op, err)
	}
	st, cleanup, err := c.open(ctx, Request{Op: op, Args: b})
	if err != nil {
		return nil, err
	}
	return &Stream{rw: st, close: cleanup}, nil
}

// Call runs an operation that answers one FrameReply, decoded into reply.
func (c *Client) Call(ctx context.Context, op string, args, reply any) error {
	st, err := c.Open(ctx, op, args)
	if err != nil {
		return err
	}
	defer st.Close()
	if err := st.ReadJSON(FrameReply, reply); err != nil {
		return ctxErr(ctx, fmt.Errorf("%s: %w", op, err))
	}
	return nil
}
