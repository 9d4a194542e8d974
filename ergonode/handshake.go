package ergonode

import (
	"encoding/binary"
	"errors"
	"net"
	"time"
)

// flagUnlinkID is DFLAG_UNLINK_ID, which OTP 26 and later require of a peer
// and ergo v1.999.224 never advertises.
const flagUnlinkID = 1 << 25

// maxHandshakeMessage bounds a handshake message (a node name is at most
// 255 bytes; the longest message adds 19).
const maxHandshakeMessage = 1 << 10

// handshakeConn carries ergo's side of the distribution handshake over a
// tailnet connection. It adds DFLAG_UNLINK_ID to the flags of every name
// and challenge message ergo sends (the digest covers only the cookie and
// the challenge, so amending the flags is sound), and it hands ergo one
// handshake message per Read, never more: the peer's first distribution
// frames, which may follow its last handshake message in the same read,
// stay here (leftover) for the repair layer rather than reaching ergo
// unrepaired.
type handshakeConn struct {
	conn net.Conn
	rbuf []byte // read from conn, not yet given to ergo
	left int    // bytes of the current message (with its length) not yet given
	wbuf []byte // written by ergo, not yet a whole message
}

func (h *handshakeConn) Read(p []byte) (int, error) {
	for h.left == 0 {
		if len(h.rbuf) >= 2 {
			h.left = 2 + int(binary.BigEndian.Uint16(h.rbuf))
			if h.left > maxHandshakeMessage {
				return 0, errors.New("ergonode: handshake message too long")
			}
			break
		}
		if err := h.fill(); err != nil {
			return 0, err
		}
	}
	for len(h.rbuf) == 0 {
		if err := h.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, h.rbuf[:min(len(h.rbuf), h.left)])
	h.rbuf = h.rbuf[n:]
	h.left -= n
	return n, nil
}

func (h *handshakeConn) fill() error {
	var b [512]byte
	n, err := h.conn.Read(b[:])
	h.rbuf = append(h.rbuf, b[:n]...)
	if n > 0 {
		return nil
	}
	return err
}

func (h *handshakeConn) Write(p []byte) (int, error) {
	h.wbuf = append(h.wbuf, p...)
	var out []byte
	for len(h.wbuf) >= 2 {
		l := 2 + int(binary.BigEndian.Uint16(h.wbuf))
		if len(h.wbuf) < l {
			break
		}
		msg := h.wbuf[:l]
		if l > 2 {
			switch msg[2] {
			case 'N': // send_name or challenge, version 6: 8-byte flags after the tag
				if l >= 11 {
					f := binary.BigEndian.Uint64(msg[3:])
					binary.BigEndian.PutUint64(msg[3:], f|flagUnlinkID)
				}
			case 'n': // version 5: a 2-byte version, then 4-byte flags
				if l >= 9 {
					f := binary.BigEndian.Uint32(msg[5:])
					binary.BigEndian.PutUint32(msg[5:], f|flagUnlinkID)
				}
			}
		}
		out = append(out, msg...)
		h.wbuf = h.wbuf[l:]
	}
	if len(out) > 0 {
		if _, err := h.conn.Write(out); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// leftover returns what was read past the last handshake message.
func (h *handshakeConn) leftover() []byte { return h.rbuf }

func (h *handshakeConn) SetReadDeadline(t time.Time) error  { return h.conn.SetReadDeadline(t) }
func (h *handshakeConn) SetWriteDeadline(t time.Time) error { return h.conn.SetWriteDeadline(t) }
