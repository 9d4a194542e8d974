package ergonode

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/ergo-services/ergo/etf"
)

// cacheEntry is one atom cache reference of a hand-made distribution
// header: a new entry when atom is set, an existing one otherwise.
type cacheEntry struct {
	slot int
	atom string
}

// handHeader builds a distribution header's atom cache part by the spec,
// for messages from an OTP peer (whose encoder this test cannot run).
func handHeader(entries ...cacheEntry) []byte {
	n := len(entries)
	if n == 0 {
		return []byte{0}
	}
	flags := make([]byte, n/2+1)
	var refs []byte
	for i, e := range entries {
		seg := byte(e.slot>>8) & 7
		if e.atom != "" {
			seg |= 8
		}
		flags[i/2] |= seg << uint((i&1)*4)
		refs = append(refs, byte(e.slot))
		if e.atom != "" {
			refs = append(append(refs, byte(len(e.atom))), e.atom...)
		}
	}
	return append(append([]byte{byte(n)}, flags...), refs...)
}

// newPid is a NEW_PID_EXT on the encoded node atom.
func newPid(node []byte, id uint32) []byte {
	b := append([]byte{tagNewPid}, node...)
	b = binary.BigEndian.AppendUint32(b, id)
	b = binary.BigEndian.AppendUint32(b, 0)
	return binary.BigEndian.AppendUint32(b, 0x6a000001)
}

// Frames, with their 4-byte length.
func withLen(f []byte) []byte {
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(f))), f...)
}
func dFrame(header []byte, body ...[]byte) []byte {
	return withLen(append(append([]byte{tagVersion, kindNormal}, header...), bytes.Join(body, nil)...))
}
func eFrame(seq, frag uint64, header, body []byte) []byte {
	f := binary.BigEndian.AppendUint64([]byte{tagVersion, kindFirstFrag}, seq)
	f = binary.BigEndian.AppendUint64(f, frag)
	return withLen(append(append(f, header...), body...))
}
func fFrame(seq, frag uint64, body []byte) []byte {
	f := binary.BigEndian.AppendUint64([]byte{tagVersion, kindNextFrag}, seq)
	f = binary.BigEndian.AppendUint64(f, frag)
	return withLen(append(f, body...))
}

// splitFrames cuts a byte stream into its frames (without their lengths;
// a tick is an empty frame) and fails if it ends inside one.
func splitFrames(t testing.TB, b []byte) [][]byte {
	t.Helper()
	var frames [][]byte
	for len(b) > 0 {
		if len(b) < 4 || len(b) < 4+int(binary.BigEndian.Uint32(b)) {
			t.Fatalf("stream ends inside a frame: %d bytes left", len(b))
		}
		n := int(binary.BigEndian.Uint32(b))
		frames = append(frames, b[4:4+n])
		b = b[4+n:]
	}
	return frames
}

// decodeFrame decodes a 'D' frame (no length) as the receiving ergo would:
// the header through cache, the terms with etf.Decode. It returns the
// header's atom cache part and the terms.
func decodeFrame(t testing.TB, f []byte, cache *atomTable) (header []byte, terms []etf.Term) {
	t.Helper()
	if len(f) < 2 || f[0] != tagVersion || f[1] != kindNormal {
		t.Fatalf("not a 'D' frame: % x", f[:min(len(f), 8)])
	}
	atoms, n, err := readHeaderAtoms(f[2:], cache)
	if err != nil {
		t.Fatalf("header: %v", err)
	}
	return f[2 : 2+n], decodeTerms(t, f[2+n:], atoms)
}

// decodeTerms decodes every term in b with ergo's decoder.
func decodeTerms(t testing.TB, b []byte, atoms []string) []etf.Term {
	t.Helper()
	cache := make([]etf.Atom, len(atoms))
	for i, a := range atoms {
		cache[i] = etf.Atom(a)
	}
	var terms []etf.Term
	for len(b) > 0 {
		term, rest, err := etf.Decode(b, cache, etf.DecodeOptions{FlagBigPidRef: true})
		if err != nil {
			t.Fatalf("etf.Decode of term %d: %v", len(terms), err)
		}
		terms, b = append(terms, term), rest
	}
	return terms
}

// asInt is an Erlang integer as ergo decodes it (int, int32 or int64 by
// size).
func asInt(t etf.Term) (int64, bool) {
	switch v := t.(type) {
	case int:
		return int64(v), true
	case int32:
		return int64(v), true
	case int64:
		return v, true
	}
	return 0, false
}

// harness is a repairConn over net.Pipe: the test plays the peer on the
// other end (peerSends) and ergo on the repairConn (rc.Read, rc.Write).
// Everything that reaches the peer is collected in sent.
type harness struct {
	rc   *repairConn
	peer net.Conn
	mu   sync.Mutex
	sent []byte
	done chan struct{}
}

func newHarness(t *testing.T, refs *longRefs) *harness {
	t.Helper()
	a, b := net.Pipe()
	h := &harness{rc: newRepairConn(a, nil, refs, t.Logf), peer: b, done: make(chan struct{})}
	go func() {
		defer close(h.done)
		buf := make([]byte, 64<<10)
		for {
			n, err := b.Read(buf)
			h.mu.Lock()
			h.sent = append(h.sent, buf[:n]...)
			h.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() {
		a.Close()
		b.Close()
		<-h.done
	})
	return h
}

// peerSends writes data from the peer in the given chunk sizes, in the
// background (net.Pipe blocks until the repairConn reads).
func (h *harness) peerSends(data []byte, chunk int) {
	go func() {
		for len(data) > 0 {
			n := min(chunk, len(data))
			if _, err := h.peer.Write(data[:n]); err != nil {
				return
			}
			data = data[n:]
		}
	}()
}

// read returns the next n frames ergo reads.
func (h *harness) read(t testing.TB, n int) [][]byte {
	t.Helper()
	h.rc.SetReadDeadline(time.Now().Add(10 * time.Second))
	var frames [][]byte
	for range n {
		var l [4]byte
		if _, err := io.ReadFull(h.rc, l[:]); err != nil {
			t.Fatalf("reading frame %d: %v", len(frames), err)
		}
		f := make([]byte, binary.BigEndian.Uint32(l[:]))
		if _, err := io.ReadFull(h.rc, f); err != nil {
			t.Fatalf("reading frame %d of %d bytes: %v", len(frames), len(f), err)
		}
		frames = append(frames, f)
	}
	return frames
}

// sentBytes waits until at least n bytes have reached the peer and
// returns all of them.
func (h *harness) sentBytes(t testing.TB, n int) []byte {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		h.mu.Lock()
		got := append([]byte(nil), h.sent...)
		h.mu.Unlock()
		if len(got) >= n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(time.Millisecond)
	}
}

// write has ergo write b.
func (h *harness) write(t testing.TB, b []byte) {
	t.Helper()
	if n, err := h.rc.Write(b); err != nil || n != len(b) {
		t.Fatalf("Write of %d bytes = %d, %v", len(b), n, err)
	}
}

var (
	peerNode = "peer@host"
	ergoNode = "ergo@host"
)

func TestRepairUnlinkFromPeer(t *testing.T) {
	ids := map[string][]byte{
		"small id":   {tagSmallInteger, 7},
		"integer id": {tagInteger, 0, 1, 0, 0},
		"big id":     {tagSmallBig, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8},
	}
	for name, id := range ids {
		t.Run(name, func(t *testing.T) {
			h := newHarness(t, newLongRefs())
			// New cache entries for both nodes, in a segment past 0, then
			// a message that refers to them.
			header := handHeader(cacheEntry{300, peerNode}, cacheEntry{11, ergoNode})
			from, to := newPid([]byte{tagAtomCacheRef, 0}, 1), newPid([]byte{tagAtomCacheRef, 1}, 2)
			unlinkID := dFrame(header, []byte{tagSmallTuple, 4, tagSmallInteger, opUnlinkID}, id, from, to)
			later := dFrame(handHeader(cacheEntry{300, ""}, cacheEntry{11, ""}), rawTuple([]byte{tagSmallInteger, 2}, smallAtom(""), to), []byte{tagAtomCacheRef, 0})
			h.peerSends(append(unlinkID, later...), 3)

			frames := h.read(t, 2)
			var cache atomTable
			gotHeader, terms := decodeFrame(t, frames[0], &cache)
			if !bytes.Equal(gotHeader, header) {
				t.Errorf("header changed:\n got % x\nwant % x", gotHeader, header)
			}
			want := etf.Tuple{4, etf.Pid{Node: etf.Atom(peerNode), ID: 1, Creation: 0x6a000001}, etf.Pid{Node: etf.Atom(ergoNode), ID: 2, Creation: 0x6a000001}}
			if len(terms) != 1 || !equalTerms(terms[0], want) {
				t.Errorf("ergo read %#v; want [%#v]", terms, want)
			}
			// ergo's cache, filled by the kept header, resolves the next message.
			if _, terms := decodeFrame(t, frames[1], &cache); len(terms) != 2 || terms[1] != etf.Atom(peerNode) {
				t.Errorf("the message after the unlink decodes to %#v; want its payload %q", terms, peerNode)
			}

			// The acknowledgement, with literal atoms and no cache.
			// {36, Id, To, From}: 4 + 3 + len(id) + two pids of 24 bytes
			ackFrames := splitFrames(t, h.sentBytes(t, 4+3+4+len(id)+48))
			if len(ackFrames) != 1 {
				t.Fatalf("%d frames sent to the peer; want 1 acknowledgement", len(ackFrames))
			}
			ack := ackFrames[0]
			if !bytes.HasPrefix(ack, []byte{tagVersion, kindNormal, 0}) {
				t.Fatalf("acknowledgement does not start with a header without atom cache: % x", ack[:3])
			}
			terms = decodeTerms(t, ack[3:], nil)
			wantID, _, _ := etf.Decode(id, nil, etf.DecodeOptions{})
			wantAck := etf.Tuple{opUnlinkIDAck, wantID, want[2], want[1]}
			if len(terms) != 1 || !equalTerms(terms[0], wantAck) {
				t.Errorf("peer got %#v; want [%#v]", terms, wantAck)
			}
		})
	}
}

// equalTerms compares decoded terms, integers by value whatever their Go
// type.
func equalTerms(a, b etf.Term) bool {
	if x, ok := asInt(a); ok {
		y, ok := asInt(b)
		return ok && x == y
	}
	switch x := a.(type) {
	case etf.Tuple:
		y, ok := b.(etf.Tuple)
		if !ok || len(x) != len(y) {
			return false
		}
		for i := range x {
			if !equalTerms(x[i], y[i]) {
				return false
			}
		}
		return true
	case []byte:
		y, ok := b.([]byte)
		return ok && bytes.Equal(x, y)
	}
	return a == b
}

func TestRepairUnlinkAckFromPeer(t *testing.T) {
	for _, versioned := range []bool{false, true} {
		h := newHarness(t, newLongRefs())
		header := handHeader(cacheEntry{5, peerNode})
		body := append([]byte{tagSmallTuple, 4, tagSmallInteger, opUnlinkIDAck, tagSmallInteger, 1},
			append(newPid([]byte{tagAtomCacheRef, 0}, 1), newPid(smallAtom(ergoNode), 2)...)...)
		frame := dFrame(header, body)
		if versioned { // a pass-through message: no header, a version byte
			frame = withLen(append([]byte{kindPassThrough, tagVersion}, append(body[:6:6], append(newPid(smallAtom(peerNode), 1), newPid(smallAtom(ergoNode), 2)...)...)...))
		}
		h.peerSends(frame, 1)
		f := h.read(t, 1)[0]
		if versioned {
			want := []byte{kindPassThrough, tagVersion, tagSmallTuple, 1, tagSmallInteger, opNodeLink}
			if !bytes.Equal(f, want) {
				t.Errorf("pass-through UNLINK_ID_ACK became % x; want % x", f, want)
			}
			continue
		}
		var cache atomTable
		gotHeader, terms := decodeFrame(t, f, &cache)
		if !bytes.Equal(gotHeader, header) || cache[5] != peerNode {
			t.Errorf("header % x (cache slot 5 %q); want % x kept", gotHeader, cache[5], header)
		}
		if len(terms) != 1 || !equalTerms(terms[0], etf.Tuple{opNodeLink}) {
			t.Errorf("UNLINK_ID_ACK became %#v; want {%d}", terms, opNodeLink)
		}
		if sent := h.sentBytes(t, 0); len(sent) != 0 {
			t.Errorf("an UNLINK_ID_ACK was answered: % x", sent)
		}
	}
}

func TestRepairUnlinkFromErgo(t *testing.T) {
	h := newHarness(t, newLongRefs())
	enc := newErgoEncoder(map[etf.Atom]int16{etf.Atom(ergoNode): 1, etf.Atom(peerNode): 2})
	from := etf.Pid{Node: etf.Atom(ergoNode), ID: 10, Creation: 3}
	to := etf.Pid{Node: etf.Atom(peerNode), ID: 20, Creation: 4}
	var stream []byte
	var headers [][]byte
	for range 3 {
		header, body := enc.message(t, etf.Tuple{opUnlink, from, to})
		headers = append(headers, header)
		stream = append(stream, dFrame(header, body)...)
	}
	h.write(t, stream)
	frames := splitFrames(t, h.sentBytes(t, len(stream)+3*5)) // each id: 98 and 4 bytes, the arity byte changes
	if len(frames) != 3 {
		t.Fatalf("%d frames sent; want 3", len(frames))
	}
	var cache atomTable
	for i, f := range frames {
		header, terms := decodeFrame(t, f, &cache)
		if !bytes.Equal(header, headers[i]) {
			t.Errorf("frame %d: header changed", i)
		}
		want := etf.Tuple{opUnlinkID, i + 1, from, to}
		if len(terms) != 1 || !equalTerms(terms[0], want) {
			t.Errorf("frame %d: %#v; want [%#v]", i, terms, want)
		}
	}
}

// refWords is what identifies a five-word reference in any encoding: its
// creation and words, unmasked.
func refWords(creation uint32, words ...uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, creation)
	for _, w := range words {
		b = binary.BigEndian.AppendUint32(b, w)
	}
	return b
}

// The reference of an OTP 26+ process alias: five words, the first with
// bits past the 18 ergo keeps.
var (
	aliasCreation = uint32(0x6a01f00d)
	aliasWords    = []uint32{0xfffc0000 | 12345, 0x11111111, 0x22222222, 0x33333333, 0x44444444}
	// what ergo decodes and encodes again
	aliasShort = etf.Ref{Node: etf.Atom(peerNode), Creation: aliasCreation, ID: [5]uint32{12345, 0x11111111, 0x22222222}}
)

// aliasGrowth is how much the restoring of the alias lengthens b, which
// ergo encoded: two words for each occurrence.
func aliasGrowth(b []byte) int {
	return 8 * bytes.Count(b, refWords(aliasCreation, aliasShort.ID[:3]...))
}

// rememberAlias has the peer send a message holding the alias, the way
// given, and reads it on ergo's side.
func rememberAlias(t *testing.T, h *harness, how string) {
	t.Helper()
	to := newPid(smallAtom(ergoNode), 1)
	control := rawTuple([]byte{tagSmallInteger, 2}, smallAtom(""), to) // SEND
	payload := func(node []byte) []byte {
		return rawTuple(smallAtom("$gen_call"), rawTuple(newPid(node, 9), rawTuple(smallAtom("alias"), longRef(node, aliasCreation, aliasWords...))), smallAtom("req"))
	}
	var stream []byte
	frames := 1
	switch how {
	case "plain":
		stream = dFrame(handHeader(), control, payload(smallAtom(peerNode)))
	case "cached node atom":
		stream = dFrame(handHeader(cacheEntry{77, peerNode}), control, payload([]byte{tagAtomCacheRef, 0}))
	case "fragmented":
		body := append(control, payload(smallAtom(peerNode))...)
		at := bytes.Index(body, refWords(aliasCreation, aliasWords...)) + 10 // inside the words
		stream = append(eFrame(9, 2, handHeader(), body[:at]), fFrame(9, 1, body[at:])...)
		frames = 2
	}
	h.peerSends(stream, 5)
	got := h.read(t, frames)
	if !bytes.Equal(bytes.Join(got, nil), bytes.Join(splitFrames(t, stream), nil)) {
		t.Fatalf("%s: a message with a long reference did not reach ergo unchanged", how)
	}
}

// checkRestored checks that the bytes reaching the peer hold the alias
// whole, and that ergo's decoder reads them (terms after reassembly).
func checkRestored(t *testing.T, out []byte, fragmented bool) {
	t.Helper()
	frames := splitFrames(t, out)
	var body []byte
	var atoms []string
	var cache atomTable
	for _, f := range frames {
		switch f[1] {
		case kindNormal:
			a, n, err := readHeaderAtoms(f[2:], &cache)
			if err != nil {
				t.Fatal(err)
			}
			atoms, body = a, append(body, f[2+n:]...)
		case kindFirstFrag:
			a, n, err := readHeaderAtoms(f[18:], &cache)
			if err != nil {
				t.Fatal(err)
			}
			atoms, body = a, append(body, f[18+n:]...)
		case kindNextFrag:
			body = append(body, f[18:]...)
		}
	}
	if fragmented && len(frames) < 2 {
		t.Errorf("%d frames; want the fragments", len(frames))
	}
	if !bytes.Contains(body, refWords(aliasCreation, aliasWords...)) {
		t.Fatalf("the alias did not get its five words back:\n% x", body)
	}
	terms := decodeTerms(t, body, atoms)
	found := false
	for _, term := range terms {
		found = found || hasWord(term, aliasWords[4])
	}
	if len(terms) != 2 || !found {
		t.Errorf("decoded %#v; want a control message and a payload with the five-word alias", terms)
	}
}

func TestRepairRestoresLongReferences(t *testing.T) {
	from := etf.Pid{Node: etf.Atom(ergoNode), ID: 1, Creation: 3}
	reply := etf.Tuple{etf.Alias(aliasShort), etf.Atom("reply")}
	for _, in := range []string{"plain", "cached node atom", "fragmented"} {
		for _, out := range []string{"plain", "cached node atom", "fragmented"} {
			t.Run(in+" in, "+out+" out", func(t *testing.T) {
				h := newHarness(t, newLongRefs())
				rememberAlias(t, h, in)
				enc := newErgoEncoder(nil)
				if out == "cached node atom" {
					enc = newErgoEncoder(map[etf.Atom]int16{etf.Atom(peerNode): 1500, "reply": 3})
				}
				control := etf.Tuple{22, from, aliasShort} // ALIAS_SEND: the reply to a call from OTP 26+
				if out != "fragmented" {
					sent := 0
					for range 2 { // the second time, with the cache entries in place
						header, body := enc.message(t, control, reply)
						frame := dFrame(header, body)
						h.write(t, frame)
						got := h.sentBytes(t, sent+len(frame)+aliasGrowth(body))
						checkRestored(t, got[sent:], false)
						sent = len(got)
					}
					return
				}
				// The reference straddles two fragments, cut at every
				// byte of it.
				header, body := enc.message(t, control, reply)
				short := refWords(aliasCreation, aliasShort.ID[:3]...)
				at := bytes.Index(body, short)
				if at < 0 {
					t.Fatalf("ergo's encoding has no three-word alias")
				}
				sent := 0
				for cut := at - 6; cut <= at+len(short); cut++ {
					seq := uint64(100 + cut)
					stream := append(eFrame(seq, 2, header, body[:cut]), fFrame(seq, 1, body[cut:])...)
					h.write(t, stream)
					want := len(stream) + aliasGrowth(body)
					got := h.sentBytes(t, sent+want)
					if len(got) != sent+want {
						t.Fatalf("cut at %d: %d bytes sent; want %d", cut, len(got)-sent, want)
					}
					checkRestored(t, got[sent:], true)
					sent = len(got)
				}
			})
		}
	}
}

// otherFrames are frames the repair layer has no business changing, in
// both directions: ticks, messages without references or unlinks, a
// remembered reference's unknown cousins, compressed (non-131) frames.
func otherFrames(t testing.TB) []byte {
	t.Helper()
	enc := newErgoEncoder(map[etf.Atom]int16{"a": 1})
	var s []byte
	s = append(s, 0, 0, 0, 0)
	for _, terms := range [][]etf.Term{
		{etf.Tuple{2, etf.Atom(""), etf.Pid{Node: "a"}}, etf.Tuple{etf.Atom("a"), []byte("payload")}},
		{etf.Tuple{2, etf.Atom(""), etf.Pid{Node: "a"}}, etf.Ref{Node: "a", ID: [5]uint32{1, 2, 3}}},
		{etf.Tuple{1, etf.Pid{Node: "a"}, etf.Pid{Node: "b"}}},                                              // LINK
		{etf.Tuple{19, etf.Pid{Node: "a"}, etf.Pid{Node: "b"}, etf.Ref{Node: "a", ID: [5]uint32{7, 8, 9}}}}, // MONITOR_P
		{etf.Tuple{4}}, // an UNLINK of the wrong arity
	} {
		header, body := enc.message(t, terms...)
		s = append(s, dFrame(header, body)...)
	}
	s = append(s, withLen([]byte{kindPassThrough, tagVersion, tagSmallTuple, 1, tagSmallInteger, opNodeLink})...)
	s = append(s, withLen([]byte{80, 1, 2, 3})...) // compressed
	s = append(s, 0, 0, 0, 0)
	return s
}

func TestRepairPassesOtherFrames(t *testing.T) {
	refs := newLongRefs()
	refs.remember(peerNode, longRef(smallAtom(peerNode), aliasCreation, aliasWords...))
	stream := otherFrames(t)
	t.Run("incoming", func(t *testing.T) {
		h := newHarness(t, refs)
		h.peerSends(stream, 7)
		got := bytes.Join(h.read(t, len(splitFrames(t, stream))), nil)
		if want := bytes.Join(splitFrames(t, stream), nil); !bytes.Equal(got, want) {
			t.Errorf("incoming frames changed:\n got % x\nwant % x", got, want)
		}
	})
	t.Run("outgoing", func(t *testing.T) {
		h := newHarness(t, refs)
		h.write(t, stream)
		if got := h.sentBytes(t, len(stream)); !bytes.Equal(got, stream) {
			t.Errorf("outgoing frames changed:\n got % x\nwant % x", got, stream)
		}
	})
}

// ergoStream is a stream of ergo's frames with every repair in it: an
// unlink, a reply to a remembered alias, the same in two fragments, ticks.
func ergoStream(t testing.TB) (stream []byte, growth int) {
	t.Helper()
	enc := newErgoEncoder(map[etf.Atom]int16{etf.Atom(peerNode): 1, etf.Atom(ergoNode): 2})
	from := etf.Pid{Node: etf.Atom(ergoNode), ID: 1, Creation: 3}
	h1, b1 := enc.message(t, etf.Tuple{opUnlink, from, etf.Pid{Node: etf.Atom(peerNode), ID: 2}})
	h2, b2 := enc.message(t, etf.Tuple{22, from, aliasShort}, etf.Tuple{etf.Alias(aliasShort), 1})
	h3, b3 := enc.message(t, etf.Tuple{22, from, aliasShort}, etf.Tuple{etf.Alias(aliasShort), 2})
	s := dFrame(h1, b1)
	s = append(s, 0, 0, 0, 0)
	s = append(s, dFrame(h2, b2)...)
	s = append(s, eFrame(5, 2, h3, b3[:len(b3)-20])...)
	s = append(s, fFrame(5, 1, b3[len(b3)-20:])...)
	return append(s, otherFrames(t)...), 5 + aliasGrowth(b2) + aliasGrowth(b3) // 5: the unlink's id
}

func TestRepairWriteSplits(t *testing.T) {
	refs := newLongRefs()
	refs.remember(peerNode, longRef(smallAtom(peerNode), aliasCreation, aliasWords...))
	stream, growth := ergoStream(t)
	run := func(t *testing.T, writes ...[]byte) []byte {
		t.Helper()
		h := newHarness(t, refs)
		total := 0
		for _, w := range writes {
			h.write(t, w)
			total += len(w)
		}
		want := total + growth
		got := h.sentBytes(t, want)
		if len(got) != want {
			t.Fatalf("%d bytes sent; want %d", len(got), want)
		}
		return got
	}
	whole := run(t, stream)
	frames := splitFrames(t, whole)
	var cache atomTable
	if _, terms := decodeFrame(t, frames[0], &cache); !equalTerms(terms[0].(etf.Tuple)[:2], etf.Tuple{opUnlinkID, 1}) {
		t.Errorf("first frame %#v; want an UNLINK_ID", terms)
	}
	checkRestored(t, withLen(frames[2]), false)
	checkRestored(t, append(withLen(frames[3]), withLen(frames[4])...), true)
	for cut := 1; cut < len(stream); cut++ {
		if got := run(t, stream[:cut], stream[cut:]); !bytes.Equal(got, whole) {
			t.Fatalf("written in two at %d: output differs from the whole write", cut)
		}
	}
	var bytewise [][]byte
	for i := range stream {
		bytewise = append(bytewise, stream[i:i+1])
	}
	if got := run(t, bytewise...); !bytes.Equal(got, whole) {
		t.Errorf("written byte by byte: output differs from the whole write")
	}
}

func TestRepairReadSplits(t *testing.T) {
	refs := newLongRefs()
	var stream []byte
	header := handHeader(cacheEntry{300, peerNode}, cacheEntry{11, ergoNode})
	from, to := newPid([]byte{tagAtomCacheRef, 0}, 1), newPid([]byte{tagAtomCacheRef, 1}, 2)
	stream = append(stream, dFrame(header, []byte{tagSmallTuple, 4, tagSmallInteger, opUnlinkID, tagSmallInteger, 9}, from, to)...)
	stream = append(stream, otherFrames(t)...)
	var want [][]byte
	for _, chunk := range []int{1 << 20, 1, 2, 3, 5, 13} {
		h := newHarness(t, refs)
		h.peerSends(stream, chunk)
		got := h.read(t, len(splitFrames(t, stream)))
		if want == nil {
			want = got
			continue
		}
		for i := range want {
			if !bytes.Equal(got[i], want[i]) {
				t.Errorf("read in chunks of %d: frame %d differs", chunk, i)
			}
		}
	}
}

func TestRepairLongFrames(t *testing.T) {
	refs := newLongRefs()
	refs.remember(peerNode, longRef(smallAtom(peerNode), aliasCreation, aliasWords...))
	enc := newErgoEncoder(nil)
	from := etf.Pid{Node: etf.Atom(ergoNode), ID: 1, Creation: 3}
	header, body := enc.message(t, etf.Tuple{22, from, aliasShort}, etf.Tuple{make([]byte, maxHeldFrame+10), etf.Alias(aliasShort)})
	long := dFrame(header, body)
	tick := []byte{0, 0, 0, 0}
	h2, b2 := enc.message(t, etf.Tuple{22, from, aliasShort}, 1)
	short := dFrame(h2, b2)

	t.Run("outgoing in one write", func(t *testing.T) {
		h := newHarness(t, refs)
		h.write(t, append(append(append([]byte(nil), long...), tick...), short...))
		want := len(long) + len(tick) + len(short) + aliasGrowth(b2)
		got := h.sentBytes(t, want)
		if len(got) != want || !bytes.Equal(got[:len(long)], long) {
			t.Fatalf("%d bytes sent; want %d: the long frame as it was, then a tick and the short frame repaired", len(got), want)
		}
		checkRestored(t, got[len(long)+4:], false)
	})
	t.Run("outgoing in pieces, with an acknowledgement in between", func(t *testing.T) {
		h := newHarness(t, refs)
		h.write(t, long[:1000])
		unlink := dFrame(handHeader(), []byte{tagSmallTuple, 4, tagSmallInteger, opUnlinkID, tagSmallInteger, 9},
			newPid(smallAtom(peerNode), 1), newPid(smallAtom(ergoNode), 2))
		h.peerSends(unlink, 1<<20)
		h.read(t, 1) // the unlink, acknowledged while the long frame is half out
		for pos := 1000; pos < len(long); pos += 100000 {
			h.write(t, long[pos:min(pos+100000, len(long))])
		}
		h.write(t, short)
		ackLen := 4 + 3 + 4 + 2 + 48 // {36, 9, To, From}, two pids of 24 bytes
		got := h.sentBytes(t, len(long)+ackLen+len(short)+aliasGrowth(b2))
		frames := splitFrames(t, got)
		if len(frames) != 3 || !bytes.Equal(withLen(frames[0]), long) {
			t.Fatalf("%d frames sent; want the long one intact, the acknowledgement, the short one", len(frames))
		}
		_, terms := decodeFrame(t, frames[1], new(atomTable))
		if tup, ok := terms[0].(etf.Tuple); !ok || !equalTerms(tup[0], opUnlinkIDAck) {
			t.Errorf("second frame %#v; want the acknowledgement", terms)
		}
		checkRestored(t, withLen(frames[2]), false)
	})
	t.Run("incoming", func(t *testing.T) {
		h := newHarness(t, refs)
		h.peerSends(append(append([]byte(nil), long...), short...), 70000)
		frames := h.read(t, 2)
		if !bytes.Equal(withLen(frames[0]), long) || !bytes.Equal(withLen(frames[1]), short) {
			t.Errorf("a long incoming frame did not pass intact")
		}
	})
}

func TestRepairMalformedUnlinkFromPeer(t *testing.T) {
	pid := newPid(smallAtom(peerNode), 1)
	tests := []struct {
		name string
		body []byte
	}{
		{"no elements", []byte{tagSmallTuple, 4, tagSmallInteger, opUnlinkID}},
		{"id only", []byte{tagSmallTuple, 4, tagSmallInteger, opUnlinkID, tagSmallInteger, 1}},
		{"one pid", append([]byte{tagSmallTuple, 4, tagSmallInteger, opUnlinkID, tagSmallInteger, 1}, pid...)},
		{"cut pid", append([]byte{tagSmallTuple, 4, tagSmallInteger, opUnlinkID, tagSmallInteger, 1}, pid[:10]...)},
		{"wrong arity", []byte{tagSmallTuple, 3, tagSmallInteger, opUnlinkID, tagSmallInteger, 1, tagNil}},
		{"a tuple for a pid", append([]byte{tagSmallTuple, 4, tagSmallInteger, opUnlinkID, tagSmallInteger, 1, tagSmallTuple, 0}, pid...)},
	}
	for _, tt := range tests {
		for _, kind := range []string{"D", "p"} {
			frame := dFrame(handHeader(), tt.body)
			if kind == "p" {
				frame = withLen(append([]byte{kindPassThrough, tagVersion}, tt.body...))
			}
			conn := &fuzzConn{r: frame, sizes: []int{1 << 20}}
			rc := newRepairConn(conn, nil, newLongRefs(), t.Logf)
			func() {
				defer func() {
					if r := recover(); r != nil {
						t.Errorf("%s (%s): Read panicked: %v", tt.name, kind, r)
					}
				}()
				if n, err := rc.Read(make([]byte, 4096)); err == nil || errors.Is(err, io.EOF) {
					t.Errorf("%s (%s): Read = %d, %v; want an error for the malformed frame", tt.name, kind, n, err)
				}
			}()
			if conn.w.Len() != 0 {
				t.Errorf("%s (%s): acknowledged a malformed unlink: % x", tt.name, kind, conn.w.Bytes())
			}
		}
	}
}

func TestRepairDirectWrite(t *testing.T) {
	// ergo's linkFlusher writes a packet over ergoDirectWrite bytes
	// straight to the connection, while its buffer may have sent part of
	// another packet: the long write is whole packets, to go out at once,
	// between packets.
	refs := newLongRefs()
	refs.remember(peerNode, longRef(smallAtom(peerNode), aliasCreation, aliasWords...))
	enc := newErgoEncoder(nil)
	from := etf.Pid{Node: etf.Atom(ergoNode), ID: 1, Creation: 3}
	hs, bs := enc.message(t, etf.Tuple{22, from, aliasShort}, 1)
	short := dFrame(hs, bs)
	hl, bl := enc.message(t, etf.Tuple{22, from, aliasShort}, etf.Tuple{make([]byte, ergoDirectWrite), etf.Alias(aliasShort)})
	long := dFrame(hl, bl)

	t.Run("whole packets", func(t *testing.T) {
		h := newHarness(t, refs)
		h.write(t, short[:30])
		h.write(t, append(append([]byte(nil), long...), 0, 0, 0, 0))
		h.write(t, short[30:])
		got := h.sentBytes(t, len(long)+4+len(short)+aliasGrowth(bl)+aliasGrowth(bs))
		frames := splitFrames(t, got)
		if len(frames) != 3 || len(frames[0]) != len(long)-4+aliasGrowth(bl) || len(frames[1]) != 0 {
			t.Fatalf("%d frames sent; want the long packet, the tick, then the short one", len(frames))
		}
		checkRestored(t, withLen(frames[0]), false)
		checkRestored(t, withLen(frames[2]), false)
	})
	t.Run("not at a packet boundary", func(t *testing.T) {
		h := newHarness(t, refs)
		h.write(t, short[:30])
		if _, err := h.rc.Write(long[:len(long)-1]); err == nil {
			t.Fatalf("a long write that ends inside a packet was taken")
		}
		if _, err := h.rc.Write(short[30:]); err == nil {
			t.Errorf("a write after the error was taken")
		}
	})
}

func TestRepairUnlinkFromPeerPassThrough(t *testing.T) {
	// A pass-through message ('p', no header, a version byte before each
	// term) is repaired the same way.
	h := newHarness(t, newLongRefs())
	from, to := newPid(smallAtom(peerNode), 1), newPid(smallAtom(ergoNode), 2)
	h.peerSends(withLen(bytes.Join([][]byte{{kindPassThrough, tagVersion, tagSmallTuple, 4, tagSmallInteger, opUnlinkID, tagSmallInteger, 7}, from, to}, nil)), 1)
	f := h.read(t, 1)[0]
	want := bytes.Join([][]byte{{kindPassThrough, tagVersion, tagSmallTuple, 3, tagSmallInteger, opUnlink}, from, to}, nil)
	if !bytes.Equal(f, want) {
		t.Errorf("ergo read % x; want % x", f, want)
	}
	ack := splitFrames(t, h.sentBytes(t, 4+3+4+2+48))
	if len(ack) != 1 {
		t.Fatalf("%d frames to the peer; want the acknowledgement", len(ack))
	}
	terms := decodeTerms(t, ack[0][3:], nil)
	wantAck := etf.Tuple{opUnlinkIDAck, 7, etf.Pid{Node: etf.Atom(ergoNode), ID: 2, Creation: 0x6a000001}, etf.Pid{Node: etf.Atom(peerNode), ID: 1, Creation: 0x6a000001}}
	if len(terms) != 1 || !equalTerms(terms[0], wantAck) {
		t.Errorf("peer got %#v; want [%#v]", terms, wantAck)
	}
}
