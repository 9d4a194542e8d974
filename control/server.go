package control

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tsdist/tsdist/access"
	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/epmd"
	"golang.org/x/sys/unix"
	"tailscale.com/types/logger"
)

// Server limits. A client may have MaxInFlight requests pending at once; a
// client that has not read a message for WriteTimeout is dropped, so one
// stuck client cannot hold the helper's resources.
const (
	MaxInFlight      = 64
	WriteTimeout     = 30 * time.Second
	DefaultDialTime  = 15 * time.Second
	MaxDialTime      = 5 * time.Minute
	controlReadBytes = 64 << 10
)

// Server serves the control protocol for one tailnet node. Every tailnet
// listener, EPMD registration and carried connection belongs to the control
// connection that asked for it: when that connection closes, its listeners
// and registrations go with it, as a node's name leaves a real EPMD when
// the node dies (carried connections, now owned by the client's
// descriptors, live on).
type Server struct {
	node     *carrier.Node
	logf     logger.Logf
	version  string
	registry *epmd.Registry
	epmd     epmd.Client

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	closed    bool
	netLns    map[net.Listener]struct{}
	clients   map[*client]struct{}
	listeners map[int]*tailnetListener // by tailnet port
	bridges   map[*bridge]struct{}
	// lastCarried is when the last carried connection ended.
	lastCarried time.Time
	gate        *access.Gate // who may reach this node; see Admit
}

type tailnetListener struct {
	owner *client
	ln    net.Listener
}

type bridge struct {
	tailnet net.Conn
	near    *net.UnixConn
}

// NewServer returns a Server for node. helperVersion is reported by hello;
// logf receives one line per refused request or dropped connection.
func NewServer(node *carrier.Node, helperVersion string, logf logger.Logf) *Server {
	if logf == nil {
		logf = logger.Discard
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		node:      node,
		logf:      logf,
		version:   helperVersion,
		registry:  epmd.NewRegistry(),
		gate:      access.NewGate(node, logf),
		ctx:       ctx,
		cancel:    cancel,
		netLns:    map[net.Listener]struct{}{},
		clients:   map[*client]struct{}{},
		listeners: map[int]*tailnetListener{},
		bridges:   map[*bridge]struct{}{},
	}
	s.epmd.Dial = node.DialAddr
	return s
}

// Registry is the EPMD registry that register and unregister change: the
// names this helper's EPMD server answers for.
func (s *Server) Registry() *epmd.Registry { return s.registry }

// ErrServerClosed is returned by Serve after Close.
var ErrServerClosed = errors.New("control: server closed")

// Serve accepts control connections on ln (a Unix stream listener) until ln
// fails or the server is closed. It always closes ln.
func (s *Server) Serve(ln *net.UnixListener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.netLns[ln] = struct{}{}
	s.mu.Unlock()
	defer ln.Close()
	for {
		conn, err := ln.AcceptUnix()
		if err != nil {
			if s.ctx.Err() != nil {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("control: accept: %w", err)
		}
		if err := checkPeerUID(conn); err != nil {
			s.logf("control: refused a connection: %v", err)
			conn.Close()
			continue
		}
		c := s.addClient(conn)
		if c == nil {
			conn.Close()
			return ErrServerClosed
		}
		s.wg.Go(c.serve)
	}
}

// checkPeerUID admits only processes of this helper's own user: the control
// socket hands out this node's tailnet identity, so its 0600 mode and
// private directory are checked again here, with the kernel's word for who
// connected (SO_PEERCRED), in case either was loosened.
func checkPeerUID(conn *net.UnixConn) error {
	raw, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if credErr != nil {
		return fmt.Errorf("no peer credentials: %w", credErr)
	}
	if me := os.Getuid(); int(cred.Uid) != me {
		return fmt.Errorf("pid %d runs as uid %d, not this helper's uid %d", cred.Pid, cred.Uid, me)
	}
	return nil
}

func (s *Server) addClient(conn *net.UnixConn) *client {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	ctx, cancel := context.WithCancel(s.ctx)
	c := &client{s: s, conn: conn, ctx: ctx, cancel: cancel, inflight: make(chan struct{}, MaxInFlight)}
	s.clients[c] = struct{}{}
	return c
}

// Close stops serving: it closes the control listeners, every control
// connection, every tailnet listener and every carried connection, and waits
// for all of the server's goroutines to finish. The node is left running.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	s.cancel()
	for ln := range s.netLns {
		ln.Close()
	}
	for c := range s.clients {
		c.conn.Close()
	}
	for _, l := range s.listeners {
		l.ln.Close()
	}
	for b := range s.bridges {
		b.tailnet.Close()
		b.near.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

// LastCarried reports when a carried connection last ended: now, while
// some are still open. A connection's closing packets leave the node's
// network stack shortly after it ends, so a helper that is shutting down
// waits a moment after this before it closes the node.
func (s *Server) LastCarried() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.bridges) > 0 {
		return time.Now()
	}
	return s.lastCarried
}

// Stats reports the helper's resource use.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	st := Stats{Clients: len(s.clients), Listeners: len(s.listeners), Bridges: len(s.bridges)}
	s.mu.Unlock()
	st.Registrations = len(s.registry.Names())
	st.Goroutines = runtime.NumGoroutine()
	if ents, err := os.ReadDir("/proc/self/fd"); err == nil {
		st.OpenFDs = len(ents) - 1 // ReadDir's own descriptor
	}
	return st
}

// client is one control connection.
type client struct {
	s        *Server
	conn     *net.UnixConn
	ctx      context.Context // done when the connection is gone
	cancel   context.CancelFunc
	inflight chan struct{}
	wmu      sync.Mutex

	watching atomic.Bool // watch_peers was asked for

	regMu  sync.Mutex
	regs   map[string]*epmd.Registration // by name
	closed bool                          // regMu; no registration after close
}

func (c *client) serve() {
	defer c.close()
	r := bufio.NewReaderSize(c.conn, controlReadBytes)
	hello := false
	for {
		payload, err := ReadFrame(r, MaxRequestSize)
		if errors.Is(err, ErrFrameTooLarge) {
			c.s.logf("control: dropping client: %v", err)
			c.reply(0, nil, &Error{Code: CodeTooLarge, Message: err.Error()})
			return
		}
		if errors.Is(err, ErrEmptyFrame) {
			c.reply(0, nil, &Error{Code: CodeBadRequest, Message: "empty frame"})
			continue
		}
		if err != nil {
			return // end of stream or a broken connection
		}
		req, perr := ParseRequest(payload)
		switch {
		case perr != nil:
			c.s.logf("control: bad request: %s", perr.Message)
			c.reply(req.ID, nil, perr)
		case req.Op == OpHello:
			hello = c.hello(req) || hello // a failed repeat keeps the first
		case !hello:
			c.reply(req.ID, nil, &Error{Code: CodeHelloRequired, Message: "the first request must be hello"})
		default:
			select {
			case c.inflight <- struct{}{}:
				c.s.wg.Go(func() {
					defer func() { <-c.inflight }()
					c.handle(req)
				})
			default:
				c.reply(req.ID, nil, &Error{Code: CodeBusy, Message: strconv.Itoa(MaxInFlight) + " requests already in flight"})
			}
		}
	}
}

// close releases everything the connection owns but its carried
// connections, which belong to the descriptors the client received.
func (c *client) close() {
	c.cancel()
	c.conn.Close()
	s := c.s
	s.mu.Lock()
	delete(s.clients, c)
	for port, l := range s.listeners {
		if l.owner == c {
			l.ln.Close()
			delete(s.listeners, port)
		}
	}
	s.mu.Unlock()
	c.regMu.Lock()
	c.closed = true
	for _, reg := range c.regs {
		reg.Close()
	}
	c.regs = nil
	c.regMu.Unlock()
}

func (c *client) hello(req Request) bool {
	if req.Version != Version {
		c.reply(req.ID, nil, &Error{Code: CodeVersion, Message: fmt.Sprintf("version %d requested; this helper speaks version %d", req.Version, Version)})
		return false
	}
	state := "Unknown"
	if st, err := c.s.node.Status(c.ctx); err == nil {
		state = st.State
	}
	c.reply(req.ID, HelloResult{
		Version:   Version,
		Helper:    c.s.version,
		Hostname:  c.s.node.Hostname(),
		State:     state,
		LocalOnly: carrier.KeepsToLoopback(),
		Policy:    c.s.Policy().String(),
	}, nil)
	return true
}

func (c *client) handle(req Request) {
	switch req.Op {
	case OpStatus:
		st, err := c.s.node.Status(c.ctx)
		c.replyErr(req.ID, st, err)
	case OpStats:
		c.reply(req.ID, c.s.Stats(), nil)
	case OpWhoIs:
		if req.Addr == "" {
			c.reply(req.ID, nil, &Error{Code: CodeBadRequest, Message: `whois needs "addr"`})
			return
		}
		ctx, cancel := c.requestContext(req)
		defer cancel()
		if !c.waitRunning(req.ID, ctx) {
			return
		}
		id, err := c.s.node.WhoIs(ctx, req.Addr)
		c.replyErr(req.ID, id, err)
	case OpListen:
		c.listen(req)
	case OpUnlisten:
		c.unlisten(req)
	case OpDial:
		c.dial(req)
	case OpRegister:
		c.register(req)
	case OpUnregister:
		c.unregister(req)
	case OpPortPlease:
		c.portPlease(req)
	case OpNames:
		c.names(req)
	case OpWatchPeers:
		c.watchPeers(req)
	case OpSetPolicy:
		p, err := access.Parse(req.Rules)
		if err != nil {
			c.reply(req.ID, nil, &Error{Code: CodeBadRequest, Message: err.Error()})
			return
		}
		c.s.SetPolicy(p)
		c.reply(req.ID, PolicyResult{Policy: p.String()}, nil)
	default:
		c.reply(req.ID, nil, &Error{Code: CodeUnknownOp, Message: fmt.Sprintf("unknown op %q", req.Op)})
	}
}

// waitRunning waits for the node to be on the tailnet, answering the request
// with an error and returning false if ctx ends first.
func (c *client) waitRunning(id uint64, ctx context.Context) bool {
	select {
	case <-c.s.node.Running():
		return true
	case <-ctx.Done():
		if c.ctx.Err() == nil {
			c.reply(id, nil, &Error{Code: CodeNotRunning, Message: c.s.node.Hostname() + " did not reach the Running state in time"})
		}
		return false
	}
}

// requestContext is the context of a request that waits on the tailnet: it
// ends with the connection, or after the request's timeout_ms (default
// DefaultDialTime, at most MaxDialTime).
func (c *client) requestContext(req Request) (context.Context, context.CancelFunc) {
	limit := DefaultDialTime
	if req.TimeoutMS > 0 {
		limit = MaxDialTime
		if int64(req.TimeoutMS) < MaxDialTime.Milliseconds() {
			limit = time.Duration(req.TimeoutMS) * time.Millisecond
		}
	}
	return context.WithTimeout(c.ctx, limit)
}

func (c *client) listen(req Request) {
	ctx, cancel := c.requestContext(req)
	defer cancel()
	if !c.waitRunning(req.ID, ctx) {
		return
	}
	s := c.s
	s.mu.Lock()
	if _, taken := s.listeners[req.Port]; taken && req.Port != 0 {
		s.mu.Unlock()
		c.reply(req.ID, nil, &Error{Code: CodePortInUse, Message: fmt.Sprintf("tailnet port %d is already listened on through this helper", req.Port)})
		return
	}
	s.mu.Unlock()
	ln, err := s.node.Listen(uint16(req.Port))
	if err != nil {
		code := CodeInternal
		if strings.Contains(err.Error(), "already open") || strings.Contains(err.Error(), "no available port") {
			code = CodePortInUse
		}
		c.reply(req.ID, nil, &Error{Code: code, Message: err.Error()})
		return
	}
	port := req.Port
	if ap, err := carrier.AddrPort(ln.Addr().String()); err == nil {
		port = int(ap)
	}
	s.mu.Lock()
	if s.closed || c.ctx.Err() != nil {
		s.mu.Unlock()
		ln.Close()
		return
	}
	s.listeners[port] = &tailnetListener{owner: c, ln: ln}
	s.mu.Unlock()
	// The answer goes first, so no accept event precedes it.
	c.reply(req.ID, ListenResult{Port: port}, nil)
	s.wg.Go(func() { c.acceptLoop(ln, port) })
}

func (c *client) unlisten(req Request) {
	s := c.s
	s.mu.Lock()
	l, ok := s.listeners[req.Port]
	if ok && l.owner == c {
		delete(s.listeners, req.Port)
	}
	s.mu.Unlock()
	if !ok || l.owner != c {
		c.reply(req.ID, nil, &Error{Code: CodeNotListening, Message: fmt.Sprintf("this client does not listen on tailnet port %d", req.Port)})
		return
	}
	l.ln.Close()
	c.reply(req.ID, struct{}{}, nil)
}

func (c *client) acceptLoop(ln net.Listener, port int) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			return // closed by unlisten, the client going away, or Close
		}
		c.s.wg.Go(func() { c.deliver(conn, port) })
	}
}

// deliver hands an accepted tailnet connection to the client.
func (c *client) deliver(conn net.Conn, port int) {
	peer, err := c.s.Admit(c.ctx, conn, fmt.Sprintf("tailnet port %d", port))
	if err != nil {
		conn.Close()
		return
	}
	ev := Event{Event: EventAccept, FD: true, ListenerPort: port, Peer: &peer}
	if err := c.carry(conn, ev); err != nil {
		c.s.logf("control: accepted connection from %s (%s) not delivered: %v", peer.Node, peer.Addr, err)
	}
}

func (c *client) dial(req Request) {
	if req.Host == "" || req.Port == 0 {
		c.reply(req.ID, nil, &Error{Code: CodeBadRequest, Message: `dial needs "host" and a non-zero "port"`})
		return
	}
	ctx, cancel := c.requestContext(req)
	defer cancel()
	if !c.waitRunning(req.ID, ctx) {
		return
	}
	timedOut := func() bool { return ctx.Err() != nil && c.ctx.Err() == nil }
	conn, err := c.s.node.Dial(ctx, req.Host, uint16(req.Port))
	if err != nil {
		switch {
		case errors.Is(err, carrier.ErrUnknownHost):
			c.reply(req.ID, nil, &Error{Code: CodeUnknownHost, Message: err.Error()})
		case timedOut():
			c.reply(req.ID, nil, &Error{Code: CodeTimeout, Message: fmt.Sprintf("dial %s:%d: no connection in time: %v", req.Host, req.Port, err)})
		default:
			c.reply(req.ID, nil, &Error{Code: CodeDialFailed, Message: err.Error()})
		}
		return
	}
	peer, err := c.s.node.WhoIs(ctx, conn.RemoteAddr().String())
	if err != nil {
		conn.Close()
		code := CodeDialFailed
		if timedOut() {
			code = CodeTimeout
		}
		c.reply(req.ID, nil, &Error{Code: code, Message: fmt.Sprintf("dial %s:%d: connected to %v, but found no tailnet identity for it: %v", req.Host, req.Port, conn.RemoteAddr(), err)})
		return
	}
	resp := Response{ID: req.ID, OK: true, FD: true, Result: mustJSON(DialResult{Peer: peer})}
	if err := c.carry(conn, resp); err != nil {
		c.s.logf("control: dialled connection to %s not delivered: %v", peer.Node, err)
	}
}

// carry bridges conn to a new socketpair, sends msg with the far end's
// descriptor to the client and starts splicing in a goroutine of its own
// (so a dial's in-flight slot is free again once it is answered). If the
// message cannot be sent, everything is closed.
func (c *client) carry(conn net.Conn, msg any) error {
	near, far, err := carrier.Socketpair()
	if err != nil {
		conn.Close()
		return err
	}
	b := &bridge{tailnet: conn, near: near}
	s := c.s
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		conn.Close()
		near.Close()
		far.Close()
		return ErrServerClosed
	}
	s.bridges[b] = struct{}{}
	s.mu.Unlock()
	unregister := func() {
		s.mu.Lock()
		delete(s.bridges, b)
		s.lastCarried = time.Now()
		s.mu.Unlock()
	}
	err = c.send(msg, far)
	far.Close() // the client has its own copy now, or never will
	if err != nil {
		conn.Close()
		near.Close()
		unregister()
		return err
	}
	s.wg.Go(func() {
		defer unregister()
		carrier.Splice(conn, near)
	})
	return nil
}

func mustJSON(v any) json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("control: marshal %T: %v", v, err))
	}
	return b
}

// replyErr answers with result, or with err classified into an error code.
func (c *client) replyErr(id uint64, result any, err error) {
	if err == nil {
		c.reply(id, result, nil)
		return
	}
	code := CodeInternal
	switch {
	case errors.Is(err, carrier.ErrUnknownHost):
		code = CodeUnknownHost
	case errors.Is(err, carrier.ErrNotUp):
		code = CodeNotRunning
	}
	c.reply(id, nil, &Error{Code: code, Message: err.Error()})
}

func (c *client) reply(id uint64, result any, e *Error) {
	resp := Response{ID: id, OK: e == nil, Error: e}
	if e == nil {
		resp.Result = mustJSON(result)
	}
	if err := c.send(resp, nil); err != nil && c.ctx.Err() == nil {
		c.s.logf("control: reply to request %d lost: %v", id, err)
	}
}

// send writes one message, with fd attached if non-nil. A client that does
// not take the message within WriteTimeout is disconnected.
func (c *client) send(msg any, fd *os.File) error {
	frame := AppendFrame(nil, mustJSON(msg))
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.conn.SetWriteDeadline(time.Now().Add(WriteTimeout))
	var err error
	if fd != nil {
		err = carrier.SendFD(c.conn, frame, fd)
	} else {
		_, err = c.conn.Write(frame)
	}
	if err != nil {
		c.conn.Close() // a half-written frame leaves the stream unusable
	}
	return err
}

// register adds a node name to this helper's EPMD for as long as the
// control connection lives.
func (c *client) register(req Request) {
	n := epmd.Node{
		Name:           req.Name,
		Port:           uint16(req.Port),
		Type:           epmd.NodeTypeNormal,
		Protocol:       epmd.ProtocolTCP,
		HighestVersion: uint16(cmp.Or(req.HighestVersion, DefaultHighestVersion)),
		LowestVersion:  uint16(cmp.Or(req.LowestVersion, DefaultLowestVersion)),
		Extra:          req.Extra,
	}
	if req.Hidden {
		n.Type = epmd.NodeTypeHidden
	}
	if err := epmd.ValidName(n.Name); err != nil {
		c.reply(req.ID, nil, &Error{Code: CodeInvalidName, Message: err.Error()})
		return
	}
	if n.Port == 0 || len(n.Extra) > epmd.MaxExtraLen || n.LowestVersion > n.HighestVersion {
		c.reply(req.ID, nil, &Error{Code: CodeBadRequest, Message: fmt.Sprintf(`register needs a non-zero "port", lowest_version <= highest_version and at most %d bytes of "extra"`, epmd.MaxExtraLen)})
		return
	}
	c.regMu.Lock()
	defer c.regMu.Unlock()
	if c.closed {
		return
	}
	reg, err := c.s.registry.Register(n)
	switch {
	case errors.Is(err, epmd.ErrNameTaken):
		c.reply(req.ID, nil, &Error{Code: CodeNameTaken, Message: fmt.Sprintf("%s@%s is already registered by a live node: %v", n.Name, c.s.node.Hostname(), err)})
		return
	case err != nil:
		c.reply(req.ID, nil, &Error{Code: CodeInternal, Message: err.Error()})
		return
	}
	if c.regs == nil {
		c.regs = make(map[string]*epmd.Registration)
	}
	c.regs[n.Name] = reg
	c.reply(req.ID, RegisterResult{Creation: reg.Creation}, nil)
}

func (c *client) unregister(req Request) {
	c.regMu.Lock()
	reg, ok := c.regs[req.Name]
	delete(c.regs, req.Name)
	c.regMu.Unlock()
	if !ok {
		c.reply(req.ID, nil, &Error{Code: CodeNotRegistered, Message: fmt.Sprintf("this client has not registered %q", req.Name)})
		return
	}
	reg.Close()
	c.reply(req.ID, struct{}{}, nil)
}

// portPlease asks the EPMD of a tailnet host, over the tailnet, for a node's
// registration. A lookup on this helper's own host goes over the tailnet
// too, so it sees exactly what peers see.
func (c *client) portPlease(req Request) {
	if req.Host == "" {
		c.reply(req.ID, nil, &Error{Code: CodeBadRequest, Message: `port_please needs "host" and "name"`})
		return
	}
	if err := epmd.ValidName(req.Name); err != nil {
		c.reply(req.ID, nil, &Error{Code: CodeInvalidName, Message: err.Error()})
		return
	}
	ctx, cancel := c.requestContext(req)
	defer cancel()
	if !c.waitRunning(req.ID, ctx) {
		return
	}
	n, err := c.s.epmd.PortPlease(ctx, req.Host, req.Name)
	if err != nil {
		c.reply(req.ID, nil, c.epmdError(ctx, req, err))
		return
	}
	if n.Extra == nil {
		n.Extra = []byte{} // "" rather than null in JSON
	}
	c.reply(req.ID, NodeInfo{
		Name:           n.Name,
		Host:           req.Host,
		Port:           int(n.Port),
		Hidden:         n.Type == epmd.NodeTypeHidden,
		Protocol:       int(n.Protocol),
		HighestVersion: int(n.HighestVersion),
		LowestVersion:  int(n.LowestVersion),
		Extra:          n.Extra,
	}, nil)
}

// names lists the nodes registered on the EPMD of a tailnet host.
func (c *client) names(req Request) {
	if req.Host == "" {
		c.reply(req.ID, nil, &Error{Code: CodeBadRequest, Message: `names needs "host"`})
		return
	}
	ctx, cancel := c.requestContext(req)
	defer cancel()
	if !c.waitRunning(req.ID, ctx) {
		return
	}
	names, err := c.s.epmd.Names(ctx, req.Host)
	if err != nil {
		c.reply(req.ID, nil, c.epmdError(ctx, req, err))
		return
	}
	c.reply(req.ID, NamesResult{Host: req.Host, Names: names}, nil)
}

// epmdError maps a failed EPMD lookup to its error code.
func (c *client) epmdError(ctx context.Context, req Request, err error) *Error {
	switch {
	case errors.Is(err, carrier.ErrUnknownHost):
		return &Error{Code: CodeUnknownHost, Message: err.Error()}
	case errors.Is(err, epmd.ErrNotRegistered):
		return &Error{Code: CodeNotRegistered, Message: fmt.Sprintf("no node %q is registered on %s", req.Name, req.Host)}
	case ctx.Err() != nil && c.ctx.Err() == nil:
		return &Error{Code: CodeTimeout, Message: fmt.Sprintf("%s on %s: no answer in time: %v", req.Op, req.Host, err)}
	}
	return &Error{Code: CodeEPMDFailed, Message: err.Error()}
}

// watchPeers starts sending peers events to this client: the current peers
// at once (after the response), then on every change, for as long as the
// connection lasts. Asking again changes nothing.
func (c *client) watchPeers(req Request) {
	if c.watching.Swap(true) {
		c.reply(req.ID, struct{}{}, nil)
		return
	}
	ctx, cancel := c.requestContext(req)
	running := c.waitRunning(req.ID, ctx)
	cancel()
	if !running {
		c.watching.Store(false)
		return
	}
	c.reply(req.ID, struct{}{}, nil)
	c.s.wg.Go(func() {
		err := c.s.node.WatchPeers(c.ctx, func(peers []carrier.Peer) {
			if err := c.send(PeersEvent{Event: EventPeers, Peers: peers}, nil); err != nil && c.ctx.Err() == nil {
				c.s.logf("control: peers event lost: %v", err)
			}
		})
		if c.ctx.Err() == nil {
			c.s.logf("control: no more peers events: %v", err)
		}
	})
}
