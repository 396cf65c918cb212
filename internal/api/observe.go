package api

import (
	"context"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/metrics"
	"github.com/pandastack/pandastack/internal/sandbox"
	"github.com/pandastack/pandastack/internal/store"
	"github.com/pandastack/pandastack/wire"
)

// Audit keeps the audit log: who did what to which sandbox, and when.
type Audit interface {
	AddAudit(ctx context.Context, tenant string, e wire.AuditEntry) error
	ListAudit(ctx context.Context, tenant string, f store.AuditFilter) ([]wire.AuditEntry, error)
}

// Audit actions.
const (
	ActionCreate         = "create"
	ActionExec           = "exec"
	ActionProcess        = "process"
	ActionKill           = "kill"
	ActionPause          = "pause"
	ActionResume         = "resume"
	ActionFork           = "fork"
	ActionSnapshot       = "snapshot"
	ActionDeleteSnapshot = "delete_snapshot"
	ActionTimeout        = "timeout"
)

var auditActions = []string{ActionCreate, ActionExec, ActionProcess, ActionKill, ActionPause, ActionResume, ActionFork, ActionSnapshot, ActionDeleteSnapshot, ActionTimeout}

// maxAuditCommand is how much of a command the audit keeps.
const maxAuditCommand = 1024

// observed wraps the sandbox manager: each operation's latency goes to the
// metrics and each action of a tenant to the audit log. Commands' input and
// output never reach either.
type observed struct {
	Sandboxes
	metrics *metrics.Metrics
	audit   Audit
	log     interface {
		Error(msg string, args ...any)
	}
}

// PortDialer passes the optional Ports capability of the wrapped manager
// through; without it, the wrapper answers as a server without ports.
func (o *observed) PortDialer(ctx context.Context, tenant, id, token string, port int) (func(context.Context) (net.Conn, error), error) {
	p, ok := o.Sandboxes.(Ports)
	if !ok {
		return nil, errdefs.Unavailable("this server has no sandbox ports")
	}
	return p.PortDialer(ctx, tenant, id, token, port)
}

// done records one finished operation: op ("" for none) in the metrics,
// e in the audit log.
func (o *observed) done(ctx context.Context, tenant, op string, start time.Time, err error, e wire.AuditEntry) {
	d := time.Since(start)
	outcome := metrics.OutcomeOK
	if err != nil {
		_, we := classify(err)
		outcome = we.Code
	}
	if op != "" {
		o.metrics.ObserveOp(op, outcome, d)
	}
	if o.audit == nil || tenant == "" {
		return
	}
	if ri, ok := ctx.Value(requestInfoKey{}).(*requestInfo); ok {
		e.RequestID, e.KeyID = ri.id, ri.keyID
	}
	e.Time, e.DurationMS, e.Outcome = time.Now().UTC(), d.Milliseconds(), outcome
	// The action happened: its record must not depend on the client still
	// being there.
	if aerr := o.audit.AddAudit(context.WithoutCancel(ctx), tenant, e); aerr != nil {
		o.log.Error("recording audit entry", "action", e.Action, "sandbox", e.SandboxID, "err", aerr)
	}
}

// auditCommand is the command as the audit keeps it: argv joined by
// spaces, cut at maxAuditCommand bytes on a character boundary.
func auditCommand(cmd string, argv []string) string {
	if cmd == "" {
		cmd = strings.Join(argv, " ")
	}
	if len(cmd) <= maxAuditCommand {
		return cmd
	}
	cut := maxAuditCommand
	for cut > 0 && !utf8.RuneStart(cmd[cut]) {
		cut--
	}
	return cmd[:cut] + "…"
}

func (o *observed) Create(ctx context.Context, tenant string, req wire.CreateSandboxRequest) (wire.Sandbox, error) {
	start := time.Now()
	sb, err := o.Sandboxes.Create(ctx, tenant, req)
	o.done(ctx, tenant, metrics.OpCreate, start, err, wire.AuditEntry{Action: ActionCreate, SandboxID: sb.ID, Target: req.SnapshotID})
	return sb, err
}

func (o *observed) Kill(ctx context.Context, tenant, id string) error {
	start := time.Now()
	err := o.Sandboxes.Kill(ctx, tenant, id)
	o.done(ctx, tenant, "", start, err, wire.AuditEntry{Action: ActionKill, SandboxID: id})
	return err
}

func (o *observed) SetTimeout(ctx context.Context, tenant, id string, ttlSeconds int) (wire.Sandbox, error) {
	start := time.Now()
	sb, err := o.Sandboxes.SetTimeout(ctx, tenant, id, ttlSeconds)
	o.done(ctx, tenant, "", start, err, wire.AuditEntry{Action: ActionTimeout, SandboxID: id, Target: strconv.Itoa(ttlSeconds) + "s"})
	return sb, err
}

func (o *observed) Exec(ctx context.Context, tenant, id string, req wire.ExecRequest, out sandbox.Output) (wire.ExecResult, error) {
	start := time.Now()
	res, err := o.Sandboxes.Exec(ctx, tenant, id, req, out)
	e := wire.AuditEntry{Action: ActionExec, SandboxID: id, Command: auditCommand(req.Cmd, req.Argv)}
	if err == nil {
		code := res.ExitCode
		e.ExitCode = &code
	}
	o.done(ctx, tenant, metrics.OpExec, start, err, e)
	return res, err
}

func (o *observed) StartProcess(ctx context.Context, tenant, id string, req wire.StartProcessRequest) (wire.Process, error) {
	start := time.Now()
	p, err := o.Sandboxes.StartProcess(ctx, tenant, id, req)
	e := wire.AuditEntry{Action: ActionProcess, SandboxID: id, Command: auditCommand(req.Cmd, req.Argv)}
	if err == nil {
		e.Target = "pid " + strconv.Itoa(p.PID)
	}
	o.done(ctx, tenant, "", start, err, e)
	return p, err
}

func (o *observed) Snapshot(ctx context.Context, tenant, id string, req wire.SnapshotRequest) (wire.Snapshot, error) {
	start := time.Now()
	sn, err := o.Sandboxes.Snapshot(ctx, tenant, id, req)
	o.done(ctx, tenant, metrics.OpSnapshot, start, err, wire.AuditEntry{Action: ActionSnapshot, SandboxID: id, Target: sn.ID})
	return sn, err
}

func (o *observed) DeleteSnapshot(ctx context.Context, tenant, id string) error {
	start := time.Now()
	err := o.Sandboxes.DeleteSnapshot(ctx, tenant, id)
	o.done(ctx, tenant, "", start, err, wire.AuditEntry{Action: ActionDeleteSnapshot, Target: id})
	return err
}

func (o *observed) Fork(ctx context.Context, tenant, id string, req wire.ForkRequest) ([]wire.Sandbox, error) {
	start := time.Now()
	l, err := o.Sandboxes.Fork(ctx, tenant, id, req)
	ids := make([]string, len(l))
	for i, sb := range l {
		ids[i] = sb.ID
	}
	o.done(ctx, tenant, metrics.OpFork, start, err, wire.AuditEntry{Action: ActionFork, SandboxID: id, Target: strings.Join(ids, ",")})
	return l, err
}

func (o *observed) Pause(ctx context.Context, tenant, id string) (wire.Sandbox, error) {
	start := time.Now()
	sb, err := o.Sandboxes.Pause(ctx, tenant, id)
	o.done(ctx, tenant, metrics.OpPause, start, err, wire.AuditEntry{Action: ActionPause, SandboxID: id})
	return sb, err
}

func (o *observed) Resume(ctx context.Context, tenant, id string) (wire.Sandbox, error) {
	start := time.Now()
	sb, err := o.Sandboxes.Resume(ctx, tenant, id)
	o.done(ctx, tenant, metrics.OpResume, start, err, wire.AuditEntry{Action: ActionResume, SandboxID: id})
	return sb, err
}

// sandboxMetrics serves GET /v1/sandboxes/{id}/metrics.
func (s *Server) sandboxMetrics(w http.ResponseWriter, r *http.Request, tenant string) error {
	sm, err := s.cfg.Sandboxes.Metrics(r.Context(), tenant, r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, sm)
	return nil
}

// maxAuditLimit caps the entries of one GET /v1/audit.
const maxAuditLimit = 1000

// listAudit serves GET /v1/audit: the tenant's own entries, newest first,
// filtered by sandbox, action and time.
func (s *Server) listAudit(w http.ResponseWriter, r *http.Request, tenant string) error {
	if s.cfg.Audit == nil {
		return errdefs.Unavailable("this server keeps no audit log")
	}
	q := r.URL.Query()
	for k := range q {
		switch k {
		case "sandbox", "action", "since", "limit":
		default:
			return errdefs.Invalid("unknown query parameter %q; known: sandbox, action, since, limit", truncateParam(k))
		}
	}
	f := store.AuditFilter{SandboxID: q.Get("sandbox"), Action: q.Get("action"), Limit: 100}
	if f.Action != "" && !contains(auditActions, f.Action) {
		return errdefs.Invalid("action must be one of %s, got %q", strings.Join(auditActions, ", "), truncateParam(f.Action))
	}
	if len(f.SandboxID) > 64 {
		return errdefs.Invalid("sandbox must be a sandbox id, at most 64 bytes")
	}
	if v := q.Get("since"); v != "" {
		t, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			return errdefs.Invalid("since must be an RFC 3339 time such as 2026-01-02T15:04:05Z, got %q", truncateParam(v))
		}
		f.Since = t
	}
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxAuditLimit {
			return errdefs.Invalid("limit must be an integer between 1 and %d, got %q", maxAuditLimit, truncateParam(v))
		}
		f.Limit = n
	}
	l, err := s.cfg.Audit.ListAudit(r.Context(), tenant, f)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, wire.AuditList{Entries: l})
	return nil
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

func truncateParam(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
