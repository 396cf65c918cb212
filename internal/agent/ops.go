package agent

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/hashicorp/yamux"
)

// The operations beyond ping, exec and reclaim: files, background
// processes, terminals. Each takes its arguments as Request.Args (JSON of
// its own type), and answers on its stream with frames of its own
// convention, documented beside it; an operation that fails before it
// starts answers one FrameError.

// FrameError (agent→daemon) carries a JSON OpError: the operation failed.
const FrameError byte = 'F'

// OpError is why an operation failed. Kind says what the daemon should
// answer its caller: one of the Err* kinds below.
type OpError struct {
	Kind    string `json:"kind"`
	Message string `json:"message"`
}

func (e *OpError) Error() string { return e.Message }

// Kinds of OpError, mapped by the daemon to its own error kinds.
const (
	ErrKindInvalid  = "invalid"   // a bad argument: a relative path, an unknown user
	ErrKindNotFound = "not_found" // no such file, process
	ErrKindExists   = "exists"    // the target exists already
	ErrKindNoSpace  = "no_space"  // the sandbox's disk is full
	ErrKindDenied   = "denied"    // permission denied inside the sandbox
	ErrKindOther    = "other"
)

// writeOpError answers an operation's failure.
func writeOpError(st *yamux.Stream, kind, format string, args ...any) {
	_ = WriteJSON(st, FrameError, OpError{Kind: kind, Message: fmt.Sprintf(format, args...)})
}

// decodeArgs decodes an operation's arguments, answering a FrameError when
// they are malformed.
func decodeArgs(st *yamux.Stream, req Request, v any) bool {
	if len(req.Args) == 0 {
		writeOpError(st, ErrKindInvalid, "%s: missing arguments", req.Op)
		return false
	}
	if err := json.Unmarshal(req.Args, v); err != nil {
		writeOpError(st, ErrKindInvalid, "%s: decoding arguments: %v", req.Op, err)
		return false
	}
	return true
}

// handleOp serves the operations of this file's kind; it reports false for
// an operation it does not know.
func (s *Server) handleOp(ctx context.Context, st *yamux.Stream, req Request) bool {
	switch req.Op {
	case OpFileRead, OpFileWrite, OpFileStat, OpFileList, OpFileMkdir, OpFileRemove, OpFileRename,
		OpTarGet, OpTarPut, OpFileWatch:
		s.fileOp(ctx, st, req)
		return true
	case OpProcessStart, OpProcessList, OpProcessGet, OpProcessStdin, OpProcessSignal,
		OpProcessResize, OpProcessWait, OpProcessAttach:
		return s.handleProcessOp(ctx, st, req)
	case OpCodeRun, OpCodeCreate, OpCodeList, OpCodeRestart, OpCodeDelete, OpRestored:
		s.handleCode(ctx, st, req)
		return true
	default:
		return false
	}
}
