package test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/control"
	"github.com/tsdist/tsdist/devnet"
)

// TestHelpersRunning checks what TestMain brought up: two helper processes
// on the tailnet, each seeing the other, under different users.
func TestHelpersRunning(t *testing.T) {
	ctx := testContext(t, 20*time.Second)
	t.Logf("alpha (pid %d) Running %v after process start", alpha.pid(), alpha.upAfter.Round(time.Microsecond))
	t.Logf("beta (pid %d) Running %v after process start", beta.pid(), beta.upAfter.Round(time.Microsecond))
	for _, h := range []*helper{alpha, beta} {
		if h.upAfter > 10*time.Second {
			t.Errorf("%s took %v to reach Running", h.name, h.upAfter)
		}
	}
	a, b := dialControl(t, ctx, alpha), dialControl(t, ctx, beta)
	if a.Hello.Hostname != "alpha" || a.Hello.State != "Running" || a.Hello.Version != control.Version {
		t.Errorf("alpha's hello: %+v", a.Hello)
	}
	if b.Hello.Hostname != "beta" || b.Hello.State != "Running" {
		t.Errorf("beta's hello: %+v", b.Hello)
	}
	sa, sb := selfOf(t, ctx, a), selfOf(t, ctx, b)
	if sa.Node != "alpha" || sa.DNSName != "alpha."+devnet.MagicDNSDomain {
		t.Errorf("alpha's self: %+v", sa)
	}
	if sb.Node != "beta" || sb.DNSName != "beta."+devnet.MagicDNSDomain {
		t.Errorf("beta's self: %+v", sb)
	}
	if sa.User == "" || sb.User == "" || sa.User == sb.User {
		t.Errorf("users alpha %q, beta %q: want two different users", sa.User, sb.User)
	}
	if pb := waitPeer(t, ctx, a, "beta"); !slices.Equal(pb.IPs, sb.IPs) || pb.User != sb.User {
		t.Errorf("alpha sees beta as %+v; beta is %+v", pb, sb)
	}
	if pa := waitPeer(t, ctx, b, "alpha"); !slices.Equal(pa.IPs, sa.IPs) || pa.User != sa.User {
		t.Errorf("beta sees alpha as %+v; alpha is %+v", pa, sa)
	}
}

// TestEndpointsLoopbackOnly checks that the helpers, started with no
// tailscale knobs in their environment, keep to loopback by themselves
// because their control URL is on loopback: they say so in hello, and the
// control server's own records show only loopback endpoints for them.
func TestEndpointsLoopbackOnly(t *testing.T) {
	ctx := testContext(t, 20*time.Second)
	for _, h := range []*helper{alpha, beta} {
		c := dialControl(t, ctx, h)
		if !c.Hello.LocalOnly {
			t.Errorf("%s does not report local_only though its control URL is on loopback", h.name)
		}
		waitPeer(t, ctx, c, otherOf(h))
	}
	nodes := tailnet.Control().AllNodes()
	if len(nodes) < 2 {
		t.Fatalf("control server knows %d nodes; want at least alpha and beta", len(nodes))
	}
	for _, n := range nodes {
		if len(n.Endpoints) == 0 {
			t.Errorf("node %s advertises no endpoints at all", n.Name)
		}
		for _, ep := range n.Endpoints {
			if !ep.Addr().IsLoopback() {
				t.Errorf("node %s advertises endpoint %v, which is not on loopback", n.Name, ep)
			}
		}
	}
}

// TestNoHostTCPListener checks the promise of no open ports: the helper
// holds no listening TCP socket on the host (its tailnet listeners live in
// the userspace network stack; tailscale's PeerAPI, which would listen on
// the host, is built out).
func TestNoHostTCPListener(t *testing.T) {
	for _, h := range []*helper{alpha, beta} {
		inodes := map[string]bool{}
		fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", h.pid()))
		if err != nil {
			t.Fatal(err)
		}
		for _, fd := range fds {
			target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", h.pid(), fd.Name()))
			if inode, ok := strings.CutPrefix(target, "socket:["); ok {
				inodes[strings.TrimSuffix(inode, "]")] = true
			}
		}
		if len(inodes) == 0 {
			t.Fatalf("%s has no sockets at all; the check would prove nothing", h.name)
		}
		for _, table := range []string{"tcp", "tcp6"} {
			data, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", h.pid(), table))
			if err != nil {
				t.Fatal(err)
			}
			for _, line := range strings.Split(string(data), "\n")[1:] {
				f := strings.Fields(line)
				const listen = "0A"
				if len(f) > 9 && f[3] == listen && inodes[f[9]] {
					t.Errorf("%s listens on the host at %s (%s)", h.name, f[1], table)
				}
			}
		}
	}
}

func otherOf(h *helper) string {
	if h == alpha {
		return "beta"
	}
	return "alpha"
}

// TestEcho64MiB sends 64 MiB each way at once through beta -> tailnet ->
// alpha, checking both streams by SHA-256, then ends both with a half-close.
func TestEcho64MiB(t *testing.T) {
	ctx := testContext(t, 60*time.Second)
	const size = 64 << 20
	a, b := dialControl(t, ctx, alpha), dialControl(t, ctx, beta)
	dialed, accepted := connect(t, ctx, b, a, "alpha")

	up := randomBytes(1, size)   // beta -> alpha
	down := randomBytes(2, size) // alpha -> beta
	wantUp, wantDown := sha256.Sum256(up), sha256.Sum256(down)

	type result struct {
		sum  [32]byte
		n    int64
		took time.Duration
		err  error
	}
	start := time.Now()
	var wg sync.WaitGroup
	var upRes, downRes result
	var upWriteErr, downWriteErr error
	send := func(c *control.Conn, data []byte, errp *error) {
		defer wg.Done()
		if _, err := c.Write(data); err != nil {
			*errp = err
			return
		}
		*errp = c.CloseWrite()
	}
	recv := func(c *control.Conn, res *result) {
		defer wg.Done()
		h := sha256.New()
		n, err := io.CopyBuffer(h, c, make([]byte, 256<<10))
		res.took = time.Since(start)
		res.n, res.err = n, err
		copy(res.sum[:], h.Sum(nil))
	}
	wg.Add(4)
	go send(dialed, up, &upWriteErr)
	go send(accepted, down, &downWriteErr)
	go recv(accepted, &upRes)
	go recv(dialed, &downRes)
	wg.Wait()

	for _, d := range []struct {
		name     string
		writeErr error
		res      result
		want     [32]byte
	}{
		{"beta->alpha", upWriteErr, upRes, wantUp},
		{"alpha->beta", downWriteErr, downRes, wantDown},
	} {
		if d.writeErr != nil {
			t.Errorf("%s: write: %v", d.name, d.writeErr)
		}
		if d.res.err != nil {
			t.Errorf("%s: read: %v after %d bytes", d.name, d.res.err, d.res.n)
		}
		if d.res.n != size || d.res.sum != d.want {
			t.Errorf("%s: received %d bytes with sha256 %x; sent %d bytes with sha256 %x", d.name, d.res.n, d.res.sum, size, d.want)
			continue
		}
		t.Logf("%s: 64 MiB in %v, %.1f MB/s (both directions at once)", d.name, d.res.took.Round(time.Millisecond),
			float64(size)/1e6/d.res.took.Seconds())
	}
}

// TestHalfClose shuts down one side's sending direction and checks that the
// other side sees end of stream but can still answer, both ways round.
func TestHalfClose(t *testing.T) {
	ctx := testContext(t, 30*time.Second)
	a, b := dialControl(t, ctx, alpha), dialControl(t, ctx, beta)
	for _, first := range []string{"dialer", "acceptor"} {
		t.Run(first+" closes first", func(t *testing.T) {
			dialed, accepted := connect(t, ctx, b, a, "alpha")
			closer, answerer := dialed, accepted
			if first == "acceptor" {
				closer, answerer = accepted, dialed
			}
			question := []byte("question from the " + first + ", then end of stream")
			answer := bytes.Repeat([]byte("answer after EOF; "), 10000) // more than one segment
			if _, err := closer.Write(question); err != nil {
				t.Fatal(err)
			}
			if err := closer.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(answerer) // ends only at end of stream
			if err != nil || !bytes.Equal(got, question) {
				t.Fatalf("other side read %q, %v; want %q then EOF", got, err, question)
			}
			// The direction towards the closer still works, through the tailnet.
			if _, err := answerer.Write(answer); err != nil {
				t.Fatalf("write after receiving EOF: %v", err)
			}
			if err := answerer.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			got, err = io.ReadAll(closer)
			if err != nil || !bytes.Equal(got, answer) {
				t.Fatalf("half-closed side read %d bytes, %v; want the %d-byte answer then EOF", len(got), err, len(answer))
			}
		})
	}
}

// TestConcurrentConnections opens 200 connections, and once all are open
// has each echo its own data; the accepting side answers with a write and a
// plain close. The dials go through several control connections, since one
// may have only control.MaxInFlight requests pending.
func TestConcurrentConnections(t *testing.T) {
	ctx := testContext(t, 45*time.Second)
	const conns, dialers = 200, 4
	a := dialControl(t, ctx, alpha)
	bs := make([]*control.Client, dialers)
	for i := range bs {
		bs[i] = dialControl(t, ctx, beta)
	}
	port, err := a.Listen(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	var serverErrs, clientErrs errList
	var served sync.WaitGroup
	acceptCtx, stopAccepting := context.WithCancel(ctx)
	accepting := make(chan struct{})
	go func() {
		defer close(accepting)
		for range conns {
			c, err := a.Accept(acceptCtx)
			if err != nil {
				serverErrs.add(fmt.Errorf("accept: %w", err))
				return
			}
			served.Go(func() {
				defer c.Close()
				deadlineFrom(ctx, c)
				data, err := io.ReadAll(c)
				if err != nil {
					serverErrs.add(err)
					return
				}
				if _, err := c.Write(data); err != nil {
					serverErrs.add(err)
				}
			})
		}
	}()
	var clients, dialing sync.WaitGroup
	allOpen := make(chan struct{})
	dialing.Add(conns)
	for i := range conns {
		clients.Go(func() {
			c, err := bs[i%dialers].DialTailnet(ctx, "alpha", port, 20000)
			dialing.Done()
			if err != nil {
				clientErrs.add(fmt.Errorf("conn %d: dial: %w", i, err))
				return
			}
			defer c.Close()
			deadlineFrom(ctx, c)
			select {
			case <-allOpen:
			case <-ctx.Done():
				clientErrs.add(fmt.Errorf("conn %d: %w waiting for the others to open", i, ctx.Err()))
				return
			}
			data := randomBytes(uint64(100+i), 1000+i*97)
			if _, err := c.Write(data); err != nil {
				clientErrs.add(fmt.Errorf("conn %d: write: %w", i, err))
				return
			}
			if err := c.CloseWrite(); err != nil {
				clientErrs.add(fmt.Errorf("conn %d: close write: %w", i, err))
				return
			}
			got, err := io.ReadAll(c)
			if err != nil || !bytes.Equal(got, data) {
				clientErrs.add(fmt.Errorf("conn %d: echo of %d bytes came back as %d bytes (equal %v), %v", i, len(data), len(got), bytes.Equal(got, data), err))
			}
		})
	}
	dialing.Wait()
	if st, err := bs[0].Stats(ctx); err != nil {
		t.Error(err)
	} else {
		t.Logf("beta with %d connections open: %+v", conns, st)
		if st.Bridges < conns-len(clientErrs.errs) {
			t.Errorf("beta carries %d connections; want %d", st.Bridges, conns)
		}
	}
	close(allOpen)
	clients.Wait()
	stopAccepting()
	<-accepting
	served.Wait()
	clientErrs.report(t, "client")
	serverErrs.report(t, "server")
}

// TestDialByName dials alpha from beta by every kind of name it has, and
// checks who each end says is at the other end.
func TestDialByName(t *testing.T) {
	ctx := testContext(t, 30*time.Second)
	a, b := dialControl(t, ctx, alpha), dialControl(t, ctx, beta)
	sa, sb := selfOf(t, ctx, a), selfOf(t, ctx, b)
	if sa.User == sb.User {
		t.Fatalf("alpha and beta both belong to %q; the identity checks need different users", sa.User)
	}
	fqdn := "alpha." + devnet.MagicDNSDomain
	hosts := []string{"alpha", "ALPHA", fqdn, fqdn + ".", "Alpha." + strings.ToUpper(devnet.MagicDNSDomain) + "."}
	hosts = append(hosts, sa.IPs...) // the IPv4 and the IPv6 address
	port, err := a.Listen(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, host := range hosts {
		dialed, err := b.DialTailnet(ctx, host, port, 5000)
		if err != nil {
			t.Errorf("dial %q: %v", host, err)
			continue
		}
		accepted, err := a.Accept(ctx)
		if err != nil {
			dialed.Close()
			t.Fatalf("accept of dial to %q: %v", host, err)
		}
		checkIdentity(t, "dial "+host+": dialled side's peer", dialed.Peer, sa)
		checkIdentity(t, "dial "+host+": accepting side's peer", accepted.Peer, sb)
		if h, p, _ := net.SplitHostPort(dialed.Peer.Addr); p != fmt.Sprint(port) || !slices.Contains(sa.IPs, h) {
			t.Errorf("dial %q: dialled side's peer address %s; want one of alpha's IPs, port %d", host, dialed.Peer.Addr, port)
		} else if ip := net.ParseIP(host); ip != nil && !ip.Equal(net.ParseIP(h)) {
			t.Errorf("dial %q: connected to %s", host, h)
		}
		if dialed.ListenerPort != 0 || accepted.ListenerPort != port {
			t.Errorf("dial %q: listener ports %d (dialled) and %d (accepted); want 0 and %d", host, dialed.ListenerPort, accepted.ListenerPort, port)
		}
		// And the connection carries bytes both ways.
		deadlineFrom(ctx, dialed)
		deadlineFrom(ctx, accepted)
		msg := []byte("hello via " + host)
		buf := make([]byte, len(msg))
		if _, err := dialed.Write(msg); err != nil {
			t.Error(err)
		} else if _, err := io.ReadFull(accepted, buf); err != nil || !bytes.Equal(buf, msg) {
			t.Errorf("dial %q: accepted side read %q, %v", host, buf, err)
		} else if _, err := accepted.Write(msg); err != nil {
			t.Error(err)
		} else if _, err := io.ReadFull(dialed, buf); err != nil || !bytes.Equal(buf, msg) {
			t.Errorf("dial %q: dialled side read %q, %v", host, buf, err)
		}
		dialed.Close()
		accepted.Close()
	}
}

// checkIdentity compares a connection's peer identity with a node's self.
func checkIdentity(t *testing.T, what string, got carrier.Identity, want carrier.Peer) {
	t.Helper()
	if got.Node != want.Node || got.DNSName != want.DNSName || got.User != want.User || !slices.Equal(got.IPs, want.IPs) {
		t.Errorf("%s is node %q dns %q user %q ips %v; want node %q dns %q user %q ips %v",
			what, got.Node, got.DNSName, got.User, got.IPs, want.Node, want.DNSName, want.User, want.IPs)
	}
	if host, _, err := net.SplitHostPort(got.Addr); err != nil || !slices.Contains(want.IPs, host) {
		t.Errorf("%s has address %q; want one of %v", what, got.Addr, want.IPs)
	}
}

// TestDialErrors checks the error codes of dials that cannot succeed.
func TestDialErrors(t *testing.T) {
	ctx := testContext(t, 30*time.Second)
	a, b := dialControl(t, ctx, alpha), dialControl(t, ctx, beta)
	sa := selfOf(t, ctx, a)

	// A port nobody listens on: alpha's netstack refuses the connection at
	// once, so the error is dial_failed, not timeout, well within the limit.
	freePort, err := a.Listen(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Unlisten(ctx, freePort); err != nil {
		t.Fatal(err)
	}

	// Names and addresses are checked against the netmap, locally: those
	// fail at once. A refused connection takes a round trip on the tailnet.
	const fast, roundTrip = 500 * time.Millisecond, 2 * time.Second
	for _, tc := range []struct {
		host  string
		port  int
		code  string
		inMsg string
	}{
		{host: "nosuchnode", port: 80, code: control.CodeUnknownHost, inMsg: "nosuchnode"},
		{host: "nosuchnode." + devnet.MagicDNSDomain, port: 80, code: control.CodeUnknownHost, inMsg: "nosuchnode." + devnet.MagicDNSDomain},
		{host: "alpha.example.com", port: 80, code: control.CodeUnknownHost, inMsg: "alpha.example.com"},
		{host: "127.0.0.1", port: 80, code: control.CodeUnknownHost, inMsg: "127.0.0.1"},
		{host: "::1", port: 80, code: control.CodeUnknownHost, inMsg: "::1"},
		// In the tailnet's range, but no node's: never dialled at all.
		{host: "100.64.0.250", port: 80, code: control.CodeUnknownHost, inMsg: "100.64.0.250"},
		{host: "fd7a:115c:a1e0::ffff", port: 80, code: control.CodeUnknownHost, inMsg: "fd7a:115c:a1e0::ffff"},
		{host: "alpha", port: freePort, code: control.CodeDialFailed, inMsg: "refused"},
		{host: sa.IPs[0], port: freePort, code: control.CodeDialFailed, inMsg: "refused"},
		{host: sa.IPs[1], port: freePort, code: control.CodeDialFailed, inMsg: "refused"},
		{host: "", port: 80, code: control.CodeBadRequest},
		{host: "alpha", port: 0, code: control.CodeBadRequest},
	} {
		start := time.Now()
		c, err := b.DialTailnet(ctx, tc.host, tc.port, 5000)
		took := time.Since(start)
		if c != nil {
			c.Close()
		}
		what := fmt.Sprintf("dial %q port %d", tc.host, tc.port)
		if ce := wantCode(t, what, err, tc.code); ce != nil && !strings.Contains(ce.Message, tc.inMsg) {
			t.Errorf("%s: message %q does not mention %q", what, ce.Message, tc.inMsg)
		}
		limit := fast
		if tc.code == control.CodeDialFailed {
			limit = roundTrip
		}
		if took > limit {
			t.Errorf("%s: took %v to fail; want at most %v", what, took, limit)
		}
	}
}

// TestListenErrors checks port_in_use and not_listening.
func TestListenErrors(t *testing.T) {
	ctx := testContext(t, 30*time.Second)
	a1, a2 := dialControl(t, ctx, alpha), dialControl(t, ctx, alpha)
	port, err := a1.Listen(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if port == 0 {
		t.Fatal("listen on port 0 reported port 0")
	}
	_, err = a2.Listen(ctx, port)
	wantCode(t, "listen by another client on a held port", err, control.CodePortInUse)
	_, err = a1.Listen(ctx, port)
	wantCode(t, "listen by the same client on a held port", err, control.CodePortInUse)

	err = a2.Unlisten(ctx, port)
	wantCode(t, "unlisten of a port another client holds", err, control.CodeNotListening)
	err = a2.Unlisten(ctx, 1)
	wantCode(t, "unlisten of a port nobody holds", err, control.CodeNotListening)

	if err := a1.Unlisten(ctx, port); err != nil {
		t.Fatalf("unlisten by the holder: %v", err)
	}
	err = a1.Unlisten(ctx, port)
	wantCode(t, "second unlisten", err, control.CodeNotListening)
	// Free again: another client may take it.
	if p, err := a2.Listen(ctx, port); err != nil || p != port {
		t.Fatalf("listen on the freed port %d: %d, %v", port, p, err)
	}
	if err := a2.Unlisten(ctx, port); err != nil {
		t.Fatal(err)
	}
}

// TestRawProtocol speaks the wire format directly for the errors a polite
// client never causes.
func TestRawProtocol(t *testing.T) {
	ctx := testContext(t, 30*time.Second)

	t.Run("request before hello", func(t *testing.T) {
		r := dialRaw(t, ctx, alpha)
		resp := r.call(control.Request{ID: 5, Op: control.OpStats})
		wantErrResp(t, "stats before hello", resp, control.CodeHelloRequired)
		resp = r.call(control.Request{ID: 6, Op: "frobnicate"})
		wantErrResp(t, "unknown op before hello", resp, control.CodeHelloRequired)
		r.hello() // the connection is still usable
		if resp := r.call(control.Request{ID: 7, Op: control.OpStats}); !resp.OK {
			t.Errorf("stats after hello: %+v", resp.Error)
		}
	})

	t.Run("unsupported version", func(t *testing.T) {
		r := dialRaw(t, ctx, alpha)
		resp := r.call(control.Request{ID: 1, Op: control.OpHello, Version: 99})
		wantErrResp(t, "hello version 99", resp, control.CodeVersion)
		if resp.Error != nil && !strings.Contains(resp.Error.Message, "99") {
			t.Errorf("message %q does not name the version asked for", resp.Error.Message)
		}
		resp = r.call(control.Request{ID: 2, Op: control.OpStats})
		wantErrResp(t, "stats after a refused hello", resp, control.CodeHelloRequired)
	})

	t.Run("unknown op", func(t *testing.T) {
		r := dialRaw(t, ctx, alpha)
		r.hello()
		resp := r.call(control.Request{ID: 42, Op: "frobnicate"})
		wantErrResp(t, "op frobnicate", resp, control.CodeUnknownOp)
		if resp.Error != nil && !strings.Contains(resp.Error.Message, "frobnicate") {
			t.Errorf("message %q does not name the op", resp.Error.Message)
		}
	})

	t.Run("malformed frames", func(t *testing.T) {
		r := dialRaw(t, ctx, alpha)
		r.hello()
		for _, tc := range []struct {
			payload string
			id      uint64
		}{
			{`this is not JSON`, 0},
			{`{"id": 9, "op": "stats"`, 0}, // truncated
			{`{"id": 10, "op": "listen", "port": "eighty"}`, 10},
			{`{"id": 11, "op": "listen", "port": 70000}`, 11},
			{`{"id": 12, "op": "dial", "host": "alpha", "port": 1, "timeout_ms": -1}`, 12},
			{`{"id": 13}`, 13}, // no op
			{`[1, 2, 3]`, 0},
		} {
			r.sendBytes([]byte(tc.payload))
			resp := r.recv()
			wantErrResp(t, fmt.Sprintf("frame %q", tc.payload), resp, control.CodeBadRequest)
			if resp.ID != tc.id {
				t.Errorf("frame %q: response id %d; want %d", tc.payload, resp.ID, tc.id)
			}
			// The connection keeps working after each.
			if resp := r.call(control.Request{ID: 100, Op: control.OpStats}); !resp.OK {
				t.Fatalf("stats after frame %q: %+v", tc.payload, resp.Error)
			}
		}
	})

	t.Run("largest frame accepted", func(t *testing.T) {
		r := dialRaw(t, ctx, alpha)
		r.hello()
		req := []byte(`{"id": 3, "op": "stats", "client": "`)
		req = append(req, bytes.Repeat([]byte("x"), control.MaxRequestSize-len(req)-2)...)
		req = append(req, `"}`...)
		if len(req) != control.MaxRequestSize {
			t.Fatalf("built a %d-byte frame", len(req))
		}
		r.sendBytes(req)
		if resp := r.recv(); !resp.OK || resp.ID != 3 {
			t.Errorf("a frame of exactly %d bytes: %+v", control.MaxRequestSize, resp)
		}
	})

	t.Run("oversized frame", func(t *testing.T) {
		other := dialControl(t, ctx, alpha) // another client of the same helper
		r := dialRaw(t, ctx, alpha)
		r.hello()
		var hdr [4]byte
		binary.BigEndian.PutUint32(hdr[:], control.MaxRequestSize+1)
		if _, err := r.conn.Write(append(hdr[:], `{"id": 4, "op": "stats", "client": "xxxx`...)); err != nil {
			t.Fatal(err)
		}
		resp := r.recv()
		wantErrResp(t, "oversized frame", resp, control.CodeTooLarge)
		if resp, err := r.tryRecv(); !errors.Is(err, io.EOF) {
			t.Errorf("after the too_large reply: %+v, %v; want the connection closed (EOF)", resp, err)
		}
		// Other clients of the same helper are unaffected, old and new.
		if _, err := other.Status(ctx); err != nil {
			t.Errorf("status on another client: %v", err)
		}
		if st, err := dialControl(t, ctx, alpha).Stats(ctx); err != nil {
			t.Errorf("stats on a new client: %v", err)
		} else if st.Clients < 2 {
			t.Errorf("helper counts %d clients; want at least 2", st.Clients)
		}
	})
}

// TestUnresponsivePeer freezes a third helper (SIGSTOP) so that dials to it
// hang: a short timeout_ms gives timeout, and clients that disconnect in the
// middle of such dials leave nothing behind in the dialling helper.
func TestUnresponsivePeer(t *testing.T) {
	ctx := testContext(t, 45*time.Second)
	gamma := startTestHelper(t, ctx, "gamma")
	b := dialControl(t, ctx, beta)
	g := dialControl(t, ctx, gamma)
	gPort, err := g.Listen(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	waitPeer(t, ctx, b, "gamma")
	// First a working connection, so that the path to gamma is known good.
	dialed, accepted := connect(t, ctx, b, g, "gamma")
	dialed.Close()
	accepted.Close()

	if err := gamma.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gamma.cmd.Process.Signal(syscall.SIGCONT) }) // runs before the stop
	base := settledStats(t, ctx, b, nil)

	start := time.Now()
	_, err = b.DialTailnet(ctx, "gamma", gPort, 300)
	took := time.Since(start)
	if ce := wantCode(t, "dial to a frozen peer with timeout_ms 300", err, control.CodeTimeout); ce != nil {
		if took < 250*time.Millisecond || took > 2*time.Second {
			t.Errorf("timeout after %v; want about 300ms", took)
		}
		t.Logf("dial to frozen peer: %s after %v", ce, took.Round(time.Millisecond))
	}

	// Many clients, each with dials in flight, all disconnecting mid-request.
	const clients, dialsEach = 20, 5
	raws := make([]*rawClient, clients)
	for i := range raws {
		raws[i] = dialRaw(t, ctx, beta)
		raws[i].hello()
		for j := range dialsEach {
			raws[i].send(control.Request{ID: uint64(10 + j), Op: control.OpDial, Host: "gamma", Port: gPort, TimeoutMS: 60000})
		}
	}
	// Proof the dials are in flight: the helper has grown by at least a
	// goroutine per dial, and no client has had an answer.
	busy := pollStats(t, ctx, b, 5*time.Second, "a goroutine per dial in flight", func(s control.Stats) bool {
		return s.Goroutines >= base.Goroutines+clients*dialsEach && s.Clients == base.Clients+clients
	})
	t.Logf("beta with %d dials in flight: %+v (settled: %+v)", clients*dialsEach, busy, base)
	for _, r := range raws {
		r.conn.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
		if resp, err := r.tryRecv(); err == nil {
			t.Errorf("dial to a frozen peer answered early: %+v", resp)
		}
		r.conn.Close()
	}
	after := settledStats(t, ctx, b, &base)
	t.Logf("beta after the clients left: %+v", after)

	// One client may have control.MaxInFlight requests pending; the next
	// is refused with busy at once.
	r := dialRaw(t, ctx, beta)
	r.hello()
	for i := range control.MaxInFlight {
		r.send(control.Request{ID: uint64(100 + i), Op: control.OpDial, Host: "gamma", Port: gPort, TimeoutMS: 60000})
	}
	resp := r.call(control.Request{ID: 999, Op: control.OpDial, Host: "gamma", Port: gPort, TimeoutMS: 60000})
	wantErrResp(t, "a request beyond MaxInFlight", resp, control.CodeBusy)
	r.conn.Close()
	settledStats(t, ctx, b, &base)
}

// TestListenerClosesWithClient checks that a client's listeners go when its
// control connection goes.
func TestListenerClosesWithClient(t *testing.T) {
	ctx := testContext(t, 30*time.Second)
	a, b := dialControl(t, ctx, alpha), dialControl(t, ctx, beta)
	before, err := a.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	owner, err := control.Dial(ctx, alpha.socket)
	if err != nil {
		t.Fatal(err)
	}
	port, err := owner.Listen(ctx, 0)
	if err != nil {
		owner.Close()
		t.Fatal(err)
	}
	// It works while the owner is there ...
	c, err := b.DialTailnet(ctx, "alpha", port, 5000)
	if err != nil {
		owner.Close()
		t.Fatalf("dial while the listener's client is connected: %v", err)
	}
	c.Close()
	if st, _ := a.Stats(ctx); st.Listeners != before.Listeners+1 {
		t.Errorf("listeners while held: %d; want %d", st.Listeners, before.Listeners+1)
	}
	owner.Close()
	// ... and not once it has gone. The helper notices asynchronously.
	pollStats(t, ctx, a, 5*time.Second, "the listener and client gone", func(s control.Stats) bool {
		return s.Listeners == before.Listeners && s.Clients == before.Clients
	})
	c, err = b.DialTailnet(ctx, "alpha", port, 2000)
	if c != nil {
		c.Close()
	}
	wantCode(t, "dial to the port of a client that disconnected", err, control.CodeDialFailed)
	// The port is free for someone else.
	if p, err := a.Listen(ctx, port); err != nil || p != port {
		t.Errorf("listen on port %d after its owner left: %d, %v", port, p, err)
	}
}

// TestOpenCloseCycles opens and closes 1,000 connections and checks that
// neither helper, nor this test process, holds more descriptors or
// goroutines than before.
func TestOpenCloseCycles(t *testing.T) {
	ctx := testContext(t, 60*time.Second)
	const cycles, workers, warmup = 1000, 8, 40
	a, b := dialControl(t, ctx, alpha), dialControl(t, ctx, beta)
	port, err := a.Listen(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Unlisten(context.Background(), port) })

	var serverErrs errList
	var served sync.WaitGroup
	serveCtx, stopServing := context.WithCancel(ctx)
	accepting := make(chan struct{})
	go func() {
		defer close(accepting)
		for {
			c, err := a.Accept(serveCtx)
			if err != nil {
				return
			}
			served.Go(func() {
				defer c.Close()
				deadlineFrom(ctx, c)
				defer context.AfterFunc(serveCtx, func() { c.Close() })()
				buf := make([]byte, 4)
				if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
					serverErrs.add(fmt.Errorf("read ping: %q, %v", buf, err))
					return
				}
				if _, err := c.Write([]byte("pong")); err != nil {
					serverErrs.add(err)
					return
				}
				io.Copy(io.Discard, c) // until the dialler closes
			})
		}
	}()
	defer func() {
		stopServing()
		<-accepting
		served.Wait()
	}()

	var clientErrs errList
	var done atomic.Int64
	run := func(n int) {
		var wg sync.WaitGroup
		var next atomic.Int64
		for range workers {
			wg.Go(func() {
				for next.Add(1) <= int64(n) && ctx.Err() == nil {
					if err := pingPong(ctx, b, port); err != nil {
						clientErrs.add(err)
						continue
					}
					done.Add(1)
				}
			})
		}
		wg.Wait()
	}

	run(warmup)
	baseA := settledStats(t, ctx, a, nil)
	baseB := settledStats(t, ctx, b, nil)
	fdA, fdB, fdSelf := procFDs(t, alpha.pid()), procFDs(t, beta.pid()), procFDs(t, os.Getpid())

	start := time.Now()
	run(cycles)
	took := time.Since(start)
	clientErrs.report(t, "cycle")
	serverErrs.report(t, "server side")
	t.Logf("%d open/close cycles (%d workers) in %v, %.0f per second; %d succeeded",
		cycles, workers, took.Round(time.Millisecond), cycles/took.Seconds(), done.Load()-warmup)

	const slack = 10
	afterA := settledStats(t, ctx, a, &baseA)
	afterB := settledStats(t, ctx, b, &baseB)
	t.Logf("alpha: stats %+v before, %+v after", baseA, afterA)
	t.Logf("beta: stats %+v before, %+v after", baseB, afterB)
	for _, p := range []struct {
		name string
		pid  int
		base int
	}{{"alpha", alpha.pid(), fdA}, {"beta", beta.pid(), fdB}, {"this test process", os.Getpid(), fdSelf}} {
		var now int
		deadline := time.Now().Add(5 * time.Second)
		for {
			now = procFDs(t, p.pid)
			if now <= p.base+slack || time.Now().After(deadline) {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Logf("%s: %d descriptors in /proc/%d/fd before, %d after", p.name, p.base, p.pid, now)
		if now > p.base+slack {
			t.Errorf("%s: %d descriptors open after the cycles; %d before", p.name, now, p.base)
		}
	}
}

// pingPong is one cycle: dial through beta, exchange a few bytes, close.
func pingPong(ctx context.Context, b *control.Client, port int) error {
	c, err := b.DialTailnet(ctx, "alpha", port, 10000)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	deadlineFrom(ctx, c)
	if _, err := c.Write([]byte("ping")); err != nil {
		return err
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "pong" {
		return fmt.Errorf("read pong: %q, %v", buf, err)
	}
	return nil
}

// TestSIGTERM stops a helper with SIGTERM while it carries connections both
// ways: it exits 0 promptly, every connection it carried ends, its control
// connections close and its socket file goes.
func TestSIGTERM(t *testing.T) {
	ctx := testContext(t, 30*time.Second)
	delta := startTestHelper(t, ctx, "delta")
	d := dialControl(t, ctx, delta)
	a, b := dialControl(t, ctx, alpha), dialControl(t, ctx, beta)
	waitPeer(t, ctx, b, "delta")
	waitPeer(t, ctx, a, "delta")
	waitPeer(t, ctx, d, "alpha")
	waitPeer(t, ctx, d, "beta")
	// delta accepting a connection from beta, and delta dialling alpha.
	betaEnd, inbound := connect(t, ctx, b, d, "delta")
	outbound, alphaEnd := connect(t, ctx, d, a, "alpha")

	ps, took, err := delta.terminate(5 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("delta exited %v after SIGTERM", took.Round(time.Millisecond))
	if !ps.Success() {
		t.Errorf("delta exited with %v after SIGTERM; want status 0", ps)
	}
	for name, c := range map[string]*control.Conn{"accepted": inbound, "dialled": outbound} {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := c.Read(make([]byte, 10))
		var ne net.Error
		if err == nil || errors.As(err, &ne) && ne.Timeout() {
			t.Errorf("%s connection of the stopped helper: read %d bytes, %v; want EOF or an error", name, n, err)
		}
	}
	// The far ends, on helpers that keep running, are not promised
	// anything (the node may vanish before its FIN leaves); only logged.
	var far sync.WaitGroup
	for name, c := range map[string]*control.Conn{"beta's end of the accepted connection": betaEnd, "alpha's end of the dialled connection": alphaEnd} {
		far.Go(func() {
			start := time.Now()
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			n, err := c.Read(make([]byte, 10))
			t.Logf("%s: read %d bytes, %v, after %v", name, n, err, time.Since(start).Round(time.Millisecond))
		})
	}
	far.Wait()
	if _, err := d.Status(ctx); err == nil {
		t.Error("control connection to the stopped helper still answers")
	}
	if _, err := os.Stat(delta.socket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket file after exit: %v; want it removed", err)
	}
}

// TestStatusCommand runs `tsdist status` against alpha.
func TestStatusCommand(t *testing.T) {
	ctx := testContext(t, 20*time.Second)
	sa, sb := selfOf(t, ctx, dialControl(t, ctx, alpha)), selfOf(t, ctx, dialControl(t, ctx, beta))

	out, err := exec.CommandContext(ctx, tsdistBin, "status", "--socket", alpha.socket).CombinedOutput()
	if err != nil {
		t.Fatalf("tsdist status: %v\n%s", err, out)
	}
	t.Logf("tsdist status:\n%s", out)
	lines := strings.Split(string(out), "\n")
	if !strings.HasPrefix(lines[0], "alpha is Running") {
		t.Errorf("first line %q; want it to say alpha is Running", lines[0])
	}
	for _, p := range []carrier.Peer{sa, sb} {
		found := false
		for _, l := range lines[1:] {
			f := strings.Fields(l)
			if len(f) >= 5 && f[0] == p.Node && f[1] == p.IPs[0] && f[2] == p.DNSName && f[3] == p.User && f[4] == "online" {
				found = true
			}
		}
		if !found {
			t.Errorf("no line for %s %s %s %s online", p.Node, p.IPs[0], p.DNSName, p.User)
		}
	}

	out, err = exec.CommandContext(ctx, tsdistBin, "status", "--json", "--socket", beta.socket).Output()
	if err != nil {
		t.Fatalf("tsdist status --json: %v", err)
	}
	var st carrier.Status
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("tsdist status --json: %v\n%s", err, out)
	}
	if st.State != "Running" || st.Self.Node != "beta" || !slices.ContainsFunc(st.Peers, func(p carrier.Peer) bool { return p.Node == "alpha" }) {
		t.Errorf("tsdist status --json: %+v", st)
	}

	// A socket nobody serves is an error, not a hang.
	out, err = exec.CommandContext(ctx, tsdistBin, "status", "--socket", t.TempDir()+"/none.sock").CombinedOutput()
	if err == nil {
		t.Errorf("tsdist status on a missing socket succeeded:\n%s", out)
	}
}

// connect dials host on a fresh port of the listening client from the
// dialling client and returns both ends.
func connect(t *testing.T, ctx context.Context, dialer, listener *control.Client, host string) (dialed, accepted *control.Conn) {
	t.Helper()
	port, err := listener.Listen(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Unlisten(ctx, port)
	dialed, err = dialer.DialTailnet(ctx, host, port, 10000)
	if err != nil {
		t.Fatalf("dial %s:%d: %v", host, port, err)
	}
	t.Cleanup(func() { dialed.Close() })
	accepted, err = listener.Accept(ctx)
	if err != nil {
		t.Fatalf("accept on port %d: %v", port, err)
	}
	t.Cleanup(func() { accepted.Close() })
	if accepted.ListenerPort != port {
		t.Fatalf("accepted a connection for port %d; want %d", accepted.ListenerPort, port)
	}
	deadlineFrom(ctx, dialed)
	deadlineFrom(ctx, accepted)
	return dialed, accepted
}

func selfOf(t *testing.T, ctx context.Context, c *control.Client) carrier.Peer {
	t.Helper()
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Self.IPs) != 2 {
		t.Fatalf("%s has addresses %v; want an IPv4 and an IPv6 one", st.Self.Node, st.Self.IPs)
	}
	return st.Self
}

// waitPeer waits until c's helper sees node as a peer; a node that has just
// come up may take a moment to reach the others' netmaps.
func waitPeer(t *testing.T, ctx context.Context, c *control.Client, node string) carrier.Peer {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for {
		st, err := c.Status(ctx)
		if err != nil {
			t.Fatalf("waiting for peer %s: %v", node, err)
		}
		for _, p := range st.Peers {
			if p.Node == node {
				return p
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s never saw peer %s; peers %+v", st.Self.Node, node, st.Peers)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// pollStats polls a helper's stats until ok holds, failing the test if it
// does not within d; want says what ok wants, for the failure message.
func pollStats(t *testing.T, ctx context.Context, c *control.Client, d time.Duration, want string, ok func(control.Stats) bool) control.Stats {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		st, err := c.Stats(ctx)
		if err != nil {
			t.Fatalf("stats of %s: %v", c.Hello.Hostname, err)
		}
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Fatalf("%s's stats are %+v after %v; want %s", c.Hello.Hostname, st, d, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// settledStats waits for a helper to carry no connections and, with base,
// for its goroutines and descriptors to come back to within a small slack of
// base's. Without base it returns a quiet baseline.
func settledStats(t *testing.T, ctx context.Context, c *control.Client, base *control.Stats) control.Stats {
	t.Helper()
	const slack = 10
	if base == nil {
		pollStats(t, ctx, c, 10*time.Second, "no bridges", func(s control.Stats) bool { return s.Bridges == 0 })
		time.Sleep(200 * time.Millisecond) // let goroutines of closed connections finish
		st, err := c.Stats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	want := fmt.Sprintf("no bridges, at most %d clients and %d listeners, at most %d goroutines and %d descriptors (baseline %+v plus %d)",
		base.Clients, base.Listeners, base.Goroutines+slack, base.OpenFDs+slack, *base, slack)
	return pollStats(t, ctx, c, 10*time.Second, want, func(s control.Stats) bool {
		return s.Bridges == 0 && s.Clients <= base.Clients && s.Listeners <= base.Listeners &&
			s.Goroutines <= base.Goroutines+slack && s.OpenFDs <= base.OpenFDs+slack
	})
}

func procFDs(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// randomBytes returns n pseudo-random bytes, the same for the same seed.
func randomBytes(seed uint64, n int) []byte {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	r := rand.NewChaCha8(key)
	b := make([]byte, n)
	r.Read(b)
	return b
}

// TestCloseReachesPeer closes one end outright, with the other end idle
// in a read, as a BEAM node does when it refuses a handshake: the reader
// must see end of stream at once, from either side, over either helper.
func TestCloseReachesPeer(t *testing.T) {
	ctx := testContext(t, 30*time.Second)
	a, b := dialControl(t, ctx, alpha), dialControl(t, ctx, beta)
	for _, tt := range []struct {
		name   string
		dialer *control.Client
		host   string
		closer string
	}{
		{"acceptor closes, other helper", b, "alpha", "acceptor"},
		{"dialer closes, other helper", b, "alpha", "dialer"},
		{"acceptor closes, same helper", a, "alpha", "acceptor"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dialed, accepted := connect(t, ctx, tt.dialer, a, tt.host)
			closer, reader := accepted, dialed
			if tt.closer == "dialer" {
				closer, reader = dialed, accepted
			}
			if _, err := closer.Write([]byte("hi")); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 2)
			if _, err := io.ReadFull(reader, buf); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			closer.Close()
			reader.SetReadDeadline(time.Now().Add(5 * time.Second))
			n, err := reader.Read(buf)
			if err != io.EOF {
				t.Fatalf("read after the other end closed: %d bytes, %v; want EOF", n, err)
			}
			t.Logf("EOF %v after the close", time.Since(start).Round(time.Microsecond))
		})
	}
}

// TestSlowReceiverDoesNotStallOthers fills one connection whose receiver
// never reads, and checks that another connection through the same two
// helpers still carries 16 MiB both ways meanwhile: each connection has
// its own buffers and its own flow control, end to end.
func TestSlowReceiverDoesNotStallOthers(t *testing.T) {
	ctx := testContext(t, 60*time.Second)
	a, b := dialControl(t, ctx, alpha), dialControl(t, ctx, beta)

	stuckDialed, _ := connect(t, ctx, b, a, "alpha") // its accepted end is never read
	filled := make(chan int64, 1)
	go func() {
		chunk := make([]byte, 64<<10)
		var n int64
		stuckDialed.SetWriteDeadline(time.Now().Add(3 * time.Second))
		for {
			w, err := stuckDialed.Write(chunk)
			n += int64(w)
			if err != nil {
				filled <- n
				return
			}
		}
	}()
	// Once the writer blocks, everything between it and the reader that
	// does not read is full.
	written := <-filled
	t.Logf("the unread connection took %d KiB before its writer blocked", written>>10)
	if written > 64<<20 {
		t.Errorf("%d MiB went into a connection nobody reads: buffering is not bounded", written>>20)
	}

	dialed, accepted := connect(t, ctx, b, a, "alpha")
	payload := randomBytes(7, 16<<20)
	start := time.Now()
	errs := make(chan error, 2)
	go func() {
		_, err := dialed.Write(payload)
		if err == nil {
			err = dialed.CloseWrite()
		}
		errs <- err
	}()
	go func() {
		got, err := io.ReadAll(accepted)
		if err == nil && !bytes.Equal(got, payload) {
			err = fmt.Errorf("received %d bytes that differ from the %d sent", len(got), len(payload))
		}
		errs <- err
	}()
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatalf("the other connection, while one is stuck: %v", err)
		}
	}
	t.Logf("16 MiB through the other connection in %v while one connection was stuck", time.Since(start).Round(time.Millisecond))
}
