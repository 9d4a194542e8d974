package epmd

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Defaults for the zero values of [Server]'s limits.
const (
	DefaultRequestTimeout = 5 * time.Second
	DefaultWriteTimeout   = 5 * time.Second
	DefaultMaxConns       = 256
	DefaultMaxConnsPerIP  = 16
)

// Server answers the EPMD protocol on the listeners given to Serve.
//
// Every request gets a bounded amount of memory (MaxRequestLen bytes) and
// time (RequestTimeout to arrive, WriteTimeout for the answer to leave); a
// malformed one closes its connection without an answer, as real EPMD
// does, and never touches the registry or another connection. A
// well-formed ALIVE2_REQ that cannot be registered (not allowed, name
// taken or invalid) is answered with an error result, as real EPMD does.
// KILL_REQ, STOP_REQ and DUMP_REQ are never honoured: KILL_REQ and
// STOP_REQ are answered "NO", DUMP_REQ is closed unanswered.
type Server struct {
	// Registry holds the names the server answers for. Required.
	Registry *Registry

	// AllowRegister reports whether the peer at remote may register a name
	// with ALIVE2_REQ; the registration then lasts as long as that
	// connection. nil refuses everyone, which is right for a server on the
	// tailnet: there, names are registered through the helper's control
	// socket, never by a peer.
	AllowRegister func(remote net.Addr) bool

	// Port is the port reported in NAMES answers. Zero means DefaultPort.
	Port uint16

	// RequestTimeout bounds how long a connection may take to send its
	// request. Zero means DefaultRequestTimeout.
	RequestTimeout time.Duration
	// WriteTimeout bounds how long an answer may take to leave. Zero means
	// DefaultWriteTimeout.
	WriteTimeout time.Duration
	// MaxConns bounds the connections served at once, registrations
	// included; one more is closed at once. Zero means DefaultMaxConns.
	MaxConns int
	// MaxConnsPerIP bounds the connections served at once from one remote
	// IP address, so that one peer cannot take every slot from the others.
	// Zero means DefaultMaxConnsPerIP.
	MaxConnsPerIP int

	// Logf, if set, receives one line per refused or malformed request.
	Logf func(format string, args ...any)

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]struct{}
	perIP     map[string]int
	closed    bool
	doneCh    chan struct{} // closed by Close; made on demand
	// wg counts the goroutines serving connections. It is added to under
	// mu, in addConn, so that no Add can race with Close's Wait.
	wg sync.WaitGroup
}

// ErrServerClosed is returned by Serve after Close.
var ErrServerClosed = errors.New("epmd: server closed")

// Serve accepts connections on ln and answers them until ln fails or the
// server is closed. It closes ln when it returns.
func (s *Server) Serve(ln net.Listener) error {
	if !s.track(ln) {
		ln.Close()
		return ErrServerClosed
	}
	defer s.untrack(ln)
	var backoff time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return ErrServerClosed
			}
			if !isTemporary(err) {
				return err
			}
			// Out of descriptors (EMFILE, ENFILE), a connection aborted
			// before it was accepted: wait a little and try again, as
			// net/http does, rather than stop serving every other peer.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.logf("epmd: accept: %v; retrying in %v", err, backoff)
			if !s.sleep(backoff) {
				return ErrServerClosed
			}
			continue
		}
		backoff = 0
		if why := s.addConn(conn); why != "" {
			s.logf("epmd: refusing %v: %s", conn.RemoteAddr(), why)
			conn.Close()
			continue
		}
		go func() {
			defer s.wg.Done()
			defer s.removeConn(conn)
			s.serveConn(conn)
		}()
	}
}

// isTemporary reports whether an Accept error is worth retrying.
func isTemporary(err error) bool {
	var te interface {
		Timeout() bool
		Temporary() bool
	}
	return errors.As(err, &te) && (te.Timeout() || te.Temporary())
}

// sleep waits for d, or until the server closes (then it reports false).
func (s *Server) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return !s.isClosed()
	case <-s.done():
		return false
	}
}

// done is closed when the server is.
func (s *Server) done() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.doneCh == nil {
		s.doneCh = make(chan struct{})
		if s.closed {
			close(s.doneCh)
		}
	}
	return s.doneCh
}

// Close stops every Serve, closes every connection (ending the
// registrations they hold) and waits for their goroutines to finish.
func (s *Server) Close() error {
	s.mu.Lock()
	if !s.closed && s.doneCh != nil {
		close(s.doneCh)
	}
	s.closed = true
	for ln := range s.listeners {
		ln.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

func (s *Server) serveConn(conn net.Conn) {
	conn.SetReadDeadline(time.Now().Add(s.requestTimeout()))
	body, err := readRequest(conn)
	if err != nil {
		if !errors.Is(err, io.EOF) {
			s.logf("epmd: %v: %v", conn.RemoteAddr(), err)
		}
		return
	}
	req, err := parseRequest(body)
	if err != nil {
		s.logf("epmd: %v: %v", conn.RemoteAddr(), err)
		return
	}
	switch req := req.(type) {
	case alive2Request:
		s.register(conn, req.node)
	case portPleaseRequest:
		n, ok := s.Registry.Lookup(req.name)
		if ok {
			s.reply(conn, appendPort2Response(nil, &n))
		} else {
			s.reply(conn, appendPort2Response(nil, nil))
		}
	case namesRequest:
		s.reply(conn, appendNamesResponse(nil, uint32(s.port()), s.Registry.Names()))
	case refusedRequest:
		s.logf("epmd: %v: refused %s: never honoured here", conn.RemoteAddr(), req.name())
		if req.t != tagDumpReq {
			s.reply(conn, []byte("NO"))
		}
	}
}

// register serves an ALIVE2_REQ: the registration lives until the peer
// closes the connection (or the server closes).
func (s *Server) register(conn net.Conn, n Node) {
	if s.AllowRegister == nil || !s.AllowRegister(conn.RemoteAddr()) {
		s.logf("epmd: %v: refused ALIVE2_REQ for %q: registration is not allowed from there", conn.RemoteAddr(), n.Name)
		s.reply(conn, appendAlive2Response(nil, n.HighestVersion, 1, 0))
		return
	}
	reg, err := s.Registry.Register(n)
	if err != nil {
		s.logf("epmd: %v: refused ALIVE2_REQ: %v", conn.RemoteAddr(), err)
		s.reply(conn, appendAlive2Response(nil, n.HighestVersion, 1, 0))
		return
	}
	defer reg.Close()
	if !s.reply(conn, appendAlive2Response(nil, n.HighestVersion, 0, reg.Creation)) {
		return
	}
	// The node sends nothing more; reading only tells when it goes away.
	// Stray bytes are dropped rather than parsed, so they cannot end the
	// registration by accident.
	conn.SetReadDeadline(time.Time{})
	io.Copy(io.Discard, conn)
}

func (s *Server) reply(conn net.Conn, b []byte) bool {
	conn.SetWriteDeadline(time.Now().Add(s.writeTimeout()))
	if _, err := conn.Write(b); err != nil {
		s.logf("epmd: %v: answer not sent: %v", conn.RemoteAddr(), err)
		return false
	}
	return true
}

func (s *Server) track(ln net.Listener) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if s.listeners == nil {
		s.listeners = make(map[net.Listener]struct{})
	}
	s.listeners[ln] = struct{}{}
	return true
}

func (s *Server) untrack(ln net.Listener) {
	s.mu.Lock()
	delete(s.listeners, ln)
	s.mu.Unlock()
	ln.Close()
}

// addConn tracks c, or says why it may not be served.
func (s *Server) addConn(c net.Conn) (refused string) {
	ip := remoteIP(c)
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.closed:
		return "server closed"
	case len(s.conns) >= s.maxConns():
		return fmt.Sprintf("%d connections open, the most allowed", len(s.conns))
	case s.perIP[ip] >= s.maxConnsPerIP():
		return fmt.Sprintf("%d connections open from %s, the most allowed from one address", s.perIP[ip], ip)
	}
	if s.conns == nil {
		s.conns = make(map[net.Conn]struct{})
		s.perIP = make(map[string]int)
	}
	s.conns[c] = struct{}{}
	s.perIP[ip]++
	s.wg.Add(1)
	return ""
}

func (s *Server) removeConn(c net.Conn) {
	ip := remoteIP(c)
	s.mu.Lock()
	delete(s.conns, c)
	if s.perIP[ip]--; s.perIP[ip] <= 0 {
		delete(s.perIP, ip)
	}
	s.mu.Unlock()
	c.Close()
}

// remoteIP is the address part of c's remote address, or the whole address
// when it has no port (a Unix socket, a pipe).
func remoteIP(c net.Conn) string {
	a := c.RemoteAddr().String()
	if host, _, err := net.SplitHostPort(a); err == nil {
		return host
	}
	return a
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

func (s *Server) logf(format string, args ...any) {
	if s.Logf != nil {
		s.Logf(format, args...)
	}
}

func (s *Server) port() uint16 {
	if s.Port == 0 {
		return DefaultPort
	}
	return s.Port
}

func (s *Server) requestTimeout() time.Duration {
	if s.RequestTimeout <= 0 {
		return DefaultRequestTimeout
	}
	return s.RequestTimeout
}

func (s *Server) writeTimeout() time.Duration {
	if s.WriteTimeout <= 0 {
		return DefaultWriteTimeout
	}
	return s.WriteTimeout
}

func (s *Server) maxConnsPerIP() int {
	if s.MaxConnsPerIP <= 0 {
		return DefaultMaxConnsPerIP
	}
	return s.MaxConnsPerIP
}

func (s *Server) maxConns() int {
	if s.MaxConns <= 0 {
		return DefaultMaxConns
	}
	return s.MaxConns
}
