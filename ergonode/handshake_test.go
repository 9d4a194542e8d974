package ergonode

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// hsMsg frames a handshake message with its 2-byte length.
func hsMsg(body ...[]byte) []byte {
	b := bytes.Join(body, nil)
	return append(binary.BigEndian.AppendUint16(nil, uint16(len(b))), b...)
}

func u64(v uint64) []byte  { return binary.BigEndian.AppendUint64(nil, v) }
func u32b(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func u16b(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }

// ergoFlags is a flag set like ergo's, without DFLAG_UNLINK_ID.
const ergoFlags = 0x0000_0001_00df_7fbd &^ flagUnlinkID

// handshakeWrites is what ergo writes in a handshake, each with what must
// reach the peer.
func handshakeWrites() []struct{ name, in, want []byte } {
	name := []byte("ergo@host")
	nlen := u16b(uint16(len(name)))
	return []struct{ name, in, want []byte }{
		{[]byte("send_name v6"), hsMsg([]byte{'N'}, u64(ergoFlags), u32b(7), nlen, name),
			hsMsg([]byte{'N'}, u64(ergoFlags|flagUnlinkID), u32b(7), nlen, name)},
		{[]byte("challenge v6"), hsMsg([]byte{'N'}, u64(ergoFlags), u32b(0xcafe), u32b(7), nlen, name),
			hsMsg([]byte{'N'}, u64(ergoFlags|flagUnlinkID), u32b(0xcafe), u32b(7), nlen, name)},
		{[]byte("send_name v5"), hsMsg([]byte{'n'}, u16b(5), u32b(0x7fbd), name),
			hsMsg([]byte{'n'}, u16b(5), u32b(0x7fbd|flagUnlinkID), name)},
		{[]byte("challenge v5"), hsMsg([]byte{'n'}, u16b(5), u32b(0x7fbd), u32b(0xcafe), name),
			hsMsg([]byte{'n'}, u16b(5), u32b(0x7fbd|flagUnlinkID), u32b(0xcafe), name)},
		{[]byte("flag already set"), hsMsg([]byte{'N'}, u64(ergoFlags|flagUnlinkID), u32b(7), nlen, name),
			hsMsg([]byte{'N'}, u64(ergoFlags|flagUnlinkID), u32b(7), nlen, name)},
		{[]byte("status"), hsMsg([]byte("sok")), hsMsg([]byte("sok"))},
		{[]byte("challenge reply"), hsMsg([]byte{'r'}, u32b(0x0102_0304), bytes.Repeat([]byte{'N'}, 16)), nil},
		{[]byte("challenge ack"), hsMsg([]byte{'a'}, bytes.Repeat([]byte{'n'}, 16)), nil},
		{[]byte("complement"), hsMsg([]byte{'c'}, u32b(1), u32b(7)), nil},
		{[]byte("short N"), hsMsg([]byte{'N', 1, 2, 3}), nil},
		{[]byte("short n"), hsMsg([]byte{'n', 0, 5, 0}), nil},
		{[]byte("empty"), hsMsg(), nil},
	}
}

// pipeCollect returns a net.Pipe end for the code under test and a
// function that closes it and returns all the other end received.
func pipeCollect(t *testing.T) (net.Conn, func() []byte) {
	t.Helper()
	a, b := net.Pipe()
	got := make(chan []byte, 1)
	go func() {
		all, _ := io.ReadAll(b)
		got <- all
	}()
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, func() []byte { a.Close(); return <-got }
}

func TestHandshakeWriteAddsUnlinkID(t *testing.T) {
	var all, want []byte
	for _, tc := range handshakeWrites() {
		if tc.want == nil { // untouched
			tc.want = tc.in
		}
		all, want = append(all, tc.in...), append(want, tc.want...)
		conn, done := pipeCollect(t)
		h := &handshakeConn{conn: conn}
		in := append([]byte(nil), tc.in...)
		if n, err := h.Write(in); err != nil || n != len(in) {
			t.Fatalf("%s: Write = %d, %v", tc.name, n, err)
		}
		if !bytes.Equal(in, tc.in) {
			t.Errorf("%s: Write changed the caller's buffer", tc.name)
		}
		if got := done(); !bytes.Equal(got, tc.want) {
			t.Errorf("%s: sent % x; want % x", tc.name, got, tc.want)
		}
	}
	// All of them in one write, and split at every byte.
	for _, split := range []int{0, 1, 2, 3, 7, 13, 64} {
		conn, done := pipeCollect(t)
		h := &handshakeConn{conn: conn}
		rest := all
		for len(rest) > 0 {
			n := len(rest)
			if split > 0 {
				n = min(split, n)
			}
			if _, err := h.Write(rest[:n]); err != nil {
				t.Fatal(err)
			}
			rest = rest[n:]
		}
		if got := done(); !bytes.Equal(got, want) {
			t.Errorf("written in pieces of %d: sent bytes differ:\n got % x\nwant % x", split, got, want)
		}
	}
	// A message not yet whole is not sent.
	conn, done := pipeCollect(t)
	h := &handshakeConn{conn: conn}
	h.Write(all[:5])
	if got := done(); len(got) != 0 {
		t.Errorf("a partial message was sent: % x", got)
	}
}

func TestHandshakeReadOneMessageAtATime(t *testing.T) {
	msgs := [][]byte{
		hsMsg([]byte("sok")),
		hsMsg([]byte{'N'}, u64(ergoFlags), u32b(0xcafe), u32b(7), u16b(9), []byte("peer@host")),
		hsMsg([]byte{'a'}, bytes.Repeat([]byte{'d'}, 16)),
		hsMsg(), // an empty one, to be sure the length alone is handed over
		hsMsg([]byte{'a'}, bytes.Repeat([]byte{'e'}, 300)), // more than one fill
	}
	dist := append(dFrame(handHeader(), rawTuple([]byte{tagSmallInteger, 5})), 0, 0, 0, 0, 1, 2)
	stream := append(bytes.Join(msgs, nil), dist...)
	for _, chunk := range []int{len(stream), 1, 2, 5, 100, 511} {
		for _, bufSize := range []int{1, 3, 4096} {
			a, b := net.Pipe()
			go func() {
				for rest := stream; len(rest) > 0; {
					n := min(chunk, len(rest))
					if _, err := b.Write(rest[:n]); err != nil {
						return
					}
					rest = rest[n:]
				}
			}()
			a.SetDeadline(time.Now().Add(10 * time.Second))
			h := &handshakeConn{conn: a}
			for i, msg := range msgs {
				var got []byte
				buf := make([]byte, bufSize)
				for len(got) < len(msg) {
					n, err := h.Read(buf)
					if err != nil {
						t.Fatalf("chunks of %d, reads of %d: message %d: %v", chunk, bufSize, i, err)
					}
					got = append(got, buf[:n]...)
				}
				if !bytes.Equal(got, msg) {
					t.Fatalf("chunks of %d, reads of %d: message %d is % x; want % x (never a byte past it)", chunk, bufSize, i, got, msg)
				}
			}
			// What was read past the last message, then what is still in
			// the pipe, is the distribution stream whole.
			left := append([]byte(nil), h.leftover()...)
			if !bytes.HasPrefix(dist, left) {
				t.Fatalf("chunks of %d, reads of %d: leftover % x is not the start of the stream after the handshake", chunk, bufSize, left)
			}
			more := make([]byte, len(dist)-len(left))
			if _, err := io.ReadFull(a, more); err != nil {
				t.Fatalf("chunks of %d: reading the rest: %v", chunk, err)
			}
			if got := append(left, more...); !bytes.Equal(got, dist) {
				t.Errorf("chunks of %d, reads of %d: leftover plus the rest = % x; want % x", chunk, bufSize, got, dist)
			}
			if chunk == len(stream) && len(left) != len(dist) {
				t.Errorf("sent in one write: leftover has %d bytes; want all %d after the handshake", len(left), len(dist))
			}
			a.Close()
			b.Close()
		}
	}
}

func TestHandshakeReadRefusesLongMessage(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go b.Write(hsMsg([]byte(strings.Repeat("x", maxHandshakeMessage))))
	a.SetDeadline(time.Now().Add(10 * time.Second))
	h := &handshakeConn{conn: a}
	if n, err := h.Read(make([]byte, 4096)); err == nil || !strings.Contains(err.Error(), "too long") {
		t.Errorf("Read of a %d-byte message = %d, %v; want an error", maxHandshakeMessage, n, err)
	}
}
