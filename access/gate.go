package access

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/tsdist/tsdist/carrier"
	"tailscale.com/types/logger"
)

// ErrDenied is returned by [Gate.Admit] for a peer outside the access policy.
var ErrDenied = errors.New("access: peer not allowed")

// Tunables of a Gate.
const (
	// whoIsTime bounds the identity lookup of one accepted connection.
	whoIsTime = 10 * time.Second
	// selfTTL is how long a Gate trusts the node's own identity (user and
	// tags, which the control plane can change) before it asks again. Every
	// accepted connection needs it; fetching the node's whole status each
	// time would cost more than the check.
	selfTTL = 2 * time.Second
)

// Gate applies a [Policy] to the connections a tailnet node accepts. The
// tsdist helper puts one in front of every listener it hands to a BEAM
// node and in front of its EPMD; the ergo adapter does the same for the Go
// node. It is safe for concurrent use.
type Gate struct {
	node *carrier.Node
	logf logger.Logf

	mu       sync.Mutex
	policy   Policy
	self     carrier.Identity
	selfTime time.Time
}

// NewGate returns a Gate for node with the [Default] policy. logf receives
// one line per refused peer (and per policy change); nil discards them.
func NewGate(node *carrier.Node, logf logger.Logf) *Gate {
	if logf == nil {
		logf = logger.Discard
	}
	return &Gate{node: node, logf: logf, policy: MustParse(Default)}
}

// SetPolicy replaces the policy. It takes effect for the next connection;
// connections already admitted are not affected.
func (g *Gate) SetPolicy(p Policy) {
	g.mu.Lock()
	g.policy = p
	g.mu.Unlock()
	g.logf("access: allowing %s", p)
}

// Policy returns the policy in force.
func (g *Gate) Policy() Policy {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.policy
}

// Admit looks up who is at the other end of an accepted tailnet connection
// and checks the policy. A peer that is not allowed, or has no tailnet
// identity, gets an error wrapping [ErrDenied] and a log line that says who
// and why (what names the port, for that line); the caller closes the
// connection before any byte of it goes anywhere.
func (g *Gate) Admit(ctx context.Context, conn net.Conn, what string) (carrier.Identity, error) {
	ctx, cancel := context.WithTimeout(ctx, whoIsTime)
	defer cancel()
	peer, err := g.node.WhoIs(ctx, conn.RemoteAddr().String())
	if err != nil {
		g.logf("access: refused %v on %s: no tailnet identity: %v", conn.RemoteAddr(), what, err)
		return carrier.Identity{}, fmt.Errorf("%w: %v has no tailnet identity: %v", ErrDenied, conn.RemoteAddr(), err)
	}
	self, err := g.selfIdentity(ctx)
	if err != nil {
		g.logf("access: refused %s (%s) on %s: this node's own identity is unknown: %v", peer.Node, peer.Addr, what, err)
		return peer, fmt.Errorf("%w: %v", ErrDenied, err)
	}
	if ok, why := g.Policy().Allow(self, peer); !ok {
		g.logf("access: refused %s (%s, user %q, tags %v) on %s: %s", peer.Node, peer.Addr, peer.User, peer.Tags, what, why)
		return peer, fmt.Errorf("%w: %s", ErrDenied, why)
	}
	return peer, nil
}

// selfIdentity is this node's own identity, as the policy compares it.
func (g *Gate) selfIdentity(ctx context.Context) (carrier.Identity, error) {
	g.mu.Lock()
	if !g.selfTime.IsZero() && time.Since(g.selfTime) < selfTTL {
		defer g.mu.Unlock()
		return g.self, nil
	}
	g.mu.Unlock()
	st, err := g.node.Status(ctx)
	if err != nil {
		return carrier.Identity{}, err
	}
	self := carrier.Identity{Node: st.Self.Node, DNSName: st.Self.DNSName, User: st.Self.User,
		Tags: st.Self.Tags, IPs: st.Self.IPs}
	g.mu.Lock()
	g.self, g.selfTime = self, time.Now()
	g.mu.Unlock()
	return self, nil
}

// Guard wraps a tailnet listener so that Accept returns only connections
// from peers the policy allows; the others are closed at once. ctx bounds
// each identity lookup.
func (g *Gate) Guard(ctx context.Context, ln net.Listener, what string) net.Listener {
	return &guarded{Listener: ln, gate: g, ctx: ctx, what: what}
}

type guarded struct {
	net.Listener
	gate *Gate
	ctx  context.Context
	what string
}

func (l *guarded) Accept() (net.Conn, error) {
	for {
		conn, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if _, err := l.gate.Admit(l.ctx, conn, l.what); err != nil {
			conn.Close()
			continue
		}
		return conn, nil
	}
}
