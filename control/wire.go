// Package control is the tsdist control protocol: how a local program (a BEAM
// node, a Go test, the tsdist CLI) asks a tsdist helper to listen, dial and
// describe the tailnet, and receives tailnet connections as file descriptors.
//
// The protocol runs over a Unix stream socket. Every message is a frame: a
// 4-byte big-endian length followed by that many bytes of one JSON object.
// Requests carry an "id" chosen by the client; each gets exactly one
// response with the same id, in any order. Events (accepted connections)
// carry no id. A message that brings a connection has "fd": true, and the
// connection's descriptor arrives as SCM_RIGHTS on the frame's first byte.
// docs/control-protocol.md is the full specification.
package control

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/epmd"
)

// Version is the protocol version this package speaks.
const Version = 1

// Frame size limits. A request larger than MaxRequestSize is refused and the
// connection closed, since its stream can no longer be trusted.
const (
	MaxRequestSize  = 64 << 10
	MaxResponseSize = 16 << 20
)

// Ops, the "op" of a request.
const (
	OpHello    = "hello"
	OpStatus   = "status"
	OpWhoIs    = "whois"
	OpListen   = "listen"
	OpUnlisten = "unlisten"
	OpDial     = "dial"
	OpStats    = "stats"
	// EPMD: names registered on this helper, and lookups on tailnet hosts.
	OpRegister   = "register"
	OpUnregister = "unregister"
	OpPortPlease = "port_please"
	OpNames      = "names"
	// Access: replace the policy of who may reach this node.
	OpSetPolicy = "set_policy"
	// Discovery: have peers events sent on every change of the tailnet.
	OpWatchPeers = "watch_peers"
)

// EventAccept is the "event" of a message bringing an accepted connection.
const EventAccept = "accept"

// EventPeers is the "event" of a message with the tailnet's peers, sent
// after watch_peers and on every change.
const EventPeers = "peers"

// PeersEvent is the peers event: every peer of this node, as in status
// (without the per-path fields direct and relay).
type PeersEvent struct {
	Event string         `json:"event"`
	Peers []carrier.Peer `json:"peers"`
}

// Error codes, the "code" of an error response.
const (
	CodeBadRequest    = "bad_request"         // not a valid request: bad JSON, missing or bad field
	CodeTooLarge      = "too_large"           // frame over MaxRequestSize; the connection is closed
	CodeHelloRequired = "hello_required"      // the first request must be hello
	CodeVersion       = "unsupported_version" // hello asked for a version the helper lacks
	CodeUnknownOp     = "unknown_op"          // op not known to this helper
	CodeNotRunning    = "not_running"         // the node is not (yet) on the tailnet
	CodeUnknownHost   = "unknown_host"        // host or address is not on the tailnet
	CodeDialFailed    = "dial_failed"         // the tailnet connection could not be made
	CodeTimeout       = "timeout"             // the request's time ran out
	CodePortInUse     = "port_in_use"         // another listener holds the port
	CodeNotListening  = "not_listening"       // unlisten of a port this client does not hold
	CodeBusy          = "busy"                // too many requests in flight on this connection
	CodeInternal      = "internal"            // the helper failed; the message says how
	CodeInvalidName   = "invalid_name"        // a node name EPMD does not accept
	CodeNameTaken     = "name_taken"          // register of a name a live registration holds
	CodeNotRegistered = "not_registered"      // no node of that name on that host
	CodeEPMDFailed    = "epmd_failed"         // the host's EPMD could not be reached or answered badly
	CodeNotAllowed    = "not_allowed"         // the host is a device the access policy does not admit; nothing was sent to it
)

// Request is a client's request. Which fields matter depends on Op; unknown
// fields are ignored, so newer clients can talk to older helpers.
type Request struct {
	ID uint64 `json:"id"`
	Op string `json:"op"`

	// hello
	Version int    `json:"version,omitempty"`
	Client  string `json:"client,omitempty"`
	// listen, unlisten, dial, register
	Port int `json:"port,omitempty"`
	// dial, port_please, names
	Host string `json:"host,omitempty"`
	// dial, whois, listen, port_please, names
	TimeoutMS int `json:"timeout_ms,omitempty"`
	// whois
	Addr string `json:"addr,omitempty"`
	// register, unregister, port_please
	Name string `json:"name,omitempty"`
	// register
	Hidden         bool   `json:"hidden,omitempty"`
	HighestVersion int    `json:"highest_version,omitempty"`
	LowestVersion  int    `json:"lowest_version,omitempty"`
	Extra          []byte `json:"extra,omitempty"`
	// set_policy
	Rules string `json:"rules,omitempty"`
}

// Distribution protocol versions a registration claims when the request
// gives none: those of OTP 23 and later.
const (
	DefaultHighestVersion = 6
	DefaultLowestVersion  = 5
)

// Response answers the request with the same ID. Exactly one of Result
// (OK true) and Error (OK false) is set. FD marks a response that brings a
// connection's descriptor.
type Response struct {
	ID     uint64          `json:"id"`
	OK     bool            `json:"ok"`
	FD     bool            `json:"fd,omitempty"`
	Result json.RawMessage `json:"result,omitempty"`
	Error  *Error          `json:"error,omitempty"`

	fdFile *os.File // the descriptor that came with it, on the client side
}

// Event is a message the helper sends on its own: today only "accept", an
// accepted tailnet connection whose descriptor rides along (FD is true).
type Event struct {
	Event        string            `json:"event"`
	FD           bool              `json:"fd"`
	ListenerPort int               `json:"listener_port"`
	Peer         *carrier.Identity `json:"peer"`
}

// Error is an error response, and the error a Client returns for one.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	// Peer is the device found, for not_allowed: who the name would have
	// meant had the policy admitted it.
	Peer *carrier.Identity `json:"peer,omitempty"`
}

func (e *Error) Error() string { return e.Code + ": " + e.Message }

// Is makes errors.Is match two *Error values by code.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code
}

// HelloResult is the result of hello.
type HelloResult struct {
	Version  int    `json:"version"`
	Helper   string `json:"helper"`   // the helper's own version string
	Hostname string `json:"hostname"` // the node's tailnet hostname
	State    string `json:"state"`    // the node's backend state, "Running" once usable
	// LocalOnly is true when the helper keeps every packet on loopback, as
	// on the offline tailnet (see carrier.KeepsToLoopback).
	LocalOnly bool `json:"local_only"`
	// Policy is the access policy in force (see package access).
	Policy string `json:"policy"`
}

// PolicyResult is the result of set_policy: the policy now in force.
type PolicyResult struct {
	Policy string `json:"policy"`
}

// ListenResult is the result of listen.
type ListenResult struct {
	Port int `json:"port"` // the port listened on (the one picked, for port 0)
}

// DialResult is the result of dial; the connection's descriptor rides along.
type DialResult struct {
	Peer carrier.Identity `json:"peer"`
}

// RegisterResult is the result of register.
type RegisterResult struct {
	// Creation tells this incarnation of the name from earlier ones; a
	// node uses it in its pids, ports and references.
	Creation uint32 `json:"creation"`
}

// NodeInfo is the result of port_please: a node's registration on the EPMD
// of a tailnet host.
type NodeInfo struct {
	Name           string `json:"name"`
	Host           string `json:"host"` // the host as asked
	Port           int    `json:"port"` // the node's distribution port on that host
	Hidden         bool   `json:"hidden"`
	Protocol       int    `json:"protocol"`
	HighestVersion int    `json:"highest_version"`
	LowestVersion  int    `json:"lowest_version"`
	Extra          []byte `json:"extra"` // base64 in JSON; usually empty
}

// NamesResult is the result of names.
type NamesResult struct {
	Host  string           `json:"host"`
	Names []epmd.NameEntry `json:"names"` // sorted as the host's EPMD sent them
	// Dropped counts the entries left out, past host.MaxNames.
	Dropped int `json:"dropped,omitempty"`
}

// Stats is the result of stats: the helper's own resource use, for
// operators and leak tests.
type Stats struct {
	Goroutines int `json:"goroutines"`
	OpenFDs    int `json:"open_fds"`
	Clients    int `json:"clients"`   // control connections open
	Listeners  int `json:"listeners"` // tailnet listeners open
	// Registrations counts the node names registered on this helper's EPMD.
	Registrations int `json:"registrations"`
	Bridges       int `json:"bridges"` // tailnet connections being carried
}

// ErrFrameTooLarge is returned by ReadFrame for a frame over its limit.
var ErrFrameTooLarge = errors.New("control: frame too large")

// ErrEmptyFrame is returned by ReadFrame for a frame of length zero. The
// stream is still in step after it.
var ErrEmptyFrame = errors.New("control: empty frame")

// ReadFrame reads one frame's payload from r. It refuses, with
// ErrFrameTooLarge and without reading the payload, a frame longer than max
// (a negative max admits nothing), and with ErrEmptyFrame an empty one.
func ReadFrame(r io.Reader, max int) ([]byte, error) {
	if max < 0 {
		max = 0
	}
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if uint64(n) > uint64(max) {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrFrameTooLarge, n, max)
	}
	if n == 0 {
		return nil, ErrEmptyFrame
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(r, buf); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return buf, nil
}

// AppendFrame appends payload, framed, to b.
func AppendFrame(b, payload []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

// ParseRequest decodes and checks one request payload. On error it returns
// an *Error with code bad_request, and whatever ID could be read (0 if
// none), so the caller can still answer it.
func ParseRequest(payload []byte) (Request, *Error) {
	var req Request
	if err := json.Unmarshal(payload, &req); err != nil {
		// Salvage the id, so the error response can be matched.
		var idOnly struct {
			ID uint64 `json:"id"`
		}
		json.Unmarshal(payload, &idOnly)
		return Request{ID: idOnly.ID}, &Error{Code: CodeBadRequest, Message: "request is not a JSON object of the expected shape: " + err.Error()}
	}
	if req.Op == "" {
		return req, &Error{Code: CodeBadRequest, Message: `request has no "op"`}
	}
	if req.Port < 0 || req.Port > 65535 {
		return req, &Error{Code: CodeBadRequest, Message: fmt.Sprintf("port %d is out of range 0-65535", req.Port)}
	}
	if req.HighestVersion < 0 || req.HighestVersion > 65535 || req.LowestVersion < 0 || req.LowestVersion > 65535 {
		return req, &Error{Code: CodeBadRequest, Message: "highest_version and lowest_version must be in 0-65535"}
	}
	if req.TimeoutMS < 0 {
		return req, &Error{Code: CodeBadRequest, Message: "timeout_ms must not be negative"}
	}
	return req, nil
}
