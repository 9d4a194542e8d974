package ergonode

import (
	"encoding/binary"
	"sync"
)

// maxRememberedRefs bounds the long-reference table: about 10 MB at worst.
// A reply to a call from OTP 26+ is repaired as long as fewer than this many
// long references arrived after the call's own; at 10,000 calls a second
// that is 13 s.
const maxRememberedRefs = 1 << 17

// refKey is what ergo keeps of a reference: its node, creation and first
// three words (the first one cut to 18 bits, as ergo's decoder does).
type refKey struct {
	node     string
	creation uint32
	words    [3]uint32
}

// longRefs remembers the references of more than three words that peers
// sent (OTP 26+ uses five-word references for process aliases), so that
// when ergo, which always encodes three words, sends one back, the missing
// words can be put back. It is shared by all of a node's connections, as a
// reference can reach the node over one and leave over another. It holds at
// most maxRememberedRefs, forgetting the oldest first.
type longRefs struct {
	mu    sync.Mutex
	words map[refKey][]byte // the original ID words, 4*len bytes
	order []refKey          // a ring of keys in arrival order
	next  int
}

func newLongRefs() *longRefs {
	return &longRefs{words: make(map[refKey][]byte)}
}

// parseRef splits a NEWER_REFERENCE_EXT (item, node resolved by the caller)
// into its key and its ID words.
func parseRef(node string, item []byte) (key refKey, ids []byte, ok bool) {
	if len(item) < 3 || item[0] != tagNewerRef {
		return refKey{}, nil, false
	}
	n := int(binary.BigEndian.Uint16(item[1:]))
	if n < 3 || len(item) < 4+4*n {
		return refKey{}, nil, false
	}
	ids = item[len(item)-4*n:]
	key = refKey{node: node, creation: binary.BigEndian.Uint32(item[len(item)-4*n-4:])}
	for i := range 3 {
		key.words[i] = binary.BigEndian.Uint32(ids[4*i:])
	}
	key.words[0] &= 1<<18 - 1
	return key, ids, true
}

// remember records item if it has more than three words.
func (t *longRefs) remember(node string, item []byte) {
	key, ids, ok := parseRef(node, item)
	if !ok || len(ids) == 12 {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, known := t.words[key]; known {
		return
	}
	if len(t.order) < maxRememberedRefs {
		t.order = append(t.order, key)
	} else {
		delete(t.words, t.order[t.next])
		t.order[t.next] = key
		t.next = (t.next + 1) % maxRememberedRefs
	}
	t.words[key] = append([]byte(nil), ids...)
}

// empty reports whether no long reference is remembered, so that outgoing
// messages need no walk at all.
func (t *longRefs) empty() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.words) == 0
}

// restore returns item with its remembered words put back, or nil if item
// is not a shortened long reference.
func (t *longRefs) restore(node string, item []byte) []byte {
	key, ids, ok := parseRef(node, item)
	if !ok || len(ids) != 12 {
		return nil
	}
	t.mu.Lock()
	words, known := t.words[key]
	t.mu.Unlock()
	if !known {
		return nil
	}
	out := make([]byte, 0, len(item)-12+len(words))
	out = append(out, item[:len(item)-12]...)
	binary.BigEndian.PutUint16(out[1:], uint16(len(words)/4))
	return append(out, words...)
}
