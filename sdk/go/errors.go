package pandastack

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/pandastack/pandastack/wire"
)

// Error kinds. Every error the server reports is an *APIError, which matches
// the sentinel of its code under errors.Is:
//
//	if errors.Is(err, pandastack.ErrNotFound) { ... }
//
// Use errors.As with *APIError to read the status, code and message.
var (
	ErrInvalidArgument = errors.New("invalid argument")
	ErrUnauthenticated = errors.New("unauthenticated")
	ErrNotFound        = errors.New("not found")
	ErrConflict        = errors.New("conflict")
	ErrTooLarge        = errors.New("too large")
	ErrQuotaExceeded   = errors.New("quota exceeded")
	ErrUnavailable     = errors.New("unavailable")
	// ErrInsufficientStorage: the server's disk cannot take what the
	// request would write (507).
	ErrInsufficientStorage = errors.New("insufficient storage")
	// ErrTimeout: something the request waited for inside the server did
	// not answer in time (504).
	ErrTimeout  = errors.New("timed out")
	ErrInternal = errors.New("internal server error")
)

// kindOf returns the sentinel of a wire error code, or nil for an unknown one.
func kindOf(code string) error {
	switch code {
	case wire.CodeInvalid:
		return ErrInvalidArgument
	case wire.CodeUnauthenticated:
		return ErrUnauthenticated
	case wire.CodeNotFound:
		return ErrNotFound
	case wire.CodeConflict:
		return ErrConflict
	case wire.CodeTooLarge:
		return ErrTooLarge
	case wire.CodeQuota:
		return ErrQuotaExceeded
	case wire.CodeUnavailable:
		return ErrUnavailable
	case wire.CodeInsufficientStorage:
		return ErrInsufficientStorage
	case wire.CodeTimeout:
		return ErrTimeout
	case wire.CodeInternal:
		return ErrInternal
	}
	return nil
}

// APIError is an error reported by the server: an error response, or an
// "error" event in the middle of a streamed exec (Status is then 0, since
// the response itself had started with 200).
type APIError struct {
	// Status is the HTTP status, or 0 for a streamed error event.
	Status int
	// Code is one of the wire.Code* values; for a response whose body was not
	// a JSON error (a proxy's HTML page, say) it is derived from Status, and
	// empty when Status says nothing more specific.
	Code    string
	Message string
	// RequestID is the server's id of the request (the error body's
	// request_id, or the X-Request-Id header): the server's log has the
	// details of the error under it. Empty when unknown.
	RequestID string
}

func (e *APIError) Error() string {
	msg, code := e.Message, e.Code
	if msg == "" {
		msg = http.StatusText(e.Status) // "" for a streamed error
	}
	if msg == "" {
		msg = "no message"
	}
	if code == "" {
		code = "error"
	}
	var id string
	if e.RequestID != "" {
		id = ", request " + e.RequestID
	}
	if e.Status == 0 {
		return fmt.Sprintf("%s (%s%s)", msg, code, id)
	}
	return fmt.Sprintf("%s (%s, HTTP %d%s)", msg, code, e.Status, id)
}

// Is reports whether target is the sentinel of e's code, so that callers can
// match kinds with errors.Is without knowing the wire codes.
func (e *APIError) Is(target error) bool {
	kind := kindOf(e.Code)
	return kind != nil && kind == target
}

// codeForStatus guesses a code for an error response that carried no JSON
// error body, so that errors.Is still works behind a proxy.
func codeForStatus(status int) string {
	switch status {
	case http.StatusBadRequest:
		return wire.CodeInvalid
	case http.StatusUnauthorized:
		return wire.CodeUnauthenticated
	case http.StatusNotFound:
		return wire.CodeNotFound
	case http.StatusConflict:
		return wire.CodeConflict
	case http.StatusRequestEntityTooLarge:
		return wire.CodeTooLarge
	case http.StatusTooManyRequests:
		return wire.CodeQuota
	case http.StatusBadGateway, http.StatusServiceUnavailable:
		return wire.CodeUnavailable
	case http.StatusGatewayTimeout:
		return wire.CodeTimeout
	case http.StatusInsufficientStorage:
		return wire.CodeInsufficientStorage
	case http.StatusInternalServerError:
		return wire.CodeInternal
	}
	return ""
}
