package ergonode

import (
	"errors"
	"net"
	"testing"
	"time"

	"github.com/tsdist/tsdist/internal/leakcheck"
)

// TestDialListenerTiesEachDialToErgosConnection: the dial listener (the
// loopback listener that ergo's dials reach) closes a local connection no
// dial is waiting for at once; while a dial is under way, a local process
// that connects first does not get the dial: the dial takes the connection
// from the address ergo dialled from, and the other is closed as soon as
// no dial is under way, or after claimTimeout. None of them is sent a
// byte.
func TestDialListenerTiesEachDialToErgosConnection(t *testing.T) {
	leakcheck.Check(t)
	n := &Node{logf: t.Logf, quietf: t.Logf}
	b, err := newBridge(n)
	if err != nil {
		t.Fatal(err)
	}
	defer b.close()
	addr := b.trigger.Addr().String()
	connect := func() net.Conn {
		t.Helper()
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	// waitHeld waits until the listener has accepted (and holds) k
	// connections.
	waitHeld := func(k int) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
			b.mu.Lock()
			held := len(b.held)
			b.mu.Unlock()
			if held == k {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("the dial listener holds %d connections, want %d", held, k)
			}
		}
	}

	t.Run("no dial under way", func(t *testing.T) {
		if err := wantClosedAtOnce(addr, time.Second); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("a local process connects first", func(t *testing.T) {
		ticket, err := b.expectDial()
		if err != nil {
			t.Fatal(err)
		}
		stranger := connect()
		waitHeld(1)
		ergo := connect() // ergo's own dial, which the handshake knows by its address
		waitHeld(2)
		got, err := b.claimDial(ergo.LocalAddr().String(), ticket)
		if err != nil {
			t.Fatalf("claiming ergo's connection: %v", err)
		}
		if got.RemoteAddr().String() != ergo.LocalAddr().String() {
			t.Errorf("the dial claimed the connection from %v, not ergo's from %v", got.RemoteAddr(), ergo.LocalAddr())
		}
		// No dial is under way now: the stranger's connection is closed.
		if err := readClosed(stranger, 500*time.Millisecond); err != nil {
			t.Errorf("the stranger's connection: %v", err)
		}
		// ergo's stays open, tied to the dial.
		ergo.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if n, err := ergo.Read(make([]byte, 1)); n != 0 || !isTimeout(err) {
			t.Errorf("ergo's connection: read %d, %v; want it open and silent", n, err)
		}
		b.unclaim(got)
		waitHeld(0)
	})

	t.Run("no claim in time", func(t *testing.T) {
		ticket, err := b.expectDial()
		if err != nil {
			t.Fatal(err)
		}
		defer ticket.done()
		stranger := connect()
		waitHeld(1)
		if err := readClosed(stranger, claimTimeout+time.Second); err != nil {
			t.Errorf("a connection held while a dial is under way: %v", err)
		}
		waitHeld(0)
	})

	t.Run("a dial whose connection never comes", func(t *testing.T) {
		ticket, err := b.expectDial()
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if c, err := b.claimDial("127.0.0.1:1", ticket); err == nil {
			t.Errorf("claimDial of an address nobody dialled from = %v", c.RemoteAddr())
		}
		if d := time.Since(start); d < claimTimeout || d > claimTimeout+time.Second {
			t.Errorf("claimDial gave up after %v; want claimTimeout (%v)", d, claimTimeout)
		}
		// The ticket is spent: the listener refuses at once again.
		if err := wantClosedAtOnce(addr, time.Second); err != nil {
			t.Fatal(err)
		}
	})
}

// readClosed wants c closed by the other end within d, without a byte.
func readClosed(c net.Conn, d time.Duration) error {
	c.SetReadDeadline(time.Now().Add(d))
	var buf [1]byte
	n, err := c.Read(buf[:])
	switch {
	case n != 0:
		return errReceived
	case isTimeout(err):
		return errNotClosed
	}
	return nil
}

var (
	errReceived  = errors.New("received a byte")
	errNotClosed = errors.New("not closed in time")
)

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}
