// Package epmd implements the Erlang Port Mapper Daemon protocol, as
// documented in the "Distribution Protocol" chapter of the ERTS User's
// Guide: a [Server] that answers it over any [net.Listener], a [Client]
// that asks it over any dialer, and the [Registry] of node names both sides
// agree on.
//
// tsdist runs the server on every helper's tailnet address, so an Erlang
// node finds another node's distribution port by asking the EPMD of the
// tailnet host it lives on, exactly as it would ask a real epmd.
//
// Every request on the wire is a 2-byte big-endian length followed by that
// many bytes, the first of which is the request's tag. Responses have no
// length prefix; their shape depends on the request.
package epmd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"unicode/utf8"
)

// DefaultPort is the TCP port EPMD listens on.
const DefaultPort = 4369

// Request and response tags, as in the protocol document.
const (
	tagAlive2Req   = 'x' // 120
	tagAlive2Resp  = 'y' // 121
	tagAlive2XResp = 'v' // 118
	tagPort2Req    = 'z' // 122
	tagPort2Resp   = 'w' // 119
	tagNamesReq    = 'n' // 110
	tagDumpReq     = 'd' // 100
	tagKillReq     = 'k' // 107
	tagStopReq     = 's' // 115
)

// Node types carried by ALIVE2_REQ and PORT2_RESP.
const (
	NodeTypeNormal = 77 // an ordinary node, visible in nodes()
	NodeTypeHidden = 72 // a hidden node (-hidden, or a C/Go node)
)

// ProtocolTCP is the only protocol value Erlang nodes register with: TCP
// over IPv4 (which also covers nodes that speak IPv6 or another carrier;
// EPMD never looks at it).
const ProtocolTCP = 0

// extendedCreationVersion is the lowest HighestVersion for which EPMD
// answers ALIVE2_REQ with ALIVE2_X_RESP (32-bit creation) rather than
// ALIVE2_RESP (16-bit creation): distribution protocol version 6, OTP 23.
const extendedCreationVersion = 6

// Limits of the protocol as real EPMD enforces them.
const (
	// MaxNameLen is the longest node name, in bytes.
	MaxNameLen = 255
	// MaxExtraLen is the longest Extra field of a registration, in bytes.
	MaxExtraLen = 255
	// MaxRequestLen is the largest request body this package reads: an
	// ALIVE2_REQ with the longest name and extra. Anything longer is
	// refused before it is read.
	MaxRequestLen = 13 + MaxNameLen + MaxExtraLen
)

// Node is what a node registers with EPMD and what PORT_PLEASE2_REQ
// returns for it.
type Node struct {
	// Name is the node name's part before the '@' ("app" for app@alpha).
	Name string
	// Port is the TCP port the node accepts distribution connections on.
	Port uint16
	// Type is NodeTypeNormal or NodeTypeHidden.
	Type uint8
	// Protocol is ProtocolTCP.
	Protocol uint8
	// HighestVersion and LowestVersion bound the distribution protocol
	// versions the node speaks (6 and 5 for OTP 23 and later).
	HighestVersion uint16
	LowestVersion  uint16
	// Extra is opaque data the node registered with; usually empty.
	Extra []byte
}

// NameEntry is one line of a NAMES_REQ answer.
type NameEntry struct {
	Name string `json:"name"`
	Port int    `json:"port"`
}

// Errors this package returns, wrapped with detail; test with errors.Is.
var (
	// ErrMalformed is a request or response that does not follow the
	// protocol.
	ErrMalformed = errors.New("epmd: malformed message")
	// ErrInvalidName is a node name EPMD does not accept.
	ErrInvalidName = errors.New("epmd: invalid node name")
	// ErrNameTaken is a registration of a name that is already registered.
	ErrNameTaken = errors.New("epmd: node name already registered")
	// ErrNotRegistered is a PORT_PLEASE2_REQ for a name nobody registered.
	ErrNotRegistered = errors.New("epmd: node name not registered")
	// ErrRefused is a registration the server refused.
	ErrRefused = errors.New("epmd: registration refused")
)

// ValidName reports whether name is acceptable as a registered node name:
// 1 to 255 bytes of UTF-8 with no '@', no control characters and no
// spaces. Real EPMD checks only length, encoding and NUL; the rest keeps a
// name printable in a NAMES answer ("name N at port P\n") and valid as the
// first half of a node name, so one peer cannot garble what every other
// client reads.
func ValidName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("%w: empty", ErrInvalidName)
	case len(name) > MaxNameLen:
		return fmt.Errorf("%w: %d bytes, more than %d", ErrInvalidName, len(name), MaxNameLen)
	case !utf8.ValidString(name):
		return fmt.Errorf("%w: %q is not UTF-8", ErrInvalidName, name)
	}
	for _, r := range name {
		if r == '@' || r <= ' ' || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return fmt.Errorf("%w: %q contains %q", ErrInvalidName, name, r)
		}
	}
	return nil
}

// A request is one parsed EPMD request.
type request interface{ tag() byte }

type alive2Request struct{ node Node }
type portPleaseRequest struct{ name string }
type namesRequest struct{}

// refusedRequest is a request this server understands but never honours
// from the network: DUMP_REQ, KILL_REQ and STOP_REQ.
type refusedRequest struct{ t byte }

func (alive2Request) tag() byte       { return tagAlive2Req }
func (portPleaseRequest) tag() byte   { return tagPort2Req }
func (namesRequest) tag() byte        { return tagNamesReq }
func (r refusedRequest) tag() byte    { return r.t }
func (r refusedRequest) name() string { return refusedNames[r.t] }

var refusedNames = map[byte]string{tagDumpReq: "DUMP_REQ", tagKillReq: "KILL_REQ", tagStopReq: "STOP_REQ"}

// readRequest reads one length-prefixed request body from r. It refuses a
// zero or over-long length before reading the body, so a peer cannot make
// it allocate more than MaxRequestLen bytes.
func readRequest(r io.Reader) ([]byte, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint16(hdr[:]))
	if n == 0 || n > MaxRequestLen {
		return nil, fmt.Errorf("%w: request length %d (want 1 to %d)", ErrMalformed, n, MaxRequestLen)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("%w: request cut short: %w", ErrMalformed, err)
	}
	return body, nil
}

// parseRequest parses a request body (without its length prefix).
func parseRequest(b []byte) (request, error) {
	if len(b) == 0 {
		return nil, fmt.Errorf("%w: empty request", ErrMalformed)
	}
	switch b[0] {
	case tagAlive2Req:
		n, err := parseAlive2(b[1:])
		if err != nil {
			return nil, err
		}
		return alive2Request{n}, nil
	case tagPort2Req:
		name := b[1:]
		// Some clients (erl_interface of old) send the name NUL-terminated.
		if len(name) > 0 && name[len(name)-1] == 0 {
			name = name[:len(name)-1]
		}
		// Like real EPMD, close on a name that no EPMD could hold (empty,
		// NUL, not UTF-8, over 255 characters) but answer "not registered"
		// for any other, even one ValidName refuses: that is the truth.
		switch {
		case len(name) == 0:
			return nil, fmt.Errorf("%w: PORT_PLEASE2_REQ with an empty name", ErrMalformed)
		case bytes.IndexByte(name, 0) >= 0, !utf8.Valid(name), utf8.RuneCount(name) > MaxNameLen:
			return nil, fmt.Errorf("%w: PORT_PLEASE2_REQ for %q", ErrMalformed, name)
		}
		return portPleaseRequest{string(name)}, nil
	case tagNamesReq:
		if len(b) != 1 {
			return nil, fmt.Errorf("%w: NAMES_REQ has %d bytes after its tag", ErrMalformed, len(b)-1)
		}
		return namesRequest{}, nil
	case tagDumpReq, tagKillReq, tagStopReq:
		return refusedRequest{b[0]}, nil
	}
	return nil, fmt.Errorf("%w: unknown request tag %d", ErrMalformed, b[0])
}

// parseAlive2 parses the body of an ALIVE2_REQ after its tag:
// PortNo(2) NodeType(1) Protocol(1) HighestVersion(2) LowestVersion(2)
// Nlen(2) NodeName(Nlen) Elen(2) Extra(Elen).
//
// It checks the framing only. What was registered (name, port, extra) is
// for [Registry.Register] to accept or refuse, and a refusal is answered
// with an ALIVE2 error result, as real EPMD answers a name it refuses.
func parseAlive2(b []byte) (Node, error) {
	const fixed = 10
	if len(b) < fixed {
		return Node{}, fmt.Errorf("%w: ALIVE2_REQ of %d bytes is too short", ErrMalformed, len(b)+1)
	}
	n := parseNodeFixed(b)
	nlen := int(binary.BigEndian.Uint16(b[8:]))
	rest := b[fixed:]
	if len(rest) < nlen+2 {
		return Node{}, fmt.Errorf("%w: ALIVE2_REQ name length %d overruns the request", ErrMalformed, nlen)
	}
	n.Name = string(rest[:nlen])
	rest = rest[nlen:]
	elen := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != elen {
		return Node{}, fmt.Errorf("%w: ALIVE2_REQ extra length %d, but %d bytes follow", ErrMalformed, elen, len(rest))
	}
	if elen > 0 {
		n.Extra = append([]byte(nil), rest...)
	}
	return n, nil
}

// appendRequestHeader appends the 2-byte length of a body of size n.
func appendRequestHeader(b []byte, n int) []byte {
	return binary.BigEndian.AppendUint16(b, uint16(n))
}

// nodeFixedLen is the size of the fields ALIVE2_REQ and PORT2_RESP both
// start a node with: PortNo(2) NodeType(1) Protocol(1) HighestVersion(2)
// LowestVersion(2).
const nodeFixedLen = 8

// parseNodeFixed reads those fields from the first nodeFixedLen bytes of b.
func parseNodeFixed(b []byte) Node {
	return Node{
		Port:           binary.BigEndian.Uint16(b[0:]),
		Type:           b[2],
		Protocol:       b[3],
		HighestVersion: binary.BigEndian.Uint16(b[4:]),
		LowestVersion:  binary.BigEndian.Uint16(b[6:]),
	}
}

// appendNode appends a node as ALIVE2_REQ and PORT2_RESP carry it: the
// fixed fields, then Nlen(2) NodeName Elen(2) Extra.
func appendNode(b []byte, n Node) []byte {
	b = binary.BigEndian.AppendUint16(b, n.Port)
	b = append(b, n.Type, n.Protocol)
	b = binary.BigEndian.AppendUint16(b, n.HighestVersion)
	b = binary.BigEndian.AppendUint16(b, n.LowestVersion)
	b = binary.BigEndian.AppendUint16(b, uint16(len(n.Name)))
	b = append(b, n.Name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(n.Extra)))
	return append(b, n.Extra...)
}

// appendAlive2Request appends a complete ALIVE2_REQ (with length prefix).
func appendAlive2Request(b []byte, n Node) []byte {
	b = appendRequestHeader(b, 1+nodeFixedLen+4+len(n.Name)+len(n.Extra))
	b = append(b, tagAlive2Req)
	return appendNode(b, n)
}

// refusedCreation is the creation real EPMD puts in a refusal.
const refusedCreation = 99

// appendAlive2Response appends the answer to an ALIVE2_REQ from a node that
// speaks highestVersion: ALIVE2_X_RESP with a 32-bit creation for version 6
// and later, else ALIVE2_RESP with a creation of 1 to 3. result is 0 for
// success; any other result is a refusal, which carries creation 99 (and
// ignores the creation given), byte for byte what real EPMD sends.
func appendAlive2Response(b []byte, highestVersion uint16, result uint8, creation uint32) []byte {
	if result != 0 {
		creation = refusedCreation
	}
	if highestVersion >= extendedCreationVersion {
		b = append(b, tagAlive2XResp, result)
		return binary.BigEndian.AppendUint32(b, creation)
	}
	if result == 0 {
		creation = creation%3 + 1
	}
	b = append(b, tagAlive2Resp, result)
	return binary.BigEndian.AppendUint16(b, uint16(creation))
}

// appendPort2Response appends the answer to a PORT_PLEASE2_REQ: the node's
// registration, or (n == nil) the 2-byte "not registered" answer.
func appendPort2Response(b []byte, n *Node) []byte {
	if n == nil {
		return append(b, tagPort2Resp, 1)
	}
	b = append(b, tagPort2Resp, 0)
	return appendNode(b, *n)
}

// appendNamesResponse appends the answer to a NAMES_REQ: EPMD's own port
// as 4 bytes, then one "name N at port P\n" line per registered node.
func appendNamesResponse(b []byte, epmdPort uint32, names []NameEntry) []byte {
	b = binary.BigEndian.AppendUint32(b, epmdPort)
	for _, e := range names {
		b = fmt.Appendf(b, "name %s at port %d\n", e.Name, e.Port)
	}
	return b
}
