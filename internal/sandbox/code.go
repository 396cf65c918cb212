package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/pandastack/pandastack/internal/agent"
	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/template"
	"github.com/pandastack/pandastack/wire"
)

// Code execution: cells run in live interpreters (code contexts) that the
// sandbox's agent keeps (internal/agent/code.go), so that state persists
// from one call to the next. The default context of a language is started
// on first use, or ahead of any request when the template has warm-up code
// (warmCode: template snapshots and warm pool members).

// CodeOutput receives a cell's events as they are produced: wire.EventStdout
// and wire.EventStderr (Data), wire.CodeEventResult (Result) and
// wire.CodeEventExecutionError (ExecutionError). An error stops the run;
// the cell is interrupted.
type CodeOutput func(ev wire.CodeEvent) error

// maxCodeBytes bounds one cell's source.
const maxCodeBytes = 512 << 10

// codeEventLimit bounds one event the daemon reads from an agent: a
// result within the output cap, plus its other formats and the framing.
func (m *Manager) codeEventLimit() int { return m.cfg.MaxOutputBytes + 1<<20 }

var codeContextID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

func checkContextID(id string) error {
	if !codeContextID.MatchString(id) {
		return errdefs.Invalid("code context ids are 1-64 letters, digits, '_', '.' or '-', got %q", truncate(id, 64))
	}
	return nil
}

func checkLanguage(lang string) error {
	if lang != "" && lang != wire.LanguagePython {
		return errdefs.Invalid("language must be %q, got %q", wire.LanguagePython, truncate(lang, 64))
	}
	return nil
}

// RunCode runs one cell in a code context of the tenant's sandbox (resuming
// it first if paused), handing its output and results to out as they come.
// The returned Execution has the cell's error, count and flags; its
// results and logs are left empty (they went to out).
func (m *Manager) RunCode(ctx context.Context, tenant, id string, req wire.RunCodeRequest, out CodeOutput) (wire.Execution, error) {
	// Another tenant's sandbox is not found, whatever the request.
	if _, err := m.lookup(tenant, id); err != nil {
		return wire.Execution{}, err
	}
	if req.Code == "" {
		return wire.Execution{}, errdefs.Invalid("code is required")
	}
	if len(req.Code) > maxCodeBytes {
		return wire.Execution{}, errdefs.Invalid("code is %d bytes; at most %d are allowed", len(req.Code), maxCodeBytes)
	}
	if req.Context != "" {
		if err := checkContextID(req.Context); err != nil {
			return wire.Execution{}, err
		}
	}
	if err := checkLanguage(req.Language); err != nil {
		return wire.Execution{}, err
	}
	timeout, err := m.codeTimeout(req.TimeoutSeconds)
	if err != nil {
		return wire.Execution{}, err
	}
	in, client, release, err := m.acquire(ctx, tenant, id)
	if err != nil {
		return wire.Execution{}, err
	}
	defer release()
	in.mu.Lock()
	env := envList(in.rec.Env)
	args := agent.CodeRunArgs{
		Context: req.Context, Language: req.Language, Code: req.Code,
		TimeoutMS: max(timeout.Milliseconds(), 1), MaxOutputBytes: int64(m.cfg.MaxOutputBytes),
		SandboxEnv: env,
		Default:    agent.CodeContextArgs{Language: wire.LanguagePython, SandboxEnv: env, User: in.user("")},
	}
	in.mu.Unlock()
	if err := checkCodeArgsSize(agent.OpCodeRun, args); err != nil {
		return wire.Execution{}, err
	}
	// Bounded: a context's start, the wait for a busy context (at most
	// the timeout), the cell itself and its interrupt, then the grace the
	// daemon gives any agent.
	ectx, cancel := context.WithTimeout(ctx, agent.CodeStartTimeout+2*timeout+agent.CodeInterruptGrace+m.cfg.ExecGrace)
	defer cancel()
	start := time.Now()
	st, err := client.Open(ectx, agent.OpCodeRun, args)
	if err != nil {
		return wire.Execution{}, m.codeError(ctx, ectx, in, client, err)
	}
	defer st.Close()
	exe := wire.Execution{Context: req.Context}
	for {
		ev, err := agent.ReadCodeEvent(st, m.codeEventLimit())
		if err != nil {
			return wire.Execution{}, m.codeError(ctx, ectx, in, client, err)
		}
		var wev wire.CodeEvent
		switch ev.Type {
		case agent.CodeEventStdout, agent.CodeEventStderr:
			wev = wire.CodeEvent{Type: ev.Type, Data: ev.Text}
		case agent.CodeEventResult:
			r := codeResult(ev.Data, ev.Main)
			wev = wire.CodeEvent{Type: wire.CodeEventResult, Result: &r}
		case agent.CodeEventError:
			exe.Error = &wire.ExecutionError{Name: ev.Name, Value: ev.Value, Traceback: ev.Traceback}
			wev = wire.CodeEvent{Type: wire.CodeEventExecutionError, ExecutionError: exe.Error}
		case agent.CodeEventEnd:
			exe.ExecutionCount, exe.TimedOut, exe.Truncated = ev.ExecutionCount, ev.TimedOut, ev.Truncated
			if ev.Context != "" {
				exe.Context = ev.Context
			}
			exe.DurationMS = float64(time.Since(start).Microseconds()) / 1000
			return exe, nil
		default:
			// "started", and types of newer agents.
			continue
		}
		if err := out(wev); err != nil {
			return wire.Execution{}, fmt.Errorf("delivering code output: %w", err)
		}
	}
}

// codeTimeout validates a cell's timeout; the exec defaults and maximum
// apply.
func (m *Manager) codeTimeout(seconds float64) (time.Duration, error) {
	if seconds == 0 {
		return m.cfg.DefaultExecTimeout, nil
	}
	// Compare as floats first: a huge value would overflow Duration.
	if !(seconds > 0 && seconds <= m.cfg.MaxExecTimeout.Seconds()) {
		return 0, errdefs.Invalid("timeout_seconds must be between 0 and %d, got %g", int(m.cfg.MaxExecTimeout/time.Second), seconds)
	}
	return time.Duration(seconds * float64(time.Second)), nil
}

// checkCodeArgsSize refuses a request that does not fit in one agent frame.
func checkCodeArgsSize(op string, args any) error {
	b, err := json.Marshal(args)
	if err != nil {
		return fmt.Errorf("encoding %s arguments: %w", op, err)
	}
	n, err := agent.EncodedSize(agent.Request{Op: op, Args: b})
	if err != nil {
		return err
	}
	if n > agent.MaxFrame {
		return errdefs.Invalid("the code and its environment are %d bytes encoded; at most %d are allowed", n, agent.MaxFrame)
	}
	return nil
}

// codeResult maps a Jupyter MIME bundle to the keys Jupyter front ends and
// E2B's code interpreter use; other types go to Extra.
func codeResult(data map[string]json.RawMessage, main bool) wire.CodeResult {
	r := wire.CodeResult{IsMainResult: main}
	fields := map[string]*string{
		"text/plain": &r.Text, "text/html": &r.HTML, "text/markdown": &r.Markdown,
		"image/svg+xml": &r.SVG, "image/png": &r.PNG, "image/jpeg": &r.JPEG,
		"application/pdf": &r.PDF, "text/latex": &r.LaTeX,
		"application/javascript": &r.JavaScript, "text/javascript": &r.JavaScript,
	}
	binary := map[string]bool{"image/png": true, "image/jpeg": true, "application/pdf": true}
	for mime, raw := range data {
		if mime == "application/json" {
			r.JSON = raw
			continue
		}
		f, ok := fields[mime]
		if !ok {
			if r.Extra == nil {
				r.Extra = make(map[string]json.RawMessage)
			}
			r.Extra[mime] = raw
			continue
		}
		s, ok := mimeText(raw)
		if !ok {
			continue
		}
		if binary[mime] {
			// base64, as the kernel sends it, without its line breaks.
			s = strings.Join(strings.Fields(s), "")
		}
		*f = s
	}
	return r
}

// mimeText reads a MIME value that is text: a JSON string, or (as in
// notebook files) an array of strings to join.
func mimeText(raw json.RawMessage) (string, bool) {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s, true
	}
	var parts []string
	if json.Unmarshal(raw, &parts) == nil {
		return strings.Join(parts, ""), true
	}
	return "", false
}

// codeError turns the error of a code operation into the caller's.
func (m *Manager) codeError(ctx, ectx context.Context, in *instance, client *agent.Client, err error) error {
	var oe *agent.OpError
	switch {
	case errors.As(err, &oe) && oe.Kind == agent.ErrKindContextDead:
		return errdefs.Conflict("%s", oe.Message)
	case errors.Is(err, agent.ErrOpUnsupported):
		return errdefs.Wrap(errdefs.ErrConflict, err, "sandbox %q runs an agent from before code contexts existed; create a new sandbox to run code", in.id)
	case ctx.Err() == nil && errors.Is(ectx.Err(), context.DeadlineExceeded) && !client.IsClosed():
		// The agent let the cell's time pass without a word.
		if perr := m.pingWithin(client, m.cfg.AgentTimeout); perr != nil {
			if in.isSaving() {
				// A checkpoint stops the whole sandbox while it saves
				// it (as in execError).
				return errdefs.Wrap(errdefs.ErrTimeout, perr, "the code context did not answer in time (the sandbox was being saved meanwhile)")
			}
			reason := "its agent stopped answering (it may have been stopped from inside the sandbox)"
			m.fail(in, reason)
			return errdefs.Wrap(errdefs.ErrUnavailable, perr, "sandbox %q was ended: %s", in.id, reason)
		}
		return errdefs.Wrap(errdefs.ErrTimeout, err, "the code context did not answer in time")
	}
	return m.agentError(ctx, in, client, err)
}

// codeCall runs one code operation that answers a reply, bounded by d.
func (m *Manager) codeCall(ctx context.Context, tenant, id, op string, d time.Duration, args func(in *instance) any, reply any) error {
	in, client, release, err := m.acquire(ctx, tenant, id)
	if err != nil {
		return err
	}
	defer release()
	in.mu.Lock()
	a := args(in)
	in.mu.Unlock()
	if err := checkCodeArgsSize(op, a); err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	if err := client.CodeCall(cctx, op, a, reply); err != nil {
		return m.codeError(ctx, cctx, in, client, err)
	}
	return nil
}

// CreateCodeContext starts a new code context in the tenant's sandbox and
// returns it once its interpreter answers.
func (m *Manager) CreateCodeContext(ctx context.Context, tenant, id string, req wire.CreateCodeContextRequest) (wire.CodeContext, error) {
	if _, err := m.lookup(tenant, id); err != nil {
		return wire.CodeContext{}, err
	}
	if err := checkLanguage(req.Language); err != nil {
		return wire.CodeContext{}, err
	}
	if req.Cwd != "" && (!strings.HasPrefix(req.Cwd, "/") || strings.ContainsRune(req.Cwd, 0) || len(req.Cwd) > 4096) {
		return wire.CodeContext{}, errdefs.Invalid("cwd must be an absolute path of at most 4096 bytes without NUL bytes, got %q", truncate(req.Cwd, 256))
	}
	if err := checkEnv(req.Env); err != nil {
		return wire.CodeContext{}, err
	}
	if err := checkUser(req.User); err != nil {
		return wire.CodeContext{}, err
	}
	var info agent.CodeContextInfo
	err := m.codeCall(ctx, tenant, id, agent.OpCodeCreate, agent.CodeStartTimeout+m.cfg.AgentTimeout, func(in *instance) any {
		return agent.CodeContextArgs{Language: wire.LanguagePython, Cwd: req.Cwd, Env: envList(req.Env),
			SandboxEnv: envList(in.rec.Env), User: in.user(req.User)}
	}, &info)
	if err != nil {
		return wire.CodeContext{}, err
	}
	return codeContextToWire(info), nil
}

// ListCodeContexts returns the code contexts of the tenant's sandbox that
// have been started, oldest first.
func (m *Manager) ListCodeContexts(ctx context.Context, tenant, id string) ([]wire.CodeContext, error) {
	var l agent.CodeContextList
	err := m.codeCall(ctx, tenant, id, agent.OpCodeList, m.cfg.AgentTimeout, func(*instance) any { return struct{}{} }, &l)
	if err != nil {
		return nil, err
	}
	out := make([]wire.CodeContext, 0, len(l.Contexts))
	for _, c := range l.Contexts {
		out = append(out, codeContextToWire(c))
	}
	return out, nil
}

// RestartCodeContext replaces a context's interpreter with a fresh one (its
// variables are gone; a cell running in it ends) and returns it once the
// new one answers. The default context ("python") is started if it was not.
func (m *Manager) RestartCodeContext(ctx context.Context, tenant, id, contextID string) (wire.CodeContext, error) {
	if _, err := m.lookup(tenant, id); err != nil {
		return wire.CodeContext{}, err
	}
	if err := checkContextID(contextID); err != nil {
		return wire.CodeContext{}, err
	}
	var info agent.CodeContextInfo
	err := m.codeCall(ctx, tenant, id, agent.OpCodeRestart, agent.CodeStartTimeout+m.cfg.AgentTimeout, func(in *instance) any {
		env := envList(in.rec.Env)
		return agent.CodeContextRef{ID: contextID,
			Default: &agent.CodeContextArgs{Language: wire.LanguagePython, SandboxEnv: env, User: in.user("")}}
	}, &info)
	if err != nil {
		return wire.CodeContext{}, err
	}
	return codeContextToWire(info), nil
}

// DeleteCodeContext ends a code context and its interpreter.
func (m *Manager) DeleteCodeContext(ctx context.Context, tenant, id, contextID string) error {
	if _, err := m.lookup(tenant, id); err != nil {
		return err
	}
	if err := checkContextID(contextID); err != nil {
		return err
	}
	var reply struct{}
	return m.codeCall(ctx, tenant, id, agent.OpCodeDelete, m.cfg.AgentTimeout, func(*instance) any {
		return agent.CodeContextRef{ID: contextID}
	}, &reply)
}

func codeContextToWire(c agent.CodeContextInfo) wire.CodeContext {
	return wire.CodeContext{ID: c.ID, Language: c.Language, Cwd: c.Cwd, User: c.User, State: c.State, Error: c.Error}
}

// warmCode readies a sandbox being prepared ahead of any request (a
// template snapshot, a warm pool member): its default code context is
// started and runs the template's warm-up code silently, so that a new
// sandbox's first cell finds the interpreter up and its imports done.
func (m *Manager) warmCode(ctx context.Context, client *agent.Client, tpl template.Template) error {
	if tpl.WarmCode == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, agent.CodeStartTimeout+2*time.Minute)
	defer cancel()
	args := agent.CodeRunArgs{Code: tpl.WarmCode, Silent: true, TimeoutMS: (2 * time.Minute).Milliseconds(),
		Default: agent.CodeContextArgs{Language: wire.LanguagePython, User: wire.UserDefault}}
	st, err := client.Open(ctx, agent.OpCodeRun, args)
	if err != nil {
		return err
	}
	defer st.Close()
	var failed string
	for {
		ev, err := agent.ReadCodeEvent(st, 0)
		if err != nil {
			return fmt.Errorf("warming the code context: %w", err)
		}
		switch ev.Type {
		case agent.CodeEventError:
			failed = ev.Name + ": " + ev.Value
		case agent.CodeEventEnd:
			if failed != "" || ev.TimedOut {
				return fmt.Errorf("warming the code context: %s (timed out: %v)", failed, ev.TimedOut)
			}
			return nil
		}
	}
}

// notifyRestored tells a restored sandbox's agent that it was restored, so
// that its code contexts reseed their random generators: every copy of an
// image would otherwise draw the same numbers. Agents from before code
// contexts do not know the notice; nothing else depends on it.
func (m *Manager) notifyRestored(ctx context.Context, client *agent.Client) {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.AgentTimeout)
	defer cancel()
	var reply struct{}
	if err := client.CodeCall(ctx, agent.OpRestored, struct{}{}, &reply); err != nil && !errors.Is(err, agent.ErrOpUnsupported) {
		m.log.Warn("telling a restored agent it was restored", "err", err)
	}
}
