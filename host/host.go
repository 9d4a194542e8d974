// Package host is one tsdist device on a tailnet: the tailnet node (package
// carrier), its EPMD on tailnet port 4369, and the access policy (package
// access) that decides every exchange with another device, in both
// directions.
//
// Both front ends are built on it: `tsdist serve` (a Host plus the control
// server that hands its connections to BEAM nodes) and package ergonode (a
// Host plus the bridge to an ergo node). The data path reads
//
//	carrier (tsnet, socketpair, fd passing) → host → control → the BEAM side
//
// # One policy, both directions
//
// A Host admits a connection it accepts only from a device its policy
// allows ([Host.Admit], [Host.Guard]); and it resolves a name it is to dial
// or ask for names only among the devices the policy allows
// ([Host.Resolve]), so [Host.Dial], [Host.PortPlease] and [Host.Names]
// never send a byte to any other. A name that only devices outside the
// policy answer to fails with a [*NotAllowedError] naming the device found.
// The device itself is always allowed.
package host

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/tsdist/tsdist/access"
	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/epmd"
	"tailscale.com/feature/buildfeatures"
	"tailscale.com/types/logger"
)

// Config describes a Host.
type Config struct {
	// Tailnet is the tailnet node: hostname, control URL, auth key, state
	// directory, tags.
	Tailnet carrier.Config
	// Policy decides which devices the host exchanges bytes with. The
	// zero Policy allows nobody; use access.Parse ("" gives access.Default).
	Policy access.Policy
	// LocalOnly keeps every packet on loopback (carrier.KeepToLoopback);
	// implied when the control URL is on loopback.
	LocalOnly bool
	// Logf receives what an operator should see: refusals (rate-limited),
	// policy changes, EPMD complaints (rate-limited), shutdown trouble.
	// Nil discards them.
	Logf logger.Logf
}

// Shutdown timing.
const (
	// FINGrace is how long Close lets connections that just ended send
	// their last packets: peers learn that a connection ended from its FIN
	// or RST, and closing the node at once would drop those, so peers would
	// find out only at their next keepalive (a BEAM node: net_ticktime).
	FINGrace = 300 * time.Millisecond
	// nodeCloseTime bounds how long Close waits for the tailnet node.
	nodeCloseTime = 3 * time.Second
)

// Host is one tsdist device. Its methods are safe for concurrent use.
type Host struct {
	node     *carrier.Node
	gate     *access.Gate
	logf     logger.Logf
	registry *epmd.Registry
	epmdSrv  *epmd.Server
	epmdCli  epmd.Client

	ctx    context.Context // ends with Close
	cancel context.CancelFunc
	wg     sync.WaitGroup
	served chan error // EPMD's end, if it ends before Close

	mu        sync.Mutex
	open      int       // connections in use (see Track)
	lastEnded time.Time // when the last of them ended
	epmdLn    net.Listener
	closed    bool
}

// New checks cfg and prepares a Host; nothing touches the network until Up.
func New(cfg Config) (*Host, error) {
	logf := cfg.Logf
	if logf == nil {
		logf = logger.Discard
	}
	if cfg.LocalOnly || carrier.IsLoopbackURL(cfg.Tailnet.ControlURL) {
		carrier.KeepToLoopback()
	}
	if buildfeatures.HasPeerAPIServer {
		logf("warning: built without -tags ts_omit_peerapiserver, so tailscale's PeerAPI will hold a TCP port open on this host (it answers tailnet peers only); build with -tags ts_omit_peerapiserver (as `make build` does) to leave it out")
	}
	node, err := carrier.New(cfg.Tailnet)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := &Host{
		node:     node,
		gate:     access.NewGate(node, logf),
		logf:     logf,
		registry: epmd.NewRegistry(),
		ctx:      ctx,
		cancel:   cancel,
		served:   make(chan error, 1),
	}
	h.gate.SetPolicy(cfg.Policy)
	h.epmdCli.Dial = h.dialAddr
	// Every tailnet peer the policy admits can reach the EPMD port, so its
	// complaints are rate-limited too.
	h.epmdSrv = &epmd.Server{Registry: h.registry, Logf: logger.RateLimitedFn(logf, time.Minute, 20, 100)}
	return h, nil
}

// Up joins the tailnet and waits until the node is Running (or ctx ends),
// then serves EPMD on tailnet port 4369, behind the policy, and returns
// memory to the system after bursts of traffic, until Close.
func (h *Host) Up(ctx context.Context) error {
	if err := h.node.Up(ctx); err != nil {
		return err
	}
	ln, err := h.node.Listen(epmd.DefaultPort)
	if err != nil {
		return fmt.Errorf("host: EPMD on the tailnet: %w", err)
	}
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		ln.Close()
		return net.ErrClosed
	}
	h.epmdLn = ln
	h.mu.Unlock()
	h.wg.Go(func() {
		if err := h.epmdSrv.Serve(h.Guard(ln, "EPMD")); !errors.Is(err, epmd.ErrServerClosed) {
			h.served <- fmt.Errorf("host: EPMD on the tailnet: %w", err)
		}
	})
	h.wg.Go(func() { carrier.ReleaseMemory(h.ctx) })
	return nil
}

// Failed delivers an error if a service of the host (EPMD) stops on its own
// before Close.
func (h *Host) Failed() <-chan error { return h.served }

// Node is the host's tailnet node, for status, identity look-ups and
// listeners. Dial through the Host, not the node: the node applies no
// policy.
func (h *Host) Node() *carrier.Node { return h.node }

// Registry holds the node names the host's EPMD answers for.
func (h *Host) Registry() *epmd.Registry { return h.registry }

// SetPolicy replaces the access policy. It takes effect for the next
// connection, dial and look-up; connections already made are not affected.
func (h *Host) SetPolicy(p access.Policy) { h.gate.SetPolicy(p) }

// Policy returns the access policy in force.
func (h *Host) Policy() access.Policy { return h.gate.Policy() }

// Admit checks an accepted tailnet connection against the policy; see
// [access.Gate.Admit]. The caller closes a refused connection.
func (h *Host) Admit(ctx context.Context, conn net.Conn, what string) (carrier.Identity, error) {
	return h.gate.Admit(ctx, conn, what)
}

// Guard wraps a tailnet listener so that Accept returns only connections
// from devices the policy allows; the others are closed at once.
func (h *Host) Guard(ln net.Listener, what string) net.Listener {
	return h.gate.Guard(h.ctx, ln, what)
}

// Allowed reports whether the policy admits a device, without logging;
// for marking peers in listings.
func (h *Host) Allowed(ctx context.Context, id carrier.Identity) bool {
	return h.gate.Allowed(ctx, id)
}

// Track marks a connection of the host as in use, until the returned
// function is called; Close waits FINGrace after the last one ends.
func (h *Host) Track() (done func()) {
	h.mu.Lock()
	h.open++
	h.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			h.mu.Lock()
			h.open--
			h.lastEnded = time.Now()
			h.mu.Unlock()
		})
	}
}

// Close stops EPMD, lets the packets of connections that just ended get
// out (FINGrace), and leaves the tailnet. The caller closes its own
// connections first. It waits for the tailnet node nodeCloseTime at most:
// tsnet's Close can block for good (tailscale v1.102.5: netstack's Close
// stops draining its 512-packet outbound queue, then aborts every TCP
// endpoint still connected, each abort queueing a RST; with more than 512
// such endpoints the 513th waits forever), and what the node still holds
// goes with the process.
func (h *Host) Close() error {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return nil
	}
	h.closed = true
	ln := h.epmdLn
	last := h.lastEnded
	if h.open > 0 {
		last = time.Now()
	}
	h.mu.Unlock()
	h.cancel()
	h.epmdSrv.Close()
	if ln != nil {
		ln.Close()
	}
	if wait := FINGrace - time.Since(last); wait > 0 {
		time.Sleep(wait)
	}
	done := make(chan struct{})
	go func() {
		h.node.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(nodeCloseTime):
		h.logf("the tailnet node did not close within %v; going on", nodeCloseTime)
	}
	h.wg.Wait()
	return nil
}

// NotAllowedError is the error of a dial or look-up whose name only
// devices outside the access policy answer to. Nothing was sent to them.
type NotAllowedError struct {
	// Host is the name asked for.
	Host string
	// Peer is the device the name would have meant without the policy.
	Peer carrier.Identity
	// Why is the policy's reason.
	Why string
}

func (e *NotAllowedError) Error() string {
	return fmt.Sprintf("host: %s is %s (%s), which the access policy does not admit: %s",
		e.Host, e.Peer.DNSName, access.Owner(e.Peer), e.Why)
}

// Unwrap makes a NotAllowedError match access.ErrDenied.
func (e *NotAllowedError) Unwrap() error { return access.ErrDenied }

// Resolve finds the device host means (a bare hostname, a MagicDNS name or
// a tailnet IP) among the devices the policy admits, by [carrier.Pick]'s
// rule, and returns its address and identity. A name no device answers to
// fails wrapping carrier.ErrUnknownHost; one that only refused devices
// answer to fails with a *NotAllowedError (and a rate-limited log line).
func (h *Host) Resolve(ctx context.Context, host string) (netip.Addr, carrier.Identity, error) {
	cands, err := h.node.Candidates(ctx, host)
	if err != nil {
		return netip.Addr{}, carrier.Identity{}, err
	}
	// Allowed, not Check: a refused device that answers to the name as
	// well as an admitted one is no refusal of anything this host does.
	admitted := cands[:0:0]
	for _, c := range cands {
		if h.gate.Allowed(ctx, c.Identity) {
			admitted = append(admitted, c)
		}
	}
	if best, ok := carrier.Pick(admitted); ok {
		return best.IP, best.Identity, nil
	}
	found, _ := carrier.Pick(cands)
	err = h.gate.Check(ctx, found.Identity, "for "+host)
	var denied *access.DeniedError
	if !errors.As(err, &denied) {
		if err == nil { // the policy changed in between and admits it now
			return found.IP, found.Identity, nil
		}
		return netip.Addr{}, carrier.Identity{}, err
	}
	return netip.Addr{}, found.Identity, &NotAllowedError{Host: host, Peer: found.Identity, Why: denied.Why}
}

// Dial resolves host among the admitted devices and opens a TCP connection
// to port there. The identity returned is the connected device's, as the
// tailnet vouches for it once connected (checked against the policy again:
// the netmap may have changed since Resolve).
func (h *Host) Dial(ctx context.Context, host string, port uint16) (net.Conn, carrier.Identity, error) {
	ip, _, err := h.Resolve(ctx, host)
	if err != nil {
		return nil, carrier.Identity{}, err
	}
	conn, err := h.node.DialIP(ctx, netip.AddrPortFrom(ip, port))
	if err != nil {
		return nil, carrier.Identity{}, fmt.Errorf("host: dial %s:%d: %w", host, port, err)
	}
	peer, err := h.node.WhoIs(ctx, conn.RemoteAddr().String())
	if err != nil {
		conn.Close()
		return nil, carrier.Identity{}, fmt.Errorf("host: dial %s:%d: connected to %v, but found no tailnet identity for it: %w", host, port, conn.RemoteAddr(), err)
	}
	if err := h.gate.Check(ctx, peer, "for "+host); err != nil {
		conn.Close()
		var denied *access.DeniedError
		if errors.As(err, &denied) {
			return nil, peer, &NotAllowedError{Host: host, Peer: peer, Why: denied.Why}
		}
		return nil, peer, err
	}
	return conn, peer, nil
}

// dialAddr is Dial for an address of the form "host:port", the shape of
// epmd.Client's dial hook.
func (h *Host) dialAddr(ctx context.Context, addr string) (net.Conn, error) {
	name, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("host: dial %q: %w", addr, err)
	}
	port, err := carrier.AddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("host: dial: %w", err)
	}
	conn, _, err := h.Dial(ctx, name, port)
	return conn, err
}

// PortPlease asks the EPMD of host, over the tailnet, for the node
// registered as name, if the policy admits host (a look-up of this host
// goes over the tailnet too, so it sees what peers see).
func (h *Host) PortPlease(ctx context.Context, host, name string) (epmd.Node, error) {
	return h.epmdCli.PortPlease(ctx, host, name)
}

// MaxNames bounds the names [Host.Names] returns for one host.
const MaxNames = 256

// Names lists the nodes registered on the EPMD of host, if the policy
// admits it: at most MaxNames entries; dropped counts those left out. An
// answer longer than epmd.MaxNamesResponse, or with a name EPMD does not
// accept, is an error (epmd.ErrMalformed).
func (h *Host) Names(ctx context.Context, host string) (names []epmd.NameEntry, dropped int, err error) {
	names, err = h.epmdCli.Names(ctx, host)
	if err != nil {
		return nil, 0, err
	}
	if len(names) > MaxNames {
		return names[:MaxNames], len(names) - MaxNames, nil
	}
	return names, 0, nil
}

// Status is the node's view of the tailnet (see [carrier.Node.Status]),
// with each peer's Allowed set by the policy.
func (h *Host) Status(ctx context.Context) (carrier.Status, error) {
	st, err := h.node.Status(ctx)
	if err != nil {
		return st, err
	}
	h.markAllowed(ctx, st.Peers)
	return st, nil
}

// WatchPeers is [carrier.Node.WatchPeers] with each peer's Allowed set by
// the policy in force: a policy change that admits or refuses a peer is
// reported like any other change.
func (h *Host) WatchPeers(ctx context.Context, fn func([]carrier.Peer)) error {
	return h.node.WatchPeers(ctx, func(peers []carrier.Peer) { h.markAllowed(ctx, peers) }, fn)
}

func (h *Host) markAllowed(ctx context.Context, peers []carrier.Peer) {
	for i := range peers {
		peers[i].Allowed = h.gate.Allowed(ctx, peers[i].Identity())
	}
}
