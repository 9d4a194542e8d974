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
// connection that its loopback connection stands for. The adapter dials
// ergo's listener and records the pair at once, so only a loopback
// connection from someone else ever waits this long.
const claimTimeout = 2 * time.Second

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
	once     sync.Once
	gone     chan struct{} // closed once ergo has let go of the connection
	goneOnce sync.Once
}

func newSession(tailnet net.Conn, peer carrier.Identity) *session {
	return &session{tailnet: tailnet, peer: peer, gone: make(chan struct{})}
}

func (s *session) close() { s.once.Do(func() { s.tailnet.Close() }) }

// bridge pairs ergo's loopback sockets with tailnet connections.
type bridge struct {
	n           *Node
	ergoAddr    string       // ergo's loopback listener, once it has registered
	trigger     net.Listener // the loopback listener that ergo's dials reach
	triggerPort uint16

	mu       sync.Mutex
	closed   bool
	arrived  chan struct{}                  // closed and renewed when waiting gains an entry
	waiting  map[string]*session            // accepted, by the loopback address that will reach ergo
	byDial   map[string]*session            // dialled, by ergo's loopback address
	handed   map[lib.NetReadWriter]*session // handshake done, until Proto.Init
	byName   map[string]*session
	sessions map[*session]struct{}
	loops    map[net.Conn]struct{} // our ends of ergo's loopback sockets, tied
	wg       sync.WaitGroup
}

func newBridge(n *Node) (*bridge, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("ergonode: loopback listener for ergo's dials: %w", err)
	}
	b := &bridge{
		n: n, trigger: ln, triggerPort: uint16(ln.Addr().(*net.TCPAddr).Port), arrived: make(chan struct{}),
		waiting: map[string]*session{}, byDial: map[string]*session{},
		handed: map[lib.NetReadWriter]*session{}, byName: map[string]*session{},
		sessions: map[*session]struct{}{}, loops: map[net.Conn]struct{}{},
	}
	b.wg.Go(b.triggerLoop)
	return b, nil
}

// triggerLoop accepts ergo's loopback dials. They carry nothing; each one
// only ties the lifetime of its tailnet connection to ergo's socket.
func (b *bridge) triggerLoop() {
	for {
		c, err := b.trigger.Accept()
		if err != nil {
			return
		}
		b.wg.Go(func() {
			b.tie(c, func() *session {
				b.mu.Lock()
				defer b.mu.Unlock()
				s := b.byDial[c.RemoteAddr().String()]
				delete(b.byDial, c.RemoteAddr().String())
				return s
			})
		})
	}
}

// tie waits until ergo closes its end of the loopback connection c, then
// closes the tailnet connection that find returns.
func (b *bridge) tie(c net.Conn, find func() *session) {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		c.Close()
		return
	}
	b.loops[c] = struct{}{}
	b.mu.Unlock()
	io.Copy(io.Discard, c) // ergo never writes to it: this waits for its close
	c.Close()
	b.mu.Lock()
	delete(b.loops, c)
	b.mu.Unlock()
	if s := find(); s != nil {
		b.drop(s)
	}
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

func (b *bridge) add(s *session) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return errors.New("ergonode: node stopped")
	}
	b.sessions[s] = struct{}{}
	return nil
}

// accept hands an admitted tailnet connection to ergo: it dials ergo's
// loopback listener and leaves the connection waiting for ergo's
// handshake to claim it by that dial's address.
func (b *bridge) accept(conn net.Conn, peer carrier.Identity) error {
	b.mu.Lock()
	addr := b.ergoAddr
	b.mu.Unlock()
	if addr == "" {
		return errors.New("ergo's listener is not up")
	}
	s := newSession(conn, peer)
	if err := b.add(s); err != nil {
		return err
	}
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		b.drop(s)
		return fmt.Errorf("reaching ergo's listener: %w", err)
	}
	key := c.LocalAddr().String()
	b.mu.Lock()
	b.waiting[key] = s
	close(b.arrived)
	b.arrived = make(chan struct{})
	b.mu.Unlock()
	b.wg.Go(func() {
		b.tie(c, func() *session {
			b.mu.Lock()
			defer b.mu.Unlock()
			delete(b.waiting, key) // if ergo never claimed it
			return s
		})
	})
	return nil
}

// claim returns the tailnet connection waiting for ergo's loopback
// connection from remote, or nil after claimTimeout.
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
		arrived, closed := b.arrived, b.closed
		b.mu.Unlock()
		if closed {
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

// close closes every tailnet connection and the trigger listener, and
// waits for the bridge's goroutines. It returns how many connections it
// closed.
func (b *bridge) close() int {
	b.mu.Lock()
	b.closed = true
	close(b.arrived)
	b.arrived = make(chan struct{})
	sessions, loops := b.sessions, b.loops
	b.sessions, b.loops = map[*session]struct{}{}, map[net.Conn]struct{}{}
	b.mu.Unlock()
	b.trigger.Close()
	for s := range sessions {
		s.close()
	}
	// ergo closes its sockets when its connections end; these are closed
	// too, so that a socket ergo kept cannot hold Stop up.
	for c := range loops {
		c.Close()
	}
	b.wg.Wait()
	return len(sessions)
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
		h.b.n.logf("ergonode: refused a loopback connection from %v: it did not come through the tailnet", remote)
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
// dials the peer over the tailnet and runs ergo's handshake there.
type dialHandshake struct {
	node.Handshake
	inner node.HandshakeInterface
	b     *bridge
	host  string
	port  uint16
	peer  string // the node name dialled
}

func (h *dialHandshake) Version() node.HandshakeVersion { return h.inner.Version() }

func (h *dialHandshake) Start(remote net.Addr, conn lib.NetReadWriter, tls bool, cookie string) (node.HandshakeDetails, error) {
	local, ok := conn.(net.Conn)
	if !ok {
		return node.HandshakeDetails{}, fmt.Errorf("ergonode: ergo dialled with a %T", conn)
	}
	ctx, cancel := context.WithTimeout(h.b.n.ctx, resolveTimeout)
	defer cancel()
	tc, err := h.b.n.tailnet.Dial(ctx, h.host, h.port)
	if err != nil {
		return node.HandshakeDetails{}, fmt.Errorf("ergonode: dialling %s over the tailnet: %w", h.peer, err)
	}
	s := newSession(tc, carrier.Identity{})
	if id, err := h.b.n.tailnet.WhoIs(ctx, tc.RemoteAddr().String()); err == nil {
		s.peer = id
	}
	if err := h.b.add(s); err != nil {
		tc.Close()
		return node.HandshakeDetails{}, err
	}
	h.b.mu.Lock()
	h.b.byDial[local.LocalAddr().String()] = s
	h.b.mu.Unlock()
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
	h.b.handshakeDone(conn, s, details)
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

// Resolve asks the EPMD of the peer's tailnet host for its port, and
// returns a route whose handshake dials it over the tailnet.
func (r *registrar) Resolve(peername string) (node.Route, error) {
	alive, host, ok := strings.Cut(peername, "@")
	if !ok || host == "" {
		return node.Route{}, fmt.Errorf("ergonode: node name %q must look like name@host", peername)
	}
	ctx, cancel := context.WithTimeout(r.n.ctx, resolveTimeout)
	defer cancel()
	ep, err := r.n.epmdCli.PortPlease(ctx, host, alive)
	if err != nil {
		return node.Route{}, fmt.Errorf("ergonode: resolving %s: %w", peername, err)
	}
	return node.Route{
		Node: peername,
		Host: "127.0.0.1",
		Port: r.n.bridge.triggerPort,
		Options: node.RouteOptions{Handshake: &dialHandshake{
			inner: r.handshake, b: r.n.bridge, host: host, port: ep.Port, peer: peername,
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
