// Package devnet runs a whole tailnet offline, on loopback: tailscale's test
// control server, an in-process DERP relay and a STUN server, all bound to
// 127.0.0.1, with MagicDNS on.
//
// It is what the tests and the demo run against. Nothing it starts listens on
// or sends to any address outside 127.0.0.0/8, provided the tsnet nodes that
// join it apply [carrier.KeepToLoopback] first (the tsdist helper does so by itself when
// its control URL is on loopback).
package devnet

import (
	"context"
	"crypto/tls"
	"fmt"
	"log"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tsdist/tsdist/carrier"
	"tailscale.com/derp/derpserver"
	"tailscale.com/net/stunserver"
	"tailscale.com/tailcfg"
	"tailscale.com/tstest/integration/testcontrol"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// MagicDNSDomain is the MagicDNS suffix of every node on the offline tailnet:
// a node with hostname "alpha" is also "alpha.tsdist.test".
const MagicDNSDomain = "tsdist.test"

// Options configures an offline tailnet. The zero value is ready to use.
type Options struct {
	// Logf receives the control server's and DERP's logs. Nil discards them.
	Logf logger.Logf
	// SameUser puts every node under one tailnet user. By default each node
	// gets a user of its own (user-N@fake-control.example.net), which makes
	// identity checks meaningful.
	SameUser bool
	// RequireAuth makes nodes without an auth key go through interactive
	// login: the control server hands out a login URL, and the node stays
	// in NeedsLogin until [Net.CompleteAuth] is called with that URL.
	RequireAuth bool
	// AuthKey, if set, is the only auth key the control server accepts.
	AuthKey string
}

// Net is a running offline tailnet. Close stops everything it started.
type Net struct {
	// ControlURL is the base URL of the control server, e.g.
	// "http://127.0.0.1:41234". Pass it to nodes as their control URL.
	ControlURL string
	// DERPMap is the DERP map the control server hands to nodes.
	DERPMap *tailcfg.DERPMap

	control   *testcontrol.Server
	closeOnce sync.Once
	closers   []func()

	onlineMu sync.Mutex
	streams  map[key.NodePublic]int // open map streams per node
}

// Start brings up an offline tailnet on 127.0.0.1 and returns once every
// server is listening. It calls [carrier.KeepToLoopback] for this process.
// The tailnet runs until ctx is done or Close is called.
func Start(ctx context.Context, opts Options) (_ *Net, err error) {
	carrier.KeepToLoopback()
	logf := opts.Logf
	if logf == nil {
		logf = logger.Discard
	}
	n := &Net{}
	defer func() {
		if err != nil {
			n.Close()
		}
	}()

	relay, err := StartRelay(logf)
	if err != nil {
		return nil, err
	}
	n.closers = append(n.closers, relay.Close)
	n.DERPMap = relay.DERPMap

	n.control = &testcontrol.Server{
		DERPMap:          n.DERPMap,
		DNSConfig:        &tailcfg.DNSConfig{Proxied: true},
		MagicDNSDomain:   MagicDNSDomain,
		AllNodesSameUser: opts.SameUser,
		RequireAuth:      opts.RequireAuth,
		RequireAuthKey:   opts.AuthKey,
		// A non-nil TagOwners makes the control server honour the tags a
		// node advertises (tsnet's AdvertiseTags) at sign-up.
		TagOwners: map[string][]string{},
		// Online is tracked per node (trackOnline), so that peers see a
		// node leave when its client goes away.
		HoldMapRequest: n.trackOnline,
		Logf:           logf,
	}
	ctrlLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("devnet: control listen: %w", err)
	}
	ctrlHTTP := httptest.NewUnstartedServer(n.control)
	ctrlHTTP.Listener.Close()
	ctrlHTTP.Listener = ctrlLn
	ctrlHTTP.Config.ErrorLog = log.New(logWriter(logf), "", 0)
	n.control.HTTPTestServer = ctrlHTTP
	ctrlHTTP.Start()
	n.closers = append(n.closers, func() {
		ctrlHTTP.CloseClientConnections()
		ctrlHTTP.Close()
	})
	n.ControlURL = ctrlHTTP.URL

	if ctx.Done() != nil {
		stop := context.AfterFunc(ctx, n.Close)
		n.closers = append(n.closers, func() { stop() })
	}
	return n, nil
}

// Relay is a DERP relay and a STUN server on 127.0.0.1 with no control
// server: what a real coordination server (Headscale) hands its nodes as
// their DERP map when the tailnet must stay on loopback. [Start] runs one
// for the test control server.
type Relay struct {
	// DERPMap has one region, "loopback", whose one node is this relay.
	DERPMap *tailcfg.DERPMap

	closeOnce sync.Once
	closers   []func()
}

// StartRelay starts a DERP relay (TLS with a self-signed certificate, so
// its DERP map node says InsecureForTests) and a STUN server, both on
// 127.0.0.1, and returns once they are listening. logf receives their logs
// (nil discards them). Close stops both.
func StartRelay(logf logger.Logf) (_ *Relay, err error) {
	if logf == nil {
		logf = logger.Discard
	}
	r := &Relay{}
	defer func() {
		if err != nil {
			r.Close()
		}
	}()

	stunCtx, stopSTUN := context.WithCancel(context.Background())
	stun := stunserver.New(stunCtx)
	if err := stun.Listen("127.0.0.1:0"); err != nil {
		stopSTUN()
		return nil, fmt.Errorf("devnet: STUN listen: %w", err)
	}
	stunDone := make(chan struct{})
	go func() {
		defer close(stunDone)
		stun.Serve()
	}()
	r.closers = append(r.closers, func() { stopSTUN(); <-stunDone })
	stunPort := stun.LocalAddr().(*net.UDPAddr).Port

	derp := derpserver.New(key.NewNode(), logf)
	derpLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		derp.Close()
		return nil, fmt.Errorf("devnet: DERP listen: %w", err)
	}
	derpHTTP := httptest.NewUnstartedServer(derpserver.Handler(derp))
	derpHTTP.Listener.Close()
	derpHTTP.Listener = derpLn
	derpHTTP.Config.ErrorLog = logger.StdLogger(logf)
	// DERP upgrades the HTTP/1.1 connection; HTTP/2 would break that.
	derpHTTP.Config.TLSNextProto = map[string]func(*http.Server, *tls.Conn, http.Handler){}
	derpHTTP.StartTLS()
	r.closers = append(r.closers, func() {
		derpHTTP.CloseClientConnections()
		derpHTTP.Close()
		derp.Close()
	})

	r.DERPMap = &tailcfg.DERPMap{
		Regions: map[int]*tailcfg.DERPRegion{
			1: {
				RegionID:   1,
				RegionCode: "loopback",
				RegionName: "Offline loopback DERP",
				Nodes: []*tailcfg.DERPNode{{
					Name:     "1a",
					RegionID: 1,
					HostName: "127.0.0.1",
					IPv4:     "127.0.0.1",
					IPv6:     "none",
					STUNPort: stunPort,
					DERPPort: derpLn.Addr().(*net.TCPAddr).Port,
					// The DERP server's certificate is httptest's
					// self-signed one; there is no CA to check it against.
					InsecureForTests: true,
					STUNTestIP:       "127.0.0.1",
				}},
			},
		},
	}
	return r, nil
}

// HeadscaleDERPMap is the relay's DERP map as a Headscale DERP map file
// (the YAML that Headscale's derp.paths names: tailcfg's field names in
// lower case).
func (r *Relay) HeadscaleDERPMap() []byte {
	var b strings.Builder
	b.WriteString("# The tsdist offline DERP relay and STUN server on 127.0.0.1 (tsdist devnet --relay-only).\n")
	b.WriteString("regions:\n")
	for _, id := range slices.Sorted(maps.Keys(r.DERPMap.Regions)) {
		reg := r.DERPMap.Regions[id]
		fmt.Fprintf(&b, "  %d:\n    regionid: %d\n    regioncode: %s\n    regionname: %q\n    nodes:\n",
			id, reg.RegionID, reg.RegionCode, reg.RegionName)
		for _, n := range reg.Nodes {
			fmt.Fprintf(&b, "      - name: %q\n        regionid: %d\n        hostname: %q\n        ipv4: %q\n        ipv6: %q\n"+
				"        stunport: %d\n        derpport: %d\n        insecurefortests: %t\n        stuntestip: %q\n",
				n.Name, n.RegionID, n.HostName, n.IPv4, n.IPv6, n.STUNPort, n.DERPPort, n.InsecureForTests, n.STUNTestIP)
		}
	}
	return []byte(b.String())
}

// Close stops the relay and the STUN server. It is safe to call more than
// once.
func (r *Relay) Close() {
	r.closeOnce.Do(func() {
		for i := len(r.closers) - 1; i >= 0; i-- {
			r.closers[i]()
		}
	})
}

// trackOnline marks a node online while it holds a map stream open, as a
// real control server does, and offline once its last stream ends, telling
// every peer either way.
func (n *Net) trackOnline(req *tailcfg.MapRequest) (done func()) {
	if !req.Stream {
		return nil
	}
	n.setStreams(req.NodeKey, +1)
	return func() { n.setStreams(req.NodeKey, -1) }
}

func (n *Net) setStreams(k key.NodePublic, delta int) {
	n.onlineMu.Lock()
	defer n.onlineMu.Unlock()
	if n.streams == nil {
		n.streams = make(map[key.NodePublic]int)
	}
	before := n.streams[k]
	n.streams[k] += delta
	if n.streams[k] <= 0 {
		delete(n.streams, k)
	}
	online := n.streams[k] > 0
	if online == (before > 0) {
		return
	}
	node := n.control.Node(k)
	if node == nil {
		return
	}
	node.Online = &online
	if node.Created.IsZero() {
		// As a real control server records, when the node joined: which
		// of two nodes with one name came first decides what the name
		// means (carrier.Pick).
		node.Created = time.Now()
	}
	if !online {
		now := time.Now()
		node.LastSeen = &now
	}
	n.control.UpdateNode(node)
}

// Control returns the underlying test control server, for tests that need to
// change the tailnet (complete a login, expire nodes, inspect nodes).
func (n *Net) Control() *testcontrol.Server { return n.control }

// CompleteAuth approves a pending interactive login, given the login URL a
// node printed. It reports whether the URL was a pending login.
func (n *Net) CompleteAuth(loginURL string) bool {
	if n.control == nil {
		return false
	}
	return n.control.CompleteAuth(loginURL)
}

// Close stops the control server, DERP and STUN, closing every connection
// they hold. It is safe to call more than once.
func (n *Net) Close() {
	n.closeOnce.Do(func() {
		for i := len(n.closers) - 1; i >= 0; i-- {
			n.closers[i]()
		}
	})
}

// logWriter adapts a logger.Logf to an io.Writer for net/http's error log.
type logWriter logger.Logf

func (w logWriter) Write(p []byte) (int, error) {
	if len(p) > 0 && p[len(p)-1] == '\n' {
		p = p[:len(p)-1]
	}
	w("%s", p)
	return len(p), nil
}
