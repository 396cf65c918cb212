// Package errdefs defines the few error kinds PandaStack classifies errors
// by. Code deep inside wraps one of these sentinels with %w; the API edge
// translates the kind to an HTTP status in one place.
//
// An error made here has two texts: its public message, written for the
// tenant who made the request, and its full text (Error), which adds the
// internal cause (runsc stderr, host paths, SQLite messages) for the
// server's log. Only the public message ever reaches a tenant.
package errdefs

import (
	"errors"
	"fmt"
)

// Error kinds.
var (
	ErrNotFound     = errors.New("not found")
	ErrConflict     = errors.New("conflict")
	ErrInvalid      = errors.New("invalid argument")
	ErrUnavailable  = errors.New("unavailable")
	ErrQuota        = errors.New("quota exceeded")
	ErrUnauthorized = errors.New("unauthenticated")
	ErrTooLarge     = errors.New("too large")
	// ErrInsufficientStorage: the server's disk cannot take what the
	// request would write.
	ErrInsufficientStorage = errors.New("insufficient storage")
	// ErrTimeout: something the request waited for did not answer in time.
	ErrTimeout = errors.New("timed out")
)

// kindError carries a kind, a public message and an optional internal cause.
type kindError struct {
	kind  error
	msg   string
	cause error
}

func (e *kindError) Error() string {
	if e.cause != nil {
		return e.msg + ": " + e.cause.Error()
	}
	return e.msg
}

func (e *kindError) Unwrap() []error {
	if e.cause != nil {
		return []error{e.kind, e.cause}
	}
	return []error{e.kind}
}

// New returns an error of the given kind whose text is the formatted message.
func New(kind error, format string, args ...any) error {
	return &kindError{kind: kind, msg: fmt.Sprintf(format, args...)}
}

// Wrap returns an error of the given kind whose public message is the
// formatted message and whose cause, kept for the log, is cause. A nil cause
// gives the same as New.
func Wrap(kind, cause error, format string, args ...any) error {
	return &kindError{kind: kind, msg: fmt.Sprintf(format, args...), cause: cause}
}

// Public returns the text of err that may be shown to the tenant: the public
// message of the outermost error made by this package, and ok. When err
// holds none, it returns "" and false: the error is internal.
func Public(err error) (string, bool) {
	var ke *kindError
	if errors.As(err, &ke) {
		return ke.msg, true
	}
	return "", false
}

// Invalid returns an ErrInvalid error with the formatted message.
func Invalid(format string, args ...any) error { return New(ErrInvalid, format, args...) }

// NotFound returns an ErrNotFound error with the formatted message.
func NotFound(format string, args ...any) error { return New(ErrNotFound, format, args...) }

// Conflict returns an ErrConflict error with the formatted message.
func Conflict(format string, args ...any) error { return New(ErrConflict, format, args...) }

// Unavailable returns an ErrUnavailable error with the formatted message.
func Unavailable(format string, args ...any) error { return New(ErrUnavailable, format, args...) }

// Quota returns an ErrQuota error with the formatted message.
func Quota(format string, args ...any) error { return New(ErrQuota, format, args...) }

// InsufficientStorage returns an ErrInsufficientStorage error with the
// formatted message.
func InsufficientStorage(format string, args ...any) error {
	return New(ErrInsufficientStorage, format, args...)
}
