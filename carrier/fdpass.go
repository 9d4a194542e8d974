package carrier

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Socketpair returns the two ends of a new socketpair(AF_UNIX, SOCK_STREAM):
// near stays in this process (as a net.UnixConn on Go's poller), far is the
// end to hand to another process with [SendFD] and then close here. Both
// are close-on-exec.
func Socketpair() (near *net.UnixConn, far *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("carrier: socketpair: %w", err)
	}
	nearFile := os.NewFile(uintptr(fds[0]), "tsdist-bridge")
	far = os.NewFile(uintptr(fds[1]), "tsdist-conn")
	c, err := net.FileConn(nearFile) // dups the fd
	nearFile.Close()
	if err != nil {
		far.Close()
		return nil, nil, fmt.Errorf("carrier: socketpair: %w", err)
	}
	return c.(*net.UnixConn), far, nil
}

// SendFD writes msg to c with f attached as SCM_RIGHTS. The descriptor rides
// on the first byte of msg, in the same sendmsg, so a receiver that takes
// descriptors in arrival order always has it once it has read all of msg.
// msg must not be empty. f stays open here; close it once sent.
func SendFD(c *net.UnixConn, msg []byte, f *os.File) error {
	if len(msg) == 0 {
		return errors.New("carrier: SendFD needs a non-empty message")
	}
	raw, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("carrier: send fd: %w", err)
	}
	var oob []byte
	if err := raw.Control(func(fd uintptr) { oob = unix.UnixRights(int(fd)) }); err != nil {
		return fmt.Errorf("carrier: send fd: %w", err)
	}
	n, _, err := c.WriteMsgUnix(msg, oob, nil)
	if err != nil {
		return fmt.Errorf("carrier: send fd: %w", err)
	}
	// The rest, if the socket buffer took only part, goes without the fd.
	if _, err := c.Write(msg[n:]); err != nil {
		return fmt.Errorf("carrier: send fd: %w", err)
	}
	return nil
}

// FDReader reads a Unix stream that carries descriptors with SCM_RIGHTS.
// Read returns the stream's bytes; descriptors that arrived are queued in
// order and taken with [FDReader.TakeFD]. It is what a client of the tsdist
// control protocol needs, and is not safe for concurrent Reads.
type FDReader struct {
	c   *net.UnixConn
	oob []byte

	mu  sync.Mutex
	fds []*os.File
}

// NewFDReader reads from c.
func NewFDReader(c *net.UnixConn) *FDReader {
	// Room for a few descriptors; Linux delivers one sendmsg's worth per
	// recvmsg on a stream socket, and the helper sends one per message.
	return &FDReader{c: c, oob: make([]byte, unix.CmsgSpace(4*4))}
}

// Read implements io.Reader.
func (r *FDReader) Read(p []byte) (int, error) {
	n, oobn, flags, _, err := r.c.ReadMsgUnix(p, r.oob)
	n = max(n, 0) // -1 on some errors
	if oobn > 0 {
		r.queue(r.oob[:oobn])
	}
	if flags&unix.MSG_CTRUNC != 0 && err == nil {
		err = errors.New("carrier: control message truncated: descriptors lost")
	}
	if n == 0 && err == nil && len(p) > 0 {
		err = io.EOF
	}
	if errors.Is(err, io.EOF) {
		err = io.EOF // io.Reader's contract: a plain io.EOF at the end
	}
	return n, err
}

func (r *FDReader) queue(oob []byte) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			r.fds = append(r.fds, os.NewFile(uintptr(fd), "tsdist-conn"))
		}
	}
}

// TakeFD removes and returns the oldest queued descriptor, or nil if none
// has arrived.
func (r *FDReader) TakeFD() *os.File {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.fds) == 0 {
		return nil
	}
	f := r.fds[0]
	r.fds = r.fds[1:]
	return f
}

// Close closes every descriptor still queued.
func (r *FDReader) Close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, f := range r.fds {
		f.Close()
	}
	r.fds = nil
}

// bufSize is the copy buffer of each direction of a bridge; large enough to
// move a whole socketpair buffer's worth per syscall.
const bufSize = 256 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, bufSize); return &b }}

// closeWriter is a connection that can shut down its sending side alone, as
// TCP connections (tsnet's included) and Unix stream sockets can.
type closeWriter interface {
	CloseWrite() error
}

// Splice moves bytes both ways between a tailnet connection and the near end
// of a socketpair until both directions are finished, then closes both.
//
// End of stream propagates as a half-close: when one side stops sending, the
// other side's sending direction is shut down and the opposite direction
// keeps flowing. A local side that is closed outright (its socket closed,
// not just shut down for writing, even long after the shutdown), or any read
// or write error, tears the whole pair down. Splice blocks; run it in its
// own goroutine.
func Splice(tailnet net.Conn, near *net.UnixConn) {
	var once sync.Once
	teardown := func() {
		once.Do(func() {
			tailnet.Close()
			near.Close()
		})
	}
	inboundDone := make(chan struct{})
	go func() {
		defer close(inboundDone)
		if copyHalf(near, tailnet) != nil {
			teardown()
		}
	}()
	err := copyHalf(tailnet, near)
	if err == nil {
		err = awaitLocalClose(near, inboundDone)
	}
	if err != nil {
		teardown()
	}
	<-inboundDone
	teardown()
}

// hangupPoll is how often a half-closed local end is checked for having been
// closed outright. Only connections whose local side shut down its writing
// direction while still reading are checked; BEAM nodes close, they do not
// half-close, so this is rare.
const hangupPoll = 100 * time.Millisecond

// awaitLocalClose waits, after the local side has shut down its writing
// direction, until the inbound direction finishes (nil) or the local side
// closes its end outright (errPeerClosed).
func awaitLocalClose(near *net.UnixConn, inboundDone <-chan struct{}) error {
	if peerClosed(near) {
		return errPeerClosed
	}
	tick := time.NewTicker(hangupPoll)
	defer tick.Stop()
	for {
		select {
		case <-inboundDone:
			return nil
		case <-tick.C:
			if peerClosed(near) {
				return errPeerClosed
			}
		}
	}
}

var errPeerClosed = errors.New("carrier: local end closed")

// copyHalf copies src to dst until src ends, then shuts down dst's sending
// side. A nil result means a clean end of stream.
func copyHalf(dst, src net.Conn) error {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	if _, err := io.CopyBuffer(onlyWriter{dst}, onlyReader{src}, *bp); err != nil {
		return err
	}
	if cw, ok := dst.(closeWriter); ok {
		return cw.CloseWrite()
	}
	return dst.Close()
}

// onlyReader and onlyWriter hide ReadFrom/WriteTo so io.CopyBuffer uses the
// pooled buffer instead of allocating one per connection.
type onlyReader struct{ io.Reader }
type onlyWriter struct{ io.Writer }

// peerClosed reports whether the process holding the far end of near has
// closed it entirely (rather than only shutting down its writing side).
// Linux signals that with POLLHUP on near; a shutdown gives only POLLRDHUP.
func peerClosed(near *net.UnixConn) bool {
	raw, err := near.SyscallConn()
	if err != nil {
		return true
	}
	hup := false
	raw.Control(func(fd uintptr) {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
		for {
			_, err := unix.Poll(pfd, 0)
			if err != syscall.EINTR {
				break
			}
		}
		hup = pfd[0].Revents&(unix.POLLHUP|unix.POLLERR) != 0
	})
	return hup
}
