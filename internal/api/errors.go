package api

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/wire"
)

// errorStatus maps an error's kind to its HTTP status and wire code. It is
// the one place where kinds become statuses.
func errorStatus(err error) (int, string) {
	var mbe *http.MaxBytesError
	switch {
	case errors.Is(err, errdefs.ErrInvalid):
		return http.StatusBadRequest, wire.CodeInvalid
	case errors.Is(err, errdefs.ErrUnauthorized):
		return http.StatusUnauthorized, wire.CodeUnauthenticated
	case errors.Is(err, errdefs.ErrNotFound):
		return http.StatusNotFound, wire.CodeNotFound
	case errors.Is(err, errdefs.ErrConflict):
		return http.StatusConflict, wire.CodeConflict
	case errors.Is(err, errdefs.ErrTooLarge), errors.As(err, &mbe):
		return http.StatusRequestEntityTooLarge, wire.CodeTooLarge
	case errors.Is(err, errdefs.ErrQuota):
		return http.StatusTooManyRequests, wire.CodeQuota
	case errors.Is(err, errdefs.ErrUnavailable), errors.Is(err, context.DeadlineExceeded):
		return http.StatusServiceUnavailable, wire.CodeUnavailable
	default:
		return http.StatusInternalServerError, wire.CodeInternal
	}
}

func wireError(err error) *wire.Error {
	_, code := errorStatus(err)
	return &wire.Error{Code: code, Message: err.Error()}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, err error) {
	status, _ := errorStatus(err)
	writeJSON(w, status, wire.ErrorResponse{Error: *wireError(err)})
}
