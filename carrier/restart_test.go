package carrier_test

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/devnet"
	"github.com/tsdist/tsdist/internal/leakcheck"
)

// TestRestartedPeerKeepsItsPort restarts a node on its state directory (same
// node key, new disco key, as a restarted helper or Go node) and redials it
// from a peer that had a session with it. The restarted node must be back on
// its UDP port, so that the path the peer trusts is right (see
// carrier/udpport.go), and the redial must get through.
//
// TSDIST_RESTART_REPEATS restarts it more times, to measure; each redial's
// time is logged (docs/connection.md has the numbers).
func TestRestartedPeerKeepsItsPort(t *testing.T) {
	leakcheck.Check(t)
	repeats := envInt(t, "TSDIST_RESTART_REPEATS", 1)
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(30+20*repeats)*time.Second)
	defer cancel()
	dn, err := devnet.Start(ctx, devnet.Options{SameUser: true})
	if err != nil {
		t.Fatal(err)
	}
	defer dn.Close()
	start := func(name, dir string) *carrier.Node {
		t.Helper()
		node, err := carrier.New(carrier.Config{Hostname: name, ControlURL: dn.ControlURL, Dir: dir})
		if err != nil {
			t.Fatal(err)
		}
		if err := node.Up(ctx); err != nil {
			node.Close()
			t.Fatal(err)
		}
		return node
	}
	dialer := start("survivor", t.TempDir())
	defer dialer.Close()
	dir := t.TempDir()
	restarted := start("restarted", dir)
	defer func() { restarted.Close() }()
	ln, err := restarted.Listen(meshPort)
	if err != nil {
		t.Fatal(err)
	}
	go echoOneByte(ln)
	addr := ipv4Of(t, ctx, restarted)
	waitPeer(t, ctx, dialer, addr)
	if err := dialAndEcho(ctx, dialer, netip.AddrPortFrom(addr, meshPort)); err != nil {
		t.Fatalf("first dial: %v", err)
	}
	port := restarted.UDPPort()
	if port == 0 {
		t.Fatal("UDPPort is 0 on a node that is up")
	}
	var took []time.Duration
	for r := range repeats {
		ln.Close()
		if err := restarted.Close(); err != nil {
			t.Fatalf("repeat %d: close: %v", r, err)
		}
		restarted = start("restarted", dir)
		if got := restarted.UDPPort(); got != port {
			t.Fatalf("repeat %d: restarted on UDP port %d, want its old port %d", r, got, port)
		}
		if got := ipv4Of(t, ctx, restarted); got != addr {
			t.Fatalf("repeat %d: restarted with address %v, want %v (same node key)", r, got, addr)
		}
		if ln, err = restarted.Listen(meshPort); err != nil {
			t.Fatal(err)
		}
		go echoOneByte(ln)
		t0 := time.Now()
		if err := dialAndEcho(ctx, dialer, netip.AddrPortFrom(addr, meshPort)); err != nil {
			t.Fatalf("repeat %d: redial: %v", r, err)
		}
		took = append(took, time.Since(t0))
		t.Logf("repeat %d: redial after restart took %v", r, took[r].Round(100*time.Microsecond))
	}
	ln.Close()
	slices.Sort(took)
	t.Logf("redial after restart: median %v, max %v over %d", took[len(took)/2].Round(100*time.Microsecond), took[len(took)-1].Round(100*time.Microsecond), len(took))
}
