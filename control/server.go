package control

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/host"
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
	host    *host.Host
	node    *carrier.Node // host's
	logf    logger.Logf
	version string

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	closed    bool
	netLns    map[net.Listener]struct{}
	clients   map[*client]struct{}
	listeners map[int]*tailnetListener // by tailnet port
	bridges   map[*bridge]struct{}
}

type tailnetListener struct {
	owner *client
	ln    net.Listener
}

type bridge struct {
	tailnet net.Conn
	near    *net.UnixConn
}

// NewServer returns a Server for the device h: its tailnet node, EPMD
// registry and access policy. helperVersion is reported by hello; logf
// receives one line per refused request or dropped connection.
func NewServer(h *host.Host, helperVersion string, logf logger.Logf) *Server {
	if logf == nil {
		logf = logger.Discard
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{
		host:      h,
		node:      h.Node(),
		logf:      logf,
		version:   helperVersion,
		ctx:       ctx,
		cancel:    cancel,
		netLns:    map[net.Listener]struct{}{},
		clients:   map[*client]struct{}{},
		listeners: map[int]*tailnetListener{},
		bridges:   map[*bridge]struct{}{},
	}
}

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
// for all of the server's goroutines to finish. The host is left running
// (its Close then lets the carried connections' last packets out).
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

// Stats reports the helper's resource use.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	st := Stats{Clients: len(s.clients), Listeners: len(s.listeners), Bridges: len(s.bridges)}
	s.mu.Unlock()
	st.Registrations = len(s.host.Registry().Names())
	st.Goroutines = runtime.NumGoroutine()
	if ents, err := os.ReadDir("/proc/self/fd"); err == nil {
		st.OpenFDs = len(ents) - 1 // ReadDir's own descriptor
	}
	return st
}
