package carrier

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"tailscale.com/tailcfg"
)

// Bringing up the WireGuard session to a peer before a first dial (see
// awaitSession and docs/connection.md).
const (
	// discoProbeTimeout bounds the disco ping that measures the round trip
	// to a peer before the first handshake.
	discoProbeTimeout = 250 * time.Millisecond
	// assumedRTT stands in for a round trip that the disco ping could not
	// measure.
	assumedRTT = 50 * time.Millisecond
	// handshakeSlack is added to four round trips to give the first
	// handshake and the TSMP ping that follows it time to complete: a
	// loaded machine takes tens of milliseconds to run a handshake.
	handshakeSlack = 50 * time.Millisecond
	// sessionWait is how long a dial waits for a session in all; after
	// that it goes ahead and leaves the rest to WireGuard's own retries.
	sessionWait = 3 * time.Second
)

// awaitSession returns once this node has a working WireGuard session with
// the peer at addr (a TSMP ping, which travels inside WireGuard, has been
// answered), so that the connection's SYN goes out at once.
//
// WireGuard loses a first handshake in two ways that both cost its 5 s
// retry (wireguard-go's RekeyTimeout, during which it starts no new
// handshake for any packet):
//
//   - Crossing initiations: when both ends of a pair start a handshake at
//     the same moment (BEAM nodes connect to each other at once), each
//     consumes the other's initiation, which overwrites its own; each
//     answers, and each rejects the other's answer ("Received invalid
//     response message"). Neither has a session, and both retry in step.
//   - A peer that cannot answer yet: a node that has just joined reaches
//     peers before the control server has told them about it, or before
//     they have a path back to it.
//
// When a TSMP ping gets no answer in a few round trips, the handshake is
// taken as lost and the device peer is reset (its handshake state
// dropped; the next packet starts a fresh handshake). Only one side of a
// pair resets at the first loss, the one with the lower tailnet address,
// so that two resets do not cross again; the other resets only if a
// second ping is lost too, which covers a peer that simply did not answer.
// Each ping waits twice as long as the one before it.
//
// Peers that answered are remembered: later dials rely on WireGuard alone.
func (n *Node) awaitSession(ctx context.Context, addr netip.Addr) error {
	self4, self6 := n.ts.TailscaleIPs()
	if addr == self4 || addr == self6 {
		return nil // this node
	}
	n.mu.Lock()
	up := n.sessionUp[addr]
	n.mu.Unlock()
	if up {
		return nil
	}
	lc, err := n.local()
	if err != nil {
		return err
	}
	self := self4
	if addr.Is6() {
		self = self6
	}
	resetFirst := self.Less(addr)

	waitCtx, cancelWait := context.WithTimeout(ctx, sessionWait)
	defer cancelWait()
	rtt := assumedRTT
	probeCtx, cancelProbe := context.WithTimeout(waitCtx, discoProbeTimeout)
	if res, err := lc.Ping(probeCtx, addr, tailcfg.PingDisco); err == nil && res.Err == "" {
		rtt = time.Duration(res.LatencySeconds * float64(time.Second))
	}
	cancelProbe()

	timeout := 4*rtt + handshakeSlack
	for lost := 0; ; lost++ {
		pingCtx, cancel := context.WithTimeout(waitCtx, timeout)
		res, err := lc.Ping(pingCtx, addr, tailcfg.PingTSMP)
		cancel()
		if err == nil && res.Err == "" {
			n.mu.Lock()
			n.sessionUp[addr] = true
			n.mu.Unlock()
			return nil
		}
		if waitCtx.Err() != nil {
			if err := ctx.Err(); err != nil {
				return err
			}
			return nil // waited sessionWait: dial anyway
		}
		reset := lost > 0 || resetFirst
		n.ts.Logf("carrier: no session with %v after %v (try %d, reset %v)", addr, timeout, lost+1, reset)
		if reset {
			if err := n.resetPeer(waitCtx, addr); err != nil {
				n.ts.Logf("carrier: first handshake with %v: %v", addr, err)
			}
		}
		timeout *= 2
	}
}

// resetPeer drops the WireGuard device's state for the peer at addr: its
// keys and any handshake in flight. The next packet to it starts afresh.
// (wgengine's ResetDevicePeer, which tailscale itself calls when a peer's
// disco key changes; tsnet reaches it only through Sys, which it documents
// as not a stable API: tailscale.com is pinned in go.mod.)
func (n *Node) resetPeer(ctx context.Context, addr netip.Addr) error {
	lc, err := n.local()
	if err != nil {
		return err
	}
	who, err := lc.WhoIs(ctx, addr.String())
	if err != nil {
		return fmt.Errorf("look up peer: %w", err)
	}
	engine, ok := n.ts.Sys().Engine.GetOK()
	if !ok {
		return fmt.Errorf("tsnet has no WireGuard engine")
	}
	engine.ResetDevicePeer(who.Node.Key)
	return nil
}
