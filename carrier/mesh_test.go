package carrier_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/devnet"
	"github.com/tsdist/tsdist/internal/leakcheck"
)

// meshPort is the port every node of a mesh test listens on.
const meshPort = 7000

// TestMeshBothWays is a full mesh of fresh nodes in which both ends of every
// pair dial each other at the same moment, as BEAM nodes that connect to
// each other do. Every dial must get through and carry a byte each way.
// Crossing first dials are where WireGuard loses both handshakes (both
// initiations are answered, both answers are rejected; see docs/connection.md),
// so this is the case that must not stall.
//
// TSDIST_MESH_NODES and TSDIST_MESH_REPEATS make it bigger and repeat it, to
// measure; each repeat's slowest dial is logged. TSDIST_MESH_LOGS=1 keeps the
// nodes' tailscale logs of a repeat with a dial over 0.5 s, in $TMPDIR.
func TestMeshBothWays(t *testing.T) {
	leakcheck.Check(t)
	nodes := envInt(t, "TSDIST_MESH_NODES", 4)
	repeats := envInt(t, "TSDIST_MESH_REPEATS", 1)
	var slowest []time.Duration
	for r := range repeats {
		d := meshOnce(t, nodes, r)
		slowest = append(slowest, d)
		t.Logf("repeat %d: %d nodes, %d dials, slowest %v", r, nodes, nodes*(nodes-1), d.Round(time.Millisecond))
	}
	slices.Sort(slowest)
	t.Logf("slowest dial per repeat: median %v, max %v", slowest[len(slowest)/2].Round(time.Millisecond), slowest[len(slowest)-1].Round(time.Millisecond))
}

func envInt(t *testing.T, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a positive number", name, v)
	}
	return n
}

// meshOnce starts a tailnet of n fresh nodes, dials every ordered pair at
// once and returns the slowest dial (connect plus one byte each way).
func meshOnce(t *testing.T, n, repeat int) time.Duration {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var logs *strings.Builder
	var logMu sync.Mutex
	if os.Getenv("TSDIST_MESH_LOGS") != "" {
		logs = new(strings.Builder)
	}
	dn, err := devnet.Start(ctx, devnet.Options{SameUser: true})
	if err != nil {
		t.Fatal(err)
	}
	defer dn.Close()
	nodes := make([]*carrier.Node, n)
	var up sync.WaitGroup
	upErr := make([]error, n)
	for i := range nodes {
		name := fmt.Sprintf("m%d", i)
		cfg := carrier.Config{Hostname: name, ControlURL: dn.ControlURL, Dir: t.TempDir(), Ephemeral: true}
		if logs != nil {
			cfg.Logf = func(format string, args ...any) {
				logMu.Lock()
				fmt.Fprintf(logs, "%s %s "+format+"\n", append([]any{time.Now().Format("05.000000"), name}, args...)...)
				logMu.Unlock()
			}
		}
		node, err := carrier.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		nodes[i] = node
		defer node.Close()
		up.Add(1)
		go func() {
			defer up.Done()
			upErr[i] = node.Up(ctx)
		}()
	}
	up.Wait()
	addrs := make([]netip.Addr, n)
	for i, node := range nodes {
		if upErr[i] != nil {
			t.Fatalf("Up: %v", upErr[i])
		}
		ln, err := node.Listen(meshPort)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go echoOneByte(ln)
		addrs[i] = ipv4Of(t, ctx, node)
	}
	// Every node must see every other before the dials start, as a BEAM
	// node sees a peer in its discovery before it connects.
	for _, node := range nodes {
		for _, a := range addrs {
			waitPeer(t, ctx, node, a)
		}
	}

	type result struct {
		from, to int
		took     time.Duration
		err      error
	}
	results := make(chan result, n*n)
	start := make(chan struct{})
	var dials sync.WaitGroup
	for i := range nodes {
		for j := range nodes {
			if i == j {
				continue
			}
			dials.Add(1)
			go func() {
				defer dials.Done()
				<-start
				t0 := time.Now()
				err := dialAndEcho(ctx, nodes[i], netip.AddrPortFrom(addrs[j], meshPort))
				results <- result{i, j, time.Since(t0), err}
			}()
		}
	}
	close(start)
	dials.Wait()
	close(results)
	var slowest time.Duration
	var slow []string
	for r := range results {
		if r.err != nil {
			t.Errorf("repeat %d: m%d -> m%d: %v", repeat, r.from, r.to, r.err)
		}
		slowest = max(slowest, r.took)
		if r.took > 500*time.Millisecond {
			slow = append(slow, fmt.Sprintf("m%d->m%d %v", r.from, r.to, r.took.Round(time.Millisecond)))
		}
	}
	if logs != nil {
		logMu.Lock()
		text := logs.String()
		logMu.Unlock()
		if k := strings.Count(text, "carrier: first handshake"); k > 0 {
			t.Logf("repeat %d: %d lost first handshakes restarted (crossed: %d, raced: %d)", repeat, k,
				strings.Count(text, "crossed the peer's"), strings.Count(text, "raced the peer's"))
		}
	}
	if len(slow) > 0 {
		t.Logf("repeat %d: dials over 0.5 s: %s", repeat, strings.Join(slow, ", "))
		if logs != nil {
			path := filepath.Join(os.TempDir(), fmt.Sprintf("tsdist-mesh-%d.log", repeat))
			if err := os.WriteFile(path, []byte(logs.String()), 0o600); err != nil {
				t.Errorf("writing the nodes' logs: %v", err)
			} else {
				t.Logf("repeat %d: the nodes' logs are in %s", repeat, path)
			}
		}
	}
	return slowest
}

func echoOneByte(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			var b [1]byte
			if _, err := io.ReadFull(c, b[:]); err == nil {
				c.Write(b[:])
			}
		}()
	}
}

func dialAndEcho(ctx context.Context, from *carrier.Node, to netip.AddrPort) error {
	c, err := from.DialIP(ctx, to)
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := c.Write([]byte{42}); err != nil {
		return err
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return fmt.Errorf("echo: %w", err)
	}
	return nil
}

// ipv4Of is the node's tailnet IPv4 address.
func ipv4Of(t *testing.T, ctx context.Context, node *carrier.Node) netip.Addr {
	t.Helper()
	st, err := node.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, ip := range st.Self.IPs {
		if a, err := netip.ParseAddr(ip); err == nil && a.Is4() {
			return a
		}
	}
	t.Fatalf("%s has no IPv4 address", node.Hostname())
	return netip.Addr{}
}

func waitPeer(t *testing.T, ctx context.Context, node *carrier.Node, addr netip.Addr) {
	t.Helper()
	for {
		st, err := node.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if slices.Contains(st.Self.IPs, addr.String()) {
			return
		}
		for _, p := range st.Peers {
			if slices.Contains(p.IPs, addr.String()) {
				return
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s never saw %v", node.Hostname(), addr)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
