package control

import (
	"context"
	"errors"

	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/host"
)

// errorFor classifies err, from a request whose context is ctx, into the
// protocol's error codes (docs/control-protocol.md, section 8) by the
// error's type, never its text; fallback is the code of anything else.
func (c *client) errorFor(ctx context.Context, err error, fallback string) *Error {
	var notAllowed *host.NotAllowedError
	switch {
	case errors.As(err, &notAllowed):
		return &Error{Code: CodeNotAllowed, Message: err.Error(), Peer: &notAllowed.Peer}
	case errors.Is(err, carrier.ErrUnknownHost):
		return &Error{Code: CodeUnknownHost, Message: err.Error()}
	case errors.Is(err, carrier.ErrNotUp):
		return &Error{Code: CodeNotRunning, Message: err.Error()}
	case errors.Is(err, carrier.ErrPortInUse):
		return &Error{Code: CodePortInUse, Message: err.Error()}
	case ctx.Err() != nil && c.ctx.Err() == nil:
		// The request's own time ran out (not the connection's end).
		return &Error{Code: CodeTimeout, Message: "no answer in time: " + err.Error()}
	}
	return &Error{Code: fallback, Message: err.Error()}
}
