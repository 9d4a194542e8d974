package ergonode

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"tailscale.com/types/logger"
)

// Distribution operations and message kinds the repair layer rewrites.
const (
	opUnlink      = 4  // {4, FromPid, ToPid}: what ergo sends
	opNodeLink    = 5  // {5}: ergo ignores it; stands in for messages ergo must not see
	opUnlinkID    = 35 // {35, Id, FromPid, ToPid}: what OTP 26+ requires
	opUnlinkIDAck = 36 // {36, Id, FromPid, ToPid}

	kindPassThrough = 'p' // a message without a distribution header
	kindNormal      = 68  // 131, 'D': distribution header, control, payload
	kindFirstFrag   = 69  // 131, 'E': the first fragment of a long message
	kindNextFrag    = 70  // 131, 'F': a later fragment

	// maxHeldFrame bounds the frame the repair layer holds whole in order
	// to rewrite it. ergo fragments messages at 65,000 bytes, so its
	// frames fit; a longer one (fragmentation off) passes through as it
	// comes, unrepaired, and is logged.
	maxHeldFrame = 1 << 20
	// maxControlFrame bounds an incoming unlink message, which the layer
	// rewrites whole: a pid pair and an id take well under 3 KiB.
	maxControlFrame = 64 << 10
	// maxOpenFragmented bounds the fragmented messages in flight that one
	// direction tracks; past it the oldest is no longer inspected.
	maxOpenFragmented = 256
	readChunk         = 64 << 10
	// ergoDirectWrite is the size above which ergo's linkFlusher writes a
	// packet directly rather than through its buffer.
	ergoDirectWrite = 64000
	// FragmentationUnit is the fragment size the adapter gives ergo by
	// default: small enough that every packet ergo sends goes through its
	// buffer (ergoDirectWrite), which keeps messages in order.
	FragmentationUnit = 48000
)

// repairConn is a distribution connection between ergo and an OTP node,
// after the handshake, with what ergo v1.999.224 gets wrong repaired in
// the byte stream, in both directions:
//
//   - OTP 26 and later require unlink with ids (DFLAG_UNLINK_ID, which the
//     handshake layer adds to ergo's flags). An incoming UNLINK_ID becomes
//     the UNLINK ergo knows, and is acknowledged to the peer; an incoming
//     UNLINK_ID_ACK becomes a message ergo ignores; an outgoing UNLINK
//     becomes an UNLINK_ID with an id of this connection's.
//   - ergo encodes every reference in three words; OTP 26 and later send
//     five-word references for process aliases and match replies on all
//     five. References longer than three words that arrive are remembered
//     (longRefs), and put back whole when ergo sends them out again.
//
// Both directions follow the atom cache of the distribution header (the
// rewritten messages keep their headers, so ergo's and the peer's caches
// stay in step) and fragmented messages (walked across fragments without
// reassembling them). Memory is bounded: a frame up to maxHeldFrame is held
// to rewrite it, and a message's walk holds one term header at most.
type repairConn struct {
	conn net.Conn
	refs *longRefs
	logf logger.Logf

	// Incoming: only ergo's reading goroutine calls Read.
	rback      []byte // rbuf's backing array
	rbuf       []byte // read from conn, not yet looked at
	ready      []byte // repaired, for ergo, from roff on
	roff       int
	inLeft     int // bytes of the current frame still to pass
	inWalk     *walkState
	inCache    atomTable
	inFrags    map[uint64]*walkState
	inFragList []uint64

	// Outgoing: ergo writes from several goroutines; acknowledgements are
	// written by the reading one.
	wmu         sync.Mutex
	wbuf        []byte   // written by ergo, not yet a whole frame
	streamLeft  int      // bytes of an over-long frame still to pass through
	held        [][]byte // acknowledgements waiting for the stream to end
	outCache    atomTable
	outFrags    map[uint64]*walkState
	outFragList []uint64
	unlinkID    uint32
	warnedLong  bool
	werr        error
}

// walkState is one message being walked: the walker and the bytes of a
// term header cut by the end of a frame or a read.
type walkState struct {
	w     *termWalker
	carry []byte
}

func newRepairConn(conn net.Conn, leftover []byte, refs *longRefs, logf logger.Logf) *repairConn {
	c := &repairConn{
		conn:     conn,
		refs:     refs,
		logf:     logf,
		rback:    make([]byte, max(readChunk, len(leftover))),
		inFrags:  make(map[uint64]*walkState),
		outFrags: make(map[uint64]*walkState),
	}
	c.rbuf = c.rback[:copy(c.rback, leftover)]
	return c
}

// Read returns repaired bytes from the peer.
func (c *repairConn) Read(p []byte) (int, error) {
	for c.roff == len(c.ready) {
		c.ready, c.roff = c.ready[:0], 0
		if err := c.process(); err != nil {
			return 0, err
		}
		if len(c.ready) > 0 {
			break
		}
		if err := c.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, c.ready[c.roff:])
	c.roff += n
	return n, nil
}

// fill reads more bytes from the peer into rbuf, reusing one buffer.
func (c *repairConn) fill() error {
	if len(c.rbuf) == 0 {
		c.rbuf = c.rback[:0]
	}
	if cap(c.rbuf)-len(c.rbuf) < readChunk/4 {
		if len(c.rbuf)+readChunk > cap(c.rback) {
			c.rback = make([]byte, len(c.rbuf)+readChunk)
		}
		n := copy(c.rback[:cap(c.rback)], c.rbuf)
		c.rbuf = c.rback[:n]
	}
	n, err := c.conn.Read(c.rbuf[len(c.rbuf):cap(c.rbuf)])
	c.rbuf = c.rbuf[:len(c.rbuf)+n]
	if n > 0 {
		return nil
	}
	return err
}

// process moves what it can from rbuf to ready.
func (c *repairConn) process() error {
	for len(c.rbuf) > 0 {
		if c.inLeft > 0 {
			n := min(c.inLeft, len(c.rbuf))
			chunk := c.rbuf[:n]
			if c.inWalk != nil {
				c.inWalk.observe(chunk, c.refs)
			}
			c.ready = append(c.ready, chunk...)
			c.rbuf = c.rbuf[n:]
			c.inLeft -= n
			continue
		}
		if len(c.rbuf) < 4 {
			break
		}
		size := int(binary.BigEndian.Uint32(c.rbuf))
		if size == 0 { // a tick
			c.ready = append(c.ready, c.rbuf[:4]...)
			c.rbuf = c.rbuf[4:]
			continue
		}
		avail := c.rbuf[4:min(len(c.rbuf), 4+size)]
		done, err := c.startIncoming(size, avail)
		if errors.Is(err, errIncomplete) {
			if len(avail) == size {
				return fmt.Errorf("ergonode: malformed frame from peer: header longer than the frame")
			}
			break
		}
		if err != nil {
			return err
		}
		if done {
			c.rbuf = c.rbuf[4+size:]
		}
	}
	return nil
}

// startIncoming looks at the start of a frame of size bytes (avail of
// them here). It either handles the frame whole (done) or passes its
// head to ready and leaves the rest to stream through (inLeft).
func (c *repairConn) startIncoming(size int, avail []byte) (done bool, err error) {
	kind, headLen, atoms, seq, fragID, err := frameHead(avail, &c.inCache)
	if err != nil {
		return false, err
	}
	if kind == kindPassThrough || kind == kindNormal {
		op, err := controlOp(avail[headLen:], kind == kindPassThrough)
		if err != nil {
			return false, err
		}
		if op == opUnlinkID || op == opUnlinkIDAck {
			if size > maxControlFrame {
				return false, fmt.Errorf("ergonode: unlink message of %d bytes from peer", size)
			}
			if len(avail) < size {
				return false, errIncomplete
			}
			return true, c.unlinkFromPeer(avail, headLen, atoms, kind == kindPassThrough, op)
		}
	}
	walk := messageWalk(kind, atoms, seq, fragID, c.inFrags, &c.inFragList, true)
	c.ready = binary.BigEndian.AppendUint32(c.ready, uint32(size))
	c.ready = append(c.ready, avail[:headLen]...)
	c.rbuf = c.rbuf[4+headLen:]
	c.inLeft = size - headLen
	c.inWalk = walk
	return false, nil
}

// messageWalk returns the walk that a frame's terms continue: for the
// first frame of a message a new one (if start), tracked in frags when
// more fragments follow; for a later fragment the tracked one, forgotten
// at the last. It is nil for frames that are not walked.
func messageWalk(kind byte, atoms []string, seq, fragID uint64, frags map[uint64]*walkState, order *[]uint64, start bool) *walkState {
	switch kind {
	case kindPassThrough, kindNormal:
		if start {
			return &walkState{w: newTermWalker(atoms, kind == kindPassThrough)}
		}
	case kindFirstFrag:
		if start {
			walk := &walkState{w: newTermWalker(atoms, false)}
			if fragID > 1 {
				trackFrag(frags, order, seq, walk)
			}
			return walk
		}
	case kindNextFrag:
		walk := frags[seq]
		if fragID == 1 {
			delete(frags, seq)
		}
		return walk
	}
	return nil
}

// trackFrag records the walk of a fragmented message, forgetting the
// oldest one past maxOpenFragmented.
func trackFrag(m map[uint64]*walkState, order *[]uint64, seq uint64, walk *walkState) {
	m[seq] = walk
	*order = append(*order, seq)
	if len(*order) > maxOpenFragmented {
		old := (*order)[0]
		*order = (*order)[1:]
		delete(m, old)
	}
	if len(*order) > 2*len(m)+16 { // drop finished sequences from the list
		live := (*order)[:0]
		for _, s := range *order {
			if _, ok := m[s]; ok {
				live = append(live, s)
			}
		}
		*order = live
	}
}

// observe walks chunk, a piece of an incoming message, remembering long
// references.
func (s *walkState) observe(chunk []byte, refs *longRefs) {
	if s.w.broken != nil {
		return
	}
	b := chunk
	if len(s.carry) > 0 {
		b = append(s.carry, chunk...)
	}
	_, rest := s.w.walk(b, func(node string, item []byte) []byte {
		refs.remember(node, item)
		return nil
	}, false, nil)
	s.carry = append(s.carry[:0], rest...)
}

// frameHead parses the head of a non-empty frame: its kind, the length of
// everything before the terms, the atoms its header references, and for
// fragments the sequence and fragment ids. The atom cache is updated.
func frameHead(f []byte, cache *atomTable) (kind byte, headLen int, atoms []string, seq, fragID uint64, err error) {
	if len(f) < 1 {
		return 0, 0, nil, 0, 0, errIncomplete
	}
	if f[0] == kindPassThrough {
		return kindPassThrough, 1, nil, 0, 0, nil
	}
	if f[0] != tagVersion {
		// Compressed or proxied ergo-to-ergo frames; never seen with OTP.
		return f[0], len(f), nil, 0, 0, nil
	}
	if len(f) < 2 {
		return 0, 0, nil, 0, 0, errIncomplete
	}
	kind = f[1]
	switch kind {
	case kindNormal:
		atoms, n, err := readHeaderAtoms(f[2:], cache)
		return kind, 2 + n, atoms, 0, 0, err
	case kindFirstFrag, kindNextFrag:
		if len(f) < 18 {
			return 0, 0, nil, 0, 0, errIncomplete
		}
		seq, fragID = binary.BigEndian.Uint64(f[2:]), binary.BigEndian.Uint64(f[10:])
		if fragID == 0 {
			return 0, 0, nil, 0, 0, errors.New("ergonode: fragment id 0")
		}
		if kind == kindNextFrag {
			return kind, 18, nil, seq, fragID, nil
		}
		atoms, n, err := readHeaderAtoms(f[18:], cache)
		return kind, 18 + n, atoms, seq, fragID, err
	}
	return 0, 0, nil, 0, 0, fmt.Errorf("ergonode: unknown distribution message kind %d", kind)
}

// controlOp returns the operation of the control message at the start of
// b ({Op, ...}), or -1 for a control message of another shape.
func controlOp(b []byte, versioned bool) (int, error) {
	if versioned {
		if len(b) < 1 {
			return 0, errIncomplete
		}
		b = b[1:]
	}
	if len(b) < 4 {
		return 0, errIncomplete
	}
	if b[0] != tagSmallTuple || b[2] != tagSmallInteger {
		return -1, nil
	}
	return int(b[3]), nil
}

// termLen is the encoded length of the (small, flat) term at the start of
// b: an integer or a pid.
func termLen(b []byte, atoms []string) (int, error) {
	if len(b) == 0 {
		return 0, errors.New("unlink message ends before its last element")
	}
	w := &termWalker{atoms: atoms, pending: []int{1}}
	n, children, err := w.header(b)
	if err != nil {
		return 0, err
	}
	if children > 0 || w.skip > len(b)-n {
		return 0, errors.New("unexpected term in an unlink message")
	}
	return n + w.skip, nil
}

// literalPid re-encodes a pid with its node atom spelled out, so that it
// can go into a message of the other direction, whose atom cache differs.
func literalPid(pid []byte, atoms []string) ([]byte, error) {
	if len(pid) < 1 || (pid[0] != tagNewPid && pid[0] != tagPid) {
		return nil, errors.New("not a pid")
	}
	node, n, err := readAtom(pid[1:], atoms)
	if err != nil {
		return nil, err
	}
	out := appendAtom([]byte{pid[0]}, node)
	return append(out, pid[1+n:]...), nil
}

// unlinkFromPeer handles a whole UNLINK_ID or UNLINK_ID_ACK frame f.
func (c *repairConn) unlinkFromPeer(f []byte, headLen int, atoms []string, versioned bool, op int) error {
	ctl := headLen
	if versioned {
		ctl++
	}
	b := f[ctl:]
	if len(b) < 4 || b[1] != 4 {
		return fmt.Errorf("ergonode: malformed unlink message from peer (arity %d)", b[1])
	}
	var parts [3][]byte // Id, FromPid, ToPid
	pos := 4
	for i := range parts {
		n, err := termLen(b[pos:], atoms)
		if err != nil {
			return fmt.Errorf("ergonode: malformed unlink message from peer: %w", err)
		}
		parts[i] = b[pos : pos+n]
		pos += n
	}
	out := binary.BigEndian.AppendUint32(c.ready, 0)
	start := len(out)
	out = append(out, f[:ctl]...)
	if op == opUnlinkIDAck {
		// The unlink it acknowledges was ergo's own, done already. The
		// header stays: it may fill atom cache slots the peer will use.
		out = append(out, tagSmallTuple, 1, tagSmallInteger, opNodeLink)
	} else {
		out = append(out, tagSmallTuple, 3, tagSmallInteger, opUnlink)
		out = append(out, parts[1]...)
		out = append(out, parts[2]...)
	}
	binary.BigEndian.PutUint32(out[start-4:], uint32(len(out)-start))
	c.ready = out
	if op == opUnlinkIDAck {
		return nil
	}
	// Acknowledge: {36, Id, ToPid, FromPid}, with no atom cache.
	from, err := literalPid(parts[2], atoms)
	if err != nil {
		return fmt.Errorf("ergonode: malformed unlink message from peer: %w", err)
	}
	to, err := literalPid(parts[1], atoms)
	if err != nil {
		return fmt.Errorf("ergonode: malformed unlink message from peer: %w", err)
	}
	ack := []byte{0, 0, 0, 0, tagVersion, kindNormal, 0, tagSmallTuple, 4, tagSmallInteger, opUnlinkIDAck}
	ack = append(ack, parts[0]...)
	ack = append(ack, from...)
	ack = append(ack, to...)
	binary.BigEndian.PutUint32(ack, uint32(len(ack)-4))
	return c.inject(ack)
}

// inject writes a whole frame of the layer's own between ergo's frames.
func (c *repairConn) inject(frame []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr != nil {
		return c.werr
	}
	if c.streamLeft > 0 {
		c.held = append(c.held, frame)
		return nil
	}
	return c.writeOut(frame)
}

func (c *repairConn) writeOut(b []byte) error {
	if _, err := c.conn.Write(b); err != nil {
		c.werr = err
		return err
	}
	return nil
}

// Write takes bytes of ergo's frames and sends them repaired.
func (c *repairConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr != nil {
		return 0, c.werr
	}
	written := len(p)
	var out []byte
	if len(p) > ergoDirectWrite && c.streamLeft == 0 && len(c.wbuf) > 0 {
		// ergo's linkFlusher writes a packet over 64,000 bytes straight to
		// the connection, past its buffer, which may have sent the first
		// part of another packet and hold the rest. Such a write is whole
		// packets: repaired on its own, it goes out now, between packets,
		// and the partial one waits for its rest.
		partial := c.wbuf
		c.wbuf = append([]byte(nil), p...)
		var err error
		if out, err = c.drainFrames(out); err != nil {
			c.werr = err
			return 0, err
		}
		if len(c.wbuf) > 0 || c.streamLeft > 0 {
			c.werr = errors.New("ergonode: ergo wrote a long packet that did not end at a packet boundary")
			return 0, c.werr
		}
		c.wbuf, p = partial, nil
	}
	for len(p) > 0 {
		if c.streamLeft > 0 {
			n := min(c.streamLeft, len(p))
			out = append(out, p[:n]...)
			p = p[n:]
			c.streamLeft -= n
			if c.streamLeft == 0 {
				for _, h := range c.held {
					out = append(out, h...)
				}
				c.held = nil
			}
			continue
		}
		c.wbuf = append(c.wbuf, p...)
		p = nil
		var err error
		if out, err = c.drainFrames(out); err != nil {
			c.werr = err
			return 0, err
		}
		if c.streamLeft > 0 && len(c.wbuf) > 0 { // bytes past the head of a long frame
			p, c.wbuf = c.wbuf, nil
		}
	}
	if len(out) > 0 {
		if err := c.writeOut(out); err != nil {
			return 0, err
		}
	}
	return written, nil
}

// drainFrames appends to out every whole frame in wbuf, repaired, and
// starts streaming an over-long one.
func (c *repairConn) drainFrames(out []byte) ([]byte, error) {
	for len(c.wbuf) >= 4 {
		size := int(binary.BigEndian.Uint32(c.wbuf))
		if size == 0 {
			out = append(out, c.wbuf[:4]...)
			c.wbuf = c.wbuf[4:]
			continue
		}
		if size > maxHeldFrame {
			kind, _, _, seq, _, err := frameHead(c.wbuf[4:min(len(c.wbuf), 4+size)], &c.outCache)
			if errors.Is(err, errIncomplete) {
				break
			}
			if err != nil {
				return out, err
			}
			if !c.warnedLong {
				c.warnedLong = true
				c.logf("ergonode: a %d-byte frame (fragmentation off?) goes out without reference repair", size)
			}
			if kind == kindNextFrag {
				delete(c.outFrags, seq)
			}
			n := min(len(c.wbuf), 4+size)
			out = append(out, c.wbuf[:n]...)
			c.streamLeft = 4 + size - n
			c.wbuf = c.wbuf[n:]
			// Whole frames may follow a long frame that ended in this
			// write; when it did not end, wbuf is empty and the loop ends.
			continue
		}
		if len(c.wbuf) < 4+size {
			break
		}
		var err error
		out, err = c.repairOutgoing(out, c.wbuf[4:4+size])
		if err != nil {
			return out, err
		}
		c.wbuf = c.wbuf[4+size:]
	}
	return out, nil
}

// repairOutgoing appends frame f of ergo's, repaired, with its length.
func (c *repairConn) repairOutgoing(out []byte, f []byte) ([]byte, error) {
	kind, headLen, atoms, seq, fragID, err := frameHead(f, &c.outCache)
	if err != nil {
		return out, fmt.Errorf("ergonode: ergo sent a frame this layer cannot parse: %w", err)
	}
	lenAt := len(out)
	out = binary.BigEndian.AppendUint32(out, 0)
	out = append(out, f[:headLen]...)
	body := f[headLen:]
	if kind == kindPassThrough || kind == kindNormal {
		if op, err := controlOp(body, kind == kindPassThrough); err == nil && op == opUnlink {
			body = c.unlinkWithID(body, kind == kindPassThrough)
		}
	}
	// While no long reference is remembered, a new message needs no walk.
	walk := messageWalk(kind, atoms, seq, fragID, c.outFrags, &c.outFragList, !c.refs.empty())
	if walk == nil || walk.w.broken != nil {
		out = append(out, body...)
	} else {
		b := body
		if len(walk.carry) > 0 {
			b = append(walk.carry, body...)
		}
		var rest []byte
		out, rest = walk.w.walk(b, c.refs.restore, true, out)
		walk.carry = append(walk.carry[:0], rest...)
		if fragID <= 1 && len(walk.carry) > 0 { // the message's end: nothing may stay behind
			out = append(out, walk.carry...)
			walk.carry = nil
		}
	}
	binary.BigEndian.PutUint32(out[lenAt:], uint32(len(out)-lenAt-4))
	return out, nil
}

// unlinkWithID turns ergo's {4, From, To} into {35, Id, From, To}.
func (c *repairConn) unlinkWithID(body []byte, versioned bool) []byte {
	pre := 0
	if versioned {
		pre = 1
	}
	if len(body) < pre+4 || body[pre+1] != 3 {
		return body
	}
	c.unlinkID++
	if c.unlinkID > 1<<31-1 {
		c.unlinkID = 1
	}
	out := make([]byte, 0, len(body)+6)
	out = append(out, body[:pre]...)
	out = append(out, tagSmallTuple, 4, tagSmallInteger, opUnlinkID, tagInteger)
	out = binary.BigEndian.AppendUint32(out, c.unlinkID)
	return append(out, body[pre+4:]...)
}

// SetReadDeadline sets the read deadline of the tailnet connection.
func (c *repairConn) SetReadDeadline(t time.Time) error { return c.conn.SetReadDeadline(t) }

// SetWriteDeadline sets the write deadline of the tailnet connection.
func (c *repairConn) SetWriteDeadline(t time.Time) error { return c.conn.SetWriteDeadline(t) }
