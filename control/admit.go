package control

import (
	"context"
	"net"

	"github.com/tsdist/tsdist/access"
	"github.com/tsdist/tsdist/carrier"
)

// ErrDenied is returned by Admit for a peer outside the access policy.
var ErrDenied = access.ErrDenied

// SetPolicy replaces the access policy that Admit applies. It takes effect
// for the next connection; connections already carried are not affected.
func (s *Server) SetPolicy(p access.Policy) { s.gate.SetPolicy(p) }

// Policy returns the access policy in force.
func (s *Server) Policy() access.Policy { return s.gate.Policy() }

// Admit checks an accepted tailnet connection against the access policy;
// see [access.Gate.Admit].
func (s *Server) Admit(ctx context.Context, conn net.Conn, what string) (carrier.Identity, error) {
	return s.gate.Admit(ctx, conn, what)
}

// Guard wraps a tailnet listener so that Accept returns only connections
// from peers the access policy allows; the others are closed at once.
func (s *Server) Guard(ln net.Listener, what string) net.Listener {
	return s.gate.Guard(s.ctx, ln, what)
}
