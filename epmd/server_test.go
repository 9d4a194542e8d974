package epmd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tsdist/tsdist/internal/leakcheck"
	"github.com/tsdist/tsdist/internal/nettest"
)

// These tests run the Server on a real TCP listener on 127.0.0.1 and talk
// to it with the Client or byte by byte.

// logBuf collects a Server's log lines.
type logBuf struct {
	mu    sync.Mutex
	lines []string
}

func (l *logBuf) logf(format string, args ...any) {
	l.mu.Lock()
	l.lines = append(l.lines, fmt.Sprintf(format, args...))
	l.mu.Unlock()
}

// count is the number of lines containing s.
func (l *logBuf) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, line := range l.lines {
		if strings.Contains(line, s) {
			n++
		}
	}
	return n
}

func loopbackOnly(a net.Addr) bool {
	ta, ok := a.(*net.TCPAddr)
	return ok && ta.IP.IsLoopback()
}

type testServer struct {
	srv    *Server
	addr   string // 127.0.0.1:port
	port   uint16
	client *Client
	logs   *logBuf
	// serveErr waits for Serve to return, and says what it returned.
	serveErr func() error
}

var errServeRunning = errors.New("Serve still running 5s after Close")

// startServer serves a fresh registry on 127.0.0.1. Registration is allowed
// from loopback; configure may change that and the limits before Serve.
func startServer(t *testing.T, configure func(*Server)) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	logs := &logBuf{}
	srv := &Server{Registry: NewRegistry(), AllowRegister: loopbackOnly, Port: port, Logf: logs.logf}
	if configure != nil {
		configure(srv)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	ts := &testServer{
		srv:    srv,
		addr:   ln.Addr().String(),
		port:   port,
		client: &Client{Port: port},
		logs:   logs,
		serveErr: sync.OnceValue(func() error {
			select {
			case err := <-served:
				return err
			case <-time.After(5 * time.Second):
				return errServeRunning
			}
		}),
	}
	t.Cleanup(func() {
		srv.Close()
		if err := ts.serveErr(); err != ErrServerClosed {
			t.Errorf("Serve returned %v; want ErrServerClosed", err)
		}
	})
	return ts
}

// register registers name over TCP with the test's Client, until the test
// ends.
func (ts *testServer) register(t *testing.T, n Node) *ClientRegistration {
	t.Helper()
	reg, err := ts.client.Register(t.Context(), "127.0.0.1", n)
	if err != nil {
		t.Fatalf("Register %q: %v", n.Name, err)
	}
	t.Cleanup(func() { reg.Close() })
	return reg
}

// node is a plausible registration.
func node(name string, port uint16) Node {
	return Node{Name: name, Port: port, Type: NodeTypeNormal, Protocol: ProtocolTCP, HighestVersion: 6, LowestVersion: 5}
}

// poll waits up to 5 seconds for cond.
func poll(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// dial opens a raw connection to the server.
func (ts *testServer) dial(t *testing.T) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// readToClose reads what the server sends until it closes the connection.
// It fails the test if the server has not closed it within wait. A reset
// counts as a close: a server that closes with bytes of ours unread resets.
func readToClose(t *testing.T, c net.Conn, wait time.Duration) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(wait))
	got, err := io.ReadAll(c)
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("after %q: %v; want the server to close the connection", got, err)
	}
	return got
}

// exchange sends req on a fresh connection and returns everything the server
// sends before it closes the connection (within 3 seconds).
func (ts *testServer) exchange(t *testing.T, req []byte) []byte {
	t.Helper()
	c := ts.dial(t)
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	got := readToClose(t, c, 3*time.Second)
	c.Close()
	return got
}

// req frames a request body.
func req(body string) []byte { return append(appendRequestHeader(nil, len(body)), body...) }

func TestRegisterPortPleaseNames(t *testing.T) {
	leakcheck.Check(t)
	ts := startServer(t, nil)
	ctx := t.Context()

	n := Node{Name: "alpha", Port: 4370, Type: NodeTypeHidden, Protocol: ProtocolTCP, HighestVersion: 6, LowestVersion: 5, Extra: []byte("x\x00y")}
	reg, err := ts.client.Register(ctx, "127.0.0.1", n)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	if reg.Creation < 4 {
		t.Errorf("creation %d; want 4 or more (0..3 are for old nodes)", reg.Creation)
	}
	if got, ok := ts.srv.Registry.Lookup("alpha"); !ok || !reflect.DeepEqual(got, n) {
		t.Fatalf("registry has %+v, %v; want %+v", got, ok, n)
	}
	got, err := ts.client.PortPlease(ctx, "127.0.0.1", "alpha")
	if err != nil || !reflect.DeepEqual(got, n) {
		t.Fatalf("PortPlease = %+v, %v; want %+v", got, err, n)
	}
	// Byte for byte, as the protocol document has it.
	if got, want := ts.exchange(t, req("zalpha")), appendPort2Response(nil, &n); !bytes.Equal(got, want) {
		t.Fatalf("PORT2_RESP % x; want % x", got, want)
	}

	// An old node (highest version 5) gets ALIVE2_RESP, creation 1..3.
	old := node("beta", 4371)
	old.HighestVersion = 5
	reg5 := ts.register(t, old)
	if reg5.Creation < 1 || reg5.Creation > 3 {
		t.Errorf("creation %d for a version-5 node; want 1..3", reg5.Creation)
	}

	names, err := ts.client.Names(ctx, "127.0.0.1")
	if want := []NameEntry{{"alpha", 4370}, {"beta", 4371}}; err != nil || !reflect.DeepEqual(names, want) {
		t.Fatalf("Names = %v, %v; want %v", names, err, want)
	}
	want := append([]byte{0, 0, byte(ts.port >> 8), byte(ts.port)}, "name alpha at port 4370\nname beta at port 4371\n"...)
	if got := ts.exchange(t, req("n")); !bytes.Equal(got, want) {
		t.Fatalf("NAMES answer %q; want %q", got, want)
	}

	// The registration ends the moment its connection does.
	reg.Close()
	poll(t, "alpha to be unregistered", func() bool { _, ok := ts.srv.Registry.Lookup("alpha"); return !ok })
	if _, err := ts.client.PortPlease(ctx, "127.0.0.1", "alpha"); !errors.Is(err, ErrNotRegistered) {
		t.Fatalf("PortPlease after Close: %v; want ErrNotRegistered", err)
	}
	if got := ts.exchange(t, req("zalpha")); !bytes.Equal(got, []byte{'w', 1}) {
		t.Fatalf("PORT2_RESP for a name gone: % x; want 77 01", got)
	}
	// The name is free again, with a new creation.
	reg2 := ts.register(t, n)
	if reg2.Creation == reg.Creation {
		t.Errorf("the same name registered again got the same creation %d", reg.Creation)
	}
}

func TestRegistrationLifetime(t *testing.T) {
	leakcheck.Check(t)
	ts := startServer(t, func(s *Server) { s.RequestTimeout = 100 * time.Millisecond })
	c := ts.dial(t)
	if _, err := c.Write(appendAlive2Request(nil, node("gamma", 5000))); err != nil {
		t.Fatal(err)
	}
	var resp [6]byte
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.ReadFull(c, resp[:]); err != nil || resp[0] != 'v' || resp[1] != 0 {
		t.Fatalf("ALIVE2 answer % x, %v", resp, err)
	}
	// A registration outlives RequestTimeout: only the request is timed.
	// And bytes the node sends afterwards are dropped, not parsed.
	if _, err := c.Write(req("k")); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := c.Read(resp[:]); n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("registration connection: read %d bytes, %v; want it left open and silent", n, err)
	}
	if _, ok := ts.srv.Registry.Lookup("gamma"); !ok {
		t.Fatal("registration ended while its connection stayed open")
	}
	// Half-closing is going away.
	c.CloseWrite()
	poll(t, "gamma to be unregistered", func() bool { _, ok := ts.srv.Registry.Lookup("gamma"); return !ok })
	readToClose(t, c, 3*time.Second)
}

func TestDuplicateName(t *testing.T) {
	leakcheck.Check(t)
	ts := startServer(t, nil)
	ts.register(t, node("taken", 5001))

	// Real EPMD's answer: result 1, creation 99; then the connection ends.
	for _, tt := range []struct {
		highest uint16
		want    []byte
	}{{6, []byte{'v', 1, 0, 0, 0, 99}}, {5, []byte{'y', 1, 0, 99}}} {
		n := node("taken", 5002)
		n.HighestVersion = tt.highest
		if got := ts.exchange(t, appendAlive2Request(nil, n)); !bytes.Equal(got, tt.want) {
			t.Errorf("duplicate ALIVE2 (version %d): % x; want % x", tt.highest, got, tt.want)
		}
	}
	if _, err := ts.client.Register(t.Context(), "127.0.0.1", node("taken", 5003)); !errors.Is(err, ErrRefused) {
		t.Fatalf("Register of a taken name: %v; want ErrRefused", err)
	}
	// A name taken through the registry directly is taken over TCP too.
	direct, err := ts.srv.Registry.Register(node("direct", 5004))
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	if _, err := ts.client.Register(t.Context(), "127.0.0.1", node("direct", 5005)); !errors.Is(err, ErrRefused) {
		t.Fatalf("Register of a name held in the registry: %v; want ErrRefused", err)
	}
	for name, port := range map[string]uint16{"taken": 5001, "direct": 5004} {
		if n, err := ts.client.PortPlease(t.Context(), "127.0.0.1", name); err != nil || n.Port != port {
			t.Fatalf("PortPlease %s = %+v, %v; want the first registration, port %d", name, n, err, port)
		}
	}
}

func TestRegisterNotAllowed(t *testing.T) {
	leakcheck.Check(t)
	t.Run("nil", func(t *testing.T) {
		leakcheck.Check(t)
		ts := startServer(t, func(s *Server) { s.AllowRegister = nil })
		if got, want := ts.exchange(t, appendAlive2Request(nil, node("n", 6000))), []byte{'v', 1, 0, 0, 0, 99}; !bytes.Equal(got, want) {
			t.Fatalf("ALIVE2: % x; want % x and close", got, want)
		}
		n := node("n", 6000)
		n.HighestVersion = 5
		if got, want := ts.exchange(t, appendAlive2Request(nil, n)), []byte{'y', 1, 0, 99}; !bytes.Equal(got, want) {
			t.Fatalf("ALIVE2 version 5: % x; want % x and close", got, want)
		}
		if _, err := ts.client.Register(t.Context(), "127.0.0.1", node("n", 6000)); !errors.Is(err, ErrRefused) {
			t.Fatalf("Register: %v; want ErrRefused", err)
		}
		if names := ts.srv.Registry.Names(); len(names) != 0 {
			t.Fatalf("registry has %v", names)
		}
		if n := ts.logs.count("registration is not allowed"); n != 3 {
			t.Errorf("%d refusals logged; want 3", n)
		}
	})
	t.Run("func", func(t *testing.T) {
		leakcheck.Check(t)
		var (
			mu   sync.Mutex
			seen []net.Addr
		)
		ts := startServer(t, func(s *Server) {
			s.AllowRegister = func(a net.Addr) bool {
				mu.Lock()
				seen = append(seen, a)
				mu.Unlock()
				return false
			}
		})
		c := ts.dial(t)
		c.Write(appendAlive2Request(nil, node("n", 6000)))
		if got := readToClose(t, c, 3*time.Second); !bytes.Equal(got, []byte{'v', 1, 0, 0, 0, 99}) {
			t.Fatalf("ALIVE2: % x", got)
		}
		mu.Lock()
		defer mu.Unlock()
		if len(seen) != 1 || seen[0].String() != c.LocalAddr().String() {
			t.Fatalf("AllowRegister saw %v; want the client's address %v", seen, c.LocalAddr())
		}
		if names := ts.srv.Registry.Names(); len(names) != 0 {
			t.Fatalf("registry has %v", names)
		}
	})
}

func TestKillStopDumpRefused(t *testing.T) {
	leakcheck.Check(t)
	ts := startServer(t, nil)
	ts.register(t, node("keeper", 7000))
	tests := []struct {
		name string
		body string
		want string
	}{
		{"KILL_REQ", "k", "NO"},
		{"STOP_REQ", "skeeper", "NO"},
		{"STOP_REQ without a name", "s", "NO"},
		{"DUMP_REQ", "d", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ts.exchange(t, req(tt.body)); string(got) != tt.want {
				t.Fatalf("%s answered %q; want %q", tt.name, got, tt.want)
			}
			if n, err := ts.client.PortPlease(t.Context(), "127.0.0.1", "keeper"); err != nil || n.Port != 7000 {
				t.Fatalf("after %s: PortPlease keeper = %+v, %v", tt.name, n, err)
			}
		})
	}
	if names := ts.srv.Registry.Names(); !reflect.DeepEqual(names, []NameEntry{{"keeper", 7000}}) {
		t.Fatalf("registry: %v", names)
	}
	// The server is still up and answering.
	if _, err := ts.client.Names(t.Context(), "127.0.0.1"); err != nil {
		t.Fatal(err)
	}
}

func TestBadInput(t *testing.T) {
	leakcheck.Check(t)
	// RequestTimeout is long: a connection closed in time was closed for
	// its input, not for being slow.
	ts := startServer(t, func(s *Server) { s.RequestTimeout = 30 * time.Second })
	keeper := node("keeper", 7000)
	keeper.Extra = []byte("k")
	ts.register(t, keeper)

	alive2 := func(n Node) []byte { return appendAlive2Request(nil, n) }
	// fixed is an ALIVE2_REQ body's tag and fixed fields.
	fixed := "x\x12\x34\x4d\x00\x00\x06\x00\x05"
	refused := []byte{'v', 1, 0, 0, 0, 99}
	tests := []struct {
		name string
		send []byte
		// halfClose: the client then stops sending (it is cut short).
		halfClose bool
		want      []byte // the answer before the server closes
		// taken: the name that must not be registered afterwards.
		taken string
	}{
		{"nothing", nil, true, nil, ""},
		{"half a header", []byte{0}, true, nil, ""},
		{"header only", []byte{0, 10}, true, nil, ""},
		{"body cut short", req("zkeeper")[:5], true, nil, ""},
		{"ALIVE2 cut short", alive2(node("cut", 1))[:12], true, nil, "cut"},
		{"length 0", []byte{0, 0}, false, nil, ""},
		{"length one over MaxRequestLen", appendRequestHeader(nil, MaxRequestLen+1), false, nil, ""},
		{"length 0xffff", []byte{0xff, 0xff}, false, nil, ""},
		{"ALIVE2 name length overruns", req(fixed + "\x00\xc8abc\x00\x00"), false, nil, "abc"},
		{"ALIVE2 name length 0xffff", req(fixed + "\xff\xffabc\x00\x00"), false, nil, "abc"},
		{"ALIVE2 extra length says more", req(fixed + "\x00\x03abc\x00\x05xy"), false, nil, "abc"},
		{"ALIVE2 extra length says less", req(fixed + "\x00\x03abc\x00\x01xy"), false, nil, "abc"},
		{"ALIVE2 no extra length", req(fixed + "\x00\x03abc"), false, nil, "abc"},
		{"ALIVE2 fixed fields only", req(fixed), false, nil, ""},
		// Well framed, but no name the registry takes: the error answer.
		{"ALIVE2 name of 256 bytes", alive2(node(strings.Repeat("a", 256), 1)), false, refused, strings.Repeat("a", 256)},
		{"ALIVE2 name not UTF-8", alive2(node("a\xffb", 1)), false, refused, "a\xffb"},
		{"ALIVE2 empty name", alive2(node("", 1)), false, refused, ""},
		{"ALIVE2 name with @", alive2(node("a@b", 1)), false, refused, "a@b"},
		{"ALIVE2 name with NUL", alive2(node("a\x00b", 1)), false, refused, "a\x00b"},
		{"ALIVE2 port 0", alive2(node("portless", 0)), false, refused, "portless"},
		{"ALIVE2 extra of 256 bytes", alive2(Node{Name: "extra", Port: 1, Extra: make([]byte, 256)}), false, []byte{'y', 1, 0, 99}, "extra"},
		{"PORT_PLEASE2 no name", req("z"), false, nil, ""},
		{"PORT_PLEASE2 NUL in name", req("zkee\x00per"), false, nil, ""},
		{"PORT_PLEASE2 not UTF-8", req("z\xff"), false, nil, ""},
		{"PORT_PLEASE2 a name nobody could register", req("zkeeper@host"), false, []byte{'w', 1}, ""},
		{"NAMES with a byte after", req("nn"), false, nil, ""},
		{"unknown tag", req("Q"), false, nil, ""},
		{"old ALIVE_REQ", req("a\x12\x34keeper"), false, nil, ""},
		{"HTTP", []byte("GET / HTTP/1.0\r\n\r\n"), false, nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// A bystander is half-way through its own request meanwhile.
			bystander := ts.dial(t)
			full := req("zkeeper")
			if _, err := bystander.Write(full[:4]); err != nil {
				t.Fatal(err)
			}

			c := ts.dial(t)
			if _, err := c.Write(tt.send); err != nil {
				t.Fatal(err)
			}
			if tt.halfClose {
				c.CloseWrite()
			}
			if got := readToClose(t, c, 3*time.Second); !bytes.Equal(got, tt.want) {
				t.Fatalf("answer % x; want % x", got, tt.want)
			}

			if _, err := bystander.Write(full[4:]); err != nil {
				t.Fatal(err)
			}
			if got, want := readToClose(t, bystander, 3*time.Second), appendPort2Response(nil, &keeper); !bytes.Equal(got, want) {
				t.Fatalf("bystander got % x; want % x", got, want)
			}
			if tt.taken != "" {
				if _, ok := ts.srv.Registry.Lookup(tt.taken); ok {
					t.Fatalf("%q was registered", tt.taken)
				}
			}
			if names := ts.srv.Registry.Names(); !reflect.DeepEqual(names, []NameEntry{{"keeper", 7000}}) {
				t.Fatalf("registry: %v", names)
			}
			if n, err := ts.client.PortPlease(t.Context(), "127.0.0.1", "keeper"); err != nil || !reflect.DeepEqual(n, keeper) {
				t.Fatalf("PortPlease keeper = %+v, %v", n, err)
			}
		})
	}
}

func TestSlowLoris(t *testing.T) {
	leakcheck.Check(t)
	const timeout = 200 * time.Millisecond
	ts := startServer(t, func(s *Server) { s.RequestTimeout = timeout })
	ts.register(t, node("keeper", 7000))

	tests := []struct {
		name string
		send func(c net.Conn, stop <-chan struct{})
	}{
		{"one byte, then nothing", func(c net.Conn, stop <-chan struct{}) { c.Write([]byte{0}) }},
		{"a header, then nothing", func(c net.Conn, stop <-chan struct{}) { c.Write([]byte{0, 7}) }},
		{"a byte every 40ms", func(c net.Conn, stop <-chan struct{}) {
			// 40 bytes announced, one byte at a time: each read is
			// quick, the request never is.
			c.Write([]byte{0, 40})
			tick := time.NewTicker(40 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					if _, err := c.Write([]byte{'z'}); err != nil {
						return
					}
				}
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			leakcheck.Check(t)
			c := ts.dial(t)
			start := time.Now()
			stop := make(chan struct{})
			var wg sync.WaitGroup
			wg.Go(func() { tt.send(c, stop) })
			defer func() { close(stop); wg.Wait() }()

			closed := make(chan time.Duration, 1)
			go func() {
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				var b [1]byte
				_, err := c.Read(b[:])
				if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
					closed <- -1
					return
				}
				closed <- time.Since(start) // EOF, or a reset if it was still sending
			}()

			// Meanwhile the others are served.
			served := 0
			for {
				select {
				case d := <-closed:
					if d < 0 {
						t.Fatal("the slow connection was not closed within 5s")
					}
					if d < timeout*3/4 {
						t.Fatalf("the slow connection was closed after %v, before RequestTimeout %v", d, timeout)
					}
					if served < 3 {
						t.Fatalf("only %d requests served while the slow connection was open", served)
					}
					if _, ok := ts.srv.Registry.Lookup("keeper"); !ok {
						t.Fatal("keeper's registration is gone")
					}
					return
				default:
				}
				n, err := ts.client.PortPlease(t.Context(), "127.0.0.1", "keeper")
				if err != nil || n.Port != 7000 {
					t.Fatalf("PortPlease while a slow connection is open: %+v, %v", n, err)
				}
				if _, err := ts.client.Names(t.Context(), "127.0.0.1"); err != nil {
					t.Fatalf("Names while a slow connection is open: %v", err)
				}
				served += 2
			}
		})
	}
}

// dialMany opens n connections to addr, at most 64 dials at a time.
func dialMany(t *testing.T, addr string, n int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, n)
	errs := make([]error, n)
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	for i := range conns {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			conns[i], errs[i] = net.DialTimeout("tcp", addr, 10*time.Second)
		})
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	})
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	return conns
}

// openConns reports which of conns the server has left open: it waits up to
// wait for each to be closed.
func openConns(conns []net.Conn, wait time.Duration) (open []net.Conn) {
	var (
		mu sync.Mutex
		wg sync.WaitGroup
	)
	deadline := time.Now().Add(wait)
	for _, c := range conns {
		wg.Go(func() {
			c.SetReadDeadline(deadline)
			var b [1]byte
			if _, err := c.Read(b[:]); errors.Is(err, os.ErrDeadlineExceeded) {
				mu.Lock()
				open = append(open, c)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return open
}

func TestConnectionLimits(t *testing.T) {
	leakcheck.Check(t)
	const dials = 2000
	tests := []struct {
		name                    string
		maxConns, maxConnsPerIP int
		refusal                 string // in the log line of each refusal
	}{
		{"MaxConns", 10, 100000, "connections open, the most allowed"},
		{"MaxConnsPerIP", 100000, 12, "the most allowed from one address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			leakcheck.Check(t)
			limit := min(tt.maxConns, tt.maxConnsPerIP)
			ts := startServer(t, func(s *Server) {
				s.MaxConns, s.MaxConnsPerIP = tt.maxConns, tt.maxConnsPerIP
				s.RequestTimeout = 30 * time.Second // the held ones stay
			})
			ts.register(t, node("keeper", 7000)) // one slot

			conns := dialMany(t, ts.addr, dials)
			poll(t, "every connection accepted", func() bool { return ts.logs.count(tt.refusal) >= dials-(limit-1) })
			if got := ts.logs.count("refusing"); got != dials-(limit-1) {
				t.Fatalf("%d connections refused; want %d", got, dials-(limit-1))
			}
			open := openConns(conns, 500*time.Millisecond)
			if len(open) != limit-1 {
				t.Fatalf("%d connections left open; want %d (the limit %d less the registration)", len(open), limit-1, limit)
			}
			// Full: a new client is turned away, and the registry is intact.
			if _, err := ts.client.Names(t.Context(), "127.0.0.1"); err == nil {
				t.Fatal("Names answered with every slot taken")
			}
			if names := ts.srv.Registry.Names(); !reflect.DeepEqual(names, []NameEntry{{"keeper", 7000}}) {
				t.Fatalf("registry: %v", names)
			}
			// The held connections still get their answers.
			for _, c := range open[:3] {
				c.Write(req("zkeeper"))
				c.SetReadDeadline(time.Now().Add(3 * time.Second))
				if got, err := io.ReadAll(c); err != nil || !bytes.HasPrefix(got, []byte{'w', 0}) {
					t.Fatalf("held connection: % x, %v", got, err)
				}
			}
			// Once they are gone, everyone is served again.
			for _, c := range conns {
				c.Close()
			}
			poll(t, "a client to be served again", func() bool {
				_, err := ts.client.Names(t.Context(), "127.0.0.1")
				return err == nil
			})
			if n, err := ts.client.PortPlease(t.Context(), "127.0.0.1", "keeper"); err != nil || n.Port != 7000 {
				t.Fatalf("PortPlease keeper = %+v, %v", n, err)
			}
		})
	}
}

func TestManyClients(t *testing.T) {
	leakcheck.Check(t)
	const clients, parallel = 2000, 32
	ts := startServer(t, func(s *Server) { s.MaxConns, s.MaxConnsPerIP = 1000, 1000 })
	ts.register(t, node("keeper", 7000))
	var (
		wg     sync.WaitGroup
		failed atomic.Int32
		sem    = make(chan struct{}, parallel)
	)
	for i := range clients {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			var err error
			if i%2 == 0 {
				var n Node
				n, err = ts.client.PortPlease(t.Context(), "127.0.0.1", "keeper")
				if err == nil && n.Port != 7000 {
					err = fmt.Errorf("port %d", n.Port)
				}
			} else {
				_, err = ts.client.Names(t.Context(), "127.0.0.1")
			}
			if err != nil && failed.Add(1) == 1 {
				t.Errorf("client %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if n := failed.Load(); n != 0 {
		t.Fatalf("%d of %d clients failed", n, clients)
	}
}

func TestServerClose(t *testing.T) {
	leakcheck.Check(t)
	ts := startServer(t, func(s *Server) { s.RequestTimeout = 30 * time.Second })
	reg := ts.register(t, node("alpha", 7000))
	direct, err := ts.srv.Registry.Register(node("direct", 7001))
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	slow := ts.dial(t)
	slow.Write([]byte{0})
	poll(t, "the slow connection to be served", func() bool {
		ts.srv.mu.Lock()
		defer ts.srv.mu.Unlock()
		return len(ts.srv.conns) == 2
	})

	start := time.Now()
	if err := ts.srv.Close(); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Close took %v", d)
	}
	if err := ts.serveErr(); err != ErrServerClosed {
		t.Fatalf("Serve returned %v; want ErrServerClosed", err)
	}
	// Registrations over TCP end with the server; ones made in the
	// registry directly are the registry's.
	if names := ts.srv.Registry.Names(); !reflect.DeepEqual(names, []NameEntry{{"direct", 7001}}) {
		t.Fatalf("registry after Close: %v", names)
	}
	readToClose(t, reg.conn, time.Second)
	readToClose(t, slow, time.Second)
	if c, err := net.DialTimeout("tcp", ts.addr, time.Second); err == nil {
		c.Close()
		t.Fatal("the listener still accepts after Close")
	}

	// Serve after Close returns at once, and closes its listener.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := ts.srv.Serve(ln); err != ErrServerClosed {
		t.Fatalf("Serve after Close: %v", err)
	}
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Serve after Close left its listener open: %v", err)
	}
	if err := ts.srv.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// TestCloseWhileBusy closes servers while clients keep connecting: Close
// must wait for every connection it let in (the race detector watches the
// WaitGroup), and Serve must end.
func TestCloseWhileBusy(t *testing.T) {
	leakcheck.Check(t)
	for range 20 {
		ts := startServer(t, func(s *Server) { s.MaxConnsPerIP = 1000 })
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					c, err := net.Dial("tcp", ts.addr)
					if err != nil {
						continue // closed
					}
					c.Write(req("n"))
					c.SetReadDeadline(time.Now().Add(time.Second))
					io.Copy(io.Discard, c)
					c.Close()
				}
			})
		}
		poll(t, "clients to be served", func() bool {
			_, err := ts.client.Names(t.Context(), "127.0.0.1")
			return err == nil
		})
		ts.srv.Close()
		ts.srv.mu.Lock()
		left := len(ts.srv.conns)
		ts.srv.mu.Unlock()
		if left != 0 {
			t.Fatalf("%d connections still tracked after Close returned", left)
		}
		close(stop)
		wg.Wait()
		if err := ts.serveErr(); err != ErrServerClosed {
			t.Fatalf("Serve returned %v", err)
		}
	}
}

// flakyListener fails its first fails Accepts with err.
type flakyListener struct {
	net.Listener
	fails atomic.Int32
	err   error
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if l.fails.Add(-1) >= 0 {
		return nil, l.err
	}
	return l.Listener.Accept()
}

func TestAcceptErrors(t *testing.T) {
	leakcheck.Check(t)
	t.Run("temporary", func(t *testing.T) {
		leakcheck.Check(t)
		// Out of descriptors: Serve waits and goes on serving.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		fl := &flakyListener{Listener: ln, err: &net.OpError{Op: "accept", Net: "tcp", Addr: ln.Addr(), Err: os.NewSyscallError("accept4", syscall.EMFILE)}}
		fl.fails.Store(4)
		logs := &logBuf{}
		srv := &Server{Registry: NewRegistry(), Logf: logs.logf}
		served := make(chan error, 1)
		go func() { served <- srv.Serve(fl) }()
		c := &Client{Port: uint16(ln.Addr().(*net.TCPAddr).Port)}
		if _, err := c.Names(t.Context(), "127.0.0.1"); err != nil {
			t.Fatalf("Names after %d EMFILEs: %v", 4, err)
		}
		if n := logs.count("too many open files"); n != 4 {
			t.Errorf("%d accept errors logged; want 4", n)
		}
		srv.Close()
		if err := <-served; err != ErrServerClosed {
			t.Fatalf("Serve returned %v", err)
		}
	})
	t.Run("permanent", func(t *testing.T) {
		leakcheck.Check(t)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		boom := errors.New("boom")
		fl := &flakyListener{Listener: ln, err: boom}
		fl.fails.Store(1)
		srv := &Server{Registry: NewRegistry()}
		defer srv.Close()
		if err := srv.Serve(fl); err != boom {
			t.Fatalf("Serve returned %v; want the listener's error", err)
		}
		if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Serve left its listener open: %v", err)
		}
	})
	t.Run("Close during backoff", func(t *testing.T) {
		leakcheck.Check(t)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		fl := &flakyListener{Listener: ln, err: &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.ENFILE)}}
		fl.fails.Store(1 << 30)
		srv := &Server{Registry: NewRegistry()}
		served := make(chan error, 1)
		go func() { served <- srv.Serve(fl) }()
		// Seven failures: Serve has waited 5+10+...+160ms and is now
		// starting to wait 320ms more.
		poll(t, "Serve to back off", func() bool { return fl.fails.Load() <= 1<<30-7 })
		start := time.Now()
		srv.Close()
		if err := <-served; err != ErrServerClosed {
			t.Fatalf("Serve returned %v", err)
		}
		if d := time.Since(start); d > 150*time.Millisecond {
			t.Fatalf("Serve took %v to see Close", d)
		}
	})
}

// silentListener accepts connections on 127.0.0.1 and never answers.
func silentListener(t *testing.T) (port uint16) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	nettest.Silent(t, ln)
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

func TestClientTimeouts(t *testing.T) {
	leakcheck.Check(t)
	defer func(d time.Duration) { defaultClientTimeout = d }(defaultClientTimeout)
	defaultClientTimeout = 300 * time.Millisecond
	c := &Client{Port: silentListener(t)}
	calls := map[string]func(ctx context.Context) error{
		"Register": func(ctx context.Context) error {
			reg, err := c.Register(ctx, "127.0.0.1", node("n", 1))
			if err == nil {
				reg.Close()
			}
			return err
		},
		"PortPlease": func(ctx context.Context) error { _, err := c.PortPlease(ctx, "127.0.0.1", "n"); return err },
		"Names":      func(ctx context.Context) error { _, err := c.Names(ctx, "127.0.0.1"); return err },
	}
	for name, call := range calls {
		t.Run(name, func(t *testing.T) {
			// No deadline in the context: DefaultClientTimeout applies.
			start := time.Now()
			if err := returnsWithin(t, 3*time.Second, func() error { return call(context.Background()) }); !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("against a silent server: %v; want a deadline error", err)
			}
			if d := time.Since(start); d < defaultClientTimeout*3/4 {
				t.Fatalf("gave up after %v, before the default timeout", d)
			}
			// Cancelled: returns at once.
			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(50*time.Millisecond, cancel)
			start = time.Now()
			if err := returnsWithin(t, 3*time.Second, func() error { return call(ctx) }); err == nil {
				t.Fatal("cancelled call succeeded")
			}
			if d := time.Since(start); d > 250*time.Millisecond {
				t.Fatalf("cancelled call took %v", d)
			}
		})
	}
}

// returnsWithin runs f and fails the test if it has not returned after d.
func returnsWithin(t *testing.T, d time.Duration, f func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		t.Fatalf("still blocked after %v", d)
		return nil
	}
}

func TestClientValidates(t *testing.T) {
	leakcheck.Check(t)
	// Nothing listens on the port: a refused name never dials.
	c := &Client{Port: 1, Dial: func(ctx context.Context, addr string) (net.Conn, error) {
		t.Errorf("dialled %s", addr)
		return nil, errors.New("no")
	}}
	if _, err := c.PortPlease(t.Context(), "127.0.0.1", "a@b"); !errors.Is(err, ErrInvalidName) {
		t.Errorf("PortPlease a@b: %v", err)
	}
	if _, err := c.Register(t.Context(), "127.0.0.1", node("", 1)); !errors.Is(err, ErrInvalidName) {
		t.Errorf("Register empty name: %v", err)
	}
	if _, err := c.Register(t.Context(), "127.0.0.1", Node{Name: "a", Port: 1, Extra: make([]byte, MaxExtraLen+1)}); err == nil {
		t.Error("Register with 256 bytes of extra succeeded")
	}
}

func TestClientDial(t *testing.T) {
	leakcheck.Check(t)
	ts := startServer(t, nil)
	ts.register(t, node("keeper", 7000))
	// Dial is used, with host:Port.
	var dialled []string
	c := &Client{Port: 4242, Dial: func(ctx context.Context, addr string) (net.Conn, error) {
		dialled = append(dialled, addr)
		var d net.Dialer
		return d.DialContext(ctx, "tcp", ts.addr)
	}}
	if n, err := c.PortPlease(t.Context(), "somehost", "keeper"); err != nil || n.Port != 7000 {
		t.Fatalf("PortPlease = %+v, %v", n, err)
	}
	if !reflect.DeepEqual(dialled, []string{"somehost:4242"}) {
		t.Fatalf("dialled %v", dialled)
	}
	// Port 0 is DefaultPort.
	c.Port = 0
	c.Names(t.Context(), "h")
	if dialled[1] != "h:4369" {
		t.Fatalf("dialled %v", dialled)
	}
}

func TestRegistry(t *testing.T) {
	leakcheck.Check(t)
	r := NewRegistry()
	a, err := r.Register(Node{Name: "a", Port: 1, Extra: []byte("e")})
	if err != nil {
		t.Fatal(err)
	}
	if a.Creation < 4 {
		t.Errorf("creation %d", a.Creation)
	}
	for _, bad := range []struct {
		n    Node
		want error
	}{
		{Node{Name: "a", Port: 2}, ErrNameTaken},
		{Node{Name: "", Port: 2}, ErrInvalidName},
		{Node{Name: "a b", Port: 2}, ErrInvalidName},
		{Node{Name: "p", Port: 0}, nil},
		{Node{Name: "e", Port: 2, Extra: make([]byte, MaxExtraLen+1)}, nil},
	} {
		if reg, err := r.Register(bad.n); err == nil || (bad.want != nil && !errors.Is(err, bad.want)) {
			t.Errorf("Register(%q, port %d, %d bytes extra) = %v, %v; want %v", bad.n.Name, bad.n.Port, len(bad.n.Extra), reg, err, bad.want)
		}
	}
	b, err := r.Register(Node{Name: "b", Port: 2})
	if err != nil {
		t.Fatal(err)
	}
	if b.Creation == a.Creation {
		t.Errorf("two registrations share creation %d", a.Creation)
	}
	if got := r.Names(); !reflect.DeepEqual(got, []NameEntry{{"a", 1}, {"b", 2}}) {
		t.Errorf("Names = %v", got)
	}
	// Lookup hands out a copy.
	n, _ := r.Lookup("a")
	n.Extra[0] = 'X'
	if n, _ := r.Lookup("a"); string(n.Extra) != "e" {
		t.Errorf("changing a looked-up Extra changed the registration: %q", n.Extra)
	}
	// Closing an old registration leaves a newer one of the same name.
	a.Close()
	a2, err := r.Register(Node{Name: "a", Port: 3})
	if err != nil {
		t.Fatal(err)
	}
	a.Close()
	if n, ok := r.Lookup("a"); !ok || n.Port != 3 {
		t.Fatalf("after closing the old registration twice: %+v, %v", n, ok)
	}
	a2.Close()
	b.Close()
	if got := r.Names(); len(got) != 0 {
		t.Fatalf("Names after closing all: %v", got)
	}
}
