// Package carrier joins a tailnet as one node (with tailscale.com/tsnet) and
// turns its tailnet connections into ordinary file descriptors.
//
// A tsnet connection lives in a userspace network stack, so it has no file
// descriptor another process could use. The carrier makes one: each tailnet
// connection is bridged to one end of a socketpair(AF_UNIX, SOCK_STREAM) by
// [Splice], and the other end is handed to a local client with SCM_RIGHTS by
// [SendFD]. The client then reads and writes the connection as a plain
// socket; for the BEAM that means the emulator's own distribution fast path.
//
// Names are resolved from the node's own view of the tailnet (its netmap),
// never through the system resolver: a name the tailnet does not know fails
// at once with [ErrUnknownHost].
package carrier

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"tailscale.com/client/local"
	"tailscale.com/ipn"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/ipn/store/mem"
	"tailscale.com/net/tsaddr"
	"tailscale.com/tailcfg"
	"tailscale.com/tsnet"
	"tailscale.com/types/logger"
)

// Config describes one tailnet node.
type Config struct {
	// Hostname is the node's name on the tailnet ("alpha"). Required.
	Hostname string
	// ControlURL is the coordination server. Empty means Tailscale's.
	ControlURL string
	// AuthKey logs the node in without a person. Empty means interactive
	// login (the login URL goes to UserLogf) or an existing login in Dir.
	AuthKey string
	// Dir holds the node's state (keys, login). Required, one per node.
	Dir string
	// Ephemeral nodes are removed from the tailnet when they go offline,
	// and keep their state in memory only.
	Ephemeral bool
	// Tags are the ACL tags the node asks for ("tag:erlang").
	Tags []string
	// Logf receives tailscale's own (verbose) logs. Nil discards them.
	Logf logger.Logf
	// UserLogf receives what a person should see: the login URL, state
	// changes. Nil discards them.
	UserLogf logger.Logf
}

// ErrUnknownHost is returned (wrapped) when a name or address is not a node
// of the tailnet as this node currently sees it.
var ErrUnknownHost = errors.New("unknown host")

// ErrNotUp is returned by methods that need the node Running before Up has
// succeeded.
var ErrNotUp = errors.New("carrier: node is not up")

// Node is one tailnet node. Its methods are safe for concurrent use.
type Node struct {
	cfg Config
	ts  *tsnet.Server
	lc  atomic.Pointer[local.Client] // set once the node is Running

	upOnce  sync.Once
	upErr   error
	running chan struct{} // closed once the node is Running

	mu      sync.Mutex
	knownBy map[netip.Addr]bool // peers that have answered a disco ping
}

// New checks cfg and prepares a node; nothing touches the network until Up.
func New(cfg Config) (*Node, error) {
	if err := ValidHostname(cfg.Hostname); err != nil {
		return nil, err
	}
	if cfg.Dir == "" {
		return nil, errors.New("carrier: Config.Dir is required")
	}
	for _, t := range cfg.Tags {
		if !strings.HasPrefix(t, "tag:") || len(t) == len("tag:") {
			return nil, fmt.Errorf("carrier: tag %q must look like tag:NAME", t)
		}
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("carrier: state dir: %w", err)
	}
	logf, userLogf := cfg.Logf, cfg.UserLogf
	if logf == nil {
		logf = logger.Discard
	}
	if userLogf == nil {
		userLogf = logger.Discard
	}
	ts := &tsnet.Server{
		Dir:           cfg.Dir,
		Hostname:      cfg.Hostname,
		ControlURL:    cfg.ControlURL,
		AuthKey:       cfg.AuthKey,
		Ephemeral:     cfg.Ephemeral,
		AdvertiseTags: cfg.Tags,
		Logf:          logf,
		// tsnet prints the login URL through UserLogf every few seconds;
		// Up prints it once, in its own words, so drop tsnet's copy.
		UserLogf: logger.Discard,
	}
	if cfg.Ephemeral {
		ts.Store = new(mem.Store)
	}
	return &Node{cfg: cfg, ts: ts, running: make(chan struct{}), knownBy: make(map[netip.Addr]bool)}, nil
}

// ValidHostname reports whether name can be a tailnet hostname: 1 to 63
// letters, digits and hyphens, not starting or ending with a hyphen (one
// DNS label, as MagicDNS needs).
func ValidHostname(name string) error {
	if name == "" {
		return errors.New("carrier: hostname is empty")
	}
	if len(name) > 63 {
		return fmt.Errorf("carrier: hostname %q is longer than 63 characters", name)
	}
	for i, r := range name {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' ||
			r == '-' && i != 0 && i != len(name)-1
		if !ok {
			return fmt.Errorf("carrier: hostname %q: only letters, digits and inner hyphens are allowed", name)
		}
	}
	return nil
}

// Up starts the node and waits until it is Running on the tailnet or ctx is
// done. When the control server asks for an interactive login, the login URL
// is printed once through UserLogf and Up keeps waiting for approval. Calling
// Up again returns the first call's result.
func (n *Node) Up(ctx context.Context) error {
	n.upOnce.Do(func() { n.upErr = n.up(ctx) })
	return n.upErr
}

func (n *Node) up(ctx context.Context) error {
	lc, err := n.ts.LocalClient() // starts the node
	if err != nil {
		return fmt.Errorf("carrier: start %s: %w", n.cfg.Hostname, err)
	}
	if err := n.tuneNetstack(); err != nil {
		return fmt.Errorf("carrier: start %s: %w", n.cfg.Hostname, err)
	}
	watcher, err := lc.WatchIPNBus(ctx, ipn.NotifyInitialState)
	if err != nil {
		return fmt.Errorf("carrier: watch %s: %w", n.cfg.Hostname, err)
	}
	defer watcher.Close()
	printed := ""
	for {
		note, err := watcher.Next()
		if err != nil {
			return fmt.Errorf("carrier: bringing %s up: %w", n.cfg.Hostname, err)
		}
		if note.ErrMessage != nil {
			return fmt.Errorf("carrier: bringing %s up: %s", n.cfg.Hostname, *note.ErrMessage)
		}
		if u := note.BrowseToURL; u != nil && *u != "" && *u != printed {
			printed = *u
			n.userLogf("To log %s in to the tailnet, visit: %s", n.cfg.Hostname, *u)
		}
		if note.State != nil && *note.State == ipn.Running {
			n.lc.Store(lc)
			close(n.running)
			return nil
		}
	}
}

// Running is closed once Up has brought the node onto the tailnet.
func (n *Node) Running() <-chan struct{} { return n.running }

func (n *Node) userLogf(format string, args ...any) {
	if n.cfg.UserLogf != nil {
		n.cfg.UserLogf(format, args...)
	}
}

// Close leaves the tailnet and closes every listener and connection of the
// node. An ephemeral node is removed from the tailnet.
func (n *Node) Close() error { return n.ts.Close() }

// Hostname is the name the node asked for.
func (n *Node) Hostname() string { return n.cfg.Hostname }

func (n *Node) local() (*local.Client, error) {
	if lc := n.lc.Load(); lc != nil {
		return lc, nil
	}
	return nil, ErrNotUp
}

// Listen accepts tailnet TCP connections on port of the node's tailnet
// addresses (IPv4 and IPv6). Port 0 picks a free port; the listener's Addr
// tells which.
func (n *Node) Listen(port uint16) (net.Listener, error) {
	if _, err := n.local(); err != nil {
		return nil, err
	}
	ln, err := n.ts.Listen("tcp", ":"+strconv.Itoa(int(port)))
	if err != nil {
		return nil, fmt.Errorf("carrier: listen on tailnet port %d: %w", port, err)
	}
	return ln, nil
}

// Dial opens a TCP connection to port on host, where host is a bare tailnet
// hostname ("beta"), a MagicDNS name ("beta.example.ts.net") or a tailnet IP.
// The name is resolved from the node's netmap; see [Node.Resolve].
func (n *Node) Dial(ctx context.Context, host string, port uint16) (net.Conn, error) {
	addr, err := n.Resolve(ctx, host)
	if err != nil {
		return nil, err
	}
	if err := n.awaitKnownBy(ctx, addr); err != nil {
		return nil, fmt.Errorf("carrier: dial %s:%d: %w", host, port, err)
	}
	// Straight into the userspace network stack: tsnet's own Dial would
	// send an address it has no route for through the host's network,
	// off the tailnet, should the peer leave between Resolve and here.
	dialTCP := n.ts.Sys().Dialer.Get().NetstackDialTCP
	if dialTCP == nil {
		return nil, fmt.Errorf("carrier: dial %s:%d: tsnet has no userspace network stack", host, port)
	}
	c, err := dialTCP(ctx, netip.AddrPortFrom(addr, port))
	if err != nil {
		return nil, fmt.Errorf("carrier: dial %s:%d: %w", host, port, err)
	}
	return c, nil
}

// timeWait is how long a closed TCP connection of this node lingers in
// TIME_WAIT; netstack's default is the Internet's 60 s. See tuneNetstack.
const timeWait = time.Second

// tuneNetstack sets the node's TCP options: a short TIME_WAIT, and small
// socket buffers.
//
// TIME_WAIT (timeWait): the side that closes first holds the connection in
// TIME_WAIT, and an EPMD server closes first after every answer (clients
// wait for it), so a node that looks up ports often would soon reuse a
// source port the server still holds: its SYN then waits out
// retransmission, several seconds. Inside a WireGuard tunnel, with its own
// sequence numbers and replay protection, a stray old segment needs far
// less than 60 s to drain.
//
// Buffers (tcpBufMax): tailscale lets a connection's send and receive
// buffers grow to 6 and 8 MiB, for long fat paths. Each 1280-byte packet
// in flight then holds a 64 KiB wireguard-go message buffer, so one bulk
// connection kept several hundred MB of them (pprof, docs/BENCHMARKS.md),
// and a receiver that stops reading had MiBs queued in the helper. Capped
// at tcpBufMax, a connection still fills a 1 Gb/s path with 8 ms of round
// trip, and a stuck one holds about 1 MiB here.
func (n *Node) tuneNetstack() error {
	impl, ok := n.ts.Sys().Netstack.GetOK()
	if !ok {
		return errors.New("tsnet has no userspace network stack")
	}
	ns, ok := impl.(interface {
		SetTransportProtocolOption(tcpip.TransportProtocolNumber, tcpip.SettableTransportProtocolOption) tcpip.Error
	})
	if !ok {
		return fmt.Errorf("netstack %T cannot set TCP options", impl)
	}
	opt := tcpip.TCPTimeWaitTimeoutOption(timeWait)
	if err := ns.SetTransportProtocolOption(tcp.ProtocolNumber, &opt); err != nil {
		return fmt.Errorf("set TCP TIME_WAIT to %v: %v", timeWait, err)
	}
	// tailscale's own minimum and default (gVisor's), with a lower maximum.
	rx := tcpip.TCPReceiveBufferSizeRangeOption{Min: tcp.MinBufferSize, Default: min(tcp.DefaultReceiveBufferSize, tcpBufMax), Max: tcpBufMax}
	if err := ns.SetTransportProtocolOption(tcp.ProtocolNumber, &rx); err != nil {
		return fmt.Errorf("set TCP receive buffer sizes: %v", err)
	}
	tx := tcpip.TCPSendBufferSizeRangeOption{Min: tcp.MinBufferSize, Default: min(tcp.DefaultSendBufferSize, tcpBufMax), Max: tcpBufMax}
	if err := ns.SetTransportProtocolOption(tcp.ProtocolNumber, &tx); err != nil {
		return fmt.Errorf("set TCP send buffer sizes: %v", err)
	}
	return nil
}

// tcpBufMax caps each TCP connection's send and receive buffer in the
// node's network stack; see tuneNetstack.
const tcpBufMax = 1 << 20

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

// Resolve finds the tailnet IP of host among this node and its peers.
// A bare name matches a node's MagicDNS label or, failing that, its
// hostname; a dotted name matches a MagicDNS name or, failing that, the
// node's hostname under the tailnet's suffix; when several nodes match,
// online and newer ones win (see nameMatch); an IP must be
// the tailnet address of one of those nodes. Matching ignores case and a
// trailing dot. IPv4 is preferred.
// Anything else fails with an error wrapping [ErrUnknownHost]; the system
// resolver is never asked.
func (n *Node) Resolve(ctx context.Context, host string) (netip.Addr, error) {
	ip, ipErr := netip.ParseAddr(host)
	if ipErr == nil && !tsaddr.IsTailscaleIP(ip) {
		return netip.Addr{}, fmt.Errorf("carrier: %s is not a tailnet address: %w", host, ErrUnknownHost)
	}
	st, err := n.rawStatus(ctx)
	if err != nil {
		return netip.Addr{}, err
	}
	if ipErr == nil {
		// An address in the tailnet's range that no node holds must not
		// reach tsnet's dialer: for an IP it has no peer for, that dials
		// through the host's own network stack, off the tailnet.
		ip = ip.WithZone("")
		if st.Self != nil && slices.Contains(st.Self.TailscaleIPs, ip) {
			return ip, nil
		}
		for _, p := range st.Peer {
			if slices.Contains(p.TailscaleIPs, ip) {
				return ip, nil
			}
		}
		return netip.Addr{}, fmt.Errorf("carrier: no node of the tailnet has address %s: %w", host, ErrUnknownHost)
	}
	want := strings.ToLower(strings.TrimSuffix(host, "."))
	if want == "" {
		return netip.Addr{}, fmt.Errorf("carrier: empty host name: %w", ErrUnknownHost)
	}
	dnsName := func(p *ipnstate.PeerStatus) string { return strings.ToLower(strings.TrimSuffix(p.DNSName, ".")) }
	label := func(p *ipnstate.PeerStatus) string { l, _, _ := strings.Cut(dnsName(p), "."); return l }
	hostname := func(p *ipnstate.PeerStatus) string { return strings.ToLower(p.HostName) }
	// hostnameFQDN is the MagicDNS name the node would have had, had
	// nobody else held its hostname: "alpha.example.ts.net" for the
	// "alpha-1.example.ts.net" that asked for "alpha".
	hostnameFQDN := func(p *ipnstate.PeerStatus) string {
		_, suffix, ok := strings.Cut(dnsName(p), ".")
		if !ok {
			return ""
		}
		return hostname(p) + "." + suffix
	}
	exact, loose := label, hostname
	if strings.Contains(want, ".") {
		exact, loose = dnsName, hostnameFQDN
	}
	var best *nameMatch
	consider := func(p *ipnstate.PeerStatus, online bool) {
		if len(p.TailscaleIPs) == 0 {
			return
		}
		m := &nameMatch{peer: p, online: online, exact: exact(p) == want}
		if (m.exact || loose(p) == want) && m.better(best) {
			best = m
		}
	}
	if st.Self != nil {
		consider(st.Self, true)
	}
	for _, p := range st.Peer {
		consider(p, p.Online)
	}
	if best != nil {
		return preferIPv4(best.peer.TailscaleIPs), nil
	}
	return netip.Addr{}, fmt.Errorf("carrier: host %q is not on the tailnet: %w", host, ErrUnknownHost)
}

// nameMatch is a node whose name matches the one being resolved, exactly
// (its MagicDNS label or name) or loosely (the hostname it asked for).
//
// A name can match more than one node. A node that was killed without
// logging out lingers on the tailnet: an ephemeral one until the control
// server's inactivity timeout, a persistent one until it is removed, and
// the control server may still call it online for a while (Headscale:
// about 15 s). The node that takes its place with the same hostname gets
// a MagicDNS name with a suffix ("alpha-1"). Nodes name themselves by the
// hostname they asked for (app@alpha), so that newer node must be what
// "alpha" means: online nodes win over offline ones, the newest online
// node wins, and an exact match wins when nothing else tells them apart.
type nameMatch struct {
	peer          *ipnstate.PeerStatus
	online, exact bool
}

// better reports whether m should be chosen over other (nil: nothing yet).
func (m *nameMatch) better(other *nameMatch) bool {
	switch {
	case other == nil:
		return true
	case m.online != other.online:
		return m.online
	case m.online && !m.peer.Created.Equal(other.peer.Created):
		return m.peer.Created.After(other.peer.Created)
	case m.exact != other.exact:
		return m.exact
	}
	return false
}

func preferIPv4(ips []netip.Addr) netip.Addr {
	if i := slices.IndexFunc(ips, netip.Addr.Is4); i >= 0 {
		return ips[i]
	}
	return ips[0]
}

func (n *Node) rawStatus(ctx context.Context) (*ipnstate.Status, error) {
	lc, err := n.local()
	if err != nil {
		return nil, err
	}
	st, err := lc.Status(ctx)
	if err != nil {
		return nil, fmt.Errorf("carrier: status: %w", err)
	}
	return st, nil
}

// DialAddr is [Node.Dial] for an address of the form "host:port", the shape
// that dial hooks such as epmd.Client's take.
func (n *Node) DialAddr(ctx context.Context, addr string) (net.Conn, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("carrier: dial %q: %w", addr, err)
	}
	port, err := AddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("carrier: dial: %w", err)
	}
	return n.Dial(ctx, host, port)
}

// AddrPort returns the port of an address of the form "host:port", such as
// a listener's (net.Listener.Addr().String()).
func AddrPort(addr string) (uint16, error) {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return 0, fmt.Errorf("address %q: %w", addr, err)
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return 0, fmt.Errorf("address %q: bad port: %w", addr, err)
	}
	return uint16(p), nil
}
