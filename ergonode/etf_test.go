package ergonode

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"math/big"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"

	"github.com/ergo-services/ergo/etf"
	"github.com/ergo-services/ergo/lib"
)

// ergoEncoder encodes distribution messages exactly as ergo's sender does:
// etf.Encode with the connection's atom cache, then the distribution
// header built from the atoms the encoding used (a copy of
// proto/dist.encodeDistHeaderAtomCache, which is a method of an unexported
// type). It keeps the sender's cache state, so a second message using an
// atom refers to the slot the first one filled.
type ergoEncoder struct {
	cache  etf.AtomCache
	sender map[etf.Atom]etf.CacheItem
	plain  bool // no atom cache: FlagBigCreation and literal atoms only
}

// newErgoEncoder returns an encoder whose atom cache puts each of the
// given atoms in the given slot (0..2047): slots past 255 exercise the
// header's segment index.
func newErgoEncoder(slots map[etf.Atom]int16) *ergoEncoder {
	e := &ergoEncoder{cache: etf.NewAtomCache(), sender: map[etf.Atom]etf.CacheItem{}}
	for a, id := range slots {
		e.sender[a] = etf.CacheItem{ID: id, Name: a}
	}
	return e
}

// message encodes terms (control message, payload) and returns the
// distribution header's atom cache part (what readHeaderAtoms parses,
// from NumberOfAtomCacheRefs on) and the encoded terms.
func (e *ergoEncoder) message(t testing.TB, terms ...etf.Term) (header, body []byte) {
	t.Helper()
	eac := etf.TakeEncodingAtomCache()
	defer etf.ReleaseEncodingAtomCache(eac)
	opts := etf.EncodeOptions{FlagBigCreation: true, FlagBigPidRef: true}
	if !e.plain {
		opts.AtomCache, opts.SenderAtomCache, opts.EncodingAtomCache = e.cache.Out, e.sender, eac
	}
	buf := lib.TakeBuffer()
	defer lib.ReleaseBuffer(buf)
	for _, term := range terms {
		if err := etf.Encode(term, buf, opts); err != nil {
			t.Fatalf("etf.Encode(%#v): %v", term, err)
		}
	}
	body = append([]byte(nil), buf.B...)
	if e.plain {
		return []byte{0}, body
	}
	return e.header(eac), body
}

// header is proto/dist.encodeDistHeaderAtomCache.
func (e *ergoEncoder) header(eac *etf.EncodingAtomCache) []byte {
	n := eac.Len()
	h := []byte{byte(n)}
	if n == 0 {
		return h
	}
	flags := make([]byte, n/2+1)
	var entries []byte
	for i, item := range eac.L {
		ci := e.sender[item.Name]
		seg := byte(item.ID >> 8)
		if !ci.Encoded {
			seg |= 8
		}
		flags[i/2] |= seg << uint((i&1)*4)
		entries = append(entries, byte(item.ID))
		if ci.Encoded {
			continue
		}
		if eac.HasLongAtom {
			entries = binary.BigEndian.AppendUint16(entries, uint16(len(item.Name)))
		} else {
			entries = append(entries, byte(len(item.Name)))
		}
		entries = append(entries, item.Name...)
		ci.Encoded = true
		e.sender[item.Name] = ci
	}
	if eac.HasLongAtom {
		flags[n/2] |= 1 << uint((n&1)*4)
	}
	return append(append(h, flags...), entries...)
}

// Hand-made encodings of terms ergo's encoder never produces (it has no
// case for ports, funs, exports, bit binaries, old floats, five-word
// references), straight from erl_ext_dist.

// smallAtom is SMALL_ATOM_UTF8_EXT.
func smallAtom(a string) []byte { return append([]byte{tagSmallAtomUTF8, byte(len(a))}, a...) }

// longRef is a NEWER_REFERENCE_EXT of len(words) words whose node is the
// encoded atom node.
func longRef(node []byte, creation uint32, words ...uint32) []byte {
	b := binary.BigEndian.AppendUint16([]byte{tagNewerRef}, uint16(len(words)))
	b = append(b, node...)
	b = binary.BigEndian.AppendUint32(b, creation)
	for _, w := range words {
		b = binary.BigEndian.AppendUint32(b, w)
	}
	return b
}

// rawTuple is a SMALL_TUPLE_EXT of already encoded elements.
func rawTuple(elems ...[]byte) []byte {
	b := []byte{tagSmallTuple, byte(len(elems))}
	for _, e := range elems {
		b = append(b, e...)
	}
	return b
}

// handMade is one term of every kind ergo cannot encode, with the number
// of NEWER_REFERENCE_EXTs in it.
func handMade() (term []byte, refs int) {
	node := smallAtom("erl@host")
	u32 := func(b []byte, v uint32) []byte { return binary.BigEndian.AppendUint32(b, v) }
	newPort := u32(u32(append([]byte{tagNewPort}, node...), 7), 3)
	v4Port := u32(binary.BigEndian.AppendUint64(append([]byte{tagV4Port}, node...), 1<<40), 3)
	oldPort := append(u32(append([]byte{tagPort}, node...), 7), 1)
	oldRef := append(u32(append([]byte{tagRef}, node...), 9), 1)
	newRef := append(append(binary.BigEndian.AppendUint16([]byte{tagNewRef}, 3), node...), 2)
	newRef = u32(u32(u32(newRef, 1), 2), 3)
	oldPid := append(u32(u32(append([]byte{tagPid}, node...), 1), 0), 2)
	export := append(append(append([]byte{tagExport}, smallAtom("lists")...), smallAtom("map")...), tagSmallInteger, 2)
	// NEW_FUN_EXT: Size counts itself and everything after the tag.
	funBody := append([]byte{1}, bytes.Repeat([]byte{0xab}, 16)...) // arity, uniq
	funBody = u32(u32(funBody, 0), 1)                               // index, numfree
	funBody = append(funBody, smallAtom("m")...)
	funBody = append(funBody, tagSmallInteger, 0, tagInteger, 0, 0, 0, 1)
	funBody = append(funBody, oldPid...)
	funBody = append(funBody, tagSmallInteger, 42) // the free variable
	fun := u32([]byte{tagNewFun}, uint32(4+len(funBody)))
	fun = append(fun, funBody...)
	bits := append(u32([]byte{tagBitBinary}, 3), 5, 1, 2, 0xe0)
	oldFloat := append([]byte{tagFloat}, []byte("1.50000000000000000000e+00\x00\x00\x00\x00\x00")...)
	largeBig := append(u32([]byte{tagLargeBig}, 300), 1)
	largeBig = append(largeBig, bytes.Repeat([]byte{0x5a}, 300)...)
	cachedNode := []byte{tagAtomCacheRef, 0}
	ref5 := longRef(node, 7, 1, 2, 3, 4, 5)
	ref4 := longRef(cachedNode, 7, 1, 2, 3, 4)
	return rawTuple(newPort, v4Port, oldPort, oldRef, newRef, oldPid, export, fun, bits,
		oldFloat, largeBig, ref5, rawTuple(ref4, ref5)), 3
}

// walkerCase is one message for the walker: its atom cache references and
// its two top-level terms, encoded.
type walkerCase struct {
	name  string
	atoms []string
	body  []byte
	refs  int // NEWER_REFERENCE_EXTs in body
	nodes []string
}

// walkerCases encodes, with ergo's own encoder, a control message and a
// payload holding every kind of term, alone and nested; plus the
// hand-made kinds.
func walkerCases(t testing.TB) []walkerCase {
	t.Helper()
	ref := func(node string, a uint32) etf.Ref {
		return etf.Ref{Node: etf.Atom(node), Creation: 5, ID: [5]uint32{a, a + 1, a + 2}}
	}
	pid := etf.Pid{Node: "erl@host", ID: 77, Creation: 5}
	huge := new(big.Int).Lsh(big.NewInt(1), 2100) // > 255 bytes: LARGE_BIG_EXT
	largeTuple := make(etf.Tuple, 300)
	for i := range largeTuple {
		largeTuple[i] = i
	}
	largeTuple[299] = ref("erl@host", 1)
	deep := etf.Term(ref("deep@host", 9))
	for i := range 200 {
		switch i % 4 {
		case 0:
			deep = etf.Tuple{etf.Atom("t"), deep, ref("erl@host", uint32(i))}
		case 1:
			deep = etf.List{deep, 1.5, []byte("x")}
		case 2:
			deep = etf.Map{etf.Atom("k"): deep}
		case 3:
			deep = etf.ListImproper{"s", deep, ref("erl@host", uint32(i))}
		}
	}
	payloads := []struct {
		name  string
		term  etf.Term
		refs  int
		nodes []string
	}{
		{"atoms", etf.Tuple{etf.Atom("ok"), true, false, etf.Atom(strings.Repeat("ä", 200)), etf.Atom("")}, 0, nil},
		{"integers", etf.List{0, 255, 256, -1, math.MaxInt32, math.MinInt32, int64(math.MaxInt64), int64(math.MinInt64), uint64(math.MaxUint64)}, 0, nil},
		{"bigs", etf.Tuple{*big.NewInt(-7), *huge}, 0, nil},
		{"floats", etf.Tuple{3.25, float32(-1), math.Inf(1)}, 0, nil},
		{"binaries", etf.Tuple{[]byte{}, []byte("bin"), bytes.Repeat([]byte{tagNewerRef}, 70000), etf.String("str")}, 0, nil},
		{"strings", etf.Tuple{"", "abc", etf.Charlist("zürich"), strings.Repeat("s", 60000)}, 0, nil},
		{"lists", etf.Tuple{etf.List{}, etf.List{1, etf.List{2}}, etf.ListImproper{1, etf.Atom("tail")}, etf.ListImproper{ref("erl@host", 3), ref("erl@host", 6)}}, 2, nil},
		{"tuples", etf.Tuple{etf.Tuple{}, largeTuple}, 1, nil},
		{"maps", etf.Map{ref("erl@host", 1): ref("other@host", 2), etf.Atom("m"): etf.Map{}}, 2, []string{"other@host"}},
		{"pids", etf.Tuple{pid, etf.Pid{Node: etf.Atom(strings.Repeat("ñ", 200) + "@h"), ID: 1 << 40}}, 0, nil},
		{"refs", etf.Tuple{ref("erl@host", 1), etf.Alias(ref("erl@host", 2)), ref("x@y", 1<<20)}, 3, []string{"x@y"}},
		{"deep", deep, 101, []string{"deep@host"}},
	}
	enc := newErgoEncoder(map[etf.Atom]int16{"erl@host": 3, "ok": 300, "t": 2047, "k": 5})
	var cases []walkerCase
	var cache atomTable // the receiving side's, shared by the messages as on a connection
	for _, p := range payloads {
		control := etf.Tuple{2, etf.Atom(""), pid} // SEND
		header, body := enc.message(t, control, p.term)
		atoms, n, err := readHeaderAtoms(header, &cache)
		if err != nil || n != len(header) {
			t.Fatalf("%s: readHeaderAtoms = %d, %v; want %d", p.name, n, err, len(header))
		}
		cases = append(cases, walkerCase{p.name, atoms, body, p.refs, append([]string{"erl@host"}, p.nodes...)})
	}
	// Encoded again: the atoms are cache references to entries the first
	// message defined.
	header, body := enc.message(t, etf.Tuple{22, ref("erl@host", 1)}, etf.Tuple{pid, ref("erl@host", 2)})
	atoms, _, err := readHeaderAtoms(header, &cache)
	if err != nil {
		t.Fatal(err)
	}
	cases = append(cases, walkerCase{"cached atoms", atoms, body, 2, []string{"erl@host"}})
	hand, refs := handMade()
	cases = append(cases, walkerCase{"hand-made kinds", []string{"erl@host"}, append(rawTuple(smallAtom("c")), hand...), refs, []string{"erl@host"}})
	return cases
}

// walkSplit walks body fed in the given chunk sizes (the last repeated as
// needed), carrying rest back in front of the next chunk as observe and
// repairOutgoing do. visit sees every reference; the emitted bytes are
// returned.
func walkSplit(t testing.TB, w *termWalker, body []byte, sizes []int, visit refVisitor) []byte {
	t.Helper()
	var out, carry []byte
	for i, pos := 0, 0; pos < len(body); i++ {
		n := min(sizes[min(i, len(sizes)-1)], len(body)-pos)
		b := append(append([]byte(nil), carry...), body[pos:pos+n]...)
		var rest []byte
		out, rest = w.walk(b, visit, true, out)
		if len(rest) > len(b) {
			t.Fatalf("rest of %d bytes from a walk of %d", len(rest), len(b))
		}
		carry = append(carry[:0], rest...)
		pos += n
	}
	return append(out, carry...)
}

// refCounter counts the references a walk meets and checks each one's node
// against a set; it replaces three-word ones with five words when grow is
// set, as restore does.
type refCounter struct {
	n     int
	nodes map[string]bool
	bad   []string
	grow  bool
}

func (c *refCounter) visit(node string, item []byte) []byte {
	c.n++
	if !c.nodes[node] {
		c.bad = append(c.bad, node)
	}
	if !c.grow || binary.BigEndian.Uint16(item[1:]) != 3 {
		return nil
	}
	out := append([]byte(nil), item...)
	binary.BigEndian.PutUint16(out[1:], 5)
	return binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(out, 0xdead), 0xbeef)
}

func TestTermWalkerFindsEveryReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, tc := range walkerCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			nodes := map[string]bool{}
			for _, n := range tc.nodes {
				nodes[n] = true
			}
			splits := map[string][]int{"whole": {len(tc.body)}, "byte by byte": {1}}
			for i := range 5 {
				var sizes []int
				for range 200 {
					sizes = append(sizes, 1+rng.IntN(1<<(1+i*3)))
				}
				splits["random "+string(rune('a'+i))] = sizes
			}
			var grown []byte
			for name, sizes := range splits {
				for _, grow := range []bool{false, true} {
					c := &refCounter{nodes: nodes, grow: grow}
					w := newTermWalker(tc.atoms, false)
					out := walkSplit(t, w, tc.body, sizes, c.visit)
					if w.broken != nil {
						t.Fatalf("%s: walker broken: %v", name, w.broken)
					}
					if !w.finished() || len(w.pending) != 1 || w.pending[0] != 0 {
						t.Errorf("%s: walker not finished after both terms: pending %v, skip %d", name, w.pending, w.skip)
					}
					if c.n != tc.refs {
						t.Errorf("%s: found %d references; want %d", name, c.n, tc.refs)
					}
					if len(c.bad) > 0 {
						t.Errorf("%s: references with unexpected nodes %q", name, c.bad)
					}
					switch {
					case !grow && !bytes.Equal(out, tc.body):
						t.Errorf("%s: emitted bytes differ from the input without replacements", name)
					case grow && grown == nil:
						grown = out
					case grow && !bytes.Equal(out, grown):
						t.Errorf("%s: emitted bytes with replacements differ between splits", name)
					}
				}
			}
			if tc.name == "hand-made kinds" {
				return // ergo's decoder does not know every hand-made kind
			}
			// The bytes with every reference grown to five words are still
			// two valid terms, and the references carry the new words.
			cache := make([]etf.Atom, len(tc.atoms))
			for i, a := range tc.atoms {
				cache[i] = etf.Atom(a)
			}
			rest := grown
			for i := range 2 {
				term, r, err := etf.Decode(rest, cache, etf.DecodeOptions{FlagBigPidRef: true})
				if err != nil {
					t.Fatalf("term %d of the grown bytes: etf.Decode: %v", i, err)
				}
				rest = r
				if i == 1 && tc.refs > 0 && !hasWord(term, 0xbeef) {
					t.Errorf("decoded payload has no reference with the added words: %v", term)
				}
			}
			if len(rest) != 0 {
				t.Errorf("%d bytes after the two terms", len(rest))
			}
		})
	}
}

// hasWord reports whether term holds a reference whose fifth word is w.
func hasWord(term etf.Term, w uint32) bool {
	found := false
	var visit func(v reflect.Value)
	visit = func(v reflect.Value) {
		if found || !v.IsValid() {
			return
		}
		if v.Kind() == reflect.Interface {
			v = v.Elem()
			if !v.IsValid() {
				return
			}
		}
		if r, ok := v.Interface().(etf.Ref); ok {
			found = r.ID[4] == w
			return
		}
		switch v.Kind() {
		case reflect.Slice:
			if v.Type().Elem().Kind() == reflect.Uint8 {
				return
			}
			for i := range v.Len() {
				visit(v.Index(i))
			}
		case reflect.Map:
			for _, k := range v.MapKeys() {
				visit(k)
				visit(v.MapIndex(k))
			}
		}
	}
	visit(reflect.ValueOf(term))
	return found
}

func TestTermWalkerVersioned(t *testing.T) {
	// A pass-through ('p') message: each top-level term has its version
	// byte.
	node := smallAtom("erl@host")
	body := append([]byte{tagVersion}, rawTuple([]byte{tagSmallInteger, 2}, longRef(node, 1, 1, 2, 3))...)
	body = append(append(body, tagVersion), longRef(node, 1, 4, 5, 6, 7, 8)...)
	for size := 1; size <= len(body); size++ {
		c := &refCounter{nodes: map[string]bool{"erl@host": true}}
		w := newTermWalker(nil, true)
		walkSplit(t, w, body, []int{size}, c.visit)
		if w.broken != nil || c.n != 2 || !w.finished() {
			t.Errorf("chunks of %d: broken %v, %d references (want 2), finished %v", size, w.broken, c.n, w.finished())
		}
	}
}

func TestTermWalkerMalformed(t *testing.T) {
	node := smallAtom("n@h")
	tests := []struct {
		name  string
		atoms []string
		body  []byte
	}{
		{"unknown tag", nil, []byte{200}},
		{"unknown tag deep", nil, []byte{tagSmallTuple, 2, tagNil, tagList, 0, 0, 0, 1, 201}},
		{"six-word reference", nil, longRef(node, 1, 1, 2, 3, 4, 5, 6)},
		{"fun of size 2", nil, []byte{tagNewFun, 0, 0, 0, 2}},
		{"bytes after the last term", nil, []byte{tagNil, tagNil, tagNil}},
		{"pid with a number for a node", nil, append([]byte{tagNewPid, tagSmallInteger, 1}, make([]byte, 12)...)},
		{"pid with an atom cache ref outside the header", []string{"a"}, append([]byte{tagNewPid, tagAtomCacheRef, 1}, make([]byte, 12)...)},
		{"reference with a cut-off atom longer than any header", nil, append([]byte{tagNewerRef, 0, 3, tagAtomUTF8, 0xff, 0xff}, make([]byte, maxCompositeHeader)...)},
	}
	for _, tt := range tests {
		for size := 1; size <= len(tt.body); size++ {
			w := newTermWalker(tt.atoms, false)
			visits := 0
			walkSplit(t, w, tt.body, []int{size}, func(string, []byte) []byte { visits++; return nil })
			if w.broken == nil {
				t.Errorf("%s, chunks of %d: walker not broken", tt.name, size)
			}
			if visits != 0 {
				t.Errorf("%s, chunks of %d: %d references visited in bytes that make no sense", tt.name, size, visits)
			}
		}
	}
	// Truncated terms are not malformed: the walk waits for more.
	_, body := newErgoEncoder(nil).message(t, etf.Tuple{2, etf.Atom(""), etf.Pid{Node: "a@b"}}, etf.Ref{Node: "a@b"})
	for cut := 1; cut < len(body); cut++ {
		w := newTermWalker(nil, false)
		_, rest := w.walk(body[:cut], nil, false, nil)
		if w.broken != nil || len(w.pending) == 1 && w.pending[0] == 0 && len(rest) == 0 {
			t.Errorf("cut at %d of %d: broken %v, pending %v", cut, len(body), w.broken, w.pending)
		}
	}
}

func TestReadHeaderAtoms(t *testing.T) {
	long := strings.Repeat("ä", 150) // 300 bytes: the header's long atoms
	enc := newErgoEncoder(map[etf.Atom]int16{"a": 0, "b": 255, "c": 256, "d": 2047, etf.Atom(long): 1000})
	var cache atomTable
	steps := []struct {
		name  string
		terms []etf.Term
		want  []string // the atoms of the message, in header order
	}{
		{"new entries", []etf.Term{etf.Tuple{etf.Atom("a"), etf.Atom("b")}, etf.Atom("c")}, []string{"a", "b", "c"}},
		{"cached entries", []etf.Term{etf.Tuple{etf.Atom("c"), etf.Atom("a")}}, []string{"c", "a"}},
		{"mixed, segment 7", []etf.Term{etf.List{etf.Atom("b"), etf.Atom("d")}}, []string{"b", "d"}},
		{"long atom", []etf.Term{etf.Tuple{etf.Atom(long), etf.Atom("a")}}, []string{long, "a"}},
		{"no atoms", []etf.Term{etf.Tuple{1, []byte("x")}}, nil},
		{"uncached atom", []etf.Term{etf.Atom("zzz")}, nil},
	}
	for _, st := range steps {
		header, body := enc.message(t, st.terms...)
		// Every cut of the header is incomplete and leaves the cache alone.
		for cut := range len(header) {
			before := cache
			if _, _, err := readHeaderAtoms(header[:cut], &cache); !errors.Is(err, errIncomplete) {
				t.Errorf("%s: header cut at %d of %d: err %v; want errIncomplete", st.name, cut, len(header), err)
			}
			if cache != before {
				t.Fatalf("%s: a header cut at %d changed the cache", st.name, cut)
			}
		}
		atoms, n, err := readHeaderAtoms(append(header, body...), &cache)
		if err != nil || n != len(header) {
			t.Fatalf("%s: readHeaderAtoms = %d, %v; want %d, nil", st.name, n, err, len(header))
		}
		if !reflect.DeepEqual(atoms, st.want) && !(len(atoms) == 0 && len(st.want) == 0) {
			t.Errorf("%s: atoms %q; want %q", st.name, atoms, st.want)
		}
		// ergo's decoder reads the terms with these atoms.
		decCache := make([]etf.Atom, len(atoms))
		for i, a := range atoms {
			decCache[i] = etf.Atom(a)
		}
		rest := body
		for range st.terms {
			if _, rest, err = etf.Decode(rest, decCache, etf.DecodeOptions{FlagBigPidRef: true}); err != nil {
				t.Fatalf("%s: etf.Decode: %v", st.name, err)
			}
		}
	}
	for slot, want := range map[int]string{0: "a", 255: "b", 256: "c", 2047: "d", 1000: long} {
		if cache[slot] != want {
			t.Errorf("cache slot %d = %q; want %q", slot, cache[slot], want)
		}
	}

	// A header that defines a slot and refers to it again: the second
	// reference sees the new entry, not the old one.
	cache = atomTable{}
	cache[9] = "old"
	h := []byte{2, 0x08 | 0x00<<4, 0, 9, 3, 'n', 'e', 'w', 9}
	atoms, n, err := readHeaderAtoms(h, &cache)
	if err != nil || n != len(h) || !reflect.DeepEqual(atoms, []string{"new", "new"}) || cache[9] != "new" {
		t.Errorf("define then reuse slot 9: %q, %d, %v, cache %q; want [new new], %d", atoms, n, err, cache[9], len(h))
	}
}
