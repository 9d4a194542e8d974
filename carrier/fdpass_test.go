package carrier

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tsdist/tsdist/internal/leakcheck"
)

// pair returns the two ends of a Socketpair as *net.UnixConn: near as
// Socketpair makes it, far turned into a connection the way a client turns a
// received descriptor into one.
func pair(t *testing.T) (near, far *net.UnixConn) {
	t.Helper()
	near, farFile, err := Socketpair()
	if err != nil {
		t.Fatal(err)
	}
	far = fileConn(t, farFile)
	t.Cleanup(func() { near.Close(); far.Close() })
	return near, far
}

// fileConn turns f into a *net.UnixConn and closes f.
func fileConn(t *testing.T, f *os.File) *net.UnixConn {
	t.Helper()
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		t.Fatalf("FileConn: %v", err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		t.Fatalf("FileConn gave a %T", c)
	}
	return uc
}

func fdOf(t *testing.T, sc syscall.Conn) int {
	t.Helper()
	raw, err := sc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd int
	raw.Control(func(u uintptr) { fd = int(u) })
	return fd
}

func cloexec(t *testing.T, fd int) bool {
	t.Helper()
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if err != nil {
		t.Fatalf("F_GETFD: %v", err)
	}
	return flags&unix.FD_CLOEXEC != 0
}

func deadline(t *testing.T, cs ...net.Conn) {
	t.Helper()
	for _, c := range cs {
		c.SetDeadline(time.Now().Add(20 * time.Second))
	}
}

func TestSocketpair(t *testing.T) {
	near, far, err := Socketpair()
	if err != nil {
		t.Fatal(err)
	}
	defer near.Close()
	defer far.Close()
	if !cloexec(t, fdOf(t, near)) || !cloexec(t, int(far.Fd())) {
		t.Error("socketpair ends are not close-on-exec")
	}
	typ, err := unix.GetsockoptInt(int(far.Fd()), unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil || typ != unix.SOCK_STREAM {
		t.Errorf("far end SO_TYPE = %d, %v; want SOCK_STREAM", typ, err)
	}
	dom, err := unix.GetsockoptInt(int(far.Fd()), unix.SOL_SOCKET, unix.SO_DOMAIN)
	if err != nil || dom != unix.AF_UNIX {
		t.Errorf("far end SO_DOMAIN = %d, %v; want AF_UNIX", dom, err)
	}
	// Bytes flow both ways between the ends.
	fc := fileConn(t, far)
	defer fc.Close()
	deadline(t, near, fc)
	if _, err := near.Write([]byte("to far")); err != nil {
		t.Fatal(err)
	}
	if _, err := fc.Write([]byte("to near")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 7)
	if _, err := io.ReadFull(fc, buf[:6]); err != nil || string(buf[:6]) != "to far" {
		t.Fatalf("far read %q, %v", buf[:6], err)
	}
	if _, err := io.ReadFull(near, buf); err != nil || string(buf) != "to near" {
		t.Fatalf("near read %q, %v", buf, err)
	}
}

func TestSendFDEmptyMessage(t *testing.T) {
	a, _ := pair(t)
	_, f, err := Socketpair()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := SendFD(a, nil, f); err == nil {
		t.Fatal("SendFD with an empty message succeeded")
	}
}

// TestSendFDWorkingDescriptor passes the far end of one socketpair over
// another and checks the received descriptor is the same socket: bytes
// written through it come out of the near end, and the other way round.
func TestSendFDWorkingDescriptor(t *testing.T) {
	leakcheck.Check(t)
	ctlSend, ctlRecv := pair(t)
	dataNear, dataFar, err := Socketpair()
	if err != nil {
		t.Fatal(err)
	}
	defer dataNear.Close()
	if err := SendFD(ctlSend, []byte("here"), dataFar); err != nil {
		t.Fatal(err)
	}
	dataFar.Close() // only the receiver's copy is left

	r := NewFDReader(ctlRecv)
	defer r.Close()
	deadline(t, ctlRecv, dataNear)
	buf := make([]byte, 4)
	if _, err := io.ReadFull(r, buf); err != nil || string(buf) != "here" {
		t.Fatalf("read %q, %v", buf, err)
	}
	got := r.TakeFD()
	if got == nil {
		t.Fatal("no descriptor queued")
	}
	if r.TakeFD() != nil {
		t.Fatal("a second descriptor was queued")
	}
	if !cloexec(t, int(got.Fd())) {
		t.Error("received descriptor is not close-on-exec")
	}
	c := fileConn(t, got)
	defer c.Close()
	deadline(t, c)
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(dataNear, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("near end read %q, %v", buf, err)
	}
	if _, err := dataNear.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "pong" {
		t.Fatalf("received descriptor read %q, %v", buf, err)
	}
	// Closing the received descriptor, the last copy, closes the socket.
	c.Close()
	if n, err := dataNear.Read(buf); err != io.EOF {
		t.Fatalf("near end after close: %d, %v; want EOF", n, err)
	}
}

// writeFramed sends msgs on c as 4-byte-length frames; those with a
// descriptor in fds (same index, nil for none) go with SendFD.
func writeFramed(c *net.UnixConn, msgs [][]byte, fds []*os.File) error {
	for i, m := range msgs {
		b := binary.BigEndian.AppendUint32(nil, uint32(len(m)))
		b = append(b, m...)
		var err error
		if fds[i] != nil {
			err = SendFD(c, b, fds[i])
		} else {
			_, err = c.Write(b)
		}
		if err != nil {
			return fmt.Errorf("message %d: %w", i, err)
		}
	}
	return nil
}

func readFramed(r io.Reader) ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	b := make([]byte, binary.BigEndian.Uint32(hdr[:]))
	_, err := io.ReadFull(r, b)
	return b, err
}

// TestFDReaderOrder sends many messages, some with a descriptor, and checks
// that a reader that takes the oldest queued descriptor for each message that
// announces one always gets that message's descriptor, whatever the reader's
// buffer size (so however the stream is cut into recvmsg calls).
func TestFDReaderOrder(t *testing.T) {
	leakcheck.Check(t)
	for _, bufSize := range []int{16, 100, 4096, 1 << 20} {
		t.Run(fmt.Sprint("buf=", bufSize), func(t *testing.T) {
			ctlSend, ctlRecv := pair(t)
			const n = 60
			msgs := make([][]byte, n)
			fds := make([]*os.File, n)
			for i := range n {
				// Each descriptor is the read end of a pipe holding the
				// message's number, so the receiver can tell which it got.
				withFD := i%3 != 1
				msgs[i] = fmt.Appendf(nil, `{"n":%d,"fd":%v,"pad":%q}`, i, withFD, strings.Repeat("p", i*7))
				if withFD {
					pr, pw, err := os.Pipe()
					if err != nil {
						t.Fatal(err)
					}
					fmt.Fprintf(pw, "pipe %d", i)
					pw.Close()
					fds[i] = pr
				}
			}
			errc := make(chan error, 1)
			go func() {
				errc <- writeFramed(ctlSend, msgs, fds)
				for _, f := range fds {
					if f != nil {
						f.Close()
					}
				}
			}()
			fr := NewFDReader(ctlRecv)
			defer fr.Close()
			r := bufio.NewReaderSize(fr, bufSize)
			deadline(t, ctlRecv)
			for i := range n {
				m, err := readFramed(r)
				if err != nil {
					t.Fatalf("message %d: %v", i, err)
				}
				if !bytes.Equal(m, msgs[i]) {
					t.Fatalf("message %d: got %q", i, m)
				}
				if fds[i] == nil {
					continue
				}
				f := fr.TakeFD()
				if f == nil {
					t.Fatalf("message %d announces a descriptor, none queued", i)
				}
				got, err := io.ReadAll(f)
				f.Close()
				if want := fmt.Sprintf("pipe %d", i); err != nil || string(got) != want {
					t.Fatalf("message %d came with the descriptor of %q (%v); want %q", i, got, err, want)
				}
			}
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
			if f := fr.TakeFD(); f != nil {
				f.Close()
				t.Fatal("a descriptor was left over")
			}
		})
	}
}

// TestSendFDLargeMessage sends a message far larger than the socket buffer,
// so SendFD's first sendmsg takes only part of it. The descriptor must be
// readable with the message's very first byte, and the whole message must
// arrive intact.
func TestSendFDLargeMessage(t *testing.T) {
	leakcheck.Check(t)
	ctlSend, ctlRecv := pair(t)
	sndbuf, _ := unix.GetsockoptInt(fdOf(t, ctlSend), unix.SOL_SOCKET, unix.SO_SNDBUF)
	msg := make([]byte, 8<<20)
	for i := range msg {
		msg[i] = byte(rand.Uint32())
	}
	if len(msg) <= 4*sndbuf {
		t.Fatalf("message of %d bytes is not larger than the socket buffer (%d)", len(msg), sndbuf)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	pw.Write([]byte("large"))
	pw.Close()
	errc := make(chan error, 1)
	go func() { errc <- SendFD(ctlSend, msg, pr); pr.Close() }()

	fr := NewFDReader(ctlRecv)
	defer fr.Close()
	deadline(t, ctlRecv)
	// One byte first: the descriptor must be queued by then.
	first := make([]byte, 1)
	if _, err := io.ReadFull(fr, first); err != nil {
		t.Fatal(err)
	}
	f := fr.TakeFD()
	if f == nil {
		t.Fatal("descriptor not queued after the message's first byte")
	}
	got, _ := io.ReadAll(f)
	f.Close()
	if string(got) != "large" {
		t.Fatalf("descriptor reads %q", got)
	}
	rest := make([]byte, len(msg)-1)
	if _, err := io.ReadFull(fr, rest); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if first[0] != msg[0] || sha256.Sum256(rest) != sha256.Sum256(msg[1:]) {
		t.Fatal("message corrupted")
	}
	if f := fr.TakeFD(); f != nil {
		f.Close()
		t.Fatal("more than one descriptor arrived")
	}
}

// TestFDReaderStopsAtDescriptor checks the kernel behaviour the protocol's
// pairing rule rests on: a recvmsg on a Linux stream socket never returns
// bytes sent after a message that carried descriptors, so the bytes of a
// later frame cannot arrive before the descriptors of an earlier one.
func TestFDReaderStopsAtDescriptor(t *testing.T) {
	ctlSend, ctlRecv := pair(t)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pw.Close()
	if _, err := ctlSend.Write([]byte("plain-")); err != nil {
		t.Fatal(err)
	}
	if err := SendFD(ctlSend, []byte("withfd"), pr); err != nil {
		t.Fatal(err)
	}
	pr.Close()
	if _, err := ctlSend.Write([]byte("-after")); err != nil {
		t.Fatal(err)
	}
	fr := NewFDReader(ctlRecv)
	defer fr.Close()
	deadline(t, ctlRecv)
	buf := make([]byte, 100)
	n, err := fr.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	if got := string(buf[:n]); got != "plain-withfd" {
		t.Fatalf("first read %q; want %q (data up to and including the descriptor's message, nothing after)", got, "plain-withfd")
	}
	if f := fr.TakeFD(); f == nil {
		t.Fatal("descriptor not queued")
	} else {
		f.Close()
	}
	n, err = fr.Read(buf)
	if err != nil || string(buf[:n]) != "-after" {
		t.Fatalf("second read %q, %v", buf[:n], err)
	}
}

// TestFDReaderTruncated sends more descriptors in one sendmsg than
// FDReader's control buffer holds: Read must report the loss (MSG_CTRUNC)
// and still queue the ones that fit.
func TestFDReaderTruncated(t *testing.T) {
	leakcheck.Check(t)
	ctlSend, ctlRecv := pair(t)
	var files []*os.File
	var fds []int
	for range 6 {
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		pw.Close()
		files = append(files, pr)
		fds = append(fds, int(pr.Fd()))
	}
	if _, _, err := ctlSend.WriteMsgUnix([]byte("x"), unix.UnixRights(fds...), nil); err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		f.Close()
	}
	fr := NewFDReader(ctlRecv)
	defer fr.Close()
	deadline(t, ctlRecv)
	buf := make([]byte, 10)
	n, err := fr.Read(buf)
	if n != 1 || err == nil || !strings.Contains(err.Error(), "truncated") {
		t.Fatalf("Read = %d, %v; want 1 byte and a truncation error", n, err)
	}
	queued := 0
	for f := fr.TakeFD(); f != nil; f = fr.TakeFD() {
		queued++
		f.Close()
	}
	if queued != 4 {
		t.Fatalf("%d descriptors queued; want the 4 that fit", queued)
	}
}

func TestFDReaderClose(t *testing.T) {
	leakcheck.Check(t)
	ctlSend, ctlRecv := pair(t)
	var files []*os.File
	for range 3 {
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		pw.Close()
		if err := SendFD(ctlSend, []byte("m"), pr); err != nil {
			t.Fatal(err)
		}
		files = append(files, pr)
	}
	for _, f := range files {
		f.Close()
	}
	ctlSend.Close()
	fr := NewFDReader(ctlRecv)
	deadline(t, ctlRecv)
	var got []byte
	buf := make([]byte, 16)
	for {
		n, err := fr.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatalf("Read error %v; want end of stream", err)
			}
			break
		}
	}
	if string(got) != "mmm" {
		t.Fatalf("read %q", got)
	}
	// Three descriptors are queued; Close closes them all.
	fr.Close()
	if f := fr.TakeFD(); f != nil {
		t.Fatal("Close left a descriptor queued")
	}
}

// TestFDReaderPlainEOF: FDReader implements io.Reader and, as that contract
// asks, returns io.EOF itself at end of stream (io.ReadAll, io.Copy and
// friends compare with ==), not the *net.OpError wrapping it that
// ReadMsgUnix returns.
func TestFDReaderPlainEOF(t *testing.T) {
	ctlSend, ctlRecv := pair(t)
	ctlSend.Write([]byte("data"))
	ctlSend.Close()
	fr := NewFDReader(ctlRecv)
	defer fr.Close()
	deadline(t, ctlRecv)
	got, err := io.ReadAll(fr)
	if err != nil || string(got) != "data" {
		t.Fatalf("io.ReadAll = %q, %v; want \"data\", nil "+
			"(Read must return io.EOF itself, not %T wrapping it)", got, err, err)
	}
}

// splice sets up the bridge the helper builds for one tailnet connection,
// with a loopback TCP connection standing in for the tailnet:
//
//	peer (TCP client) <-> tailnet (TCP, accepted) <-Splice-> near <-> far
//
// far is what the local client holds. done is closed when Splice returns.
func splice(t *testing.T) (peer *net.TCPConn, far *net.UnixConn, done <-chan struct{}) {
	t.Helper()
	leakcheck.Check(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	pc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	tailnet, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	near, farFile, err := Socketpair()
	if err != nil {
		t.Fatal(err)
	}
	far = fileConn(t, farFile)
	d := make(chan struct{})
	go func() { defer close(d); Splice(tailnet, near) }()
	peer = pc.(*net.TCPConn)
	t.Cleanup(func() {
		peer.Close()
		far.Close()
		select {
		case <-d:
		case <-time.After(10 * time.Second):
			t.Error("Splice still running at the end of the test")
		}
	})
	deadline(t, peer, far)
	return peer, far, d
}

func waitDone(t *testing.T, done <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatalf("Splice did not return after %s", what)
	}
}

func notDone(t *testing.T, done <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-done:
		t.Fatalf("Splice returned after %s", what)
	case <-time.After(100 * time.Millisecond):
	}
}

func expectEOF(t *testing.T, c net.Conn, what string) {
	t.Helper()
	n, err := c.Read(make([]byte, 1))
	if n != 0 || err != io.EOF {
		t.Fatalf("%s: read %d, %v; want EOF", what, n, err)
	}
}

func TestSpliceBothWays(t *testing.T) {
	peer, far, done := splice(t)
	const size = 16 << 20
	send := func(w net.Conn, seed uint64) ([32]byte, error) {
		rng := rand.New(rand.NewPCG(seed, seed))
		h := sha256.New()
		buf := make([]byte, 64<<10)
		for sent := 0; sent < size; {
			n := min(len(buf), size-sent, 1+rng.IntN(len(buf)))
			for i := range n {
				buf[i] = byte(rng.Uint32())
			}
			if _, err := w.Write(buf[:n]); err != nil {
				return [32]byte{}, err
			}
			h.Write(buf[:n])
			sent += n
		}
		var sum [32]byte
		h.Sum(sum[:0])
		return sum, w.(interface{ CloseWrite() error }).CloseWrite()
	}
	recv := func(r net.Conn) ([32]byte, int64, error) {
		h := sha256.New()
		n, err := io.Copy(h, r)
		var sum [32]byte
		h.Sum(sum[:0])
		return sum, n, err
	}
	var wg sync.WaitGroup
	var sentUp, sentDown, gotUp, gotDown [32]byte
	var nUp, nDown int64
	var errs [4]error
	wg.Add(4)
	go func() { defer wg.Done(); sentUp, errs[0] = send(far, 1) }()
	go func() { defer wg.Done(); sentDown, errs[1] = send(peer, 2) }()
	go func() { defer wg.Done(); gotUp, nUp, errs[2] = recv(peer) }()
	go func() { defer wg.Done(); gotDown, nDown, errs[3] = recv(far) }()
	wg.Wait()
	if err := errors.Join(errs[:]...); err != nil {
		t.Fatal(err)
	}
	if nUp != size || gotUp != sentUp {
		t.Errorf("far -> peer: %d bytes, checksum match %v", nUp, gotUp == sentUp)
	}
	if nDown != size || gotDown != sentDown {
		t.Errorf("peer -> far: %d bytes, checksum match %v", nDown, gotDown == sentDown)
	}
	waitDone(t, done, "both sides half-closed")
}

// TestSpliceHalfCloseFromFar: shutdown(SHUT_WR) on the client's descriptor
// reaches the tailnet peer as EOF, and the peer can still answer.
func TestSpliceHalfCloseFromFar(t *testing.T) {
	peer, far, done := splice(t)
	if _, err := far.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	if err := far.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(peer)
	if err != nil || string(got) != "request" {
		t.Fatalf("peer read %q, %v; want the request then EOF", got, err)
	}
	notDone(t, done, "only the far side half-closed")
	if _, err := peer.Write([]byte("response")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8)
	if _, err := io.ReadFull(far, buf); err != nil || string(buf) != "response" {
		t.Fatalf("far read %q, %v", buf, err)
	}
	if err := peer.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	expectEOF(t, far, "far after the peer's half-close")
	waitDone(t, done, "both sides half-closed")
}

// TestSpliceHalfCloseFromPeer: a FIN from the tailnet peer shows up as EOF
// on the client's descriptor, which can still send.
func TestSpliceHalfCloseFromPeer(t *testing.T) {
	peer, far, done := splice(t)
	if _, err := peer.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := peer.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(far)
	if err != nil || string(got) != "hello" {
		t.Fatalf("far read %q, %v; want the data then EOF", got, err)
	}
	notDone(t, done, "only the peer half-closed")
	if _, err := far.Write([]byte("still here")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 10)
	if _, err := io.ReadFull(peer, buf); err != nil || string(buf) != "still here" {
		t.Fatalf("peer read %q, %v", buf, err)
	}
	if err := far.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	expectEOF(t, peer, "peer after the far side's half-close")
	waitDone(t, done, "both sides half-closed")
}

// TestSpliceFarClosed: closing the client's descriptor outright tears the
// tailnet connection down at once, even with the peer still open and idle.
func TestSpliceFarClosed(t *testing.T) {
	peer, far, done := splice(t)
	if _, err := far.Write([]byte("last words")); err != nil {
		t.Fatal(err)
	}
	far.Close()
	waitDone(t, done, "the far end was closed")
	got, err := io.ReadAll(peer)
	if string(got) != "last words" {
		t.Fatalf("peer read %q, %v; want the data sent before the close", got, err)
	}
	// The helper's end is gone: the peer's writes fail soon (RST).
	failed := false
	for range 50 {
		if _, err := peer.Write([]byte("x")); err != nil {
			failed = true
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !failed {
		t.Fatal("peer can still write after the far end was closed and Splice returned")
	}
}

// TestSpliceFarClosedWhilePeerSends: the far end closes while the peer keeps
// sending; the write into the closed socketpair fails and tears all down.
func TestSpliceFarClosedWhilePeerSends(t *testing.T) {
	peer, far, done := splice(t)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		b := make([]byte, 32<<10)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := peer.Write(b); err != nil {
				return
			}
		}
	}()
	io.ReadFull(far, make([]byte, 1<<20))
	far.Close()
	waitDone(t, done, "the far end was closed during a transfer")
}

// TestSpliceFarHalfClosedThenClosed: shutdown(SHUT_WR) followed, later, by
// close() on the client's descriptor, with an idle peer, tears the tailnet
// connection down as a plain close() does: Splice keeps checking a
// half-closed local end (every hangupPoll) for having been closed outright.
func TestSpliceFarHalfClosedThenClosed(t *testing.T) {
	peer, far, done := splice(t)
	if err := far.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	expectEOF(t, peer, "peer after the far side's half-close")
	far.Close()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("after shutdown(SHUT_WR) then close() on the client's descriptor, " +
			"the tailnet connection stayed open with the peer idle; the close must tear it down")
	}
}

// TestSplicePeerReset: a reset from the tailnet side reaches the client as
// end of stream (or a reset) on its descriptor, at once.
func TestSplicePeerReset(t *testing.T) {
	peer, far, done := splice(t)
	if _, err := peer.Write([]byte("abc")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 3)
	if _, err := io.ReadFull(far, buf); err != nil {
		t.Fatal(err)
	}
	peer.SetLinger(0) // close sends RST
	peer.Close()
	waitDone(t, done, "the peer reset the connection")
	n, err := far.Read(buf)
	if n != 0 || (err != io.EOF && !errors.Is(err, syscall.ECONNRESET)) {
		t.Fatalf("far read %d, %v; want EOF or ECONNRESET", n, err)
	}
	if _, err := far.Write([]byte("x")); err == nil {
		t.Fatal("far can still write after the bridge was torn down")
	}
}

// TestSplicePeerClosedFarIdle: the peer closing (FIN) only half-closes the
// bridge; the far side sees EOF and the bridge stays until it answers.
func TestSplicePeerClosedFarIdle(t *testing.T) {
	peer, far, done := splice(t)
	peer.Close()
	expectEOF(t, far, "far after the peer closed")
	notDone(t, done, "only the peer closed")
	far.Close()
	waitDone(t, done, "both closed")
}

func TestPeerClosed(t *testing.T) {
	tests := []struct {
		name string
		do   func(near, far *net.UnixConn)
		want bool
	}{
		{"open", func(near, far *net.UnixConn) {}, false},
		{"far shut down for writing", func(near, far *net.UnixConn) { far.CloseWrite() }, false},
		{"far shut down for reading", func(near, far *net.UnixConn) { far.CloseRead() }, false},
		{"far closed", func(near, far *net.UnixConn) { far.Close() }, true},
		{"far closed with data unread", func(near, far *net.UnixConn) { far.Write([]byte("x")); far.Close() }, true},
		{"both directions shut down", func(near, far *net.UnixConn) { far.CloseWrite(); near.CloseWrite() }, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			near, far := pair(t)
			tt.do(near, far)
			if got := peerClosed(near); got != tt.want {
				t.Fatalf("peerClosed = %v; want %v", got, tt.want)
			}
		})
	}
}

func TestValidHostname(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
	}{
		{"alpha", true},
		{"a", true},
		{"A", true},
		{"9", true},
		{"node-1", true},
		{"a-b-c", true},
		{"a--b", true},
		{"Beta2", true},
		{strings.Repeat("x", 63), true},
		{strings.Repeat("x", 64), false},
		{"", false},
		{"-a", false},
		{"a-", false},
		{"-", false},
		{"a.b", false},
		{"a_b", false},
		{"a b", false},
		{"a/b", false},
		{"é", false},
		{"aé", false},
		{"a\x00", false},
		{"a\n", false},
		{"tag:x", false},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%q", tt.name), func(t *testing.T) {
			err := ValidHostname(tt.name)
			if (err == nil) != tt.ok {
				t.Fatalf("ValidHostname(%q) = %v; want ok=%v", tt.name, err, tt.ok)
			}
		})
	}
}
