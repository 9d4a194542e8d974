package ergonode

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/ergo-services/ergo/etf"
	"github.com/ergo-services/ergo/gen"
	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/devnet"
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
		c.SetReadDeadline(time.Now().Add(claimTimeout + 5*time.Second))
		got, err := io.ReadAll(c)
		if len(got) != 0 {
			t.Errorf("ergo answered a loopback connection that did not come through the tailnet: %q", got)
		}
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Errorf("the loopback connection was not closed within %v", claimTimeout+5*time.Second)
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
