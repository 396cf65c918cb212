package agent

import (
	"encoding/binary"
	"io"
)

// yamux header layout: version(1) type(1) flags(2) stream id(4) length(4).
const (
	yamuxHeaderSize = 12
	yamuxTypeData   = 0
)

// headerJoiner merges each yamux data-frame header with the body that
// yamux's send loop writes right after it, so that a frame costs one write
// instead of two. Inside gVisor every write to the stdio FIFO is a trip
// through the sentry to the host, which makes this worth about a millisecond
// per exec.
//
// It relies on yamux writing to the connection from its single send loop:
// a data header with a non-zero length is always followed by its body.
type headerJoiner struct {
	io.ReadWriteCloser
	held []byte // a data header waiting for its body
}

func newHeaderJoiner(c io.ReadWriteCloser) *headerJoiner {
	return &headerJoiner{ReadWriteCloser: c, held: make([]byte, 0, 64<<10)}
}

func (j *headerJoiner) Write(p []byte) (int, error) {
	if len(j.held) > 0 {
		buf := append(j.held, p...)
		j.held = j.held[:0]
		if _, err := j.ReadWriteCloser.Write(buf); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	if len(p) == yamuxHeaderSize && p[1] == yamuxTypeData && binary.BigEndian.Uint32(p[8:12]) > 0 {
		j.held = append(j.held, p...)
		return len(p), nil
	}
	return j.ReadWriteCloser.Write(p)
}
