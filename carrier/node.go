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
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"tailscale.com/client/local"
	"tailscale.com/ipn"
	"tailscale.com/ipn/store/mem"
	"tailscale.com/tsnet"
	"tailscale.com/types/key"
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
	// UDPPort is the UDP port for WireGuard and peer-to-peer traffic. Zero
	// means the port of the node's last run on Dir (a non-ephemeral node
	// remembers it there), or one the system picks on a first run or when
	// that port is taken. Keeping the port makes a restarted node reachable
	// at once (see udpPortFile).
	UDPPort uint16
	// Logf receives tailscale's own (verbose) logs. Nil discards them.
	Logf logger.Logf
	// UserLogf receives what a person should see: the login URL, state
	// changes. Nil discards them.
	UserLogf logger.Logf
}

// ErrUnknownHost is returned (wrapped) when a name or address is not a node
// of the tailnet as this node currently sees it.
var ErrUnknownHost = errors.New("unknown host")

// ErrPortInUse is returned (wrapped) by Listen for a port that another
// listener of the node holds, or when no port is free.
var ErrPortInUse = errors.New("port in use")

// ErrNotUp is returned by methods that need the node Running before Up has
// succeeded.
var ErrNotUp = errors.New("carrier: node is not up")

// Node is one tailnet node. Its methods are safe for concurrent use.
type Node struct {
	cfg Config
	ts  *tsnet.Server
	lc  atomic.Pointer[local.Client] // set once the node is Running

	apiTransport *http.Transport // lc's; set by New, so Close may race Up

	started atomic.Bool // Up was called: tsnet was started
	upOnce  sync.Once
	upErr   error
	running chan struct{} // closed once the node is Running

	mu        sync.Mutex
	sessionUp map[netip.Addr]key.DiscoPublic // peers that have answered a TSMP ping, by the disco key they had
	crossings *crossings                     // first handshakes lost to the peer's (see awaitSession)
	pathless  map[string]bool                // peers a redoPathless is under way for
	view      netmapView                     // the Status that look-ups share (see Candidates)

	// bgCtx ends, and bg is waited for, at Close: the node's own
	// goroutines (redoPathless, watchNetmap).
	bgCtx    context.Context
	bgCancel context.CancelFunc
	bg       sync.WaitGroup
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
	cross := newCrossings()
	ts := &tsnet.Server{
		Dir:           cfg.Dir,
		Hostname:      cfg.Hostname,
		ControlURL:    cfg.ControlURL,
		AuthKey:       cfg.AuthKey,
		Ephemeral:     cfg.Ephemeral,
		AdvertiseTags: cfg.Tags,
		Port:          cfg.UDPPort,
		Logf:          cross.logf(logf),
		// tsnet prints the login URL through UserLogf every few seconds;
		// Up prints it once, in its own words, so drop tsnet's copy.
		UserLogf: logger.Discard,
	}
	if cfg.Ephemeral {
		ts.Store = new(mem.Store)
	} else if ts.Port == 0 {
		ts.Port = storedUDPPort(cfg.Dir)
	}
	n := &Node{cfg: cfg, ts: ts, running: make(chan struct{}), sessionUp: make(map[netip.Addr]key.DiscoPublic),
		crossings: cross, pathless: make(map[string]bool)}
	n.bgCtx, n.bgCancel = context.WithCancel(context.Background())
	cross.pathless = n.redoPathless
	// The carrier's own client of tsnet's LocalAPI, on a transport it can
	// close: tsnet's Close leaves the idle connections of its client (and
	// the server's goroutines behind them) open, one set per node.
	n.apiTransport = &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		tsLC, err := ts.LocalClient()
		if err != nil {
			return nil, err
		}
		return tsLC.Dial(ctx, network, addr)
	}}
	return n, nil
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
	n.started.Store(true)
	if _, err := n.ts.LocalClient(); err != nil { // starts the node
		return fmt.Errorf("carrier: start %s: %w", n.cfg.Hostname, err)
	}
	lc := &local.Client{Transport: n.apiTransport}
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
			n.mu.Lock()
			if n.bgCtx.Err() == nil {
				n.bg.Add(1)
				go func() {
					defer n.bg.Done()
					n.watchNetmap(n.bgCtx)
				}()
			}
			n.mu.Unlock()
			close(n.running)
			if !n.cfg.Ephemeral {
				if err := n.rememberUDPPort(); err != nil {
					n.userLogf("%v (a restart will pick a new port, and peers may take 5-10 s to reach it)", err)
				}
			}
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
// A node that was never brought up has nothing to close (and tsnet's Close
// of a server that never started dereferences nil, v1.102.5).
func (n *Node) Close() error {
	n.mu.Lock()
	n.bgCancel()
	n.mu.Unlock()
	n.bg.Wait()
	if !n.started.Load() {
		return nil
	}
	err := n.ts.Close()
	n.apiTransport.CloseIdleConnections()
	return err
}

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
		// tsnet's errors have no type; these are its words (v1.102.5,
		// tsnet.go) for a port another listener holds, and for no free
		// port left.
		if msg := err.Error(); strings.Contains(msg, "listener already open") || strings.Contains(msg, "no available port") {
			return nil, fmt.Errorf("carrier: listen on tailnet port %d: %w (%w)", port, ErrPortInUse, err)
		}
		return nil, fmt.Errorf("carrier: listen on tailnet port %d: %w", port, err)
	}
	return ln, nil
}

// Dial opens a TCP connection to port on host, where host is a bare tailnet
// hostname ("beta"), a MagicDNS name ("beta.example.ts.net") or a tailnet IP.
// The name is resolved from the node's netmap; see [Node.Resolve].
//
// Dial applies no access policy: it reaches whichever device the name
// resolves to. tsdist's front ends dial through package host, which
// resolves only among the devices its policy admits.
func (n *Node) Dial(ctx context.Context, host string, port uint16) (net.Conn, error) {
	addr, err := n.Resolve(ctx, host)
	if err != nil {
		return nil, err
	}
	c, err := n.DialIP(ctx, netip.AddrPortFrom(addr, port))
	if err != nil {
		return nil, fmt.Errorf("carrier: dial %s:%d: %w", host, port, err)
	}
	return c, nil
}

// DialIP opens a TCP connection to a tailnet address, one of a node of the
// tailnet (see [Node.Candidates]). A first connection to a peer waits
// until this node has a WireGuard session with the peer (see awaitSession).
func (n *Node) DialIP(ctx context.Context, to netip.AddrPort) (net.Conn, error) {
	if err := n.awaitSession(ctx, to.Addr()); err != nil {
		return nil, err
	}
	// Straight into the userspace network stack: tsnet's own Dial would
	// send an address it has no route for through the host's network,
	// off the tailnet, should the peer leave between Resolve and here.
	dialTCP := n.ts.Sys().Dialer.Get().NetstackDialTCP
	if dialTCP == nil {
		return nil, errors.New("tsnet has no userspace network stack")
	}
	return dialTCP(ctx, to)
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
