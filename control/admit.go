package control

import (
	"context"
	"errors"
	"fmt"
	"net"

	"github.com/tsdist/tsdist/access"
	"github.com/tsdist/tsdist/carrier"
)

// ErrDenied is returned by Admit for a peer outside the access policy.
var ErrDenied = errors.New("control: peer not allowed")

// SetPolicy replaces the access policy that Admit applies. It takes effect
// for the next connection; connections already carried are not affected.
func (s *Server) SetPolicy(p access.Policy) {
	s.mu.Lock()
	s.policy = p
	s.mu.Unlock()
	s.logf("access: allowing %s", p)
}

// Policy returns the access policy in force.
func (s *Server) Policy() access.Policy {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.policy
}

// Admit looks up who is at the other end of an accepted tailnet
// connection and checks the access policy. A peer that is not allowed, or
// has no tailnet identity, gets an error wrapping ErrDenied and a log line
// that says who and why; the caller closes the connection before any byte
// of it goes anywhere.
func (s *Server) Admit(ctx context.Context, conn net.Conn, what string) (carrier.Identity, error) {
	ctx, cancel := context.WithTimeout(ctx, whoIsTime)
	defer cancel()
	peer, err := s.node.WhoIs(ctx, conn.RemoteAddr().String())
	if err != nil {
		s.logf("access: refused %v on %s: no tailnet identity: %v", conn.RemoteAddr(), what, err)
		return carrier.Identity{}, fmt.Errorf("%w: %v has no tailnet identity: %v", ErrDenied, conn.RemoteAddr(), err)
	}
	self, err := s.self(ctx)
	if err != nil {
		s.logf("access: refused %s (%s) on %s: this node's own identity is unknown: %v", peer.Node, peer.Addr, what, err)
		return peer, fmt.Errorf("%w: %v", ErrDenied, err)
	}
	if ok, why := s.Policy().Allow(self, peer); !ok {
		s.logf("access: refused %s (%s, user %q, tags %v) on %s: %s", peer.Node, peer.Addr, peer.User, peer.Tags, what, why)
		return peer, fmt.Errorf("%w: %s", ErrDenied, why)
	}
	return peer, nil
}

// self is this node's own identity, as the access policy compares it.
func (s *Server) self(ctx context.Context) (carrier.Identity, error) {
	st, err := s.node.Status(ctx)
	if err != nil {
		return carrier.Identity{}, err
	}
	return carrier.Identity{Node: st.Self.Node, DNSName: st.Self.DNSName, User: st.Self.User,
		Tags: st.Self.Tags, IPs: st.Self.IPs}, nil
}

// Guard wraps a tailnet listener so that Accept returns only connections
// from peers the access policy allows; the others are closed at once.
func (s *Server) Guard(ln net.Listener, what string) net.Listener {
	return &guarded{Listener: ln, s: s, what: what}
}

type guarded struct {
	net.Listener
	s    *Server
	what string
}

func (g *guarded) Accept() (net.Conn, error) {
	for {
		conn, err := g.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if _, err := g.s.Admit(g.s.ctx, conn, g.what); err != nil {
			conn.Close()
			continue
		}
		return conn, nil
	}
}
