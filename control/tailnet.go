package control

import (
	"fmt"
	"net"

	"github.com/tsdist/tsdist/carrier"
)

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
		c.reply(req.ID, nil, c.errorFor(ctx, err, CodeInternal))
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
	peer, err := c.s.host.Admit(c.ctx, conn, fmt.Sprintf("tailnet port %d", port))
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
	conn, peer, err := c.s.host.Dial(ctx, req.Host, uint16(req.Port))
	if err != nil {
		c.reply(req.ID, nil, c.errorFor(ctx, err, CodeDialFailed))
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
	carried := s.host.Track()
	unregister := func() {
		s.mu.Lock()
		delete(s.bridges, b)
		s.mu.Unlock()
		carried()
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
		err := c.s.host.WatchPeers(c.ctx, func(peers []carrier.Peer) {
			if err := c.send(PeersEvent{Event: EventPeers, Peers: peers}, nil); err != nil && c.ctx.Err() == nil {
				c.s.logf("control: peers event lost: %v", err)
			}
		})
		if c.ctx.Err() == nil {
			c.s.logf("control: no more peers events: %v", err)
		}
	})
}
