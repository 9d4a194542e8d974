package ergonode

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ergo-services/ergo/etf"
	"github.com/ergo-services/ergo/gen"
	"github.com/tsdist/tsdist/access"
	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/devnet"
	"github.com/tsdist/tsdist/epmd"
	"github.com/tsdist/tsdist/host"
	"github.com/tsdist/tsdist/internal/leakcheck"
)

// echoServer answers {echo, Term} with Term: the gen server the Go↔Go test
// calls across the tailnet.
type echoServer struct{ gen.Server }

func (echoServer) HandleCall(sp *gen.ServerProcess, from gen.ServerFrom, message etf.Term) (etf.Term, gen.ServerStatus) {
	if t, ok := message.(etf.Tuple); ok && len(t) == 2 && t[0] == etf.Atom("echo") {
		return t[1], gen.ServerStatusOK
	}
	return etf.Atom("bad_request"), gen.ServerStatusOK
}

// callRequest asks a caller process to make a gen_server call.
type callRequest struct {
	to  gen.ProcessID
	msg etf.Term
}

// caller makes gen_server calls on the test's behalf: a call needs a
// process to come from, and the test goroutine is not one.
type caller struct{ gen.Server }

func (caller) HandleDirect(sp *gen.ServerProcess, ref etf.Ref, message interface{}) (interface{}, gen.DirectStatus) {
	req := message.(callRequest)
	reply, err := sp.CallWithTimeout(req.to, req.msg, 3)
	if err != nil {
		return nil, err
	}
	return reply, gen.DirectStatusOK
}

// startTestNode starts an ergonode node on the offline tailnet with its own
// state directory, stopped when the test ends.
func startTestNode(t *testing.T, ctx context.Context, dn *devnet.Net, name, allow string) *Node {
	t.Helper()
	n, err := Start(ctx, name, "secret", Options{
		Tailnet: carrier.Config{ControlURL: dn.ControlURL, Dir: t.TempDir(), Ephemeral: true},
		Allow:   allow,
		Logf:    t.Logf,
	})
	if err != nil {
		t.Fatalf("Start(%s): %v", name, err)
	}
	t.Cleanup(n.Stop)
	return n
}

// call makes a call from a process on n to name@peer, as a Go program
// using ergonode would.
func call(t *testing.T, n *Node, name, peer string, msg etf.Term) (etf.Term, error) {
	t.Helper()
	p, err := n.Spawn("", gen.ProcessOptions{}, &caller{})
	if err != nil {
		t.Fatalf("spawning a caller on %s: %v", n.name, err)
	}
	defer p.Kill()
	return p.DirectWithTimeout(callRequest{to: gen.ProcessID{Name: name, Node: peer}, msg: msg}, 10)
}

func TestNodesOverTailnet(t *testing.T) {
	leakcheck.Check(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dn, err := devnet.Start(ctx, devnet.Options{SameUser: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dn.Close) // cleanups run last-in first-out: after the nodes stop

	alpha := startTestNode(t, ctx, dn, "one@alpha", "")
	beta := startTestNode(t, ctx, dn, "two@beta", "")
	gamma := startTestNode(t, ctx, dn, "three@gamma", "host:nobody")
	for _, n := range []*Node{alpha, gamma} {
		if _, err := n.Spawn("echo", gen.ProcessOptions{}, &echoServer{}); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("dial listener refuses local connections", func(t *testing.T) {
		// Nothing dials: a local connection is closed at once.
		if err := wantClosedAtOnce(beta.bridge.trigger.Addr().String(), time.Second); err != nil {
			t.Fatal(err)
		}
		// Local processes keep connecting while beta dials alpha (the
		// first connection between them): each is closed without a
		// byte, and the dial still gets through.
		stop := make(chan struct{})
		errs := make(chan error, 1)
		tried := 0
		go func() {
			defer close(errs)
			for {
				select {
				case <-stop:
					return
				default:
				}
				tried++
				if err := wantClosedAtOnce(beta.bridge.trigger.Addr().String(), claimTimeout+time.Second); err != nil {
					errs <- err
					return
				}
			}
		}()
		reply, err := call(t, beta, "echo", "one@alpha", etf.Tuple{etf.Atom("echo"), "first"})
		close(stop)
		if err := <-errs; err != nil {
			t.Error(err)
		}
		if err != nil || reply != "first" {
			t.Fatalf("call to echo on one@alpha while local processes crowd the dial listener = %#v, %v; want \"first\"", reply, err)
		}
		t.Logf("%d local connections refused during the dial", tried)
	})

	t.Run("call by name@host", func(t *testing.T) {
		for i := range 3 {
			reply, err := call(t, beta, "echo", "one@alpha", etf.Tuple{etf.Atom("echo"), i})
			if err != nil || reply != i {
				t.Fatalf("call %d to echo on one@alpha = %#v, %v; want %d", i, reply, err, i)
			}
		}
	})

	t.Run("identity", func(t *testing.T) {
		id, ok := alpha.Identity("two@beta")
		if !ok || id.Node != "beta" || id.User == "" {
			t.Errorf("alpha.Identity(two@beta) = %+v, %v; want beta's tailnet identity", id, ok)
		}
		id, ok = beta.Identity("one@alpha")
		if !ok || id.Node != "alpha" {
			t.Errorf("beta.Identity(one@alpha) = %+v, %v; want alpha's tailnet identity", id, ok)
		}
		if id, ok := beta.Identity("three@gamma"); ok {
			t.Errorf("beta.Identity(three@gamma) = %+v for a node never connected", id)
		}
	})

	t.Run("policy refuses", func(t *testing.T) {
		reply, err := call(t, beta, "echo", "three@gamma", etf.Tuple{etf.Atom("echo"), 1})
		if err == nil {
			t.Fatalf("call to three@gamma, whose policy refuses beta, = %#v; want an error", reply)
		}
		// The distribution port itself closes on beta without a byte.
		c, err := beta.Tailnet().Dial(ctx, "gamma", gamma.TailnetPort())
		if err != nil {
			t.Fatalf("dialling gamma's distribution port: %v", err)
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if got, err := io.ReadAll(c); len(got) != 0 || err != nil {
			t.Errorf("gamma's distribution port gave beta %q, %v; want it closed at once", got, err)
		}
		if _, ok := gamma.Identity("two@beta"); ok {
			t.Errorf("gamma has a connection from two@beta, which its policy refuses")
		}
	})

	t.Run("loopback refused", func(t *testing.T) {
		alpha.bridge.mu.Lock()
		addr := alpha.bridge.ergoAddr
		alpha.bridge.mu.Unlock()
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatalf("dialling ergo's loopback listener %s: %v", addr, err)
		}
		defer c.Close()
		// A well-formed send_name: ergo would answer it with a status
		// message if the handshake went ahead.
		name := "intruder@localhost"
		msg := []byte{0, byte(1 + 8 + 4 + 2 + len(name)), 'N', 0, 0, 0, 0, 0x0d, 0x07, 0x7f, 0xfd, 0, 0, 0, 1, 0, byte(len(name))}
		msg = append(msg, name...)
		if _, err := c.Write(msg); err != nil {
			t.Logf("writing send_name: %v (closed already)", err)
		}
		// No tailnet connection is being handed to ergo, so nothing can
		// be waiting for this one: it is refused at once.
		c.SetReadDeadline(time.Now().Add(time.Second))
		got, err := io.ReadAll(c)
		if len(got) != 0 {
			t.Errorf("ergo answered a loopback connection that did not come through the tailnet: %q", got)
		}
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Errorf("the loopback connection was not closed within %v", time.Second)
		}
	})

	t.Run("stop", func(t *testing.T) {
		for _, n := range []*Node{beta, gamma, alpha} {
			start := time.Now()
			n.Stop()
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("Stop of %s took %v", n.name, d)
			}
		}
	})
}

// wantClosedAtOnce connects to a loopback listener of the adapter's as a
// local process would, and wants the connection closed within d without a
// byte.
func wantClosedAtOnce(addr string, d time.Duration) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return fmt.Errorf("dialling %s: %v", addr, err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(d))
	got, err := io.ReadAll(c)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return fmt.Errorf("a local connection to %s was not closed within %v", addr, d)
	}
	if len(got) != 0 {
		return fmt.Errorf("a local connection to %s received %q", addr, got)
	}
	return nil
}

// logLines records a node's log lines for a test, and passes them on to
// t.Logf.
type logLines struct {
	t     *testing.T
	mu    sync.Mutex
	lines []string
}

func (l *logLines) logf(format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	l.mu.Lock()
	l.lines = append(l.lines, line)
	l.mu.Unlock()
	l.t.Log(line)
}

// find returns the first line holding every one of words.
func (l *logLines) find(words ...string) (string, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, line := range l.lines {
		if !slices.ContainsFunc(words, func(w string) bool { return !strings.Contains(line, w) }) {
			return line, true
		}
	}
	return "", false
}

// countAccepts listens on a tailnet port of a device and counts the
// connections that reach it, closing each at once.
func countAccepts(t *testing.T, n *carrier.Node, port uint16) *atomic.Int64 {
	t.Helper()
	ln, err := n.Listen(port)
	if err != nil {
		t.Fatal(err)
	}
	var count atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			count.Add(1)
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return &count
}

// waitPeerState waits until n sees a device holding ip online (online
// true), or offline or not at all (false).
func waitPeerState(t *testing.T, ctx context.Context, n *carrier.Node, ip string, online bool) {
	t.Helper()
	for {
		st, err := n.Status(ctx)
		if err == nil {
			i := slices.IndexFunc(st.Peers, func(p carrier.Peer) bool { return slices.Contains(p.IPs, ip) })
			if online == (i >= 0 && st.Peers[i].Online) {
				return
			}
		}
		if ctx.Err() != nil {
			t.Fatalf("%s never saw %s online=%v", n.Hostname(), ip, online)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestStrangerCannotStandInForAPeer: a Go node whose policy admits only
// beta's owner reaches beta, not a device of another user that asks for
// the hostname "beta" after it (which, without the policy, would be what
// "beta" means: the newest online device of that name). Its connect to a
// name only the stranger answers to fails with an error naming the host
// and the stranger (ergo's Resolve returns it; ergo's Connect says only
// lib.ErrNoRoute, so it is logged too), and the same holds once beta has
// stopped. The stranger receives no connection at all.
func TestStrangerCannotStandInForAPeer(t *testing.T) {
	leakcheck.Check(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	dn, err := devnet.Start(ctx, devnet.Options{}) // every device its own user
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dn.Close)

	beta := startTestNode(t, ctx, dn, "app@beta", "*")
	if _, err := beta.Spawn("echo", gen.ProcessOptions{}, &echoServer{}); err != nil {
		t.Fatal(err)
	}
	st, err := beta.Tailnet().Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	betaSelf := st.Self
	logs := &logLines{t: t}
	alpha, err := Start(ctx, "probe@alpha", "secret", Options{
		Tailnet: carrier.Config{ControlURL: dn.ControlURL, Dir: t.TempDir(), Ephemeral: true},
		Allow:   "user:" + betaSelf.User,
		Logf:    logs.logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(alpha.Stop)

	stranger, err := carrier.New(carrier.Config{Hostname: "beta", ControlURL: dn.ControlURL, Dir: t.TempDir(), Ephemeral: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stranger.Close() })
	if err := stranger.Up(ctx); err != nil {
		t.Fatal(err)
	}
	strangerAt := map[uint16]*atomic.Int64{
		epmd.DefaultPort:   countAccepts(t, stranger, epmd.DefaultPort),
		beta.TailnetPort(): countAccepts(t, stranger, beta.TailnetPort()),
	}
	st, err = stranger.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	strangerSelf := st.Self
	if strangerSelf.Hostname != "beta" || strangerSelf.User == "" || strangerSelf.User == betaSelf.User {
		t.Fatalf("the stranger is %+v; want hostname beta, of a user other than beta's (%s)", strangerSelf, betaSelf.User)
	}
	waitPeerState(t, ctx, alpha.Tailnet(), betaSelf.IPs[0], true)
	waitPeerState(t, ctx, alpha.Tailnet(), strangerSelf.IPs[0], true)

	// The positive control: with the stranger online, app@beta is beta's.
	reply, err := call(t, alpha, "echo", "app@beta", etf.Tuple{etf.Atom("echo"), "hi"})
	if err != nil || reply != "hi" {
		t.Fatalf("call to echo on app@beta with the stranger online = %#v, %v; want \"hi\" from beta", reply, err)
	}
	if id, ok := alpha.Identity("app@beta"); !ok || id.User != betaSelf.User {
		t.Errorf("alpha.Identity(app@beta) = %+v, %v; want beta of %s", id, ok, betaSelf.User)
	}

	// wantRefused: alpha's connect to peer fails, naming the stranger.
	wantRefused := func(peer string) {
		t.Helper()
		if err := alpha.Connect(peer); err == nil {
			t.Errorf("alpha connected to %s, which only the stranger answers to", peer)
		}
		_, err := alpha.Resolve(peer)
		var na *host.NotAllowedError
		if !errors.As(err, &na) || !errors.Is(err, access.ErrDenied) {
			t.Errorf("ergo's Resolve(%s) = %v; want a *host.NotAllowedError", peer, err)
			return
		}
		_, hostPart, _ := strings.Cut(peer, "@")
		if na.Host != hostPart || na.Peer.User != strangerSelf.User || !slices.Equal(na.Peer.IPs, strangerSelf.IPs) {
			t.Errorf("Resolve(%s) refused %q as %+v; want %q as the stranger %+v", peer, na.Host, na.Peer, hostPart, strangerSelf)
		}
		if line, ok := logs.find("not connecting to "+peer, strangerSelf.User); !ok {
			t.Errorf("no log line says why alpha does not connect to %s", peer)
		} else if !strings.Contains(line, hostPart) {
			t.Errorf("the log line %q does not name the host %s", line, hostPart)
		}
	}
	wantRefused("app@" + strangerSelf.IPs[0])

	// beta stops. The offline tailnet's control server may keep it,
	// offline, as a node killed without logging out lingers (then "beta"
	// still means it, and the connect fails to reach it), or drop it (then
	// only the stranger answers to "beta", and is refused).
	beta.Stop()
	waitPeerState(t, ctx, alpha.Tailnet(), betaSelf.IPs[0], false)
	for deadline := time.Now().Add(10 * time.Second); slices.Contains(alpha.Nodes(), "app@beta"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("alpha still has a connection to app@beta after beta stopped")
		}
	}
	if _, ip, err := alpha.Host().Resolve(ctx, "beta"); err == nil {
		if ip.User != betaSelf.User {
			t.Errorf("with beta stopped, \"beta\" means %+v", ip)
		}
		if err := alpha.Connect("app@beta"); err == nil {
			t.Errorf("alpha connected to app@beta with beta stopped")
		}
	} else {
		wantRefused("app@beta")
	}

	time.Sleep(200 * time.Millisecond) // a connection on its way would have landed
	for port, c := range strangerAt {
		if n := c.Load(); n != 0 {
			t.Errorf("the stranger received %d connections on port %d", n, port)
		}
	}
}
