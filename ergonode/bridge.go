package ergonode

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/ergo-services/ergo/etf"
	"github.com/ergo-services/ergo/lib"
	"github.com/ergo-services/ergo/node"
	"github.com/tsdist/tsdist/carrier"
)

// claimTimeout bounds how long ergo's accept path waits for the tailnet
// connection that its loopback connection stands for, and how long a dial's
// handshake waits for ergo's connection to the dial listener. The adapter
// records each pair at once, so only a loopback connection from someone
// else ever waits this long.
const claimTimeout = 2 * time.Second

// dialTicketTime bounds how long a route the registrar returned counts as
// a dial under way (ergo dials it at once, and gives up after 3 s).
const dialTicketTime = 10 * time.Second

// maxHeld bounds the dial listener's connections held, unclaimed, while
// dials are under way; past it, new ones are closed at once.
const maxHeld = 64

// replaceTimeout bounds the wait for ergo to let go of a connection to an
// earlier incarnation of a peer (see replaceStale).
const replaceTimeout = 5 * time.Second

// session is one distribution connection: the tailnet connection that
// carries it and what is known of the peer.
type session struct {
	tailnet  net.Conn
	peer     carrier.Identity
	name     string // the peer's node name, once the handshake has told it
	creation uint32 // the peer's incarnation, from the handshake
	leftover []byte // bytes read past the handshake
	ended    func() // tells the host the connection is no longer in use
	once     sync.Once
	gone     chan struct{} // closed once ergo has let go of the connection
	goneOnce sync.Once
}

// newSession makes a session of a tailnet connection, in use (for the
// host's FIN grace, see host.Track) until closed.
func (b *bridge) newSession(tailnet net.Conn, peer carrier.Identity) *session {
	return &session{tailnet: tailnet, peer: peer, ended: b.n.host.Track(), gone: make(chan struct{})}
}

func (s *session) close() {
	s.once.Do(func() {
		s.tailnet.Close()
		s.ended()
	})
}

// bridge pairs ergo's loopback sockets with tailnet connections.
type bridge struct {
	n           *Node
	ergoAddr    string       // ergo's loopback listener, once it has registered
	trigger     net.Listener // the dial listener: the loopback listener that ergo's dials reach
	triggerPort uint16

	mu       sync.Mutex
	closed   bool
	arrived  chan struct{}                  // closed and renewed when waiting gains an entry
	waiting  map[string]*session            // accepted, by the loopback address that will reach ergo
	handing  int                            // accepted connections being handed to ergo, not yet waiting
	dialing  int                            // dials under way: routes returned, their connection not yet claimed
	held     map[string]*heldConn           // the dial listener's, unclaimed, by the address they came from
	landed   chan struct{}                  // closed and renewed when held gains an entry
	handed   map[lib.NetReadWriter]*session // handshake done, until Proto.Init
	byName   map[string]*session
	sessions map[*session]struct{}
	loops    map[net.Conn]struct{} // our ends of ergo's loopback sockets, tied or claimed
	wg       sync.WaitGroup
}

// heldConn is a connection to the dial listener that a dial under way may
// claim; nothing is read from it or written to it meanwhile.
type heldConn struct {
	c     net.Conn
	timer *time.Timer // refuses it after claimTimeout
}

func newBridge(n *Node) (*bridge, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("ergonode: loopback listener for ergo's dials: %w", err)
	}
	b := &bridge{
		n: n, trigger: ln, triggerPort: uint16(ln.Addr().(*net.TCPAddr).Port),
		arrived: make(chan struct{}), landed: make(chan struct{}),
		waiting: map[string]*session{}, held: map[string]*heldConn{},
		handed: map[lib.NetReadWriter]*session{}, byName: map[string]*session{},
		sessions: map[*session]struct{}{}, loops: map[net.Conn]struct{}{},
	}
	b.wg.Go(b.triggerLoop)
	return b, nil
}

// triggerLoop accepts the dial listener's connections. ergo's carry
// nothing; each one only ties the lifetime of its tailnet connection to
// ergo's socket, once the dial's handshake has claimed it (claimDial). A
// connection no dial can be waiting for is closed at once; one that comes
// while dials are under way is held, unread, until a dial claims it, the
// dials under way have found theirs, or claimTimeout.
func (b *bridge) triggerLoop() {
	for {
		c, err := b.trigger.Accept()
		if err != nil {
			return
		}
		key := c.RemoteAddr().String()
		b.mu.Lock()
		if b.closed || b.dialing == 0 || len(b.held) >= maxHeld || b.held[key] != nil {
			b.mu.Unlock()
			b.refuseLocal(c)
			continue
		}
		hc := &heldConn{c: c}
		hc.timer = time.AfterFunc(claimTimeout, func() { b.expire(key, hc) })
		b.held[key] = hc
		close(b.landed)
		b.landed = make(chan struct{})
		b.mu.Unlock()
	}
}

// refuseLocal closes a connection to the dial listener that no dial of
// ergo's made.
func (b *bridge) refuseLocal(c net.Conn) {
	c.Close()
	b.n.quietf("ergonode: refused a loopback connection from %v to the dial listener: no dial of ergo's is waiting for it", c.RemoteAddr())
}

// expire refuses a held connection that no dial claimed in time.
func (b *bridge) expire(key string, hc *heldConn) {
	b.mu.Lock()
	if b.held[key] != hc {
		b.mu.Unlock()
		return
	}
	delete(b.held, key)
	b.mu.Unlock()
	b.refuseLocal(hc.c)
}

// dialTicket stands for one dial under way, from the route the registrar
// returns to the handshake's claim of ergo's connection (or
// dialTicketTime, if ergo never dials).
type dialTicket struct {
	b     *bridge
	once  sync.Once
	timer *time.Timer
}

// expectDial records a dial under way, so that the dial listener holds the
// connections that come meanwhile for it to claim.
func (b *bridge) expectDial() (*dialTicket, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, errors.New("ergonode: node stopped")
	}
	b.dialing++
	t := &dialTicket{b: b}
	t.timer = time.AfterFunc(dialTicketTime, t.done)
	return t, nil
}

// done ends the dial: when no other is under way, the connections still
// held are none of ergo's, and are closed.
func (t *dialTicket) done() {
	t.once.Do(func() {
		t.timer.Stop()
		b := t.b
		b.mu.Lock()
		b.dialing--
		var refuse []*heldConn
		if b.dialing == 0 {
			for key, hc := range b.held {
				hc.timer.Stop()
				refuse = append(refuse, hc)
				delete(b.held, key)
			}
		}
		b.mu.Unlock()
		for _, hc := range refuse {
			b.refuseLocal(hc.c)
		}
	})
}

// claimDial takes the dial listener's connection from addr, the address
// ergo dialled from, for the dial of ticket t, which it ends. It waits
// claimTimeout at most for the connection to be accepted.
func (b *bridge) claimDial(addr string, t *dialTicket) (net.Conn, error) {
	defer t.done()
	deadline := time.NewTimer(claimTimeout)
	defer deadline.Stop()
	for {
		b.mu.Lock()
		if b.closed {
			b.mu.Unlock()
			return nil, errors.New("ergonode: node stopped")
		}
		if hc, ok := b.held[addr]; ok {
			hc.timer.Stop()
			delete(b.held, addr)
			b.loops[hc.c] = struct{}{}
			b.mu.Unlock()
			return hc.c, nil
		}
		landed := b.landed
		b.mu.Unlock()
		select {
		case <-landed:
		case <-deadline.C:
			return nil, fmt.Errorf("ergonode: ergo's connection from %s never reached the dial listener", addr)
		}
	}
}

// unclaim closes a claimed connection of the dial listener whose dial
// failed.
func (b *bridge) unclaim(c net.Conn) {
	b.mu.Lock()
	delete(b.loops, c)
	b.mu.Unlock()
	c.Close()
}

// tie starts waiting until ergo closes its end of the loopback connection
// c, which is in b.loops, then closes s, which it adds to the sessions.
// Stopped, it closes both at once and reports false.
func (b *bridge) tie(c net.Conn, s *session, untie func()) bool {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		c.Close()
		s.close()
		return false
	}
	b.loops[c] = struct{}{}
	b.sessions[s] = struct{}{}
	b.wg.Add(1) // under b.mu, so never after close has started to wait
	b.mu.Unlock()
	go func() {
		defer b.wg.Done()
		io.Copy(io.Discard, c) // ergo never writes to it: this waits for its close
		c.Close()
		b.mu.Lock()
		delete(b.loops, c)
		b.mu.Unlock()
		if untie != nil {
			untie()
		}
		b.drop(s)
	}()
	return true
}

// drop closes s and forgets it.
func (b *bridge) drop(s *session) {
	s.close()
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.sessions, s)
	if b.byName[s.name] == s {
		delete(b.byName, s.name)
	}
	s.goneOnce.Do(func() { close(s.gone) })
}

// replaceStale makes way for a new connection from peer name: if a
// connection to an earlier incarnation of it (another creation) is still
// up, which is what a peer killed without a FIN leaves behind, it is
// closed, and replaceStale waits until ergo has let go of it. ergo itself
// would keep the dead connection until its keepalive gives up (60 s) and
// refuse the new one meanwhile; OTP replaces it at once, and so does this.
func (b *bridge) replaceStale(name string, creation uint32) {
	b.mu.Lock()
	old := b.byName[name]
	b.mu.Unlock()
	if old == nil || old.creation == creation {
		return
	}
	b.n.logf("ergonode: %s has restarted (creation %d, was %d); closing its old connection", name, creation, old.creation)
	old.close()
	select {
	case <-old.gone:
	case <-time.After(replaceTimeout):
		b.n.logf("ergonode: ergo still holds the old connection to %s after %v", name, replaceTimeout)
	}
}

// accept hands an admitted tailnet connection to ergo: it dials ergo's
// loopback listener and leaves the connection waiting for ergo's
// handshake to claim it by that dial's address.
func (b *bridge) accept(conn net.Conn, peer carrier.Identity) error {
	b.mu.Lock()
	addr, closed := b.ergoAddr, b.closed
	b.mu.Unlock()
	switch {
	case closed:
		return errors.New("ergonode: node stopped")
	case addr == "":
		return errors.New("ergo's listener is not up")
	}
	b.mu.Lock()
	b.handing++
	b.mu.Unlock()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		b.mu.Lock()
		b.handing--
		b.mu.Unlock()
		return fmt.Errorf("reaching ergo's listener: %w", err)
	}
	s := b.newSession(conn, peer)
	key := c.LocalAddr().String()
	b.mu.Lock()
	b.handing--
	b.waiting[key] = s
	close(b.arrived)
	b.arrived = make(chan struct{})
	b.mu.Unlock()
	untie := func() {
		b.mu.Lock()
		delete(b.waiting, key) // if ergo never claimed it
		b.mu.Unlock()
	}
	if !b.tie(c, s, untie) {
		untie()
		return errors.New("ergonode: node stopped")
	}
	return nil
}

// claim returns the tailnet connection waiting for ergo's loopback
// connection from remote; nil at once if none is on its way, else nil
// after claimTimeout.
func (b *bridge) claim(remote string) *session {
	deadline := time.NewTimer(claimTimeout)
	defer deadline.Stop()
	for {
		b.mu.Lock()
		if s, ok := b.waiting[remote]; ok {
			delete(b.waiting, remote)
			b.mu.Unlock()
			return s
		}
		arrived, none := b.arrived, b.closed || b.handing == 0
		b.mu.Unlock()
		if none {
			return nil
		}
		select {
		case <-arrived:
		case <-deadline.C:
			return nil
		}
	}
}

// handshakeDone records that ergo's socket conn now stands for s.
func (b *bridge) handshakeDone(conn lib.NetReadWriter, s *session, details node.HandshakeDetails) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s.name, s.creation = details.Name, details.Creation
	b.handed[conn] = s
}

// takeHanded returns the session ergo's Proto.Init is about to start on
// conn.
func (b *bridge) takeHanded(conn lib.NetReadWriter) *session {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.handed[conn]
	delete(b.handed, conn)
	if s != nil {
		b.byName[s.name] = s
	}
	return s
}

func (b *bridge) identity(peer string) (carrier.Identity, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	s, ok := b.byName[peer]
	if !ok {
		return carrier.Identity{}, false
	}
	return s.peer, true
}

// close closes every tailnet connection, the dial listener and what it
// holds, and waits for the bridge's goroutines.
func (b *bridge) close() {
	b.mu.Lock()
	b.closed = true
	close(b.arrived)
	b.arrived = make(chan struct{})
	close(b.landed)
	b.landed = make(chan struct{})
	sessions, loops, held := b.sessions, b.loops, b.held
	b.sessions, b.loops, b.held = map[*session]struct{}{}, map[net.Conn]struct{}{}, map[string]*heldConn{}
	b.mu.Unlock()
	b.trigger.Close()
	for _, hc := range held {
		hc.timer.Stop()
		hc.c.Close()
	}
	for s := range sessions {
		s.close()
	}
	// ergo closes its sockets when its connections end; these are closed
	// too, so that a socket ergo kept cannot hold Stop up.
	for c := range loops {
		c.Close()
	}
	b.wg.Wait()
}

// listenHandshake is the Handshake of ergo's (loopback) listener: it runs
// ergo's handshake over the tailnet connection that the loopback
// connection stands for, and refuses any other.
type listenHandshake struct {
	node.Handshake
	inner node.HandshakeInterface
	b     *bridge
}

func (h *listenHandshake) Init(nodename string, creation uint32, flags node.Flags) error {
	return h.inner.Init(nodename, creation, flags)
}

func (h *listenHandshake) Version() node.HandshakeVersion { return h.inner.Version() }

func (h *listenHandshake) Accept(remote net.Addr, conn lib.NetReadWriter, tls bool, cookie string) (node.HandshakeDetails, error) {
	s := h.b.claim(remote.String())
	if s == nil {
		h.b.n.quietf("ergonode: refused a loopback connection from %v: it did not come through the tailnet", remote)
		return node.HandshakeDetails{}, fmt.Errorf("ergonode: %v did not come through the tailnet", remote)
	}
	hc := &handshakeConn{conn: s.tailnet}
	details, err := h.inner.Accept(s.tailnet.RemoteAddr(), hc, false, cookie)
	if err != nil {
		h.b.n.logf("ergonode: handshake with %s (%s) failed: %v", s.peer.Node, s.peer.Addr, err)
		return details, err
	}
	s.leftover = hc.leftover()
	h.b.replaceStale(details.Name, details.Creation)
	h.b.handshakeDone(conn, s, details)
	return details, nil
}

// dialHandshake is the Handshake of one route the registrar resolved: it
// takes ergo's connection to the dial listener, dials the peer's device
// over the tailnet and runs ergo's handshake there.
type dialHandshake struct {
	node.Handshake
	inner  node.HandshakeInterface
	b      *bridge
	ticket *dialTicket
	host   string // the host part of the node name dialled
	at     string // the tailnet address host was resolved to, among the admitted devices
	port   uint16
	peer   string // the node name dialled
}

func (h *dialHandshake) Version() node.HandshakeVersion { return h.inner.Version() }

func (h *dialHandshake) Start(remote net.Addr, conn lib.NetReadWriter, tls bool, cookie string) (node.HandshakeDetails, error) {
	local, ok := conn.(net.Conn)
	if !ok {
		h.ticket.done()
		return node.HandshakeDetails{}, fmt.Errorf("ergonode: ergo dialled with a %T", conn)
	}
	b := h.b
	loop, err := b.claimDial(local.LocalAddr().String(), h.ticket)
	if err != nil {
		b.n.logf("ergonode: not connecting to %s: %v", h.peer, err)
		return node.HandshakeDetails{}, err
	}
	ctx, cancel := context.WithTimeout(b.n.ctx, resolveTimeout)
	defer cancel()
	// The device the registrar found, checked against the policy again
	// once connected.
	tc, peer, err := b.n.host.Dial(ctx, h.at, h.port)
	if err != nil {
		b.unclaim(loop)
		b.n.quietf("ergonode: dialling %s (%s at %s) over the tailnet: %v", h.peer, h.host, h.at, err)
		return node.HandshakeDetails{}, fmt.Errorf("ergonode: dialling %s (%s at %s) over the tailnet: %w", h.peer, h.host, h.at, err)
	}
	s := b.newSession(tc, peer)
	if !b.tie(loop, s, nil) {
		return node.HandshakeDetails{}, errors.New("ergonode: node stopped")
	}
	hc := &handshakeConn{conn: tc}
	details, err := h.inner.Start(tc.RemoteAddr(), hc, false, cookie)
	if err == nil && details.Name != h.peer {
		err = fmt.Errorf("ergonode: %s:%d answered as %q, not %q", h.host, h.port, details.Name, h.peer)
	}
	if err != nil {
		// ergo closes its socket on this error, and the tie closes tc.
		return details, err
	}
	s.leftover = hc.leftover()
	b.handshakeDone(conn, s, details)
	return details, nil
}

// tailnetProto is ergo's distribution protocol, run over the repaired
// tailnet connection instead of ergo's loopback socket.
type tailnetProto struct {
	inner node.ProtoInterface
	b     *bridge
}

func (p *tailnetProto) Init(ctx context.Context, conn lib.NetReadWriter, nodename string, details node.HandshakeDetails) (node.ConnectionInterface, error) {
	s := p.b.takeHanded(conn)
	if s == nil {
		return nil, errors.New("ergonode: a connection that did not come through the tailnet")
	}
	leftover := s.leftover
	if details.Buffer != nil && details.Buffer.Len() > 0 {
		// Bytes ergo's handshake read ahead go back in front, to be repaired.
		leftover = append(append([]byte(nil), details.Buffer.B...), leftover...)
		details.Buffer = nil
	}
	rc := newRepairConn(s.tailnet, leftover, p.b.n.refs, p.b.n.logf)
	return p.inner.Init(ctx, rc, nodename, details)
}

func (p *tailnetProto) Serve(c node.ConnectionInterface, router node.CoreRouter) {
	p.inner.Serve(c, router)
}

func (p *tailnetProto) Terminate(c node.ConnectionInterface) { p.inner.Terminate(c) }

// registrar finds peers through the tailnet EPMD of their hosts. The
// node's own name is published on its tailnet EPMD by Start, once the
// node can answer, rather than when ergo registers.
type registrar struct {
	n         *Node
	handshake node.HandshakeInterface
}

// Register learns the port of ergo's loopback listener.
func (r *registrar) Register(ctx context.Context, nodename string, options node.RegisterOptions) error {
	r.n.bridge.mu.Lock()
	r.n.bridge.ergoAddr = fmt.Sprintf("127.0.0.1:%d", options.Port)
	r.n.bridge.mu.Unlock()
	return nil
}

// Resolve finds the peer's host among the devices the access policy
// admits, asks that device's tailnet EPMD for the peer's port, and returns
// a route whose handshake dials the same device over the tailnet. A host
// that only devices outside the policy answer to is refused
// (*host.NotAllowedError, logged) before a byte is sent to any of them.
func (r *registrar) Resolve(peername string) (node.Route, error) {
	alive, hostPart, ok := strings.Cut(peername, "@")
	if !ok || hostPart == "" {
		return node.Route{}, fmt.Errorf("ergonode: node name %q must look like name@host", peername)
	}
	ctx, cancel := context.WithTimeout(r.n.ctx, resolveTimeout)
	defer cancel()
	h := r.n.host
	ip, _, err := h.Resolve(ctx, hostPart)
	if err != nil {
		r.n.quietf("ergonode: not connecting to %s: %v", peername, err)
		return node.Route{}, fmt.Errorf("ergonode: not connecting to %s: %w", peername, err)
	}
	at := ip.String()
	ep, err := h.PortPlease(ctx, at, alive)
	if err != nil {
		r.n.quietf("ergonode: resolving %s (%s at %s): %v", peername, hostPart, at, err)
		return node.Route{}, fmt.Errorf("ergonode: resolving %s (%s at %s): %w", peername, hostPart, at, err)
	}
	ticket, err := r.n.bridge.expectDial()
	if err != nil {
		return node.Route{}, err
	}
	return node.Route{
		Node: peername,
		Host: "127.0.0.1",
		Port: r.n.bridge.triggerPort,
		Options: node.RouteOptions{Handshake: &dialHandshake{
			inner: r.handshake, b: r.n.bridge, ticket: ticket,
			host: hostPart, at: at, port: ep.Port, peer: peername,
		}},
	}, nil
}

func (r *registrar) RegisterProxy(string, int, node.ProxyFlags) error { return lib.ErrUnsupported }
func (r *registrar) UnregisterProxy(string) error                     { return lib.ErrUnsupported }
func (r *registrar) ResolveProxy(string) (node.ProxyRoute, error) {
	return node.ProxyRoute{}, lib.ErrProxyNoRoute
}
func (r *registrar) Config() (node.RegistrarConfig, error) {
	return node.RegistrarConfig{}, lib.ErrUnsupported
}
func (r *registrar) ConfigItem(string) (etf.Term, error) { return nil, lib.ErrUnsupported }
func (r *registrar) SetConfigUpdateCallback(func(string, etf.Term) error) error {
	return lib.ErrUnsupported
}
