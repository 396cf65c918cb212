// Package errdefs defines the few error kinds PandaStack classifies errors
// by. Code deep inside wraps one of these sentinels with %w; the API edge
// translates the kind to an HTTP status in one place.
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
)

// kindError carries a kind and a message without repeating the kind's text.
type kindError struct {
	kind error
	msg  string
}

func (e *kindError) Error() string { return e.msg }
func (e *kindError) Unwrap() error { return e.kind }

// New returns an error of the given kind whose text is the formatted message.
func New(kind error, format string, args ...any) error {
	return &kindError{kind: kind, msg: fmt.Sprintf(format, args...)}
}

// Invalid returns an ErrInvalid error with the formatted message.
func Invalid(format string, args ...any) error { return New(ErrInvalid, format, args...) }

// NotFound returns an ErrNotFound error with the formatted message.
func NotFound(format string, args ...any) error { return New(ErrNotFound, format, args...) }

// Conflict returns an ErrConflict error with the formatted message.
func Conflict(format string, args ...any) error { return New(ErrConflict, format, args...) }

// Unavailable returns an ErrUnavailable error with the formatted message.
func Unavailable(format string, args ...any) error { return New(ErrUnavailable, format, args...) }
