package ergonode

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// fuzzAtoms stands for a message's atom cache references in FuzzWalker:
// enough for the seeds, whose references index a few.
var fuzzAtoms = []string{"erl@host", "a", "b", "c", "d", "e", "f", "g"}

// chunkSizes turns fuzz bytes into a cycle of chunk sizes (1..256).
func chunkSizes(splits []byte) []int {
	if len(splits) == 0 {
		return []int{1 << 30}
	}
	sizes := make([]int, len(splits))
	for i, s := range splits {
		sizes[i] = int(s) + 1
	}
	return sizes
}

func FuzzWalker(f *testing.F) {
	for _, tc := range walkerCases(f) {
		if len(tc.body) <= 4096 {
			f.Add(tc.body, []byte{0, 3, 17}, false)
		}
	}
	hand, _ := handMade()
	f.Add(hand, []byte{}, false)
	f.Add(append([]byte{tagVersion, tagNil, tagVersion}, longRef(smallAtom("n@h"), 1, 1, 2, 3, 4, 5)...), []byte{1}, true)
	f.Fuzz(func(t *testing.T, data, splits []byte, versioned bool) {
		sizes := chunkSizes(splits)
		walkOnce := func(sizes []int) (out []byte, visits int, w *termWalker) {
			w = newTermWalker(fuzzAtoms, versioned)
			visit := func(node string, item []byte) []byte {
				visits++
				if len(item) < 3 || item[0] != tagNewerRef {
					t.Fatalf("visited % x, not a NEWER_REFERENCE_EXT", item[:min(len(item), 3)])
				}
				return nil
			}
			var carry []byte
			for i, pos := 0, 0; pos < len(data); i++ {
				n := min(sizes[i%len(sizes)], len(data)-pos)
				b := append(append([]byte(nil), carry...), data[pos:pos+n]...)
				before := len(out)
				var rest []byte
				out, rest = w.walk(b, visit, true, out)
				// Accounting: the bytes walked, then rest, are b.
				if walked := out[before:]; !bytes.Equal(append(append([]byte(nil), walked...), rest...), b) {
					t.Fatalf("walked %d bytes and a rest of %d from %d bytes that do not add up", len(walked), len(rest), len(b))
				}
				if w.broken != nil && len(rest) != 0 {
					t.Fatalf("a broken walker left a rest of %d bytes", len(rest))
				}
				carry = append(carry[:0], rest...)
				pos += n
			}
			return append(out, carry...), visits, w
		}
		whole, wholeVisits, ww := walkOnce([]int{1 << 30})
		split, splitVisits, sw := walkOnce(sizes)
		if !bytes.Equal(whole, data) || !bytes.Equal(split, data) {
			t.Fatalf("emitted bytes differ from the input with no replacement")
		}
		if ww.broken == nil && sw.broken == nil && wholeVisits != splitVisits {
			t.Fatalf("%d references whole, %d split", wholeVisits, splitVisits)
		}
	})
}

// fuzzConn is a connection whose reads come from r in chunks of the given
// sizes and whose writes go to w (or fail with werr).
type fuzzConn struct {
	net.Conn
	r     []byte
	sizes []int
	i     int
	w     bytes.Buffer
	werr  error
}

func (c *fuzzConn) Read(p []byte) (int, error) {
	if len(c.r) == 0 {
		return 0, io.EOF
	}
	n := copy(p, c.r[:min(len(c.r), c.sizes[c.i%len(c.sizes)])])
	c.i++
	c.r = c.r[n:]
	return n, nil
}

func (c *fuzzConn) Write(p []byte) (int, error) {
	if c.werr != nil {
		return 0, c.werr
	}
	return c.w.Write(p)
}

func (c *fuzzConn) SetReadDeadline(time.Time) error  { return nil }
func (c *fuzzConn) SetWriteDeadline(time.Time) error { return nil }

// fuzzRefs is a long-reference table with the tests' alias in it, so that
// outgoing messages are walked.
func fuzzRefs() *longRefs {
	refs := newLongRefs()
	refs.remember(peerNode, longRef(smallAtom(peerNode), aliasCreation, aliasWords...))
	return refs
}

// incomingSeeds are streams an OTP peer could send: unlinks, aliases
// plain, cached and fragmented, and frames to pass.
func incomingSeeds(f *testing.F) [][]byte {
	header := handHeader(cacheEntry{300, peerNode}, cacheEntry{11, ergoNode})
	from, to := newPid([]byte{tagAtomCacheRef, 0}, 1), newPid([]byte{tagAtomCacheRef, 1}, 2)
	unlink := dFrame(header, []byte{tagSmallTuple, 4, tagSmallInteger, opUnlinkID, tagSmallInteger, 9}, from, to)
	ack := dFrame(handHeader(cacheEntry{300, ""}, cacheEntry{11, ""}), []byte{tagSmallTuple, 4, tagSmallInteger, opUnlinkIDAck, tagSmallInteger, 9}, from, to)
	control := rawTuple([]byte{tagSmallInteger, 2}, smallAtom(""), newPid(smallAtom(ergoNode), 1))
	payload := rawTuple(smallAtom("$gen_call"), longRef([]byte{tagAtomCacheRef, 0}, aliasCreation, aliasWords...))
	alias := dFrame(handHeader(cacheEntry{77, peerNode}), control, payload)
	body := append(append([]byte(nil), control...), payload...)
	frag := append(eFrame(9, 2, handHeader(cacheEntry{77, peerNode}), body[:len(body)-7]), fFrame(9, 1, body[len(body)-7:])...)
	short := dFrame(handHeader(), []byte{tagSmallTuple, 4, tagSmallInteger, opUnlinkID}) // once a panic
	return [][]byte{unlink, ack, alias, frag, append(unlink, otherFrames(f)...), short}
}

func FuzzRepairIncoming(f *testing.F) {
	for _, s := range incomingSeeds(f) {
		f.Add(s, []byte{}, uint8(0))
		f.Add(s, []byte{0, 5, 200}, uint8(7))
	}
	f.Fuzz(func(t *testing.T, data, splits []byte, leftover uint8) {
		left := data[:min(int(leftover), len(data))]
		conn := &fuzzConn{r: data[len(left):], sizes: chunkSizes(splits)}
		rc := newRepairConn(conn, left, fuzzRefs(), func(string, ...any) {})
		buf := make([]byte, 4096)
		for reads := 0; ; reads++ {
			if reads > 4*len(data)+16 {
				t.Fatalf("%d reads of %d bytes without an end", reads, len(data))
			}
			n, err := rc.Read(buf)
			if n < 0 || n > len(buf) {
				t.Fatalf("Read = %d", n)
			}
			if err != nil {
				if n != 0 {
					t.Fatalf("Read = %d with error %v", n, err)
				}
				if !errors.Is(err, io.EOF) && err.Error() == "" {
					t.Fatalf("an error without a message")
				}
				return
			}
		}
	})
}

func FuzzRepairOutgoing(f *testing.F) {
	stream, _ := ergoStream(f)
	f.Add(stream, []byte{})
	f.Add(stream, []byte{0, 1, 30, 255})
	for _, s := range incomingSeeds(f) {
		f.Add(s, []byte{3})
	}
	f.Fuzz(func(t *testing.T, data, splits []byte) {
		conn := &fuzzConn{}
		rc := newRepairConn(conn, nil, fuzzRefs(), func(string, ...any) {})
		sizes := chunkSizes(splits)
		for i, pos := 0, 0; pos < len(data); i++ {
			n := min(sizes[i%len(sizes)], len(data)-pos)
			w, err := rc.Write(data[pos : pos+n])
			if err != nil {
				if w != 0 {
					t.Fatalf("Write = %d with error %v", w, err)
				}
				if _, err2 := rc.Write([]byte{0}); err2 == nil {
					t.Fatalf("a Write after the error %v succeeded", err)
				}
				return
			}
			if w != n {
				t.Fatalf("Write of %d bytes = %d", n, w)
			}
			pos += n
		}
		// Whatever went out is whole frames, except for a frame still
		// being streamed.
		out := conn.w.Bytes()
		for len(out) >= 4 {
			size := int(uint32(out[0])<<24 | uint32(out[1])<<16 | uint32(out[2])<<8 | uint32(out[3]))
			if len(out) < 4+size {
				if rc.streamLeft == 0 {
					t.Fatalf("output ends inside a %d-byte frame with nothing streaming", size)
				}
				break
			}
			out = out[4+size:]
		}
		if len(out) > 0 && len(out) < 4 {
			t.Fatalf("output ends with %d bytes of a frame length", len(out))
		}
	})
}
