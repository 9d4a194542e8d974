// Package ergonode runs a Go node of an Erlang cluster, built on ergo
// (github.com/ergo-services/ergo v1.999.224), as its own device on a
// tailnet: the same cluster, by hostname, as BEAM nodes using tsdist.
//
// The Go program embeds its own tsdist device (package host: a tailnet
// node through package carrier, its EPMD on tailnet port 4369, its access
// policy; no helper process). It answers EPMD on its tailnet address for
// its own name, resolves peers through the tailnet EPMD of their hosts, and
// accepts and dials distribution connections over the tailnet.
//
// # One policy, both directions
//
// The access policy (package access, default "owner") decides every
// exchange with another device, as it does for a BEAM node's helper:
//
//   - Accepting: a connection to the distribution port or to EPMD from a
//     device the policy does not admit is closed before a byte is read.
//   - Dialling: a peer's host name is resolved only among the devices the
//     policy admits ([host.Host.Resolve]); the EPMD look-up and the
//     distribution connection go to that one device, and the device at the
//     other end is checked again once connected. A name that only other
//     devices answer to (a stranger that asked for the hostname "beta") is
//     never sent a byte: ergo's connect fails, and the refusal, naming the
//     host and the device found, goes to Options.Logf. (ergo reports every
//     failed connect as lib.ErrNoRoute, whatever the cause.)
//
// # How connections reach ergo
//
// ergo has no listener or dialer hook: node/network.go calls
// net.ListenConfig and net.Dialer itself. What it does let a program swap
// is the Registrar, the Handshake and the Proto, and every byte of a
// connection passes through the latter two. So ergo's own sockets stay on
// loopback and carry nothing: they only set ergo's connection machinery
// going. The bytes go over the tailnet connection, which the Handshake
// and Proto of this package put in place of ergo's loopback socket:
//
//   - Accepting: a tailnet connection the access policy admits makes the
//     adapter dial ergo's loopback listener; ergo's accept path then calls
//     the adapter's Handshake, which takes the tailnet connection waiting
//     for that loopback address and runs ergo's handshake over it.
//     A loopback connection that no tailnet connection is waiting for is
//     refused before a byte is read, so a local process cannot reach the
//     node around the tailnet's identity check (and it would still need the
//     cookie).
//   - Dialling: the Registrar resolves a peer on its host's tailnet EPMD and
//     returns a route to a loopback listener of the adapter's (the dial
//     listener), whose Handshake dials the tailnet. The Handshake first
//     takes the dial listener's connection from the exact address ergo
//     dialled from; any other local connection to that listener is closed
//     without a byte read or written: at once when no dial is under way,
//     else as soon as the dials under way have found their own. A local
//     process can neither stand in for ergo's connection nor hold the
//     listener's connections open.
//
// Each tailnet connection lives exactly as long as ergo's loopback socket:
// when ergo closes its end, the adapter sees end-of-file on the other and
// closes the tailnet connection. Stop closes them all, and the host waits
// [host.FINGrace] for their last packets before it leaves the tailnet.
//
// # What this repairs in ergo
//
// ergo v1.999.224 cannot talk to OTP 26 or later, and answers net_adm:ping
// with pang. Without forking it, the adapter
//   - adds DFLAG_UNLINK_ID to the flags ergo advertises (handshakeConn),
//   - translates UNLINK_ID and UNLINK_ID_ACK, which ergo does not know, and
//     the old UNLINK ergo sends, which OTP 27 rejects (repairConn),
//   - puts back the words of five-word references (process aliases) that
//     ergo cuts to three, without which replies to gen_server:call from
//     OTP 26+ are lost (repairConn, longRefs),
//   - registers a net_kernel that answers is_auth with yes.
package ergonode

import (
	"context"
	"fmt"
	"log"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/ergo-services/ergo"
	"github.com/ergo-services/ergo/node"
	"github.com/ergo-services/ergo/proto/dist"
	"github.com/tsdist/tsdist/access"
	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/epmd"
	"github.com/tsdist/tsdist/host"
	"tailscale.com/types/logger"
)

// Options configures a Go node on a tailnet. Only Tailnet.Dir is
// required, and not even that for an ephemeral node (Tailnet.Ephemeral),
// which then keeps its state in a temporary directory removed by Stop.
type Options struct {
	// Tailnet is the node's own tailnet device: control URL, auth key,
	// state directory, tags. Hostname defaults to the host part of the
	// node name ("delta" for "demo@delta" or "demo@delta.example.ts.net").
	// When the control URL is on loopback (the offline tailnet), every
	// packet is kept on loopback (carrier.KeepToLoopback).
	Tailnet carrier.Config
	// Allow is the access policy (see package access) for the peers that
	// connect to this node and its EPMD, and for the peers it connects to
	// or asks for ports. Empty means access.Default, "owner".
	Allow string
	// Port is the tailnet port for distribution connections. Zero picks
	// a free one; peers learn it from this node's tailnet EPMD.
	Port uint16
	// Ergo is passed to ergo, with the adapter's Listeners, Registrar,
	// Handshake and Proto put in; those four and StaticRoutesOnly must be
	// left zero. Applications, Env, Flags, Creation and the rest are
	// ergo's, as documented there.
	Ergo node.Options
	// ProtoOptions tunes ergo's distribution protocol handler. The zero
	// value means node.DefaultProtoOptions(), except that FragmentationUnit
	// is at most the package's FragmentationUnit (see there) and
	// NumHandlers is always 1 (see docs/ergo.md: more reorder messages).
	ProtoOptions node.ProtoOptions
	// Logf receives the adapter's and its device's log lines: refused
	// peers (both directions), repairs that could not be made. Nil means
	// the standard logger.
	Logf logger.Logf
}

// resolveTimeout bounds one EPMD lookup of a peer over the tailnet.
const resolveTimeout = 10 * time.Second

// Node is an ergo node on a tailnet. Its embedded node.Node is the ergo
// node itself: spawn processes, send, link and monitor with it as usual.
type Node struct {
	node.Node

	name string
	host *host.Host
	logf logger.Logf
	// quietf is logf, rate-limited, for what others can make happen as
	// often as they like: local connections refused, dials refused.
	quietf logger.Logf
	refs   *longRefs
	bridge *bridge
	port   uint16 // the tailnet distribution port

	reg    *epmd.Registration
	distLn net.Listener

	tempDir string // an ephemeral node's state directory, removed by Stop

	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	stopOnce sync.Once
}

// Start brings up the tailnet device, then the ergo node named name (for
// example "demo@delta") with the given cookie, and publishes the name on
// the device's tailnet EPMD once the node can answer. ctx bounds the start
// (joining the tailnet included); the node runs until Stop.
func Start(ctx context.Context, name, cookie string, opts Options) (_ *Node, err error) {
	alive, hostPart, ok := strings.Cut(name, "@")
	if !ok || hostPart == "" {
		return nil, fmt.Errorf("ergonode: node name %q must look like name@host", name)
	}
	if err := epmd.ValidName(alive); err != nil {
		return nil, fmt.Errorf("ergonode: node name %q: %w", name, err)
	}
	o := opts.Ergo
	for _, f := range []struct {
		name string
		set  bool
	}{
		{"Listeners", o.Listeners != nil}, {"Registrar", o.Registrar != nil}, {"Handshake", o.Handshake != nil},
		{"Proto", o.Proto != nil}, {"StaticRoutesOnly", o.StaticRoutesOnly},
	} {
		if f.set {
			return nil, fmt.Errorf("ergonode: Options.Ergo.%s must be left zero: the adapter sets it", f.name)
		}
	}
	policy, err := access.Parse(opts.Allow)
	if err != nil {
		return nil, fmt.Errorf("ergonode: %w", err)
	}
	cfg := opts.Tailnet
	if cfg.Hostname == "" {
		cfg.Hostname, _, _ = strings.Cut(hostPart, ".")
	}
	var tempDir string
	if cfg.Dir == "" && cfg.Ephemeral {
		if tempDir, err = os.MkdirTemp("", "ergonode-"+cfg.Hostname+"-"); err != nil {
			return nil, fmt.Errorf("ergonode: state directory: %w", err)
		}
		cfg.Dir = tempDir
	}
	logf := opts.Logf
	if logf == nil {
		logf = log.Printf
	}

	// A control URL on loopback keeps every packet on loopback (host.New).
	h, err := host.New(host.Config{Tailnet: cfg, Policy: policy, Logf: logf})
	if err != nil {
		if tempDir != "" {
			os.RemoveAll(tempDir)
		}
		return nil, fmt.Errorf("ergonode: %w", err)
	}
	nctx, cancel := context.WithCancel(context.Background())
	n := &Node{
		name: name, host: h, logf: logf, quietf: logger.RateLimitedFn(logf, time.Minute, 10, 100),
		refs: newLongRefs(), ctx: nctx, cancel: cancel, tempDir: tempDir,
	}
	defer func() {
		if err != nil {
			n.Stop()
		}
	}()
	if err := h.Up(ctx); err != nil {
		return nil, fmt.Errorf("ergonode: joining the tailnet: %w", err)
	}
	n.wg.Go(func() {
		select {
		case err := <-h.Failed():
			n.logf("ergonode: %v", err)
		case <-nctx.Done():
		}
	})
	if n.distLn, err = h.Node().Listen(opts.Port); err != nil {
		return nil, fmt.Errorf("ergonode: distribution listener on the tailnet: %w", err)
	}
	if n.port, err = carrier.AddrPort(n.distLn.Addr().String()); err != nil {
		return nil, fmt.Errorf("ergonode: distribution listener: %w", err)
	}
	if n.bridge, err = newBridge(n); err != nil {
		return nil, err
	}

	protoOpts := opts.ProtoOptions
	if protoOpts == (node.ProtoOptions{}) {
		protoOpts = node.DefaultProtoOptions()
	}
	// ergo hands the packets it reads to its handlers in turn, and they
	// run at once: with more than one, two messages from one BEAM process
	// can arrive in the wrong order, and a long message's fragments can be
	// joined to the next message's (OTP reuses a sender's sequence id).
	// One handler keeps Erlang's order between two processes.
	protoOpts.NumHandlers = 1
	if protoOpts.FragmentationUnit <= 0 || protoOpts.FragmentationUnit > FragmentationUnit {
		// ergo writes a packet over 64,000 bytes past its write buffer, so
		// it overtakes the messages buffered before it; with fragments of
		// at most FragmentationUnit bytes no packet is that long.
		protoOpts.FragmentationUnit = FragmentationUnit
	}
	inner := dist.CreateHandshake(dist.HandshakeOptions{Version: dist.HandshakeVersion6})
	o.Handshake = &listenHandshake{inner: inner, b: n.bridge}
	o.Proto = &tailnetProto{inner: dist.CreateProto(protoOpts), b: n.bridge}
	o.Registrar = &registrar{n: n, handshake: inner}
	o.Listeners = []node.Listener{{Hostname: "127.0.0.1"}}
	en, err := ergo.StartNodeWithContext(nctx, name, cookie, o)
	if err != nil {
		return nil, fmt.Errorf("ergonode: starting the ergo node: %w", err)
	}
	n.Node = en
	if err := replaceNetKernel(en); err != nil {
		return nil, err
	}
	n.wg.Go(func() { n.acceptLoop() })
	n.reg, err = h.Registry().Register(epmd.Node{
		Name: alive, Port: n.port, Type: epmd.NodeTypeNormal, Protocol: epmd.ProtocolTCP,
		HighestVersion: 6, LowestVersion: 5,
	})
	if err != nil {
		return nil, fmt.Errorf("ergonode: registering %q on the tailnet EPMD: %w", alive, err)
	}
	return n, nil
}

// Stop stops the ergo node, withdraws its name from the tailnet EPMD,
// closes every connection and leaves the tailnet (after the host's FIN
// grace, so that peers learn at once that the connections ended). It
// returns once all of the adapter's goroutines have ended.
func (n *Node) Stop() {
	n.stopOnce.Do(func() {
		if n.reg != nil {
			n.reg.Close()
		}
		if n.distLn != nil {
			n.distLn.Close()
		}
		if n.Node != nil {
			n.Node.Stop()
			n.Node.Wait()
		}
		n.cancel()
		if n.bridge != nil {
			n.bridge.close()
		}
		n.host.Close()
		n.wg.Wait()
		if n.tempDir != "" {
			os.RemoveAll(n.tempDir)
		}
	})
}

// Host returns the node's tsdist device: its tailnet node, EPMD and access
// policy. Dial and look up other devices through it, not through its
// tailnet node, for the policy to apply. Stop closes it; do not close it
// yourself.
func (n *Node) Host() *host.Host { return n.host }

// Tailnet returns the node's tailnet device, for status and identity
// lookups. It applies no access policy; see Host.
func (n *Node) Tailnet() *carrier.Node { return n.host.Node() }

// TailnetPort returns the tailnet port the node accepts distribution
// connections on.
func (n *Node) TailnetPort() uint16 { return n.port }

// SetPolicy replaces the access policy (see package access) for the
// connections accepted and the peers dialled and looked up from now on;
// connections already up are not affected.
func (n *Node) SetPolicy(p access.Policy) { n.host.SetPolicy(p) }

// Identity returns the tailnet identity of the connected node peer (for
// example "app@alpha"): its tailnet device, owner and tags, as the
// tailnet's control server vouches for them. ok is false when no
// connection to peer is up.
func (n *Node) Identity(peer string) (id carrier.Identity, ok bool) {
	return n.bridge.identity(peer)
}

// acceptLoop admits tailnet connections and hands them to ergo.
func (n *Node) acceptLoop() {
	for {
		conn, err := n.distLn.Accept()
		if err != nil {
			return
		}
		n.wg.Go(func() {
			peer, err := n.host.Admit(n.ctx, conn, fmt.Sprintf("distribution port %d", n.port))
			if err != nil {
				conn.Close()
				return
			}
			if err := n.bridge.accept(conn, peer); err != nil {
				n.logf("ergonode: connection from %s (%s) not handed to ergo: %v", peer.Node, peer.Addr, err)
				conn.Close()
			}
		})
	}
}
