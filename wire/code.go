package wire

import (
	"encoding/json"
	"sort"
)

// Code execution: cells run in live interpreters (Jupyter kernels), one per
// code context, so that variables persist between calls and results come
// back as Jupyter's MIME bundles, under the keys Jupyter front ends and
// E2B's code interpreter use.

// LanguagePython is the language of the default code context.
const LanguagePython = "python"

// RunCodeRequest is the body of POST /v1/sandboxes/{id}/code.
type RunCodeRequest struct {
	// Code is the cell: Python, with IPython's additions (%magics,
	// display(), the last expression's value as the result).
	Code string `json:"code"`
	// Context is the id of the code context to run in; empty: the default
	// context of Language, whose id is the language ("python").
	Context string `json:"context,omitempty"`
	// Language picks the default context when Context is empty; "python"
	// (the default).
	Language string `json:"language,omitempty"`
	// TimeoutSeconds interrupts the cell (KeyboardInterrupt) that long
	// after it started; the context and its variables stay. Default 60,
	// at most the server's maximum exec timeout.
	TimeoutSeconds float64 `json:"timeout_seconds,omitempty"`
}

// CodeResult is one result of a cell: its value (IsMainResult) or what it
// displayed, in every format the object offered. Binary formats (PNG,
// JPEG, PDF) are base64.
type CodeResult struct {
	Text       string `json:"text,omitempty"`
	HTML       string `json:"html,omitempty"`
	Markdown   string `json:"markdown,omitempty"`
	SVG        string `json:"svg,omitempty"`
	PNG        string `json:"png,omitempty"`
	JPEG       string `json:"jpeg,omitempty"`
	PDF        string `json:"pdf,omitempty"`
	LaTeX      string `json:"latex,omitempty"`
	JavaScript string `json:"javascript,omitempty"`
	// JSON is the application/json value, as JSON.
	JSON json.RawMessage `json:"json,omitempty"`
	// IsMainResult marks the cell's own value (Jupyter's execute_result),
	// as opposed to what it displayed (display(), figures).
	IsMainResult bool `json:"is_main_result"`
	// Extra holds the formats that have no key above, by MIME type.
	Extra map[string]json.RawMessage `json:"extra,omitempty"`
}

// CodeLogs is what a cell printed, in the chunks it came in.
type CodeLogs struct {
	Stdout []string `json:"stdout"`
	Stderr []string `json:"stderr"`
}

// ExecutionError is the exception a cell raised.
type ExecutionError struct {
	Name  string `json:"name"`
	Value string `json:"value"`
	// Traceback is the formatted traceback, plain text.
	Traceback string `json:"traceback"`
}

// Execution is the answer to a blocking run: everything the cell produced.
type Execution struct {
	Results []CodeResult `json:"results"`
	Logs    CodeLogs     `json:"logs"`
	// Error is the cell's exception; absent when it raised none.
	Error *ExecutionError `json:"error,omitempty"`
	// ExecutionCount is the cell's number in its context (In [n]).
	ExecutionCount int `json:"execution_count"`
	// Context is the id of the context that ran it.
	Context string `json:"context"`
	// TimedOut reports that the cell was interrupted at its timeout.
	TimedOut bool `json:"timed_out"`
	// Truncated reports that output or results went over the server's
	// cap (each of stdout, stderr and results) and the rest was dropped.
	Truncated  bool    `json:"truncated"`
	DurationMS float64 `json:"duration_ms"`
}

// CodeEvent is one line of a streamed run (NDJSON line or SSE event), in
// order: "stdout" and "stderr" (Data), "result" (Result),
// "execution_error" (ExecutionError), and last "end" (Execution, whose
// results and logs are empty: they were streamed) or "error" (Error: the
// run failed, e.g. the sandbox died).
type CodeEvent struct {
	Type           string          `json:"type"`
	Data           string          `json:"data,omitempty"`
	Result         *CodeResult     `json:"result,omitempty"`
	ExecutionError *ExecutionError `json:"execution_error,omitempty"`
	Execution      *Execution      `json:"execution,omitempty"`
	Error          *Error          `json:"error,omitempty"`
}

// Code event types beyond the exec stream's stdout, stderr and error.
const (
	CodeEventResult         = "result"
	CodeEventExecutionError = "execution_error"
	CodeEventEnd            = "end"
)

// CreateCodeContextRequest is the body of POST
// /v1/sandboxes/{id}/code/contexts.
type CreateCodeContextRequest struct {
	// Language of the context: "python" (the default).
	Language string `json:"language,omitempty"`
	// Cwd is the interpreter's working directory; the user's home when
	// empty.
	Cwd string `json:"cwd,omitempty"`
	// Env adds to the sandbox's environment for this context.
	Env map[string]string `json:"env,omitempty"`
	// User runs the interpreter as that user of the sandbox: "user" (the
	// default) or "root".
	User string `json:"user,omitempty"`
}

// CodeContext describes a code context.
type CodeContext struct {
	ID       string `json:"id"`
	Language string `json:"language"`
	Cwd      string `json:"cwd"`
	User     string `json:"user"`
	// State is "starting", "idle", "busy" or "dead" (its interpreter
	// died: restart it).
	State string `json:"state"`
	// Error says why a dead context died.
	Error string `json:"error,omitempty"`
}

// Code context states.
const (
	CodeStateStarting = "starting"
	CodeStateIdle     = "idle"
	CodeStateBusy     = "busy"
	CodeStateDead     = "dead"
)

// CodeContextList is the body of GET /v1/sandboxes/{id}/code/contexts.
type CodeContextList struct {
	Contexts []CodeContext `json:"contexts"`
}

// Text returns the text of the cell's main result (its value), or "" when
// it had none.
func (e *Execution) Text() string {
	for _, r := range e.Results {
		if r.IsMainResult {
			return r.Text
		}
	}
	return ""
}

// Formats lists the keys the result has a value for (as "png", "html",
// …; Extra's MIME types as they are), in the order of CodeResult's fields.
func (r CodeResult) Formats() []string {
	var out []string
	for _, f := range []struct {
		key string
		ok  bool
	}{
		{"text", r.Text != ""}, {"html", r.HTML != ""}, {"markdown", r.Markdown != ""}, {"svg", r.SVG != ""},
		{"png", r.PNG != ""}, {"jpeg", r.JPEG != ""}, {"pdf", r.PDF != ""}, {"latex", r.LaTeX != ""},
		{"javascript", r.JavaScript != ""}, {"json", len(r.JSON) > 0},
	} {
		if f.ok {
			out = append(out, f.key)
		}
	}
	extra := make([]string, 0, len(r.Extra))
	for k := range r.Extra {
		extra = append(extra, k)
	}
	sort.Strings(extra)
	return append(out, extra...)
}
