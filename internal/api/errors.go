package api

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/wire"
)

// StatusClientClosedRequest is nginx's status for a request whose client
// hung up before the answer. Nobody reads it; it keeps such requests apart
// from server errors in logs and metrics.
const StatusClientClosedRequest = 499

// internalMessage is all a tenant learns of an error that has no kind: its
// text may hold anything (runsc stderr, host paths, SQLite messages).
const internalMessage = "internal error"

// drainGrace is how long the server may go on reading the unread rest of a
// rejected request's body before it closes the connection (Server.drainGrace;
// tests shorten it). Reading a body that has already arrived lets the answer
// reach the client (closing a socket with unread data resets it); a slow or
// withheld body gets no more.
const drainGrace = 2 * time.Second

// kinds maps each error kind to its status and wire code.
func kinds() []struct {
	kind   error
	status int
	code   string
} {
	return []struct {
		kind   error
		status int
		code   string
	}{
		{errdefs.ErrInvalid, http.StatusBadRequest, wire.CodeInvalid},
		{errdefs.ErrUnauthorized, http.StatusUnauthorized, wire.CodeUnauthenticated},
		{errdefs.ErrNotFound, http.StatusNotFound, wire.CodeNotFound},
		{errdefs.ErrConflict, http.StatusConflict, wire.CodeConflict},
		{errdefs.ErrTooLarge, http.StatusRequestEntityTooLarge, wire.CodeTooLarge},
		{errdefs.ErrQuota, http.StatusTooManyRequests, wire.CodeQuota},
		{errdefs.ErrUnavailable, http.StatusServiceUnavailable, wire.CodeUnavailable},
		{errdefs.ErrInsufficientStorage, http.StatusInsufficientStorage, wire.CodeInsufficientStorage},
		{errdefs.ErrTimeout, http.StatusGatewayTimeout, wire.CodeTimeout},
		// A deadline the server set for itself ran out: the same as
		// ErrTimeout for the tenant.
		{context.DeadlineExceeded, http.StatusGatewayTimeout, wire.CodeTimeout},
	}
}

// classify maps an error to its HTTP status and the wire error the tenant
// sees. It is the one place where kinds become statuses.
//
// The kind is the first one met in a depth-first walk of err's tree (the
// order errors.Is uses), so the outermost kind wins over kinds inside its
// cause: errdefs.Wrap(ErrUnavailable, storeNotFound, …) is a 503, not a 404.
// The message is errdefs.Public(err), never err.Error(); without a public
// message the kind's own name stands in. An error without a kind is a 500
// whose message says nothing but "internal error".
func classify(err error) (int, wire.Error) {
	msg, public := errdefs.Public(err)
	status, code, fallback := http.StatusInternalServerError, wire.CodeInternal, internalMessage
	walk(err, func(e error) bool {
		if mbe, ok := e.(*http.MaxBytesError); ok {
			status, code = http.StatusRequestEntityTooLarge, wire.CodeTooLarge
			fallback = fmt.Sprintf("request body exceeds %d bytes", mbe.Limit)
			return true
		}
		for _, k := range kinds() {
			if e == k.kind || isOnly(e, k.kind) {
				status, code, fallback = k.status, k.code, k.kind.Error()
				if k.kind == context.DeadlineExceeded {
					fallback = errdefs.ErrTimeout.Error()
				}
				return true
			}
		}
		return false
	})
	if code == wire.CodeInternal || !public {
		msg = fallback
	}
	return status, wire.Error{Code: code, Message: msg}
}

// walk calls f on err and the errors it wraps, depth first, until f
// returns true.
func walk(err error, f func(error) bool) bool {
	if err == nil {
		return false
	}
	if f(err) {
		return true
	}
	switch u := err.(type) {
	case interface{ Unwrap() error }:
		return walk(u.Unwrap(), f)
	case interface{ Unwrap() []error }:
		for _, e := range u.Unwrap() {
			if walk(e, f) {
				return true
			}
		}
	}
	return false
}

// isOnly reports whether e itself (not what it wraps) claims to be target
// through an Is method, as errors.Is would ask it.
func isOnly(e, target error) bool {
	x, ok := e.(interface{ Is(error) bool })
	return ok && x.Is(target)
}

// requestInfo is what the API keeps about a request from its first byte on.
type requestInfo struct {
	id   string
	body *trackedBody
	// keyID names the API key that authenticated the request (KeyID).
	keyID string
}

type requestInfoKey struct{}

func infoOf(r *http.Request) *requestInfo {
	if ri, ok := r.Context().Value(requestInfoKey{}).(*requestInfo); ok {
		return ri
	}
	return &requestInfo{}
}

// newRequestID returns 16 hex digits, unique enough to find one request's
// log lines.
func newRequestID() string {
	var b [8]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand)
	return hex.EncodeToString(b[:])
}

// describe classifies err for the request and logs it: every 5xx with its
// full text, at Error; a failure of a request whose client hung up at Info,
// with StatusClientClosedRequest instead of its status. 4xx answers are the
// client's business and are not logged.
func (s *Server) describe(r *http.Request, tenant string, err error) (int, wire.Error) {
	status, e := classify(err)
	e.RequestID = infoOf(r).id
	s.cfg.Metrics.Error(e.Code)
	attrs := []any{"request_id", e.RequestID, "method", r.Method, "path", r.URL.Path, "tenant", tenant, "err", err.Error()}
	switch {
	case status >= 500 && errors.Is(r.Context().Err(), context.Canceled):
		// The client hung up and the handler failed because of it (or
		// anyway): no server error. A DeadlineExceeded of the server's
		// own leaves the request's context alone and is logged below.
		s.cfg.Log.Info("client went away", attrs...)
		status = StatusClientClosedRequest
	case status >= 500:
		s.cfg.Log.Error("request failed", append(attrs, "status", status)...)
	}
	return status, e
}

// fail answers a request with the error a handler returned.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, tenant string, err error) {
	status, e := s.describe(r, tenant, err)
	if infoOf(r).body.unread(r) {
		// The request was rejected before its body was read (or
		// half-way): do not let the server wait for the rest of a slow
		// body to keep the connection: close it, after a short grace.
		w.Header().Set("Connection", "close")
		_ = http.NewResponseController(w).SetReadDeadline(time.Now().Add(s.drainGrace))
	}
	if status == StatusClientClosedRequest {
		w.WriteHeader(status)
		return
	}
	writeJSON(w, status, wire.ErrorResponse{Error: e})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	_ = enc.Encode(v)
}
