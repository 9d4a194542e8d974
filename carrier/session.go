package carrier

import (
	"context"
	"encoding/base64"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"tailscale.com/client/local"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/tailcfg"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// Bringing up the WireGuard session to a peer before a first dial (see
// awaitSession and docs/connection.md).
const (
	// discoPingTimeout is how long a disco ping to a peer that may not yet
	// know this node waits for its pong; discoPingPause is the pause
	// before the next, and knownByWait bounds them all.
	discoPingTimeout = 250 * time.Millisecond
	discoPingPause   = 50 * time.Millisecond
	knownByWait      = time.Second
	// minPathSettle is the least time between the two pongs (see
	// awaitKnownBy).
	minPathSettle = 10 * time.Millisecond
	// firstPingTimeout is how long the first TSMP ping waits for its
	// answer; a lost ping is sent again, each time waiting twice as long.
	firstPingTimeout = 250 * time.Millisecond
	// sessionWait is how long a dial waits for a session in all; after
	// that it goes ahead and leaves the rest to WireGuard's own retries.
	sessionWait = 3 * time.Second
	// crossingFresh is how old a crossing may be for a reset to be safe:
	// well within the 5 s in which neither end starts a new handshake, so
	// that no packet of a session can be under way (see resetCrossed).
	crossingFresh = 3 * time.Second
	// initiationGap is how long after a crossing the fresh initiation
	// waits: wireguard-go drops an initiation that comes within 20 ms of
	// the last one it took from the same peer (HandshakeInitationRate),
	// and the peer took this node's crossed one just before answering it.
	initiationGap = 30 * time.Millisecond
)

// awaitSession returns once this node has a working WireGuard session with
// the peer at addr (a TSMP ping, which travels inside WireGuard, has been
// answered), so that the connection's SYN goes out at once and a first
// dial costs no fixed pause. Peers with a session are remembered, with
// their disco key: later dials rely on WireGuard alone until the peer
// restarts.
//
// Two first handshakes that cross are both lost: when both ends of a pair
// start one at the same moment (BEAM nodes that see each other connect to
// each other at once), each consumes the other's initiation, which
// overwrites its own; each answers, and each rejects the other's answer
// ("Received invalid response message"). Neither has a session, and
// wireguard-go starts no new handshake for 5 s (RekeyTimeout), after which
// both often retry in step and cross again. The rejected answer is the
// sign: the end with the lower tailnet address then drops its device peer
// (resetCrossed), and its next packet starts a fresh handshake, which the
// other end, not having started one, answers. Only one end resets, so the
// fresh handshakes do not cross again.
//
// Crossed handshakes can also leave one end with a session the other
// cannot reach (wireguard-go handles the two messages at once; see
// resetRaced): its ping goes unanswered, and it drops its device peer too.
func (n *Node) awaitSession(ctx context.Context, addr netip.Addr) error {
	self4, self6 := n.ts.TailscaleIPs()
	if addr == self4 || addr == self6 {
		return nil // this node
	}
	lc, err := n.local()
	if err != nil {
		return err
	}
	// A peer that restarted (a new disco key: a new process, perhaps on
	// the old node key) must be brought up again: it may not know this
	// node yet, and then it drops the first handshake without a word.
	var peerKey key.NodePublic
	var disco key.DiscoPublic
	if who, err := lc.WhoIs(ctx, addr.String()); err == nil && who.Node != nil {
		peerKey, disco = who.Node.Key, who.Node.DiscoKey
	}
	n.mu.Lock()
	upWith, up := n.sessionUp[addr]
	n.mu.Unlock()
	if up && upWith == disco {
		return nil
	}
	self := self4
	if addr.Is6() {
		self = self6
	}
	known, err := n.awaitKnownBy(ctx, lc, addr)
	if err != nil {
		return err
	}
	if !known {
		// No pong in knownByWait: the peer is offline, gone or not yet
		// told of this node. Waiting for a session too would only delay
		// the dial's own answer (a refusal, or its timeout).
		return nil
	}
	waitCtx, cancelWait := context.WithTimeout(ctx, sessionWait)
	defer cancelWait()
	var crossKey key.NodePublic // zero at the end that does not reset a crossing
	if self.Less(addr) {
		crossKey = peerKey
	}
	for timeout := firstPingTimeout; ; timeout *= 2 {
		lost := n.crossings.watch(peerKey)
		pingCtx, cancel := context.WithTimeout(waitCtx, timeout)
		pong := make(chan bool, 1)
		go func() {
			res, err := lc.Ping(pingCtx, addr, tailcfg.PingTSMP)
			pong <- err == nil && res.Err == ""
		}()
		var ok bool
	wait:
		for {
			select {
			case ok = <-pong:
				break wait
			case <-lost:
				if n.crossings.fresh(crossKey, crossingFresh) || n.crossings.racedWithin(peerKey, crossingFresh) {
					cancel() // this ping's handshake is lost
					ok = <-pong
					break wait
				}
				lost = n.crossings.watch(peerKey) // another peer's, or not ours to reset
			}
		}
		cancel()
		if ok {
			n.mu.Lock()
			n.sessionUp[addr] = disco
			n.mu.Unlock()
			return nil
		}
		if n.resetCrossed(waitCtx, lc, addr, crossKey) || n.resetRaced(waitCtx, lc, addr, peerKey) {
			timeout = firstPingTimeout / 2 // the fresh handshake gets a fresh wait
		}
		if waitCtx.Err() != nil {
			if err := ctx.Err(); err != nil {
				return err
			}
			n.ts.Logf("carrier: no WireGuard session with %v after %v; dialling anyway", addr, sessionWait)
			return nil
		}
	}
}

// awaitKnownBy returns once the peer at addr knows this node, so that a
// first handshake is answered: a node that has just joined reaches peers
// before the control server has told them about it, and they drop its
// handshake without a word (and WireGuard retries only after 5 s). A
// disco pong comes only from a peer that knows this node's keys.
//
// It takes two pongs: the first shows the peer knows this node's keys,
// but not that it has a path back. A node that has just joined is in the
// peer's netmap before its DERP home and endpoints are (Headscale sends
// them in a later update), and the peer learns a path when its own disco
// ping, sent on receiving ours, is answered: the second ping goes two
// round trips after the first pong (minPathSettle at least).
//
// It reports whether any pong came. It waits knownByWait at most: a node
// restarted with its old state has a new disco key but the same WireGuard
// key, so a peer answers its handshake at once but its disco pings only
// after the control server has passed the new key on, which can take
// seconds.
func (n *Node) awaitKnownBy(ctx context.Context, lc *local.Client, addr netip.Addr) (known bool, err error) {
	waitCtx, cancelWait := context.WithTimeout(ctx, knownByWait)
	defer cancelWait()
	pongs := 0
	for {
		pingCtx, cancel := context.WithTimeout(waitCtx, discoPingTimeout)
		res, err := lc.Ping(pingCtx, addr, tailcfg.PingDisco)
		cancel()
		if err == nil && res.Err == "" {
			known = true
			if pongs++; pongs == 2 {
				return true, nil
			}
			settle := max(2*time.Duration(res.LatencySeconds*float64(time.Second)), minPathSettle)
			select {
			case <-waitCtx.Done():
			case <-time.After(settle):
			}
			continue
		}
		pongs = 0
		select {
		case <-waitCtx.Done():
			if err := ctx.Err(); err != nil {
				return false, err
			}
			return known, nil // waited knownByWait: go ahead
		case <-time.After(discoPingPause):
		}
	}
}

// resetCrossed drops the WireGuard device's state for a peer whose first
// handshake crossed this node's: its keys and the handshake in flight. The
// next packet to it starts afresh.
//
// It uses wgengine's ResetDevicePeer, which tailscale itself calls when a
// peer's disco key changes (tsnet reaches it through Sys, which it
// documents as not a stable API: tailscale.com is pinned in go.mod).
// Removing a device peer while a data packet from it is being handled
// deadlocks the device (the cycle of tailscale#18124: the peer's receiver,
// answering a TSMP ping, waits for the TUN, whose reader waits for the
// peer table that the removal holds). It is safe here, and only here,
// because there is no session to carry data: no handshake with the peer
// has ever completed, and the crossing is fresh, so neither end has been
// allowed to start another one.
func (n *Node) resetCrossed(ctx context.Context, lc *local.Client, addr netip.Addr, peerKey key.NodePublic) bool {
	at, ok := n.crossings.take(peerKey, crossingFresh)
	if !ok {
		return false
	}
	select {
	case <-ctx.Done():
		return false
	case <-time.After(time.Until(at.Add(initiationGap))):
	}
	st, err := lc.Status(ctx)
	if err != nil {
		return false
	}
	p, ok := st.Peer[peerKey]
	if !ok || !p.LastHandshake.IsZero() {
		return false
	}
	engine, ok := n.ts.Sys().Engine.GetOK()
	if !ok {
		return false
	}
	n.ts.Logf("carrier: first handshake with %v crossed the peer's; starting a fresh one", addr)
	engine.ResetDevicePeer(peerKey)
	return true
}

// resetRaced drops the WireGuard device's state for a peer whose crossed
// first handshake left this node with a session the peer cannot reach, so
// that the next packet starts a fresh handshake.
//
// The race (wireguard-go's device/noise-protocol.go, handled by two of its
// handshake goroutines at once): ConsumeMessageResponse checks the peer's
// answer to this node's initiation against the handshake state under a read
// lock and writes the result under the write lock; in between,
// ConsumeMessageInitiation and CreateMessageResponse take the peer's own
// initiation and replace the handshake's local index. The answer's keys
// are then installed under the new index, while the peer, which took this
// node's initiation, addresses every packet to the old one: this node
// drops them all, unseen, and the peer never gets a pong. wireguard-go
// itself gives up on the session only after 15 s without an answer
// (KeepaliveTimeout + RekeyTimeout). The sign in the log is a valid
// response from the peer after this node answered the peer's initiation,
// with no initiation of this node's in between (see crossings.noteHandshake).
//
// The reset is deadlock-free for the reason resetCrossed's is: no packet of
// the peer's reaches the device peer, since they all carry the dropped
// index (the peer has no other keys: its own initiation was answered with
// this node's reply, which it rejected as a crossing). A race whose reply
// could not be created ("Failed to create response message") keeps the
// old index, works, and is not reset.
//
// The same race can end the other way: the answer is taken, then the
// peer's initiation changes the state before the keys are made from it
// ("Failed to derive keypair"). Neither end has keys it can send with (the
// peer's are a responder's, unusable until this node sends), so the reset
// is safe there too.
func (n *Node) resetRaced(ctx context.Context, lc *local.Client, addr netip.Addr, peerKey key.NodePublic) bool {
	at, ok := n.crossings.takeRace(peerKey, crossingFresh)
	if !ok {
		return false
	}
	// The pause lets a "Failed to create response message" line, which
	// may follow the race's, be logged and undo it; and the fresh
	// initiation must not come within 20 ms of the one the peer took.
	select {
	case <-ctx.Done():
		return false
	case <-time.After(time.Until(at.Add(initiationGap))):
	}
	if n.crossings.raceUndone(peerKey) {
		return false
	}
	st, err := lc.Status(ctx)
	if err != nil {
		return false
	}
	if _, ok := st.Peer[peerKey]; !ok {
		return false
	}
	engine, ok := n.ts.Sys().Engine.GetOK()
	if !ok {
		return false
	}
	n.ts.Logf("carrier: first handshake with %v raced the peer's (its packets go to a dropped index); starting a fresh one", addr)
	engine.ResetDevicePeer(peerKey)
	return true
}

// crossingLog is wireguard-go's log line (device/receive.go) for a
// handshake response that matches no handshake of this node's; the peer's
// public key, in hex, follows it.
const crossingLog = "Received invalid response message from "

// crossings records, per peer, the last time WireGuard rejected a
// handshake response from it, which is the sign of crossed handshakes.
//
// It also follows each peer's handshake messages, as wireguard-go logs
// them, for the sign of a raced handshake (see resetRaced).
type crossings struct {
	mu         sync.Mutex
	at         map[string]time.Time      // by the peer key's hex
	signal     chan struct{}             // closed at each new record
	handshakes map[string]handshakeRound // by the peer as wireguard-go's lines name it
	raced      map[string]time.Time      // likewise
	undone     map[string]bool           // races whose answer then failed (see resetRaced)
	// pathless, set before the node starts, is called (on the logging
	// goroutine: it must not block) with the peer of a handshake message
	// that could not be sent for want of an address (see redoPathless).
	pathless func(peer string)
}

// handshakeRound is what this node's log has said of one peer since this
// node last sent it a handshake initiation.
type handshakeRound struct {
	initiated bool // this node sent an initiation, not yet answered
	answered  bool // then it answered the peer's own initiation
	failed    bool // and that answer could not be created
}

// The lines of wireguard-go (device/send.go, device/receive.go) that follow
// a handshake with a peer; the peer comes first ("%v - ...").
const (
	sentInitiationLog = " - Sending handshake initiation"
	gotInitiationLog  = " - Received handshake initiation"
	gotResponseLog    = " - Received handshake response"
	noResponseLog     = " - Failed to create response message"
	// noKeypairLog: a handshake that completed could not make its keys,
	// the other goroutine having changed its state (see noteHandshake).
	noKeypairLog = " - Failed to derive keypair"
	// unsentLog is followed by "initiation: " or "response: " and the
	// error; pathlessLog is magicsock's error for a peer it has neither
	// a UDP address nor a DERP home for yet.
	unsentLog   = " - Failed to send handshake "
	pathlessLog = "no UDP or DERP addr"
)

func newCrossings() *crossings {
	return &crossings{
		at:         make(map[string]time.Time),
		signal:     make(chan struct{}),
		handshakes: make(map[string]handshakeRound),
		raced:      make(map[string]time.Time),
		undone:     make(map[string]bool),
	}
}

// logf wraps a tailscale logger, noting crossings and races as they are
// logged.
func (c *crossings) logf(next logger.Logf) logger.Logf {
	return func(format string, args ...any) {
		switch {
		case strings.Contains(format, "invalid response"):
			line := fmt.Sprintf(format, args...)
			if i := strings.Index(line, crossingLog); i >= 0 {
				c.note(strings.TrimSpace(line[i+len(crossingLog):]))
			}
		case strings.Contains(format, unsentLog):
			line := fmt.Sprintf(format, args...)
			if i := strings.Index(line, unsentLog); i >= 0 && strings.Contains(line, pathlessLog) && c.pathless != nil {
				head := line[:i]
				c.pathless(head[strings.LastIndexByte(head, ' ')+1:])
			}
		case strings.Contains(format, " handshake ") || strings.Contains(format, noResponseLog) ||
			strings.Contains(format, noKeypairLog):
			c.noteHandshake(fmt.Sprintf(format, args...))
		}
		next(format, args...)
	}
}

// noteHandshake follows one wireguard-go handshake line ("wg: [v2] PEER -
// Received handshake response", PEER as wglog names it).
func (c *crossings) noteHandshake(line string) {
	var peer string
	var event string
	for _, e := range []string{sentInitiationLog, gotInitiationLog, gotResponseLog, noResponseLog, noKeypairLog} {
		if i := strings.Index(line, e); i >= 0 {
			head := line[:i]
			peer, event = head[strings.LastIndexByte(head, ' ')+1:], e
			break
		}
	}
	if peer == "" {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.handshakes) >= 4096 {
		clear(c.handshakes)
		clear(c.raced)
		clear(c.undone)
	}
	r := c.handshakes[peer]
	switch event {
	case sentInitiationLog:
		r = handshakeRound{initiated: true}
	case gotInitiationLog:
		r.answered = r.initiated
	case noResponseLog:
		r.failed = true
		if _, ok := c.raced[peer]; ok {
			c.undone[peer] = true
		}
	case gotResponseLog:
		if r.initiated && r.answered && !r.failed {
			c.race(peer)
		}
		r = handshakeRound{}
	case noKeypairLog:
		// The same race the other way round: the answer was taken, then
		// the peer's initiation changed the state before the keys were
		// made from it. No session either side; the peer rejects this
		// node's answer to its initiation as a crossing.
		c.race(peer)
	}
	c.handshakes[peer] = r
}

func (c *crossings) note(keyHex string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.at) >= 4096 {
		clear(c.at) // a bound; old entries are stale anyway
	}
	c.at[keyHex] = time.Now()
	close(c.signal)
	c.signal = make(chan struct{})
}

// watch returns a channel that is closed at the next crossing with any
// peer (nil, which never fires, for the zero key: this end does not reset).
func (c *crossings) watch(k key.NodePublic) <-chan struct{} {
	if k.IsZero() {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.signal
}

// fresh reports whether a crossing with k was recorded within d.
func (c *crossings) fresh(k key.NodePublic, d time.Duration) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	at, ok := c.at[k.UntypedHexString()]
	return ok && time.Since(at) < d
}

// take is fresh, returning when the crossing was, and forgets it: a crossing allows one reset
// (after it, the fresh handshake may complete at any moment).
func (c *crossings) take(k key.NodePublic, d time.Duration) (at time.Time, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	hex := k.UntypedHexString()
	at, ok = c.at[hex]
	delete(c.at, hex)
	return at, ok && time.Since(at) < d
}

// race records a raced handshake with peer; c.mu is held.
func (c *crossings) race(peer string) {
	c.raced[peer] = time.Now()
	delete(c.undone, peer)
	close(c.signal)
	c.signal = make(chan struct{})
}

// racedWithin reports whether a raced handshake with k was logged within d.
func (c *crossings) racedWithin(k key.NodePublic, d time.Duration) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, name := range logNames(k) {
		if at, ok := c.raced[name]; ok {
			return time.Since(at) < d
		}
	}
	return false
}

// takeRace is racedWithin, returning when the race was, and forgets it
// (one reset per race).
func (c *crossings) takeRace(k key.NodePublic, d time.Duration) (at time.Time, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, name := range logNames(k) {
		if at, ok := c.raced[name]; ok {
			delete(c.raced, name)
			return at, time.Since(at) < d
		}
	}
	return time.Time{}, false
}

// raceUndone reports whether the answer this node gave in its last race
// with k could not be created: the handshake then kept its index, and the
// session works.
func (c *crossings) raceUndone(k key.NodePublic) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, name := range logNames(k) {
		if c.undone[name] {
			delete(c.undone, name)
			return true
		}
	}
	return false
}

// logNames are the names wireguard-go's lines give peer k: tailscale's
// short form ("[kcUU4]"), which wglog substitutes for the peers it knows,
// and wireguard-go's own ("peer(kcUU…9Xs=)").
func logNames(k key.NodePublic) []string {
	raw := k.Raw32()
	b64 := base64.StdEncoding.EncodeToString(raw[:])
	return []string{k.ShortString(), "peer(" + b64[0:4] + "…" + b64[39:43] + ")"}
}

// pathWait bounds how long redoPathless waits for a peer's address.
const pathWait = 2 * time.Second

// redoPathless starts a handshake with the peer that wireguard-go's lines
// call name again, once this node has an address for it (see
// resetPathless). One at a time per peer; it runs until the node closes
// at the latest.
func (n *Node) redoPathless(name string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.pathless[name] || n.bgCtx.Err() != nil {
		return
	}
	n.pathless[name] = true
	n.bg.Add(1)
	go func() {
		defer n.bg.Done()
		n.resetPathless(n.bgCtx, name, time.Now())
		n.mu.Lock()
		delete(n.pathless, name)
		n.mu.Unlock()
	}()
}

// resetPathless handles a handshake message this node could not send to a
// peer because magicsock had no address for it: a node that has just
// joined sends its first initiation as soon as the peer knows its keys,
// which can be before the control server has given the peer its DERP home
// and endpoints. The peer then takes the initiation, cannot send its
// answer ("Failed to send handshake response: no UDP or DERP addr"), and,
// having just sent a handshake message, starts none of its own for 5 s
// (RekeyTimeout), while the initiator retries only after 5 s: the pair's
// first connection stalled 5 s. Seen in about one 8-node BEAM mesh in five.
//
// Once the peer has an address (a DERP home or a direct path, within
// pathWait), this node drops its device peer, as resetCrossed does, and
// pings the peer over TSMP: the fresh device peer sends a fresh initiation,
// which the peer, whose own initiation is pending, takes and answers. The
// reset is safe for resetCrossed's reason: no handshake with the peer has
// completed (checked), so no packet of a session can be under way.
func (n *Node) resetPathless(ctx context.Context, name string, at time.Time) {
	ctx, cancel := context.WithTimeout(ctx, pathWait)
	defer cancel()
	lc, err := n.local()
	if err != nil {
		return
	}
	for {
		st, err := lc.Status(ctx)
		if err != nil {
			return
		}
		var peerKey key.NodePublic
		var peer *ipnstate.PeerStatus
		for k, p := range st.Peer {
			if slices.Contains(logNames(k), name) {
				peerKey, peer = k, p
			}
		}
		if peer == nil || !peer.LastHandshake.IsZero() || len(peer.TailscaleIPs) == 0 {
			return // gone, or a session came about anyway
		}
		if peer.Relay != "" || peer.CurAddr != "" {
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Until(at.Add(initiationGap))):
			}
			engine, ok := n.ts.Sys().Engine.GetOK()
			if !ok {
				return
			}
			addr := peer.TailscaleIPs[0]
			n.ts.Logf("carrier: a handshake message to %v could not be sent (no address yet); starting a fresh handshake", addr)
			engine.ResetDevicePeer(peerKey)
			pingCtx, cancelPing := context.WithTimeout(ctx, time.Second)
			_, _ = lc.Ping(pingCtx, addr, tailcfg.PingTSMP) // it only has to start the handshake
			cancelPing()
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
}
