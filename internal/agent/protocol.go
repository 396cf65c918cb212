// Package agent is the in-sandbox agent and the daemon's client for it.
//
// The agent is a static binary that runs as init (PID 1) of every sandbox.
// The daemon talks to it over the init process's own stdin and stdout, which
// the runtime connects to host FIFOs: no sandbox network is needed, a round
// trip costs tens of microseconds, and a restored checkpoint re-attaches
// init's stdio to fresh host pipes (see docs/ARCHITECTURE.md for the
// measurements behind this choice).
//
// A yamux session runs over that byte stream; the daemon opens one stream per
// call. Each stream carries frames: a one-byte type, a four-byte big-endian
// length and a payload. The first frame is a request; what follows depends on
// the operation.
package agent

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
)

// ProtocolVersion is bumped on any incompatible change of the frames below.
const ProtocolVersion = 1

// Frame types.
const (
	// FrameRequest (daemon→agent) carries a JSON Request; always first.
	FrameRequest byte = 'R'
	// FrameStdin (daemon→agent) carries bytes for the process's stdin.
	FrameStdin byte = 'I'
	// FrameStdinEOF (daemon→agent) closes the process's stdin.
	FrameStdinEOF byte = 'C'
	// FrameSignal (daemon→agent) carries a JSON Signal for the process group.
	FrameSignal byte = 'K'
	// FrameStarted (agent→daemon) carries a JSON Started once the process
	// runs. Agents of protocol version 1 do not send it (it costs a write
	// per exec); clients skip it.
	FrameStarted byte = 'S'
	// FrameStdout and FrameStderr (agent→daemon) carry output bytes.
	FrameStdout byte = 'O'
	FrameStderr byte = 'E'
	// FrameExit (agent→daemon) carries a JSON Exit; always last.
	FrameExit byte = 'X'
	// FrameReply (agent→daemon) carries a JSON reply to a non-exec request.
	FrameReply byte = 'P'
)

// MaxFrame bounds one frame's payload so a corrupt length cannot make either
// side allocate without limit.
const MaxFrame = 1 << 20

// Operations a Request names.
const (
	OpPing = "ping"
	OpExec = "exec"
	// OpReclaim kills the process using the most memory (reclaim.go);
	// the reply is a Reclaimed.
	OpReclaim = "reclaim"
)

// Request is the first frame of every stream.
type Request struct {
	Op   string       `json:"op"`
	Exec *ExecRequest `json:"exec,omitempty"`
	// Reclaim is set for OpReclaim.
	Reclaim *Reclaim `json:"reclaim,omitempty"`
	// Args carries the arguments of the other operations (ops.go), as
	// JSON of the operation's own type.
	Args json.RawMessage `json:"args,omitempty"`
}

// ExecRequest asks the agent to run one process.
type ExecRequest struct {
	// Argv is run directly; Argv[0] is looked up in PATH.
	Argv []string `json:"argv"`
	// Env entries (KEY=VALUE) are added to the agent's own environment,
	// replacing keys it already has.
	Env []string `json:"env,omitempty"`
	Cwd string   `json:"cwd,omitempty"`
	// TimeoutMS kills the command (its process group, its descendants and
	// the holders of its pipes) after that many milliseconds; 0 means no
	// timeout.
	TimeoutMS int64 `json:"timeout_ms,omitempty"`
	// Stdin reports whether stdin frames follow; without it the process gets
	// an empty stdin.
	Stdin bool `json:"stdin,omitempty"`
	// MaxOutputBytes caps what is sent of each of stdout and stderr; the
	// rest is read and dropped, and Exit.Truncated is set. 0: no cap.
	MaxOutputBytes int64 `json:"max_output_bytes,omitempty"`
	// User runs the process as that user of the sandbox (its uid, gid,
	// groups, HOME, USER, LOGNAME; Cwd defaults to its home); empty: the
	// agent's own (root).
	User string `json:"user,omitempty"`
}

// Signal asks the agent to signal the process group.
type Signal struct {
	Signal int `json:"signal"`
}

// Exit is the outcome of an exec.
type Exit struct {
	// ExitCode is the process's exit status, or 128+signal when a signal
	// ended it, or -1 when it could not start.
	ExitCode int  `json:"exit_code"`
	Signal   int  `json:"signal,omitempty"`
	TimedOut bool `json:"timed_out,omitempty"`
	// Truncated reports whether output went over ExecRequest.MaxOutputBytes.
	Truncated bool   `json:"truncated,omitempty"`
	Error     string `json:"error,omitempty"`
	// Invalid reports that the request itself was wrong (an unknown
	// user): the process did not start, and the caller should say so as
	// a bad request rather than as an exit code.
	Invalid bool `json:"invalid,omitempty"`
}

// Pong is the reply to a ping.
type Pong struct {
	Version int `json:"version"`
	PID     int `json:"pid"`
}

// WriteFrame writes one frame.
func WriteFrame(w io.Writer, typ byte, payload []byte) error {
	if len(payload) > MaxFrame {
		return fmt.Errorf("frame of %d bytes exceeds limit %d", len(payload), MaxFrame)
	}
	buf := make([]byte, 5+len(payload))
	buf[0] = typ
	binary.BigEndian.PutUint32(buf[1:5], uint32(len(payload)))
	copy(buf[5:], payload)
	_, err := w.Write(buf)
	return err
}

// WriteJSON writes one frame whose payload is v as JSON.
func WriteJSON(w io.Writer, typ byte, v any) error {
	b, err := encodeJSON(v)
	if err != nil {
		return fmt.Errorf("encoding frame %q: %w", typ, err)
	}
	return WriteFrame(w, typ, b)
}

// encodeJSON is json.Marshal without HTML escaping: Marshal writes each
// <, > and & as a six-byte \u003c escape, which would let a request of
// ordinary size (a 200,000-character value of '<') exceed MaxFrame. Nothing
// here is embedded in HTML.
func encodeJSON(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	// Encode ends every value with a newline; the frame carries the value
	// alone.
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// EncodedSize returns the size of req's frame payload as the client sends
// it. A request over MaxFrame cannot be sent; the daemon uses this to
// refuse one up front (as a bad request) instead of failing mid-call.
func EncodedSize(req Request) (int, error) {
	b, err := encodeJSON(req)
	if err != nil {
		return 0, fmt.Errorf("encoding %s request: %w", req.Op, err)
	}
	return len(b), nil
}

// ReadFrame reads one frame.
func ReadFrame(r io.Reader) (typ byte, payload []byte, err error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:5])
	if n > MaxFrame {
		return 0, nil, fmt.Errorf("frame of %d bytes exceeds limit %d", n, MaxFrame)
	}
	payload = make([]byte, n)
	if _, err := io.ReadFull(r, payload); err != nil {
		if err == io.EOF {
			// A header without its payload is a cut frame, not a clean end.
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, fmt.Errorf("reading frame payload: %w", err)
	}
	return hdr[0], payload, nil
}
