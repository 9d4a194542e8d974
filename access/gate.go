package access

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/tsdist/tsdist/carrier"
	"tailscale.com/types/logger"
)

// ErrDenied is returned (wrapped) by [Gate.Admit] and [Gate.Check] for a
// peer outside the access policy.
var ErrDenied = errors.New("access: peer not allowed")

// DeniedError is the error of [Gate.Check] for a device the policy does not
// admit. It matches ErrDenied.
type DeniedError struct {
	// Peer is the device refused.
	Peer carrier.Identity
	// Why is the policy's reason ("beta (user x) matches no rule of ...").
	Why string
}

func (e *DeniedError) Error() string { return ErrDenied.Error() + ": " + e.Why }

// Unwrap makes a DeniedError match ErrDenied.
func (e *DeniedError) Unwrap() error { return ErrDenied }

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

// Gate applies a [Policy] to the devices a tailnet node exchanges bytes
// with: the connections it accepts ([Gate.Admit], [Gate.Guard]) and the
// devices it dials or asks for names ([Gate.Check], through package host).
// It is safe for concurrent use.
type Gate struct {
	node *carrier.Node
	logf logger.Logf

	mu       sync.Mutex
	policy   Policy
	self     carrier.Identity
	selfTime time.Time
	refusals map[string]*refusalLog // by device
}

// NewGate returns a Gate for node with the [Default] policy. logf receives
// the refusals (rate-limited per device, see [Gate.Check]) and policy
// changes; nil discards them.
func NewGate(node *carrier.Node, logf logger.Logf) *Gate {
	if logf == nil {
		logf = logger.Discard
	}
	return &Gate{node: node, logf: logf, policy: MustParse(Default), refusals: map[string]*refusalLog{}}
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
// and checks the policy (see [Gate.Check]). A peer that is not allowed, or
// has no tailnet identity, gets an error wrapping [ErrDenied]; the caller
// closes the connection before any byte of it goes anywhere. what names
// the port, for the log.
func (g *Gate) Admit(ctx context.Context, conn net.Conn, what string) (carrier.Identity, error) {
	ctx, cancel := context.WithTimeout(ctx, whoIsTime)
	defer cancel()
	peer, err := g.node.WhoIs(ctx, conn.RemoteAddr().String())
	if err != nil {
		g.refused(conn.RemoteAddr().String(), "refused %v on %s: no tailnet identity: %v", conn.RemoteAddr(), what, err)
		return carrier.Identity{}, fmt.Errorf("%w: %v has no tailnet identity: %v", ErrDenied, conn.RemoteAddr(), err)
	}
	return peer, g.Check(ctx, peer, "on "+what)
}

// Check applies the policy to a device: one the node accepted a
// connection from, or one it is about to dial or ask for names. This node
// itself is always allowed. A refusal wraps [ErrDenied] and is logged, at
// most once a minute per device (with a count of the refusals not logged);
// what says where, for that line ("on EPMD", "for a dial to beta").
func (g *Gate) Check(ctx context.Context, peer carrier.Identity, what string) error {
	self, err := g.selfIdentity(ctx)
	if err != nil {
		g.refused(peer.Node, "refused %s (%s) %s: this node's own identity is unknown: %v", peer.Node, where(peer), what, err)
		return fmt.Errorf("%w: %v", ErrDenied, err)
	}
	if isSelf(self, peer) {
		return nil
	}
	if ok, why := g.Policy().Allow(self, peer); !ok {
		g.refused(peer.DNSName+peer.Node, "refused %s (%s, user %q, tags %v) %s: %s", peer.Node, where(peer), peer.User, peer.Tags, what, why)
		return &DeniedError{Peer: peer, Why: why}
	}
	return nil
}

// Allowed reports whether the policy admits a device, as Check does but
// without logging: for marking the peers of a listing.
func (g *Gate) Allowed(ctx context.Context, peer carrier.Identity) bool {
	self, err := g.selfIdentity(ctx)
	if err != nil {
		return false
	}
	ok, _ := g.Policy().Allow(self, peer)
	return ok || isSelf(self, peer)
}

// where is a device's address for the log: the connection's remote end, or,
// before any connection (a dial), its first tailnet address.
func where(peer carrier.Identity) string {
	if peer.Addr == "" && len(peer.IPs) > 0 {
		return peer.IPs[0]
	}
	return peer.Addr
}

// isSelf reports whether peer is this node: a connection from one of its
// own addresses (two BEAM nodes sharing a helper), or its own name.
func isSelf(self, peer carrier.Identity) bool {
	for _, ip := range peer.IPs {
		if slices.Contains(self.IPs, ip) {
			return true
		}
	}
	if host, _, err := net.SplitHostPort(peer.Addr); err == nil && slices.Contains(self.IPs, host) {
		return true
	}
	return false
}

// Refusal logging: every tailnet peer can make a node refuse it, as often as
// it likes, so the log gets one line per device per refusalLogEvery, and a
// count of the others with the next line.
const (
	refusalLogEvery = time.Minute
	// refusalKeys bounds the devices remembered; past it the oldest half
	// is forgotten (they are then logged again).
	refusalKeys = 1024
)

type refusalLog struct {
	last   time.Time
	hidden int // refusals since last that were not logged
}

func (g *Gate) refused(key, format string, args ...any) {
	g.mu.Lock()
	now := time.Now()
	r := g.refusals[key]
	if r != nil && now.Sub(r.last) < refusalLogEvery {
		r.hidden++
		g.mu.Unlock()
		return
	}
	hidden, since := 0, time.Duration(0)
	if r == nil {
		if len(g.refusals) >= refusalKeys {
			g.forgetOldRefusals()
		}
		r = &refusalLog{}
		g.refusals[key] = r
	} else {
		hidden, since = r.hidden, now.Sub(r.last)
	}
	r.last, r.hidden = now, 0
	g.mu.Unlock()
	line := fmt.Sprintf(format, args...)
	if hidden > 0 {
		line += fmt.Sprintf(" (and %d more refusals of it in the last %v, not logged)", hidden, since.Round(time.Second))
	}
	g.logf("access: %s", line)
}

// forgetOldRefusals drops the older half of the remembered devices; g.mu is
// held.
func (g *Gate) forgetOldRefusals() {
	times := make([]time.Time, 0, len(g.refusals))
	for _, r := range g.refusals {
		times = append(times, r.last)
	}
	slices.SortFunc(times, time.Time.Compare)
	cut := times[len(times)/2]
	for k, r := range g.refusals {
		if r.last.Before(cut) {
			delete(g.refusals, k)
		}
	}
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
