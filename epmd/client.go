package epmd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// MaxNamesResponse bounds the NAMES answer a [Client] reads: about 3,500
// registrations of the longest names. A server that sends more is cut off
// with an error rather than allowed to fill memory.
const MaxNamesResponse = 1 << 20

// DefaultClientTimeout bounds a Client request whose context has no
// deadline.
const DefaultClientTimeout = 10 * time.Second

// defaultClientTimeout is DefaultClientTimeout; tests shorten it.
var defaultClientTimeout = DefaultClientTimeout

// withDefaultTimeout bounds ctx by defaultClientTimeout when it has no
// deadline of its own.
func withDefaultTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, defaultClientTimeout)
}

// Client asks EPMD servers about the nodes on their hosts.
type Client struct {
	// Dial opens a TCP connection to addr ("host:port"). nil dials with a
	// plain net.Dialer; tsdist passes a dialer that reaches the tailnet.
	Dial func(ctx context.Context, addr string) (net.Conn, error)
	// Port is the port EPMD listens on. Zero means DefaultPort.
	Port uint16
}

// PortPlease asks the EPMD on host for the node registered as name (the
// part of a node name before the '@'). It fails with ErrNotRegistered when
// nobody holds the name.
func (c *Client) PortPlease(ctx context.Context, host, name string) (Node, error) {
	if err := ValidName(name); err != nil {
		return Node{}, err
	}
	req := appendRequestHeader(nil, 1+len(name))
	req = append(req, tagPort2Req)
	req = append(req, name...)
	var n Node
	err := c.exchange(ctx, host, req, func(r io.Reader) error {
		var err error
		n, err = readPort2Response(r)
		return err
	})
	if err != nil {
		return Node{}, fmt.Errorf("epmd: port_please %s@%s: %w", name, host, err)
	}
	return n, nil
}

// Names asks the EPMD on host for every node registered there.
func (c *Client) Names(ctx context.Context, host string) ([]NameEntry, error) {
	req := appendRequestHeader(nil, 1)
	req = append(req, tagNamesReq)
	var names []NameEntry
	err := c.exchange(ctx, host, req, func(r io.Reader) error {
		var err error
		names, err = readNamesResponse(r)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("epmd: names %s: %w", host, err)
	}
	return names, nil
}

// Register registers n with the EPMD on host, as a starting node does. The
// registration lasts until the returned connection's Close. ctx bounds the
// registration handshake only (DefaultClientTimeout if it has no deadline).
func (c *Client) Register(ctx context.Context, host string, n Node) (*ClientRegistration, error) {
	if err := ValidName(n.Name); err != nil {
		return nil, err
	}
	if len(n.Extra) > MaxExtraLen {
		return nil, fmt.Errorf("epmd: register %q: extra of %d bytes, more than %d", n.Name, len(n.Extra), MaxExtraLen)
	}
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	conn, err := c.dial(ctx, host)
	if err != nil {
		return nil, fmt.Errorf("epmd: register %s@%s: %w", n.Name, host, err)
	}
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	creation, err := func() (uint32, error) {
		if _, err := conn.Write(appendAlive2Request(nil, n)); err != nil {
			return 0, err
		}
		return readAlive2Response(conn)
	}()
	if !stop() && err == nil {
		// ctx ended just as the answer came: the AfterFunc may set its
		// deadline after the one below, so this connection is not ours
		// to hand back as it is.
		err = context.Cause(ctx)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("epmd: register %s@%s: %w", n.Name, host, err)
	}
	conn.SetDeadline(time.Time{})
	return &ClientRegistration{Creation: creation, conn: conn}, nil
}

// ClientRegistration is a registration made by [Client.Register].
type ClientRegistration struct {
	// Creation is the creation EPMD gave this incarnation of the name.
	Creation uint32
	conn     net.Conn
}

// Close ends the registration.
func (g *ClientRegistration) Close() error { return g.conn.Close() }

func (c *Client) dial(ctx context.Context, host string) (net.Conn, error) {
	port := c.Port
	if port == 0 {
		port = DefaultPort
	}
	addr := net.JoinHostPort(host, strconv.Itoa(int(port)))
	if c.Dial != nil {
		return c.Dial(ctx, addr)
	}
	var d net.Dialer
	return d.DialContext(ctx, "tcp", addr)
}

// exchange sends one request to the EPMD on host and reads its answer.
func (c *Client) exchange(ctx context.Context, host string, req []byte, read func(io.Reader) error) error {
	ctx, cancel := withDefaultTimeout(ctx)
	defer cancel()
	conn, err := c.dial(ctx, host)
	if err != nil {
		return err
	}
	defer conn.Close()
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	if _, err := conn.Write(req); err != nil {
		return err
	}
	return read(bufio.NewReader(conn))
}

// readAlive2Response reads either form of the answer to ALIVE2_REQ.
func readAlive2Response(r io.Reader) (uint32, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, fmt.Errorf("%w: ALIVE2 answer: %w", ErrMalformed, noEOF(err))
	}
	var creation uint32
	switch hdr[0] {
	case tagAlive2XResp:
		var b [4]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return 0, fmt.Errorf("%w: ALIVE2_X_RESP: %w", ErrMalformed, noEOF(err))
		}
		creation = binary.BigEndian.Uint32(b[:])
	case tagAlive2Resp:
		var b [2]byte
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return 0, fmt.Errorf("%w: ALIVE2_RESP: %w", ErrMalformed, noEOF(err))
		}
		creation = uint32(binary.BigEndian.Uint16(b[:]))
	default:
		return 0, fmt.Errorf("%w: answer to ALIVE2_REQ has tag %d", ErrMalformed, hdr[0])
	}
	if hdr[1] != 0 {
		return 0, fmt.Errorf("%w (result %d)", ErrRefused, hdr[1])
	}
	return creation, nil
}

// readPort2Response reads the answer to PORT_PLEASE2_REQ.
func readPort2Response(r io.Reader) (Node, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return Node{}, fmt.Errorf("%w: PORT2_RESP: %w", ErrMalformed, noEOF(err))
	}
	if hdr[0] != tagPort2Resp {
		return Node{}, fmt.Errorf("%w: answer to PORT_PLEASE2_REQ has tag %d", ErrMalformed, hdr[0])
	}
	if hdr[1] != 0 {
		return Node{}, ErrNotRegistered
	}
	var fixed [nodeFixedLen]byte
	if _, err := io.ReadFull(r, fixed[:]); err != nil {
		return Node{}, fmt.Errorf("%w: PORT2_RESP: %w", ErrMalformed, noEOF(err))
	}
	n := parseNodeFixed(fixed[:])
	name, err := readField(r, MaxNameLen, "name")
	if err != nil {
		return Node{}, err
	}
	n.Name = string(name)
	if n.Extra, err = readField(r, MaxExtraLen, "extra"); err != nil {
		return Node{}, err
	}
	return n, nil
}

// readField reads a 2-byte length and that many bytes, at most limit.
func readField(r io.Reader, limit int, what string) ([]byte, error) {
	var l [2]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return nil, fmt.Errorf("%w: PORT2_RESP %s length: %w", ErrMalformed, what, noEOF(err))
	}
	n := int(binary.BigEndian.Uint16(l[:]))
	if n > limit {
		return nil, fmt.Errorf("%w: PORT2_RESP %s of %d bytes, more than %d", ErrMalformed, what, n, limit)
	}
	if n == 0 {
		return nil, nil
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, fmt.Errorf("%w: PORT2_RESP %s: %w", ErrMalformed, what, noEOF(err))
	}
	return b, nil
}

// readNamesResponse reads the answer to NAMES_REQ, up to the server's close.
func readNamesResponse(r io.Reader) ([]NameEntry, error) {
	var port [4]byte
	if _, err := io.ReadFull(r, port[:]); err != nil {
		return nil, fmt.Errorf("%w: NAMES answer: %w", ErrMalformed, noEOF(err))
	}
	body, err := io.ReadAll(io.LimitReader(r, MaxNamesResponse+1))
	if err != nil {
		return nil, err
	}
	if len(body) > MaxNamesResponse {
		return nil, fmt.Errorf("%w: NAMES answer longer than %d bytes", ErrMalformed, MaxNamesResponse)
	}
	names := []NameEntry{}
	for line := range bytes.Lines(body) {
		e, err := parseNameLine(string(line))
		if err != nil {
			return nil, err
		}
		names = append(names, e)
	}
	return names, nil
}

// parseNameLine parses "name N at port P\n".
func parseNameLine(line string) (NameEntry, error) {
	rest, ok := strings.CutSuffix(line, "\n")
	if ok {
		rest, ok = strings.CutPrefix(rest, "name ")
	}
	var name, port string
	if ok {
		name, port, ok = cutLast(rest, " at port ")
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if !ok || err != nil || ValidName(name) != nil {
		return NameEntry{}, fmt.Errorf("%w: NAMES line %q", ErrMalformed, line)
	}
	return NameEntry{Name: name, Port: int(p)}, nil
}

func cutLast(s, sep string) (before, after string, found bool) {
	i := strings.LastIndex(s, sep)
	if i < 0 {
		return s, "", false
	}
	return s[:i], s[i+len(sep):], true
}

func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}
