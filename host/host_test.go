package host_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tsdist/tsdist/access"
	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/devnet"
	"github.com/tsdist/tsdist/epmd"
	"github.com/tsdist/tsdist/host"
	"github.com/tsdist/tsdist/internal/leakcheck"
)

// These tests try what a hostile device of the same tailnet would: ask for
// a hostname an honest node has, and wait for the name to be resolved to
// it. Every device of the offline tailnet here has a user of its own.

type tailnet struct {
	t   *testing.T
	ctx context.Context
	dn  *devnet.Net
}

func newTailnet(t *testing.T) *tailnet {
	t.Helper()
	if testing.Short() {
		t.Skip("needs the offline tailnet")
	}
	leakcheck.Check(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	dn, err := devnet.Start(ctx, devnet.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dn.Close)
	return &tailnet{t: t, ctx: ctx, dn: dn}
}

// host brings up a device. A persistent one (not ephemeral) stays on the
// tailnet, offline, after Close, as a node killed without logging out does.
func (tn *tailnet) host(name, policy string, persistent bool, tags ...string) *host.Host {
	tn.t.Helper()
	h, err := host.New(host.Config{
		Tailnet: carrier.Config{Hostname: name, ControlURL: tn.dn.ControlURL, Dir: tn.t.TempDir(),
			Ephemeral: !persistent, Tags: tags},
		Policy: access.MustParse(policy),
	})
	if err != nil {
		tn.t.Fatal(err)
	}
	tn.t.Cleanup(func() { h.Close() })
	if err := h.Up(tn.ctx); err != nil {
		tn.t.Fatal(err)
	}
	return h
}

// self is a host's own identity as the tailnet sees it.
func (tn *tailnet) self(h *host.Host) carrier.Peer {
	tn.t.Helper()
	st, err := h.Node().Status(tn.ctx)
	if err != nil {
		tn.t.Fatal(err)
	}
	return st.Self
}

// waitPeer waits until h sees the device with tailnet address ip in the
// state online. (Two devices can have one MagicDNS name: the offline
// tailnet's control server, unlike Tailscale's and Headscale's, does not
// suffix a second "beta" as "beta-1".)
func (tn *tailnet) waitPeer(h *host.Host, ip string, online bool) {
	tn.t.Helper()
	for {
		st, err := h.Node().Status(tn.ctx)
		if err == nil {
			for _, p := range st.Peers {
				if slices.Contains(p.IPs, ip) && p.Online == online {
					return
				}
			}
		}
		if tn.ctx.Err() != nil {
			tn.t.Fatalf("%s never saw %s with online=%v", h.Node().Hostname(), ip, online)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitGone waits until h no longer sees a device with tailnet address ip.
func (tn *tailnet) waitGone(h *host.Host, ip string) {
	tn.t.Helper()
	for {
		st, err := h.Node().Status(tn.ctx)
		if err == nil && !slices.ContainsFunc(st.Peers, func(p carrier.Peer) bool { return slices.Contains(p.IPs, ip) }) {
			return
		}
		if tn.ctx.Err() != nil {
			tn.t.Fatalf("%s still sees %s", h.Node().Hostname(), ip)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stranger brings up a device of a user of its own that asks for hostname
// name and counts the connections reaching its ports 7 and 4369.
func (tn *tailnet) stranger(name string) (carrier.Peer, map[uint16]*counter) {
	tn.t.Helper()
	n, err := carrier.New(carrier.Config{Hostname: name, ControlURL: tn.dn.ControlURL, Dir: tn.t.TempDir(), Ephemeral: true})
	if err != nil {
		tn.t.Fatal(err)
	}
	tn.t.Cleanup(func() { n.Close() })
	if err := n.Up(tn.ctx); err != nil {
		tn.t.Fatal(err)
	}
	at := map[uint16]*counter{7: tn.count(n, 7), epmd.DefaultPort: tn.count(n, epmd.DefaultPort)}
	st, err := n.Status(tn.ctx)
	if err != nil {
		tn.t.Fatal(err)
	}
	if st.Self.Hostname != name || st.Self.User == "" {
		tn.t.Fatalf("the stranger is %+v: want hostname %s and a user", st.Self, name)
	}
	return st.Self, at
}

// counter listens on a device's tailnet port and counts the connections
// that reach it.
type counter struct{ n atomic.Int64 }

func (tn *tailnet) count(n *carrier.Node, port uint16) *counter {
	tn.t.Helper()
	ln, err := n.Listen(port)
	if err != nil {
		tn.t.Fatal(err)
	}
	tn.t.Cleanup(func() { ln.Close() })
	c := &counter{}
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			c.n.Add(1)
			conn.Close()
		}
	}()
	return c
}

func wantNotAllowed(t *testing.T, what string, err error, stranger carrier.Peer) {
	t.Helper()
	var na *host.NotAllowedError
	if !errors.As(err, &na) {
		t.Fatalf("%s: got %v, want a *host.NotAllowedError", what, err)
	}
	if !errors.Is(err, access.ErrDenied) {
		t.Errorf("%s: %v does not match access.ErrDenied", what, err)
	}
	if !slices.Equal(na.Peer.IPs, stranger.IPs) || na.Peer.User != stranger.User {
		t.Errorf("%s: the error names %+v, want the stranger %+v", what, na.Peer, stranger)
	}
	if !strings.Contains(err.Error(), stranger.User) || na.Why == "" {
		t.Errorf("%s: the message %q does not say who was found and why", what, err)
	}
}

// TestStrangerCannotTakeOverAName: a device of another user that asks for
// the hostname "beta" is never the device "beta" means to a host that
// admits only beta's owner, neither while the honest beta runs nor after it
// has gone; and it is never sent a byte: dials, port look-ups and names
// requests fail before connecting, whether they name it by hostname,
// MagicDNS name or address.
func TestStrangerCannotTakeOverAName(t *testing.T) {
	tn := newTailnet(t)
	beta := tn.host("beta", "*", false)
	betaSelf := tn.self(beta)
	betaAccepts := tn.count(beta.Node(), 7)
	alpha := tn.host("alpha", "user:"+betaSelf.User, false)
	tn.waitPeer(alpha, betaSelf.IPs[0], true)

	stranger, strangerAt := tn.stranger("beta")
	if stranger.User == betaSelf.User {
		t.Fatalf("the stranger is %+v: want a user other than beta's (%s)", stranger, betaSelf.User)
	}
	tn.waitPeer(alpha, stranger.IPs[0], true)

	// While beta runs, "beta" is beta, as a positive control.
	_, id, err := alpha.Resolve(tn.ctx, "beta")
	if err != nil || id.User != betaSelf.User {
		t.Fatalf("Resolve(beta) with the stranger online = %+v, %v; want beta of %s", id, err, betaSelf.User)
	}
	conn, peer, err := alpha.Dial(tn.ctx, "beta", 7)
	if err != nil {
		t.Fatalf("dial beta: %v", err)
	}
	conn.Close()
	if peer.User != betaSelf.User {
		t.Errorf("dialled beta, connected to %+v", peer)
	}
	if err := waitCount(tn.ctx, betaAccepts, 1); err != nil {
		t.Fatalf("beta: %v", err)
	}

	// The stranger's own address names only the stranger.
	wantRefused := func(name string, stranger carrier.Peer) {
		t.Helper()
		_, _, err := alpha.Dial(tn.ctx, name, 7)
		wantNotAllowed(t, "dial "+name, err, stranger)
		_, err = alpha.PortPlease(tn.ctx, name, "app")
		wantNotAllowed(t, "port_please "+name, err, stranger)
		_, _, err = alpha.Names(tn.ctx, name)
		wantNotAllowed(t, "names "+name, err, stranger)
	}
	wantRefused(stranger.IPs[0], stranger)

	// beta is killed and lingers, offline: the stranger is the only online
	// device answering to "beta", and still not what "beta" means.
	beta.Close()
	tn.waitPeer(alpha, betaSelf.IPs[0], false)
	for _, name := range []string{"beta", stranger.DNSName} {
		ip, id, err := alpha.Resolve(tn.ctx, name)
		if err != nil || ip.String() != betaSelf.IPs[0] || id.User != betaSelf.User {
			t.Errorf("Resolve(%s) with beta offline = %v %+v, %v; want the offline beta %s", name, ip, id, err, betaSelf.IPs[0])
		}
	}
	wantRefused(stranger.IPs[0], stranger)

	// A name that only a stranger answers to is refused by name too.
	zeta, zetaAt := tn.stranger("zeta")
	tn.waitPeer(alpha, zeta.IPs[0], true)
	wantRefused("zeta", zeta)
	wantRefused("zeta."+devnet.MagicDNSDomain, zeta)
	for port, c := range zetaAt {
		strangerAt[port+1000] = c
	}
	// The host itself is always admitted, though its own user is not in
	// its policy.
	if _, _, err := alpha.Names(tn.ctx, "alpha"); err != nil {
		t.Errorf("names of alpha itself: %v", err)
	}
	time.Sleep(200 * time.Millisecond) // a connection on its way would have landed
	for port, c := range strangerAt {
		if n := c.n.Load(); n != 0 {
			t.Errorf("the stranger received %d connections on port %d", n, port)
		}
	}
}

// TestSuccessorOfTheSameOwner: a node killed without logging out lingers
// as "kappa"; its successor, of the same tag, also asks for "kappa" and is
// what the name means. A device of another tag that also asks for "kappa"
// does not take the name over, even where the policy admits every device.
func TestSuccessorOfTheSameOwner(t *testing.T) {
	tn := newTailnet(t)
	old := tn.host("kappa", "*", true, "tag:erlang")
	oldIP := tn.self(old).IPs[0]
	alpha := tn.host("alpha", "tag:erlang", false, "tag:erlang")
	anyone := tn.host("omega", "*", false)
	tn.waitPeer(alpha, oldIP, true)
	tn.waitPeer(anyone, oldIP, true)
	old.Close()
	tn.waitPeer(alpha, oldIP, false)
	tn.waitPeer(anyone, oldIP, false)

	successor := tn.host("kappa", "*", true, "tag:erlang")
	successorIP := tn.self(successor).IPs[0]
	other := tn.host("kappa", "*", false, "tag:other")
	otherIP := tn.self(other).IPs[0]
	for _, h := range []*host.Host{alpha, anyone} {
		tn.waitPeer(h, successorIP, true)
		tn.waitPeer(h, otherIP, true)
		ip, _, err := h.Resolve(tn.ctx, "kappa")
		if err != nil || ip.String() != successorIP {
			t.Errorf("%s: Resolve(kappa) = %v, %v; want the successor %s (lingering %s, other tag %s)",
				h.Node().Hostname(), ip, err, successorIP, oldIP, otherIP)
		}
	}
	// With only the other tag's device online, "*" admits it, but it does
	// not take kappa's name over: kappa still means the offline kappas.
	successor.Close()
	tn.waitPeer(anyone, successorIP, false)
	ip, _, err := anyone.Resolve(tn.ctx, "kappa")
	if err != nil || ip.String() == otherIP {
		t.Errorf("Resolve(kappa) with only another tag's device online = %v, %v; want one of the offline kappas", ip, err)
	}
}

func waitCount(ctx context.Context, c *counter, want int64) error {
	for c.n.Load() < want {
		if ctx.Err() != nil {
			return errors.New("the connection never arrived")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}
