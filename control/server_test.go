package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"
	"time"

	"github.com/tsdist/tsdist/access"
	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/devnet"
	"github.com/tsdist/tsdist/host"
	"github.com/tsdist/tsdist/internal/nettest"
)

// These tests speak the control protocol byte by byte, as a client in
// another language would, to pin down what docs/control-protocol.md says.
// Most use a node that never comes up (its control server does not exist),
// which is enough for everything but listen, dial and whois results.

// idleNode is a node whose coordination server is unreachable: it never
// reaches Running.
func idleNode(t *testing.T) *host.Host {
	t.Helper()
	h, err := host.New(host.Config{
		Tailnet: carrier.Config{
			Hostname:   "idle",
			ControlURL: "http://127.0.0.1:1",
			Dir:        t.TempDir(),
			Ephemeral:  true,
		},
		Policy: access.MustParse(access.Default),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// serve runs a Server for node on a fresh socket and returns its path.
func serve(t *testing.T, node *host.Host) (string, *Server) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "c.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(node, "test-1", nil)
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return path, srv
}

// wireMsg is any helper-to-client message.
type wireMsg struct {
	ID           uint64            `json:"id"`
	OK           bool              `json:"ok"`
	FD           bool              `json:"fd"`
	Result       json.RawMessage   `json:"result"`
	Error        *Error            `json:"error"`
	Event        string            `json:"event"`
	ListenerPort int               `json:"listener_port"`
	Peer         *carrier.Identity `json:"peer"`

	raw  []byte
	file *net.UnixConn // the descriptor, for "fd": true
}

type rawClient struct {
	t  *testing.T
	c  *net.UnixConn
	fr *carrier.FDReader
	r  *bufio.Reader
}

func dialRaw(t *testing.T, path string) *rawClient {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	fr := carrier.NewFDReader(c)
	t.Cleanup(func() { c.Close(); fr.Close() })
	return &rawClient{t: t, c: c, fr: fr, r: bufio.NewReader(fr)}
}

func (rc *rawClient) sendRaw(b []byte) {
	rc.t.Helper()
	if _, err := rc.c.Write(b); err != nil {
		rc.t.Fatal(err)
	}
}

func (rc *rawClient) send(payload string) {
	rc.t.Helper()
	rc.sendRaw(AppendFrame(nil, []byte(payload)))
}

// recv reads the next message, waiting at most d.
func (rc *rawClient) recv(d time.Duration) (wireMsg, error) {
	rc.c.SetReadDeadline(time.Now().Add(d))
	defer rc.c.SetReadDeadline(time.Time{})
	b, err := ReadFrame(rc.r, MaxResponseSize)
	if err != nil {
		return wireMsg{}, err
	}
	var m wireMsg
	if err := json.Unmarshal(b, &m); err != nil {
		return wireMsg{}, fmt.Errorf("bad message %q: %w", b, err)
	}
	m.raw = b
	if m.FD {
		f := rc.fr.TakeFD()
		if f == nil {
			return m, fmt.Errorf("message %s announces a descriptor that did not come", b)
		}
		nc, err := net.FileConn(f)
		f.Close()
		if err != nil {
			return m, err
		}
		m.file = nc.(*net.UnixConn)
		rc.t.Cleanup(func() { m.file.Close() })
	}
	return m, nil
}

func (rc *rawClient) mustRecv() wireMsg {
	rc.t.Helper()
	m, err := rc.recv(20 * time.Second)
	if err != nil {
		rc.t.Fatal(err)
	}
	return m
}

// call sends payload and returns the next message.
func (rc *rawClient) call(payload string) wireMsg {
	rc.t.Helper()
	rc.send(payload)
	return rc.mustRecv()
}

func (rc *rawClient) hello() HelloResult {
	rc.t.Helper()
	m := rc.call(`{"id":1,"op":"hello","version":1,"client":"raw-test"}`)
	if !m.OK {
		rc.t.Fatalf("hello: %s", m.raw)
	}
	var h HelloResult
	if err := json.Unmarshal(m.Result, &h); err != nil {
		rc.t.Fatal(err)
	}
	return h
}

func wantError(t *testing.T, m wireMsg, id uint64, code string) {
	t.Helper()
	if m.OK || m.Error == nil || m.Error.Code != code || m.ID != id || m.Result != nil {
		t.Fatalf("got %s; want id %d, ok false, error code %q", m.raw, id, code)
	}
	if m.Error.Message == "" {
		t.Errorf("error %s has no message", m.raw)
	}
}

// expectClosed checks that the helper closes the connection without
// sending anything more.
func expectClosed(t *testing.T, rc *rawClient) {
	t.Helper()
	m, err := rc.recv(10 * time.Second)
	if err == nil {
		t.Fatalf("got %s; want the connection closed", m.raw)
	}
	if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !strings.Contains(err.Error(), "reset") {
		t.Fatalf("got %v; want the connection closed", err)
	}
}

func TestServerHelloFirst(t *testing.T) {
	path, _ := serve(t, idleNode(t))
	rc := dialRaw(t, path)

	wantError(t, rc.call(`{"id":5,"op":"status"}`), 5, CodeHelloRequired)
	wantError(t, rc.call(`{"id":6,"op":"no-such-op"}`), 6, CodeHelloRequired)
	// A malformed request is answered as such, hello or not.
	wantError(t, rc.call(`{"id":7,"op":"listen","port":-1}`), 7, CodeBadRequest)
	wantError(t, rc.call(`{"id":8}`), 8, CodeBadRequest)
	wantError(t, rc.call(`{"id":9,"op":"hello","version":2}`), 9, CodeVersion)
	wantError(t, rc.call(`{"id":10,"op":"hello"}`), 10, CodeVersion)
	wantError(t, rc.call(`{"id":11,"op":"stats"}`), 11, CodeHelloRequired)

	h := rc.hello()
	if h.Version != 1 || h.Helper != "test-1" || h.Hostname != "idle" || h.State == "" || h.State == "Running" {
		t.Fatalf("hello result %+v", h)
	}
	m := rc.call(`{"id":12,"op":"stats"}`)
	if !m.OK || m.ID != 12 || m.Error != nil || m.FD {
		t.Fatalf("stats: %s", m.raw)
	}
	var st Stats
	if err := json.Unmarshal(m.Result, &st); err != nil || st.Clients != 1 || st.Goroutines == 0 || st.OpenFDs == 0 {
		t.Fatalf("stats result %s (%v)", m.Result, err)
	}
	wantError(t, rc.call(`{"id":13,"op":"no-such-op"}`), 13, CodeUnknownOp)
}

func TestServerRequestErrors(t *testing.T) {
	path, _ := serve(t, idleNode(t))
	rc := dialRaw(t, path)
	rc.hello()
	tests := []struct {
		req  string
		id   uint64
		code string
	}{
		{`not json`, 0, CodeBadRequest},
		{`{"id":2,"op":"listen","port":"x"}`, 2, CodeBadRequest},
		{`{"id":3,"op":"dial","host":"beta","port":65536}`, 3, CodeBadRequest},
		{`{"id":4,"op":"dial","host":"beta","port":1,"timeout_ms":-1}`, 4, CodeBadRequest},
		{`{"id":5,"op":"dial","port":4369}`, 5, CodeBadRequest},
		{`{"id":6,"op":"dial","host":"beta"}`, 6, CodeBadRequest},
		{`{"id":7,"op":"dial","host":"beta","port":0}`, 7, CodeBadRequest},
		{`{"id":8,"op":"whois"}`, 8, CodeBadRequest},
		{`{"id":9,"op":"unlisten","port":4370}`, 9, CodeNotListening},
		{`{"id":10,"op":"unlisten"}`, 10, CodeNotListening},
		{`{"id":11,"op":"dial","host":"beta","port":4369,"timeout_ms":100}`, 11, CodeNotRunning},
		{`{"id":12,"op":"bogus"}`, 12, CodeUnknownOp},
	}
	for _, tt := range tests {
		wantError(t, rc.call(tt.req), tt.id, tt.code)
	}
	// The connection survived all of them.
	if m := rc.call(`{"id":99,"op":"stats"}`); !m.OK || m.ID != 99 {
		t.Fatalf("stats after errors: %s", m.raw)
	}
}

func TestServerTooLarge(t *testing.T) {
	path, _ := serve(t, idleNode(t))
	for _, hello := range []bool{false, true} {
		rc := dialRaw(t, path)
		if hello {
			rc.hello()
		}
		// Only the header: the helper must not wait for the payload.
		rc.sendRaw([]byte{0, 1, 0, 1})
		wantError(t, rc.mustRecv(), 0, CodeTooLarge)
		expectClosed(t, rc)
	}
	// The largest allowed frame is read (and refused as JSON).
	rc := dialRaw(t, path)
	big := `{"id":3,"op":"status","pad":"` + strings.Repeat("x", MaxRequestSize-40) + `"}`
	big += strings.Repeat(" ", MaxRequestSize-len(big))
	m := rc.call(big)
	wantError(t, m, 3, CodeHelloRequired)
}

// TestServerEmptyFrame: an empty frame is refused, and the stream, still in
// step, keeps serving.
func TestServerEmptyFrame(t *testing.T) {
	path, _ := serve(t, idleNode(t))
	rc := dialRaw(t, path)
	rc.hello()
	rc.sendRaw([]byte{0, 0, 0, 0})
	wantError(t, rc.mustRecv(), 0, CodeBadRequest)
	m := rc.call(`{"id":9,"op":"stats"}`)
	if !m.OK || m.ID != 9 {
		t.Errorf("stats after an empty frame: %+v", m)
	}
}

// TestServerTruncatedFrameCloses: a client that closes mid-frame is simply
// gone; nothing is answered.
func TestServerTruncatedFrame(t *testing.T) {
	path, srv := serve(t, idleNode(t))
	rc := dialRaw(t, path)
	rc.hello()
	rc.sendRaw([]byte{0, 0, 0, 50, '{'})
	rc.c.CloseWrite()
	expectClosed(t, rc)
	waitClients(t, srv, 0)
}

func waitClients(t *testing.T, srv *Server, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for srv.Stats().Clients != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d clients; want %d", srv.Stats().Clients, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestServerBusy fills the in-flight window with dials that wait for the
// node to come up, and checks the next request is refused as busy at once,
// with its own id, and that hello is not counted.
func TestServerBusy(t *testing.T) {
	path, srv := serve(t, idleNode(t))
	rc := dialRaw(t, path)
	rc.hello()
	for i := range MaxInFlight {
		rc.send(fmt.Sprintf(`{"id":%d,"op":"dial","host":"beta","port":4369,"timeout_ms":60000}`, 100+i))
	}
	wantError(t, rc.call(`{"id":7,"op":"stats"}`), 7, CodeBusy)
	wantError(t, rc.call(`{"id":8,"op":"no-such-op"}`), 8, CodeBusy)
	// Checks made before a request is queued still answer at once.
	wantError(t, rc.call(`{"id":9,"op":"listen","port":-1}`), 9, CodeBadRequest)
	if m := rc.call(`{"id":10,"op":"hello","version":1}`); !m.OK || m.ID != 10 {
		t.Fatalf("hello while busy: %s", m.raw)
	}
	// Closing the connection ends its pending requests without answers.
	rc.c.Close()
	waitClients(t, srv, 0)
	rc2 := dialRaw(t, path)
	rc2.hello()
	if m := rc2.call(`{"id":2,"op":"stats"}`); !m.OK {
		t.Fatalf("stats on a new connection: %s", m.raw)
	}
}

// TestServerResponsesOutOfOrder: a slow request does not hold up a later one.
func TestServerResponsesOutOfOrder(t *testing.T) {
	path, _ := serve(t, idleNode(t))
	rc := dialRaw(t, path)
	rc.hello()
	rc.send(`{"id":20,"op":"dial","host":"beta","port":4369,"timeout_ms":1500}`)
	rc.send(`{"id":21,"op":"stats"}`)
	if m := rc.mustRecv(); m.ID != 21 || !m.OK {
		t.Fatalf("first response %s; want stats (21)", m.raw)
	}
	wantError(t, rc.mustRecv(), 20, CodeNotRunning)
}

// TestServerDialTimeoutCapped: timeout_ms is capped at five minutes without
// overflowing: a value whose nanoseconds do not fit in an int64 still means
// the cap, so the dial waits for the node instead of failing at once.
func TestServerDialTimeoutCapped(t *testing.T) {
	path, _ := serve(t, idleNode(t))
	rc := dialRaw(t, path)
	rc.hello()
	// 9223372036855 ms * 1e6 ns/ms would overflow int64.
	rc.send(`{"id":2,"op":"dial","host":"beta","port":4369,"timeout_ms":9223372036855}`)
	if m, err := rc.recv(time.Second); err == nil {
		t.Fatalf("a dial with timeout_ms 9223372036855 was answered at once with %s; "+
			"it must wait for the node up to the 5 minute cap", m.raw)
	}
}

// TestServerClientsAndStats: every control connection counts in stats
// until it closes.
func TestServerClientsAndStats(t *testing.T) {
	path, srv := serve(t, idleNode(t))
	var rcs []*rawClient
	for range 3 {
		rc := dialRaw(t, path)
		rc.hello()
		rcs = append(rcs, rc)
	}
	waitClients(t, srv, 3)
	for _, rc := range rcs {
		rc.c.Close()
	}
	waitClients(t, srv, 0)
}

// The tests below need a real tailnet: the offline one, on loopback.

// startTailnet starts the offline tailnet, each device its own user's, and
// a host on it for each hostname, with the policy "*".
func startTailnet(t *testing.T, ctx context.Context, hostnames ...string) []*host.Host {
	t.Helper()
	dn, err := devnet.Start(ctx, devnet.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dn.Close)
	var nodes []*host.Host
	for _, name := range hostnames {
		h, err := host.New(host.Config{
			Tailnet: carrier.Config{Hostname: name, ControlURL: dn.ControlURL, Dir: t.TempDir(), Ephemeral: true},
			Policy:  access.MustParse("*"),
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { h.Close() })
		if err := h.Up(ctx); err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, h)
	}
	// Wait until the first node sees all the others.
	for {
		st, err := nodes[0].Node().Status(ctx)
		if err == nil && len(st.Peers) == len(nodes)-1 {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("peers never appeared")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nodes
}

// TestServerDialFreesInFlightSlot: a dial's request gives its in-flight slot
// back once it is answered, and the connection it made is carried outside
// any slot, so with MaxInFlight dialled connections open the control
// connection still answers further requests.
func TestServerDialFreesInFlightSlot(t *testing.T) {
	if testing.Short() {
		t.Skip("needs the offline tailnet")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	nodes := startTailnet(t, ctx, "alpha", "beta")
	ln, err := nodes[1].Node().Listen(7)
	if err != nil {
		t.Fatal(err)
	}
	nettest.Silent(t, ln)
	path, _ := serve(t, nodes[0])
	rc := dialRaw(t, path)
	rc.hello()
	for i := range MaxInFlight {
		m := rc.call(fmt.Sprintf(`{"id":%d,"op":"dial","host":"beta","port":7}`, 100+i))
		if !m.OK || !m.FD || m.file == nil {
			t.Fatalf("dial %d: %s", i, m.raw)
		}
		// m.file stays open: the connection is live.
	}
	if m := rc.call(`{"id":2,"op":"stats"}`); !m.OK {
		t.Fatalf("with %d dialled connections open, stats was answered %s; "+
			"a carried connection must not hold an in-flight slot", MaxInFlight, m.raw)
	}
}

// TestClientDialTailnetBadResultClosesFD: when a dial response brings a
// descriptor but its result does not decode, DialTailnet returns the error
// and closes the descriptor itself, so the helper's end sees end of stream
// at once rather than whenever a GC finalizes the *os.File.
func TestClientDialTailnetBadResultClosesFD(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(-1)) // no finalizer may close it instead
	path := filepath.Join(t.TempDir(), "fake.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	nearc := make(chan *net.UnixConn, 1)
	go func() {
		c, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		defer c.Close()
		r := bufio.NewReader(c)
		for {
			p, err := ReadFrame(r, MaxRequestSize)
			if err != nil {
				return
			}
			req, _ := ParseRequest(p)
			switch req.Op {
			case OpHello:
				c.Write(AppendFrame(nil, mustJSON(Response{ID: req.ID, OK: true, Result: mustJSON(HelloResult{Version: 1})})))
			case OpDial:
				near, far, err := carrier.Socketpair()
				if err != nil {
					return
				}
				nearc <- near
				carrier.SendFD(c, AppendFrame(nil, []byte(fmt.Sprintf(`{"id":%d,"ok":true,"fd":true,"result":{"peer":"not an object"}}`, req.ID))), far)
				far.Close()
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cl, err := Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	conn, err := cl.DialTailnet(ctx, "beta", 4369, 0)
	if err == nil {
		conn.Close()
		t.Fatal("DialTailnet succeeded with a bad result")
	}
	near := <-nearc
	defer near.Close()
	near.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, rerr := near.Read(make([]byte, 1)); !errors.Is(rerr, io.EOF) {
		t.Fatalf("DialTailnet failed (%v) but kept the connection's descriptor open "+
			"(the helper's end reads %v, not EOF)", err, rerr)
	}
}
