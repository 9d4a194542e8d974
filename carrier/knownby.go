package carrier

import (
	"context"
	"net/netip"
	"time"

	"tailscale.com/tailcfg"
)

// Disco pings to a peer that may not yet know this node: how long one
// waits for its pong, how long before the next, and how long a dial waits
// for any pong at all before it goes ahead.
const (
	discoPingTimeout = 250 * time.Millisecond
	discoPingPause   = 50 * time.Millisecond
	knownByWait      = time.Second
	// pathSettle is how long after a peer's first pong the second ping
	// goes: time for the peer's own disco ping back to this node, which
	// gives it a path for its handshake response, to have been answered
	// (a few milliseconds on loopback; a round trip elsewhere).
	pathSettle = 100 * time.Millisecond
)

// awaitKnownBy returns once the peer at addr knows this node, so that the
// connection's first WireGuard handshake is answered. A node that has just
// joined reaches peers before the control server has told them about it;
// they drop its handshake, and WireGuard retries only after 5 s. A disco
// pong comes only from a peer that knows this node's keys, so pongs are
// the signal. Peers that answered are remembered.
//
// It takes two pongs, pathSettle apart. The first shows the peer knows
// this node's keys, but not that it has a path back: a node that has just
// joined is in the peer's netmap before its DERP home and endpoints are
// (Headscale sends them in a later update), and the peer learns a path
// only when its own disco ping, sent on receiving ours, is answered. A
// handshake arriving before that gets no response ("no UDP or DERP addr"
// in the peer's log), and WireGuard retries after 5 s. Against Headscale
// about one first dial in ten stalled so, with one pong or with two in a
// row; with the pause, none in 40.
//
// It waits knownByWait at most: a node restarted with its old state has a
// new disco key but the same WireGuard key, so a peer answers its
// handshake at once but its disco pings only after the control server has
// passed the new key on, which can take seconds.
func (n *Node) awaitKnownBy(ctx context.Context, addr netip.Addr) error {
	if ip4, ip6 := n.ts.TailscaleIPs(); addr == ip4 || addr == ip6 {
		return nil // this node
	}
	n.mu.Lock()
	known := n.knownBy[addr]
	n.mu.Unlock()
	if known {
		return nil
	}
	lc, err := n.local()
	if err != nil {
		return err
	}
	waitCtx, cancelWait := context.WithTimeout(ctx, knownByWait)
	defer cancelWait()
	pongs := 0
	for {
		pingCtx, cancel := context.WithTimeout(waitCtx, discoPingTimeout)
		res, err := lc.Ping(pingCtx, addr, tailcfg.PingDisco)
		cancel()
		if err == nil && res.Err == "" {
			if pongs++; pongs < 2 {
				select {
				case <-waitCtx.Done():
				case <-time.After(pathSettle):
				}
				continue
			}
			n.mu.Lock()
			n.knownBy[addr] = true
			n.mu.Unlock()
			return nil
		}
		pongs = 0
		select {
		case <-waitCtx.Done():
			if err := ctx.Err(); err != nil {
				return err
			}
			return nil // waited knownByWait: dial anyway
		case <-time.After(discoPingPause):
		}
	}
}
