package test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/control"
	"github.com/tsdist/tsdist/epmd"
)

// tailnetEPMD is an EPMD client that reaches tailnet hosts through c's
// helper, as a BEAM node's epmd module does.
func tailnetEPMD(c *control.Client) *epmd.Client {
	return &epmd.Client{Dial: func(ctx context.Context, addr string) (net.Conn, error) {
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, err
		}
		p, err := strconv.Atoi(port)
		if err != nil {
			return nil, err
		}
		return c.DialTailnet(ctx, host, p, 0)
	}}
}

// waitNames polls host's names through c until ok accepts them.
func waitNames(t *testing.T, ctx context.Context, c *control.Client, host string, ok func([]epmd.NameEntry) bool) []epmd.NameEntry {
	t.Helper()
	for {
		names, err := c.Names(ctx, host)
		if err != nil {
			t.Fatalf("names %s: %v", host, err)
		}
		if ok(names) {
			return names
		}
		select {
		case <-ctx.Done():
			t.Fatalf("names %s: still %v", host, names)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func hasName(name string) func([]epmd.NameEntry) bool {
	return func(ns []epmd.NameEntry) bool {
		return slices.ContainsFunc(ns, func(e epmd.NameEntry) bool { return e.Name == name })
	}
}

// TestEPMDAcrossTailnet registers names on alpha through its control socket
// and finds them from beta by bare name, MagicDNS name and tailnet IP; a
// registration ends with the control connection that made it.
func TestEPMDAcrossTailnet(t *testing.T) {
	ctx := testContext(t, 30*time.Second)
	node := dialControl(t, ctx, alpha) // plays a BEAM node on alpha
	b := dialControl(t, ctx, beta)

	creationApp, err := node.Register(ctx, control.Request{Name: "app", Port: 40001})
	if err != nil {
		t.Fatalf("register app: %v", err)
	}
	creationWorker, err := node.Register(ctx, control.Request{Name: "wörker", Port: 40002, Hidden: true, HighestVersion: 6, LowestVersion: 6, Extra: []byte{1, 2, 3}})
	if err != nil {
		t.Fatalf("register wörker: %v", err)
	}
	if creationApp == 0 || creationApp == creationWorker {
		t.Errorf("creations %d and %d; want two different non-zero ones", creationApp, creationWorker)
	}

	sa := selfOf(t, ctx, node)
	for _, host := range []string{"alpha", sa.DNSName, sa.IPs[0]} {
		info, err := b.PortPlease(ctx, host, "app")
		if err != nil {
			t.Fatalf("port_please app@%s: %v", host, err)
		}
		want := control.NodeInfo{Name: "app", Host: host, Port: 40001, HighestVersion: 6, LowestVersion: 5, Extra: []byte{}}
		if !equalNodeInfo(info, want) {
			t.Errorf("port_please app@%s = %+v; want %+v", host, info, want)
		}
	}
	info, err := b.PortPlease(ctx, "alpha", "wörker")
	want := control.NodeInfo{Name: "wörker", Host: "alpha", Port: 40002, Hidden: true, HighestVersion: 6, LowestVersion: 6, Extra: []byte{1, 2, 3}}
	if err != nil || !equalNodeInfo(info, want) {
		t.Errorf("port_please wörker@alpha = %+v, %v; want %+v", info, err, want)
	}

	names, err := b.Names(ctx, "alpha")
	if err != nil {
		t.Fatalf("names alpha: %v", err)
	}
	if !hasName("app")(names) || !hasName("wörker")(names) {
		t.Errorf("names alpha = %v; want app and wörker", names)
	}

	// The same answers straight from alpha's tailnet EPMD port, as any
	// Erlang node's EPMD client would ask.
	raw := tailnetEPMD(b)
	n, err := raw.PortPlease(ctx, "alpha", "app")
	if err != nil || n.Port != 40001 || n.Type != epmd.NodeTypeNormal || n.HighestVersion != 6 || n.LowestVersion != 5 {
		t.Errorf("EPMD PORT_PLEASE2 app on alpha:4369 = %+v, %v", n, err)
	}
	if rawNames, err := raw.Names(ctx, "alpha"); err != nil || !slices.Equal(rawNames, names) {
		t.Errorf("EPMD NAMES on alpha:4369 = %v, %v; the helper said %v", rawNames, err, names)
	}

	// Unregister ends one registration; closing the connection ends the rest.
	if err := node.Unregister(ctx, "app"); err != nil {
		t.Fatalf("unregister app: %v", err)
	}
	_, err = b.PortPlease(ctx, "alpha", "app")
	wantCode(t, "port_please app@alpha after unregister", err, control.CodeNotRegistered)
	start := time.Now()
	node.Close()
	waitNames(t, ctx, b, "alpha", func(ns []epmd.NameEntry) bool { return !hasName("wörker")(ns) })
	t.Logf("wörker left alpha's names %v after its control connection closed", time.Since(start).Round(time.Millisecond))
	if time.Since(start) > 2*time.Second {
		t.Errorf("registration outlived its connection by %v", time.Since(start))
	}
}

func equalNodeInfo(a, b control.NodeInfo) bool {
	return a.Name == b.Name && a.Host == b.Host && a.Port == b.Port && a.Hidden == b.Hidden &&
		a.Protocol == b.Protocol && a.HighestVersion == b.HighestVersion && a.LowestVersion == b.LowestVersion &&
		bytes.Equal(a.Extra, b.Extra)
}

// TestEPMDSeveralNodesOneHost registers several nodes on one helper, from
// different control connections, and refuses a duplicate live name.
func TestEPMDSeveralNodesOneHost(t *testing.T) {
	ctx := testContext(t, 30*time.Second)
	first, second := dialControl(t, ctx, alpha), dialControl(t, ctx, alpha)
	onBeta := dialControl(t, ctx, beta)

	if _, err := first.Register(ctx, control.Request{Name: "a", Port: 41001}); err != nil {
		t.Fatalf("register a: %v", err)
	}
	if _, err := second.Register(ctx, control.Request{Name: "b", Port: 41002}); err != nil {
		t.Fatalf("register b: %v", err)
	}
	_, err := second.Register(ctx, control.Request{Name: "a", Port: 41003})
	if ce := wantCode(t, "second register of a@alpha", err, control.CodeNameTaken); ce != nil && !strings.Contains(ce.Message, "a@alpha") {
		t.Errorf("name_taken message %q does not name a@alpha", ce.Message)
	}
	_, err = first.Register(ctx, control.Request{Name: "a", Port: 41004})
	wantCode(t, "repeat register of a@alpha by its holder", err, control.CodeNameTaken)
	// Another host's EPMD is another namespace.
	if _, err := onBeta.Register(ctx, control.Request{Name: "a", Port: 41005}); err != nil {
		t.Fatalf("register a@beta: %v", err)
	}

	if info, err := onBeta.PortPlease(ctx, "alpha", "a"); err != nil || info.Port != 41001 {
		t.Errorf("port_please a@alpha = %+v, %v; want port 41001", info, err)
	}
	if info, err := first.PortPlease(ctx, "beta", "a"); err != nil || info.Port != 41005 {
		t.Errorf("port_please a@beta = %+v, %v; want port 41005", info, err)
	}
	// A node on alpha looks itself up over the tailnet like anyone else.
	if info, err := first.PortPlease(ctx, "alpha", "b"); err != nil || info.Port != 41002 {
		t.Errorf("port_please b@alpha from alpha = %+v, %v; want port 41002", info, err)
	}

	// Once the holder goes, the name is free at once.
	first.Close()
	deadline := time.Now().Add(2 * time.Second)
	for {
		_, err := second.Register(ctx, control.Request{Name: "a", Port: 41006})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a@alpha still taken 2s after its holder closed: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if info, err := onBeta.PortPlease(ctx, "alpha", "a"); err != nil || info.Port != 41006 {
		t.Errorf("port_please a@alpha after re-registration = %+v, %v; want port 41006", info, err)
	}
}

// TestEPMDErrors checks each error of register, unregister, port_please and
// names.
func TestEPMDErrors(t *testing.T) {
	ctx := testContext(t, 30*time.Second)
	c := dialControl(t, ctx, alpha)
	for _, tt := range []struct {
		what string
		req  control.Request
		code string
	}{
		{"empty name", control.Request{Name: "", Port: 1}, control.CodeInvalidName},
		{"name with @", control.Request{Name: "app@alpha", Port: 1}, control.CodeInvalidName},
		{"name with a space", control.Request{Name: "a b", Port: 1}, control.CodeInvalidName},
		{"name with a newline", control.Request{Name: "a\nname evil at port 1", Port: 1}, control.CodeInvalidName},
		{"256-byte name", control.Request{Name: strings.Repeat("n", 256), Port: 1}, control.CodeInvalidName},
		{"port 0", control.Request{Name: "x"}, control.CodeBadRequest},
		{"lowest above highest", control.Request{Name: "x", Port: 1, HighestVersion: 5, LowestVersion: 6}, control.CodeBadRequest},
		{"version out of range", control.Request{Name: "x", Port: 1, HighestVersion: 70000}, control.CodeBadRequest},
		{"256 bytes of extra", control.Request{Name: "x", Port: 1, Extra: make([]byte, 256)}, control.CodeBadRequest},
	} {
		_, err := c.Register(ctx, tt.req)
		wantCode(t, "register with "+tt.what, err, tt.code)
	}
	if _, err := c.Register(ctx, control.Request{Name: strings.Repeat("n", 255), Port: 1}); err != nil {
		t.Errorf("register of a 255-byte name: %v", err)
	}

	err := c.Unregister(ctx, "never-registered")
	wantCode(t, "unregister of a name this client does not hold", err, control.CodeNotRegistered)

	_, err = c.PortPlease(ctx, "alpha", "nobody")
	if ce := wantCode(t, "port_please nobody@alpha", err, control.CodeNotRegistered); ce != nil && !strings.Contains(ce.Message, "nobody") {
		t.Errorf("not_registered message %q does not name the node", ce.Message)
	}
	start := time.Now()
	_, err = c.PortPlease(ctx, "no-such-host", "app")
	if ce := wantCode(t, "port_please app@no-such-host", err, control.CodeUnknownHost); ce != nil && !strings.Contains(ce.Message, "no-such-host") {
		t.Errorf("unknown_host message %q does not name the host", ce.Message)
	}
	_, err = c.Names(ctx, "no-such-host.example.com")
	wantCode(t, "names no-such-host.example.com", err, control.CodeUnknownHost)
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("lookups on unknown hosts took %v; want them to fail fast", d)
	}
	_, err = c.PortPlease(ctx, "", "app")
	wantCode(t, "port_please with no host", err, control.CodeBadRequest)
	_, err = c.PortPlease(ctx, "beta", "bad@name")
	wantCode(t, "port_please of an invalid name", err, control.CodeInvalidName)
	_, err = c.Names(ctx, "")
	wantCode(t, "names with no host", err, control.CodeBadRequest)
}

// TestEPMDFromTailnetPeer speaks raw EPMD to alpha's tailnet port from beta:
// a peer may look names up, but never register, kill or stop, and its bad
// packets touch nothing.
func TestEPMDFromTailnetPeer(t *testing.T) {
	ctx := testContext(t, 30*time.Second)
	node := dialControl(t, ctx, alpha)
	b := dialControl(t, ctx, beta)
	if _, err := node.Register(ctx, control.Request{Name: "keeper", Port: 42001}); err != nil {
		t.Fatalf("register keeper: %v", err)
	}
	exchange := func(what string, req []byte) []byte {
		t.Helper()
		conn, err := b.DialTailnet(ctx, "alpha", epmd.DefaultPort, 0)
		if err != nil {
			t.Fatalf("%s: dial alpha:4369: %v", what, err)
		}
		defer conn.Close()
		deadlineFrom(ctx, conn)
		if _, err := conn.Write(req); err != nil {
			t.Fatalf("%s: write: %v", what, err)
		}
		// Half-close: a truncated request then ends at once rather than at
		// the server's request timeout.
		if err := conn.CloseWrite(); err != nil {
			t.Fatalf("%s: half-close: %v", what, err)
		}
		resp, err := io.ReadAll(conn)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("%s: no answer and no close: %v", what, err)
		}
		if err != nil {
			// A server that closes on unread bytes resets the connection.
			t.Logf("%s: read ended with %v after % x", what, err, resp)
		}
		return resp
	}
	packet := func(body ...byte) []byte {
		return append(binary.BigEndian.AppendUint16(nil, uint16(len(body))), body...)
	}

	// ALIVE2_REQ for "intruder", port 42002, type 77, proto 0, versions 6/5.
	alive := packet(append([]byte{'x', 0xa4, 0x12, 77, 0, 0, 6, 0, 5, 0, 8}, append([]byte("intruder"), 0, 0)...)...)
	if got := exchange("ALIVE2_REQ from a peer", alive); len(got) != 6 || got[0] != 'v' || got[1] != 1 {
		t.Errorf("ALIVE2_REQ from a tailnet peer answered % x; want the refusal: ALIVE2_X_RESP with result 1", got)
	}
	if got := exchange("KILL_REQ", packet('k')); string(got) != "NO" {
		t.Errorf("KILL_REQ answered %q; want NO", got)
	}
	if got := exchange("STOP_REQ", packet(append([]byte{'s'}, "keeper"...)...)); string(got) != "NO" {
		t.Errorf("STOP_REQ keeper answered %q; want NO", got)
	}
	for _, bad := range []struct {
		what string
		req  []byte
	}{
		{"length 0", []byte{0, 0}},
		{"length 65535, 3 bytes sent", []byte{0xff, 0xff, 'z', 'a', 'b'}},
		{"truncated header", []byte{0}},
		{"unknown tag", packet('?', 1, 2)},
		{"ALIVE2 name length overrun", packet('x', 0, 1, 77, 0, 0, 6, 0, 5, 0xff, 0xff, 'a')},
		{"non-UTF-8 PORT_PLEASE2", packet('z', 0xff, 0xfe)},
		{"PORT_PLEASE2 of a 256-byte name", packet(append([]byte{'z'}, strings.Repeat("n", 256)...)...)},
	} {
		if got := exchange(bad.what, bad.req); len(got) != 0 {
			t.Errorf("%s: answered % x; want the connection closed unanswered", bad.what, got)
		}
	}

	names, err := b.Names(ctx, "alpha")
	if err != nil || !hasName("keeper")(names) || hasName("intruder")(names) {
		t.Errorf("alpha's names after the peer's attempts: %v, %v; want keeper and no intruder", names, err)
	}
	if got := exchange("PORT_PLEASE2_REQ keeper", packet(append([]byte{'z'}, "keeper"...)...)); !bytes.HasPrefix(got, []byte{'w', 0, 0xa4, 0x11}) {
		t.Errorf("PORT_PLEASE2_REQ keeper answered % x; want success with port 42001", got)
	}
}

// TestNamesCommand runs `tsdist names HOST`.
func TestNamesCommand(t *testing.T) {
	ctx := testContext(t, 30*time.Second)
	node := dialControl(t, ctx, beta)
	for i, name := range []string{"cmd1", "cmd2"} {
		if _, err := node.Register(ctx, control.Request{Name: name, Port: 43001 + i}); err != nil {
			t.Fatalf("register %s: %v", name, err)
		}
	}
	out, err := exec.CommandContext(ctx, tsdistBin, "names", "beta", "--socket", alpha.socket).CombinedOutput()
	if err != nil {
		t.Fatalf("tsdist names beta: %v\n%s", err, out)
	}
	t.Logf("tsdist names beta:\n%s", out)
	for _, line := range []string{"name cmd1 at port 43001\n", "name cmd2 at port 43002\n"} {
		if !strings.Contains(string(out), line) {
			t.Errorf("tsdist names beta lacks %q", line)
		}
	}

	out, err = exec.CommandContext(ctx, tsdistBin, "names", "--json", "--socket", alpha.socket, "beta").Output()
	if err != nil {
		t.Fatalf("tsdist names --json beta: %v", err)
	}
	var res control.NamesResult
	if err := json.Unmarshal(out, &res); err != nil || res.Host != "beta" || !hasName("cmd1")(res.Names) {
		t.Errorf("tsdist names --json beta: %+v, %v\n%s", res, err, out)
	}

	out, err = exec.CommandContext(ctx, tsdistBin, "names", "--socket", alpha.socket, "nowhere").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "unknown_host") || !strings.Contains(string(out), "nowhere") {
		t.Errorf("tsdist names nowhere: %v\n%s; want an unknown_host error naming it", err, out)
	}
	out, err = exec.CommandContext(ctx, tsdistBin, "names", "--socket", alpha.socket).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), "missing HOST") {
		t.Errorf("tsdist names without a host: %v\n%s; want exit status 2 and a usage error", err, out)
	}
}

// TestWatchPeers follows the tailnet through peers events: a helper that
// joins appears online, pushed (not polled), and goes offline when it
// stops.
func TestWatchPeers(t *testing.T) {
	ctx := testContext(t, 60*time.Second)
	a := dialControl(t, ctx, alpha)
	peers, err := a.WatchPeers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	waitFor := func(what string, ok func([]carrier.Peer) bool) {
		t.Helper()
		for {
			select {
			case ps := <-peers:
				if ok(ps) {
					return
				}
			case <-ctx.Done():
				t.Fatalf("no peers event with %s", what)
			}
		}
	}
	has := func(node string, online bool) func([]carrier.Peer) bool {
		return func(ps []carrier.Peer) bool {
			return slices.ContainsFunc(ps, func(p carrier.Peer) bool { return p.Node == node && p.Online == online })
		}
	}
	waitFor("beta online", has("beta", true))
	start := time.Now()
	h := startTestHelper(t, ctx, "joiner")
	waitFor("joiner online", has("joiner", true))
	joined := time.Since(start)
	t.Logf("joiner appeared in alpha's peers events %v after its helper started", joined.Round(time.Millisecond))
	if joined >= 2*time.Second {
		t.Errorf("joiner took %v to appear: the event came from the 2 s poll, not from a notification", joined)
	}
	start = time.Now()
	if err := h.stop(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	waitFor("joiner offline", func(ps []carrier.Peer) bool { return !has("joiner", true)(ps) })
	t.Logf("joiner went offline in alpha's peers events %v after its helper was told to stop", time.Since(start).Round(time.Millisecond))
}
