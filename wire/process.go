package wire

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"time"
)

// StartProcessRequest is the body of POST /v1/sandboxes/{id}/processes: a
// background process, which runs until it exits, is signalled, reaches its
// timeout or the sandbox ends, whoever is attached to it. Exactly one of Cmd
// (run by /bin/sh -c) and Argv must be set.
type StartProcessRequest struct {
	Cmd  string            `json:"cmd,omitempty"`
	Argv []string          `json:"argv,omitempty"`
	Env  map[string]string `json:"env,omitempty"`
	Cwd  string            `json:"cwd,omitempty"`
	// User runs the process as that user of the sandbox: "user" (the
	// default) or "root".
	User string `json:"user,omitempty"`
	// Tag is the caller's name for the process, shown in lists.
	Tag string `json:"tag,omitempty"`
	// Stdin keeps the process's standard input open for
	// POST .../stdin and terminal input; without it the process reads an
	// empty stdin. A process on a PTY always takes input.
	Stdin bool `json:"stdin,omitempty"`
	// TimeoutSeconds kills the process, with its children, after that
	// long (exit code 124); zero: no timeout.
	TimeoutSeconds float64 `json:"timeout_seconds,omitempty"`
	// PTY runs the process on a pseudo-terminal of that size (a new
	// session, the terminal as its controlling terminal,
	// TERM=xterm-256color); its output is the terminal's, as stdout.
	PTY *PTYSize `json:"pty,omitempty"`
}

// PTYSize is a terminal's window size in characters; also the body of
// POST /v1/sandboxes/{id}/processes/{pid}/resize.
type PTYSize struct {
	Cols int `json:"cols"`
	Rows int `json:"rows"`
}

// Process states.
const (
	ProcessRunning = "running"
	ProcessExited  = "exited"
)

// Process describes a background process of a sandbox.
type Process struct {
	PID  int      `json:"pid"`
	Tag  string   `json:"tag"`
	Argv []string `json:"argv"`
	User string   `json:"user"`
	Cwd  string   `json:"cwd"`
	// PTY reports whether the process runs on a pseudo-terminal.
	PTY bool `json:"pty"`
	// Stdin reports whether the process's input is open.
	Stdin     bool      `json:"stdin"`
	State     string    `json:"state"`
	StartedAt time.Time `json:"started_at"`
	// ExitCode is set once the process has exited: its exit status, 128+N
	// when signal N ended it, 124 when its timeout did.
	ExitCode *int      `json:"exit_code,omitempty"`
	TimedOut bool      `json:"timed_out"`
	ExitedAt time.Time `json:"exited_at,omitzero"`
	// StdoutBytes and StderrBytes count what the process wrote in all.
	StdoutBytes int64 `json:"stdout_bytes"`
	StderrBytes int64 `json:"stderr_bytes"`
}

// ProcessList is the body of GET /v1/sandboxes/{id}/processes: running
// processes and those that exited recently, oldest first.
type ProcessList struct {
	Processes []Process `json:"processes"`
}

// ProcessStdinRequest is the body of POST .../processes/{pid}/stdin: Data
// (UTF-8 text) or DataBase64 (any bytes), then, with EOF, the end of the
// process's input.
type ProcessStdinRequest struct {
	Data       string `json:"data,omitempty"`
	DataBase64 string `json:"data_base64,omitempty"`
	EOF        bool   `json:"eof,omitempty"`
}

// Signal names a signal: "SIGTERM", "TERM" (any case) or a number 1-64. In
// JSON it is a string or a number.
type Signal string

// UnmarshalJSON accepts a string or an integer.
func (s *Signal) UnmarshalJSON(b []byte) error {
	b = bytes.TrimSpace(b)
	if len(b) > 0 && b[0] == '"' {
		var str string
		if err := json.Unmarshal(b, &str); err != nil {
			return err
		}
		*s = Signal(str)
		return nil
	}
	var n int
	if err := json.Unmarshal(b, &n); err != nil {
		return fmt.Errorf("signal must be a name or a number, got %s", b)
	}
	*s = Signal(strconv.Itoa(n))
	return nil
}

// SignalRequest is the body of POST .../processes/{pid}/signal; the signal
// goes to the process's group.
type SignalRequest struct {
	Signal Signal `json:"signal"`
}

// ProcessEvent is one line (NDJSON) or event (SSE) of
// GET .../processes/{pid}/output. Type is "stdout" or "stderr" (Data set),
// "dropped" (Stream and Bytes: output the server no longer held), "exit"
// (Process set, exited: the last event), "end" (Process set, still running:
// the last event without follow) or "error" (Error set: the stream broke,
// e.g. because the sandbox was paused; attach again).
type ProcessEvent struct {
	Type    string   `json:"type"`
	Data    string   `json:"data,omitempty"`
	Stream  string   `json:"stream,omitempty"`
	Bytes   int64    `json:"bytes,omitempty"`
	Process *Process `json:"process,omitempty"`
	Error   *Error   `json:"error,omitempty"`
}

// Process event types beyond the exec ones.
const (
	EventDropped = "dropped"
	EventEnd     = "end"
)

// TerminalMessage is a text message of a terminal WebSocket (GET
// .../processes/{pid}/terminal, GET .../terminal); binary messages carry
// the terminal's bytes both ways. The client sends "resize" (Cols, Rows),
// "signal" (Signal) and "eof" (end of input: ^D on a terminal); the server
// sends "dropped" (Stream, Bytes: older output no longer held), "exit"
// (ExitCode and Process, then it closes) and "error" (Error, then it
// closes).
type TerminalMessage struct {
	Type     string   `json:"type"`
	Cols     int      `json:"cols,omitempty"`
	Rows     int      `json:"rows,omitempty"`
	Signal   Signal   `json:"signal,omitempty"`
	Stream   string   `json:"stream,omitempty"`
	Bytes    int64    `json:"bytes,omitempty"`
	ExitCode *int     `json:"exit_code,omitempty"`
	Process  *Process `json:"process,omitempty"`
	Error    *Error   `json:"error,omitempty"`
}

// Terminal message types.
const (
	TerminalResize  = "resize"
	TerminalSignal  = "signal"
	TerminalEOF     = "eof"
	TerminalDropped = "dropped"
	TerminalExit    = "exit"
	TerminalError   = "error"
)
