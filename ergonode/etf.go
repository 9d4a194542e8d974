package ergonode

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// External term format tags this package reads (erts's erl_ext_dist).
const (
	tagVersion         = 131
	tagNewFloat        = 70
	tagBitBinary       = 77
	tagAtomCacheRef    = 82
	tagNewPid          = 88
	tagNewPort         = 89
	tagNewerRef        = 90
	tagSmallInteger    = 97
	tagInteger         = 98
	tagFloat           = 99
	tagAtom            = 100
	tagRef             = 101
	tagPort            = 102
	tagPid             = 103
	tagSmallTuple      = 104
	tagLargeTuple      = 105
	tagNil             = 106
	tagString          = 107
	tagList            = 108
	tagBinary          = 109
	tagSmallBig        = 110
	tagLargeBig        = 111
	tagNewFun          = 112
	tagExport          = 113
	tagNewRef          = 114
	tagSmallAtom       = 115
	tagMap             = 116
	tagAtomUTF8        = 118
	tagSmallAtomUTF8   = 119
	tagV4Port          = 120
	maxAtomBytes       = 255 * 4 // 255 characters of up to 4 UTF-8 bytes
	maxRefWords        = 5
	maxCompositeHeader = 1 + 2 + 3 + maxAtomBytes + 4 + 4*maxRefWords // the largest pid/port/ref
)

// errIncomplete means the bytes end inside a term's header: the caller
// holds them back until more arrive.
var errIncomplete = errors.New("incomplete term")

// atomTable is one direction's atom cache as the distribution header
// describes it: 2048 slots, filled by "new entry" references and read back
// by later messages.
type atomTable [2048]string

// readHeaderAtoms parses a normal distribution header's atom cache part
// (starting at NumberOfAtomCacheRefs), updating cache, and returns the
// atoms the message's ATOM_CACHE_REFs index and the header's length.
// It returns errIncomplete if b ends inside the header.
func readHeaderAtoms(b []byte, cache *atomTable) (atoms []string, n int, err error) {
	if len(b) < 1 {
		return nil, 0, errIncomplete
	}
	refs := int(b[0])
	if refs == 0 {
		return nil, 1, nil
	}
	flagsLen := refs/2 + 1
	if len(b) < 1+flagsLen {
		return nil, 0, errIncomplete
	}
	flags := b[1 : 1+flagsLen]
	longAtoms := (flags[refs/2]>>(uint(refs&1)*4))&1 == 1
	pos := 1 + flagsLen
	atoms = make([]string, refs)
	// Entries are applied to the cache only once the whole header is
	// here, so that a header split across reads is parsed exactly once.
	type update struct {
		slot int
		atom string
	}
	var updates []update
	for i := 0; i < refs; i++ {
		flag := (flags[i/2] >> (uint(i&1) * 4)) & 0x0f
		if pos >= len(b) {
			return nil, 0, errIncomplete
		}
		slot := int(flag&0x07)<<8 | int(b[pos])
		pos++
		if flag&0x08 == 0 {
			atoms[i] = cache[slot]
			for _, u := range updates { // an earlier entry of this header
				if u.slot == slot {
					atoms[i] = u.atom
				}
			}
			continue
		}
		var l int
		if longAtoms {
			if pos+2 > len(b) {
				return nil, 0, errIncomplete
			}
			l = int(binary.BigEndian.Uint16(b[pos:]))
			pos += 2
		} else {
			if pos+1 > len(b) {
				return nil, 0, errIncomplete
			}
			l = int(b[pos])
			pos++
		}
		if pos+l > len(b) {
			return nil, 0, errIncomplete
		}
		atoms[i] = string(b[pos : pos+l])
		updates = append(updates, update{slot, atoms[i]})
		pos += l
	}
	for _, u := range updates {
		cache[u.slot] = u.atom
	}
	return atoms, pos, nil
}

// readAtom reads an atom term at the start of b, resolving cache
// references through atoms. It returns the atom and its encoded length.
func readAtom(b []byte, atoms []string) (string, int, error) {
	if len(b) < 1 {
		return "", 0, errIncomplete
	}
	var hdr, l int
	switch b[0] {
	case tagAtomCacheRef:
		if len(b) < 2 {
			return "", 0, errIncomplete
		}
		i := int(b[1])
		if i >= len(atoms) {
			return "", 0, fmt.Errorf("atom cache reference %d outside the header's %d", i, len(atoms))
		}
		return atoms[i], 2, nil
	case tagSmallAtom, tagSmallAtomUTF8:
		if len(b) < 2 {
			return "", 0, errIncomplete
		}
		hdr, l = 2, int(b[1])
	case tagAtom, tagAtomUTF8:
		if len(b) < 3 {
			return "", 0, errIncomplete
		}
		hdr, l = 3, int(binary.BigEndian.Uint16(b[1:]))
	default:
		return "", 0, fmt.Errorf("tag %d where an atom belongs", b[0])
	}
	if len(b) < hdr+l {
		return "", 0, errIncomplete
	}
	return string(b[hdr : hdr+l]), hdr + l, nil
}

// appendAtom encodes atom literally (no cache reference), as UTF-8.
func appendAtom(dst []byte, atom string) []byte {
	if len(atom) < 256 {
		return append(append(dst, tagSmallAtomUTF8, byte(len(atom))), atom...)
	}
	dst = append(dst, tagAtomUTF8)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(atom)))
	return append(dst, atom...)
}

// refVisitor sees each complete NEWER_REFERENCE_EXT a walk meets: node is
// its node atom, item its whole encoding. It returns the bytes to put in
// its place, or nil to keep it.
type refVisitor func(node string, item []byte) []byte

// termWalker steps through the terms of one distribution message (its
// control message and its payload) as their bytes arrive, possibly split
// across frames and reads, without holding more than one term header: a
// binary's contents are counted past, not buffered. It finds every
// reference, however deep, which is what the reference repair needs.
type termWalker struct {
	atoms   []string // the message's atom cache references
	pending []int    // terms still to walk at each nesting level
	skip    int      // bytes of the current term's body still to pass
	version bool     // a top-level term starts with the version byte ('p' messages)
	broken  error    // set once the bytes stop making sense; the rest passes unseen
}

// newTermWalker returns a walker for a message of two top-level terms (a
// control message and, for most operations, a payload).
func newTermWalker(atoms []string, versioned bool) *termWalker {
	return &termWalker{atoms: atoms, pending: []int{2}, version: versioned}
}

// walk consumes b. Every reference found is offered to visit; when emit is
// true the bytes walked, with visit's replacements, are appended to out.
// rest is the tail of b that ends inside a term header: the caller must
// pass it again, followed by the next bytes. A walker that hits bytes it
// cannot parse stops looking (broken) and passes everything through.
func (w *termWalker) walk(b []byte, visit refVisitor, emit bool, out []byte) (_ []byte, rest []byte) {
	start := 0 // first byte not yet appended to out
	pos := 0
	flush := func(upto int) {
		if emit {
			out = append(out, b[start:upto]...)
		}
		start = upto
	}
	for pos < len(b) {
		if w.broken != nil {
			pos = len(b)
			break
		}
		if w.skip > 0 {
			n := min(w.skip, len(b)-pos)
			w.skip -= n
			pos += n
			continue
		}
		if len(w.pending) == 1 && w.pending[0] == 0 {
			w.broken = errors.New("bytes after the message's last term")
			pos = len(b)
			break
		}
		if w.version && len(w.pending) == 1 && b[pos] == tagVersion {
			pos++
			continue
		}
		n, children, err := w.header(b[pos:])
		if err == errIncomplete {
			if len(b)-pos > maxCompositeHeader {
				w.broken = fmt.Errorf("a term header longer than %d bytes", maxCompositeHeader)
				pos = len(b)
				break
			}
			flush(pos)
			return out, b[pos:]
		}
		if err != nil {
			w.broken = err
			pos = len(b)
			break
		}
		if b[pos] == tagNewerRef && visit != nil {
			node, _, _ := readAtom(b[pos+3:], w.atoms)
			if repl := visit(node, b[pos:pos+n]); repl != nil {
				flush(pos)
				if emit {
					out = append(out, repl...)
				}
				start = pos + n
			}
		}
		pos += n
		w.advance(children)
	}
	flush(pos)
	return out, nil
}

// advance records that one term at the current level has been read and
// that children terms nested in it come next.
func (w *termWalker) advance(children int) {
	w.pending[len(w.pending)-1]--
	if children > 0 {
		w.pending = append(w.pending, children)
		return
	}
	for len(w.pending) > 1 && w.pending[len(w.pending)-1] == 0 {
		w.pending = w.pending[:len(w.pending)-1]
	}
}

// finished reports whether the walker has seen complete terms only.
func (w *termWalker) finished() bool { return w.skip == 0 && len(w.pending) == 1 }

// header parses the term header at the start of b. n is the number of
// bytes it takes (for pids, ports and references: the whole term), and
// children the number of terms nested in it. Bodies of binaries, strings,
// atoms and bignums are left in w.skip.
func (w *termWalker) header(b []byte) (n, children int, err error) {
	need := func(k int) error {
		if len(b) < k {
			return errIncomplete
		}
		return nil
	}
	u16 := func(i int) int { return int(binary.BigEndian.Uint16(b[i:])) }
	u32 := func(i int) int { return int(binary.BigEndian.Uint32(b[i:])) }
	body := func(hdr, l int) (int, int, error) {
		w.skip = l
		return hdr, 0, nil
	}
	// node is for pids, ports and references: an atom, then fixed bytes.
	node := func(at, tail int) (int, int, error) {
		_, an, err := readAtom(b[at:], w.atoms)
		if err != nil {
			return 0, 0, err
		}
		if err := need(at + an + tail); err != nil {
			return 0, 0, err
		}
		return at + an + tail, 0, nil
	}
	switch b[0] {
	case tagSmallInteger:
		return 2, 0, need(2)
	case tagInteger:
		return 5, 0, need(5)
	case tagNewFloat:
		return 9, 0, need(9)
	case tagFloat:
		return 32, 0, need(32)
	case tagNil:
		return 1, 0, nil
	case tagAtomCacheRef:
		return 2, 0, need(2)
	case tagSmallAtom, tagSmallAtomUTF8:
		if err := need(2); err != nil {
			return 0, 0, err
		}
		return body(2, int(b[1]))
	case tagAtom, tagAtomUTF8, tagString:
		if err := need(3); err != nil {
			return 0, 0, err
		}
		return body(3, u16(1))
	case tagBinary:
		if err := need(5); err != nil {
			return 0, 0, err
		}
		return body(5, u32(1))
	case tagBitBinary:
		if err := need(6); err != nil {
			return 0, 0, err
		}
		return body(6, u32(1))
	case tagSmallBig:
		if err := need(3); err != nil {
			return 0, 0, err
		}
		return body(3, int(b[1]))
	case tagLargeBig:
		if err := need(6); err != nil {
			return 0, 0, err
		}
		return body(6, u32(1))
	case tagNewFun:
		if err := need(5); err != nil {
			return 0, 0, err
		}
		size := u32(1) // counts itself, not the tag
		if size < 4 {
			return 0, 0, fmt.Errorf("NEW_FUN_EXT of size %d", size)
		}
		return body(5, size-4)
	case tagSmallTuple:
		if err := need(2); err != nil {
			return 0, 0, err
		}
		return 2, int(b[1]), nil
	case tagLargeTuple:
		if err := need(5); err != nil {
			return 0, 0, err
		}
		return 5, u32(1), nil
	case tagList:
		if err := need(5); err != nil {
			return 0, 0, err
		}
		return 5, u32(1) + 1, nil // the elements and the tail
	case tagMap:
		if err := need(5); err != nil {
			return 0, 0, err
		}
		return 5, 2 * u32(1), nil
	case tagExport:
		return 1, 3, nil
	case tagNewPid:
		return node(1, 12)
	case tagPid:
		return node(1, 9)
	case tagNewPort:
		return node(1, 8)
	case tagV4Port:
		return node(1, 12)
	case tagPort:
		return node(1, 5)
	case tagRef:
		return node(1, 5)
	case tagNewerRef, tagNewRef:
		if err := need(3); err != nil {
			return 0, 0, err
		}
		words := u16(1)
		if words > maxRefWords {
			return 0, 0, fmt.Errorf("reference of %d words", words)
		}
		creation := 4
		if b[0] == tagNewRef {
			creation = 1
		}
		return node(3, creation+4*words)
	}
	return 0, 0, fmt.Errorf("unknown term tag %d", b[0])
}
