package control

import "github.com/tsdist/tsdist/access"

// SetPolicy replaces the access policy of the server's host (see
// [host.Host.SetPolicy]).
func (s *Server) SetPolicy(p access.Policy) { s.host.SetPolicy(p) }

// Policy returns the access policy in force.
func (s *Server) Policy() access.Policy { return s.host.Policy() }
