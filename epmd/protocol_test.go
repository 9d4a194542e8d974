package epmd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"

	"github.com/tsdist/tsdist/internal/leakcheck"
)

// These tests pin every message to the bytes of the "Distribution
// Protocol" chapter of the ERTS User's Guide, section "EPMD Protocol".
// The wanted bytes are written out by hand from that document, never
// produced by the code under test.

// countingReader counts the bytes taken from r.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

func TestAlive2RequestBytes(t *testing.T) {
	leakcheck.Check(t)
	tests := []struct {
		name string
		node Node
		want []byte
	}{{
		name: "one-letter name, no extra",
		node: Node{Name: "a", Port: 0x1234, Type: NodeTypeNormal, Protocol: ProtocolTCP, HighestVersion: 6, LowestVersion: 5},
		want: []byte{
			0, 14, // length: 13 + len(name) + len(extra)
			120,        // ALIVE2_REQ 'x'
			0x12, 0x34, // PortNo
			77,   // NodeType: normal
			0,    // Protocol: TCP/IPv4
			0, 6, // HighestVersion
			0, 5, // LowestVersion
			0, 1, 'a', // Nlen, NodeName
			0, 0, // Elen
		},
	}, {
		name: "hidden node with extra",
		node: Node{Name: "ñodo", Port: 65535, Type: NodeTypeHidden, Protocol: ProtocolTCP, HighestVersion: 6, LowestVersion: 5, Extra: []byte{0, 0xff}},
		want: []byte{
			0, 20,
			120,
			0xff, 0xff,
			72,
			0,
			0, 6,
			0, 5,
			0, 5, 0xc3, 0xb1, 'o', 'd', 'o', // "ñodo" is 5 bytes
			0, 2, 0, 0xff,
		},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := appendAlive2Request(nil, tt.node)
			if !bytes.Equal(got, tt.want) {
				t.Fatalf("appendAlive2Request:\n got % x\nwant % x", got, tt.want)
			}
			cr := &countingReader{r: bytes.NewReader(append(tt.want, "next request"...))}
			body, err := readRequest(cr)
			if err != nil || !bytes.Equal(body, tt.want[2:]) || cr.n != len(tt.want) {
				t.Fatalf("readRequest = % x, %v after %d bytes; want % x after %d", body, err, cr.n, tt.want[2:], len(tt.want))
			}
			req, err := parseRequest(body)
			if err != nil {
				t.Fatal(err)
			}
			if want := (alive2Request{tt.node}); !reflect.DeepEqual(req, want) {
				t.Fatalf("parseRequest = %+v; want %+v", req, want)
			}
		})
	}
}

func TestParseAlive2Framing(t *testing.T) {
	leakcheck.Check(t)
	// head is ALIVE2_REQ's tag and fixed fields.
	head := []byte{'x', 0x12, 0x34, 77, 0, 0, 6, 0, 5}
	body := func(parts ...[]byte) []byte { return bytes.Join(append([][]byte{head}, parts...), nil) }
	tests := []struct {
		name string
		body []byte
		want *Node // nil: malformed
	}{
		{"tag only", []byte{'x'}, nil},
		{"fixed fields cut short", body()[:8], nil},
		{"no name length", body(), nil},
		{"name length cut short", body([]byte{0}), nil},
		{"name length overruns", body([]byte{0, 200}, []byte("abc"), []byte{0, 0}), nil},
		{"name length one past", body([]byte{0, 4}, []byte("abc"), []byte{0, 0}), nil},
		{"no extra length", body([]byte{0, 3}, []byte("abc")), nil},
		{"extra length cut short", body([]byte{0, 3}, []byte("abc"), []byte{0}), nil},
		{"extra length says more than follows", body([]byte{0, 3}, []byte("abc"), []byte{0, 5}, []byte("xy")), nil},
		{"extra length says less than follows", body([]byte{0, 3}, []byte("abc"), []byte{0, 1}, []byte("xy")), nil},
		{"bytes after an empty extra", body([]byte{0, 3}, []byte("abc"), []byte{0, 0}, []byte("z")), nil},
		{"name length 0xffff", body([]byte{0xff, 0xff}), nil},
		{"good", body([]byte{0, 3}, []byte("abc"), []byte{0, 2}, []byte("xy")),
			&Node{Name: "abc", Port: 0x1234, Type: 77, HighestVersion: 6, LowestVersion: 5, Extra: []byte("xy")}},
		// Framing is all parseRequest checks: what may be registered is
		// the Registry's business, and is answered with an error result.
		{"empty name is well framed", body([]byte{0, 0}, []byte{0, 0}),
			&Node{Port: 0x1234, Type: 77, HighestVersion: 6, LowestVersion: 5}},
		{"invalid name is well framed", body([]byte{0, 3}, []byte("a@b"), []byte{0, 0}),
			&Node{Name: "a@b", Port: 0x1234, Type: 77, HighestVersion: 6, LowestVersion: 5}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := parseRequest(tt.body)
			if tt.want == nil {
				if !errors.Is(err, ErrMalformed) || req != nil {
					t.Fatalf("parseRequest(% x) = %+v, %v; want ErrMalformed", tt.body, req, err)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(req, alive2Request{*tt.want}) {
				t.Fatalf("parseRequest(% x) = %+v, %v; want %+v", tt.body, req, err, *tt.want)
			}
		})
	}
}

func TestAlive2ResponseBytes(t *testing.T) {
	leakcheck.Check(t)
	tests := []struct {
		name     string
		highest  uint16
		result   uint8
		creation uint32
		want     []byte
		wantErr  error
		wantCr   uint32
	}{
		// ALIVE2_X_RESP: 'v' Result Creation(4), for HighestVersion >= 6.
		{"X_RESP", 6, 0, 0x01020304, []byte{118, 0, 1, 2, 3, 4}, nil, 0x01020304},
		{"X_RESP for version 7", 7, 0, 0xfffffffe, []byte{118, 0, 0xff, 0xff, 0xff, 0xfe}, nil, 0xfffffffe},
		{"X_RESP refused", 6, 1, 0x01020304, []byte{118, 1, 0, 0, 0, 99}, ErrRefused, 0},
		// ALIVE2_RESP: 'y' Result Creation(2) with a creation of 1..3, for
		// HighestVersion 5 and (as real EPMD does) anything below 6.
		{"RESP", 5, 0, 4, []byte{121, 0, 0, 2}, nil, 2},
		{"RESP creation 1", 5, 0, 6, []byte{121, 0, 0, 1}, nil, 1},
		{"RESP creation 3", 5, 0, 5, []byte{121, 0, 0, 3}, nil, 3},
		{"RESP for version 0", 0, 0, 0xffffffff, []byte{121, 0, 0, 1}, nil, 1},
		{"RESP refused", 5, 1, 4, []byte{121, 1, 0, 99}, ErrRefused, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := appendAlive2Response(nil, tt.highest, tt.result, tt.creation)
			if !bytes.Equal(got, tt.want) {
				t.Fatalf("appendAlive2Response(%d, %d, %d) = % x; want % x", tt.highest, tt.result, tt.creation, got, tt.want)
			}
			cr := &countingReader{r: bytes.NewReader(append(tt.want, "trailing"...))}
			cr2, err := readAlive2Response(cr)
			if !errors.Is(err, tt.wantErr) || (err == nil) != (tt.wantErr == nil) || cr2 != tt.wantCr {
				t.Fatalf("readAlive2Response = %d, %v; want %d, %v", cr2, err, tt.wantCr, tt.wantErr)
			}
			if cr.n != len(tt.want) {
				t.Fatalf("readAlive2Response read %d bytes; want %d", cr.n, len(tt.want))
			}
		})
	}
	// Every creation maps into 1..3 for an old node.
	for c := range uint32(100) {
		b := appendAlive2Response(nil, 5, 0, c)
		if got := binary.BigEndian.Uint16(b[2:]); got < 1 || got > 3 {
			t.Fatalf("creation %d sent to a version-5 node as %d", c, got)
		}
	}
}

func TestPort2ResponseBytes(t *testing.T) {
	leakcheck.Check(t)
	n := Node{Name: "ñodo", Port: 0x1f90, Type: NodeTypeHidden, Protocol: ProtocolTCP, HighestVersion: 6, LowestVersion: 5, Extra: []byte("xy")}
	want := []byte{
		119, 0, // PORT2_RESP 'w', Result 0
		0x1f, 0x90, // PortNo
		72,   // NodeType
		0,    // Protocol
		0, 6, // HighestVersion
		0, 5, // LowestVersion
		0, 5, 0xc3, 0xb1, 'o', 'd', 'o', // Nlen, NodeName
		0, 2, 'x', 'y', // Elen, Extra
	}
	if got := appendPort2Response(nil, &n); !bytes.Equal(got, want) {
		t.Fatalf("appendPort2Response:\n got % x\nwant % x", got, want)
	}
	got, err := readPort2Response(bytes.NewReader(want))
	if err != nil || !reflect.DeepEqual(got, n) {
		t.Fatalf("readPort2Response = %+v, %v; want %+v", got, err, n)
	}

	// No extra: Elen 0, and the parsed Extra is nil.
	n.Extra = nil
	want = append(want[:len(want)-4], 0, 0)
	if got := appendPort2Response(nil, &n); !bytes.Equal(got, want) {
		t.Fatalf("appendPort2Response without extra:\n got % x\nwant % x", got, want)
	}
	if got, err := readPort2Response(bytes.NewReader(want)); err != nil || !reflect.DeepEqual(got, n) {
		t.Fatalf("readPort2Response = %+v, %v; want %+v", got, err, n)
	}

	// Failure: exactly 'w' and a non-zero result, nothing more.
	if got := appendPort2Response(nil, nil); !bytes.Equal(got, []byte{119, 1}) {
		t.Fatalf("appendPort2Response(nil) = % x; want 77 01", got)
	}
	if _, err := readPort2Response(bytes.NewReader([]byte{119, 1})); err != ErrNotRegistered {
		t.Fatalf("readPort2Response(w 1) = %v; want ErrNotRegistered", err)
	}
}

func TestNamesResponseBytes(t *testing.T) {
	leakcheck.Check(t)
	tests := []struct {
		name  string
		port  uint32
		names []NameEntry
		want  string
	}{
		{"none", 4369, nil, "\x00\x00\x11\x11"},
		{"two", 0x00012345, []NameEntry{{"a", 1}, {"ñodo", 65535}},
			"\x00\x01\x23\x45name a at port 1\nname ñodo at port 65535\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := appendNamesResponse(nil, tt.port, tt.names)
			if string(got) != tt.want {
				t.Fatalf("appendNamesResponse = %q; want %q", got, tt.want)
			}
			names, err := readNamesResponse(strings.NewReader(tt.want))
			wantNames := tt.names
			if wantNames == nil {
				wantNames = []NameEntry{}
			}
			if err != nil || !reflect.DeepEqual(names, wantNames) {
				t.Fatalf("readNamesResponse = %v, %v; want %v", names, err, wantNames)
			}
		})
	}
}

func TestReadRequest(t *testing.T) {
	leakcheck.Check(t)
	max := make([]byte, 2+MaxRequestLen)
	binary.BigEndian.PutUint16(max, MaxRequestLen)
	over := binary.BigEndian.AppendUint16(nil, MaxRequestLen+1)
	tests := []struct {
		name     string
		in       []byte
		wantErr  error // nil: the body after the header
		wantRead int   // bytes taken from the stream
	}{
		{"empty stream", nil, io.EOF, 0},
		{"half a header", []byte{0}, io.ErrUnexpectedEOF, 1},
		{"length 0", []byte{0, 0, 'n'}, ErrMalformed, 2},
		{"length one over the limit", append(over, 'x'), ErrMalformed, 2},
		{"length 0xffff", []byte{0xff, 0xff, 'x'}, ErrMalformed, 2},
		{"body cut short", []byte{0, 10, 'z', 'a'}, io.ErrUnexpectedEOF, 4},
		{"header only", []byte{0, 1}, io.ErrUnexpectedEOF, 2},
		{"one byte", []byte{0, 1, 'n', 'n'}, nil, 3},
		{"longest", max, nil, len(max)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cr := &countingReader{r: bytes.NewReader(tt.in)}
			body, err := readRequest(cr)
			if cr.n != tt.wantRead {
				t.Errorf("read %d bytes of the stream; want %d", cr.n, tt.wantRead)
			}
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) || body != nil {
					t.Fatalf("readRequest = % x, %v; want %v", body, err, tt.wantErr)
				}
				return
			}
			if err != nil || !bytes.Equal(body, tt.in[2:tt.wantRead]) {
				t.Fatalf("readRequest = % x, %v; want % x", body, err, tt.in[2:tt.wantRead])
			}
		})
	}
	// A body cut short is malformed too, not a clean end of stream.
	if _, err := readRequest(bytes.NewReader([]byte{0, 5, 'z'})); !errors.Is(err, ErrMalformed) {
		t.Errorf("cut body: %v; want ErrMalformed", err)
	}
}

func TestParseRequest(t *testing.T) {
	leakcheck.Check(t)
	long := strings.Repeat("ñ", MaxNameLen) // 255 characters, 510 bytes
	tests := []struct {
		name string
		body string
		want request // nil: malformed
	}{
		{"empty", "", nil},
		{"PORT_PLEASE2_REQ", "zalpha", portPleaseRequest{"alpha"}},
		{"PORT_PLEASE2_REQ NUL-terminated", "zalpha\x00", portPleaseRequest{"alpha"}},
		{"PORT_PLEASE2_REQ UTF-8", "zñodo", portPleaseRequest{"ñodo"}},
		// A name ValidName refuses is still asked about: the answer is
		// "not registered", as real EPMD's.
		{"PORT_PLEASE2_REQ with a space", "za b", portPleaseRequest{"a b"}},
		{"PORT_PLEASE2_REQ with an @", "za@b", portPleaseRequest{"a@b"}},
		{"PORT_PLEASE2_REQ 255 characters", "z" + long, portPleaseRequest{long}},
		{"PORT_PLEASE2_REQ 256 characters", "z" + long + "a", nil},
		{"PORT_PLEASE2_REQ no name", "z", nil},
		{"PORT_PLEASE2_REQ only NUL", "z\x00", nil},
		{"PORT_PLEASE2_REQ NUL inside", "za\x00b", nil},
		{"PORT_PLEASE2_REQ two NULs", "za\x00\x00", nil},
		{"PORT_PLEASE2_REQ not UTF-8", "z\xff\xfe", nil},
		{"NAMES_REQ", "n", namesRequest{}},
		{"NAMES_REQ with a byte after", "nn", nil},
		{"DUMP_REQ", "d", refusedRequest{tagDumpReq}},
		{"KILL_REQ", "k", refusedRequest{tagKillReq}},
		{"STOP_REQ", "salpha", refusedRequest{tagStopReq}},
		{"unknown tag", "Q", nil},
		{"ALIVE_REQ of old", "a\x12\x34alpha", nil},
		{"tag 0", "\x00", nil},
		{"tag 0xff", "\xff", nil},
		{"ALIVE2 response as a request", "v\x00\x00\x00\x00\x01", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, err := parseRequest([]byte(tt.body))
			if tt.want == nil {
				if !errors.Is(err, ErrMalformed) || req != nil {
					t.Fatalf("parseRequest(%q) = %#v, %v; want ErrMalformed", tt.body, req, err)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(req, tt.want) {
				t.Fatalf("parseRequest(%q) = %#v, %v; want %#v", tt.body, req, err, tt.want)
			}
		})
	}
	for tag, name := range map[byte]string{tagDumpReq: "DUMP_REQ", tagKillReq: "KILL_REQ", tagStopReq: "STOP_REQ"} {
		if got := (refusedRequest{tag}).name(); got != name {
			t.Errorf("refusedRequest{%q}.name() = %q; want %q", tag, got, name)
		}
	}
}

func TestReadAlive2ResponseBad(t *testing.T) {
	leakcheck.Check(t)
	tests := []struct {
		name string
		in   string
		want error
	}{
		{"empty", "", ErrMalformed},
		{"tag only", "v", ErrMalformed},
		{"X_RESP cut short", "v\x00\x00\x00\x01", ErrMalformed},
		{"RESP cut short", "y\x00\x00", ErrMalformed},
		{"wrong tag", "w\x00\x00\x01", ErrMalformed},
		{"KILL answer", "NO", ErrMalformed},
		{"refused X_RESP", "v\x01\x00\x00\x00\x63", ErrRefused},
		{"refused RESP", "y\x01\x00\x63", ErrRefused},
		{"refused with result 255", "v\xff\x00\x00\x00\x00", ErrRefused},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := readAlive2Response(strings.NewReader(tt.in))
			if !errors.Is(err, tt.want) || c != 0 {
				t.Fatalf("readAlive2Response(%q) = %d, %v; want %v", tt.in, c, err, tt.want)
			}
			if errors.Is(err, ErrMalformed) && errors.Is(err, io.EOF) {
				t.Fatalf("a cut-short answer reported as a clean EOF: %v", err)
			}
		})
	}
}

func TestReadPort2ResponseBad(t *testing.T) {
	leakcheck.Check(t)
	fixed := "w\x00\x1f\x90\x4d\x00\x00\x06\x00\x05"
	field := func(n int) string { return string([]byte{byte(n >> 8), byte(n)}) + strings.Repeat("a", n) }
	tests := []struct {
		name string
		in   string
		// cut: the answer is cut short, so the stream ends with it; else
		// more bytes follow, which must be left unread.
		cut  bool
		want error
	}{
		{"empty", "", true, ErrMalformed},
		{"tag only", "w", true, ErrMalformed},
		{"wrong tag", "v\x00", false, ErrMalformed},
		{"NAMES answer", "\x00\x00\x11\x11", false, ErrMalformed},
		{"not registered", "w\x01", false, ErrNotRegistered},
		{"not registered, result 2", "w\x02", false, ErrNotRegistered},
		{"fixed fields cut short", fixed[:6], true, ErrMalformed},
		{"no name length", fixed, true, ErrMalformed},
		{"name length cut short", fixed + "\x00", true, ErrMalformed},
		{"name cut short", fixed + "\x00\x05abc", true, ErrMalformed},
		{"name of 256 bytes", fixed + "\x01\x00", false, ErrMalformed},
		{"name length 0xffff", fixed + "\xff\xff", false, ErrMalformed},
		{"no extra length", fixed + field(3), true, ErrMalformed},
		{"extra length cut short", fixed + field(3) + "\x00", true, ErrMalformed},
		{"extra cut short", fixed + field(3) + "\x00\x04xy", true, ErrMalformed},
		{"extra of 256 bytes", fixed + field(3) + "\x01\x00", false, ErrMalformed},
		{"extra length 0xffff", fixed + field(3) + "\xff\xff", false, ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stream := tt.in
			if !tt.cut {
				stream += strings.Repeat("z", 70000)
			}
			cr := &countingReader{r: strings.NewReader(stream)}
			n, err := readPort2Response(cr)
			if !errors.Is(err, tt.want) || !reflect.DeepEqual(n, Node{}) {
				t.Fatalf("readPort2Response(%q) = %+v, %v; want %v", tt.in, n, err, tt.want)
			}
			if tt.cut && errors.Is(err, io.EOF) {
				t.Fatalf("a cut-short answer reported as a clean EOF: %v", err)
			}
			// A refusal or an oversized field stops the reading at once.
			if !tt.cut && cr.n > len(tt.in) {
				t.Fatalf("read %d bytes; the answer is only %d", cr.n, len(tt.in))
			}
		})
	}
	// The longest fields are accepted.
	n, err := readPort2Response(strings.NewReader(fixed + field(MaxNameLen) + field(MaxExtraLen)))
	if err != nil || len(n.Name) != MaxNameLen || len(n.Extra) != MaxExtraLen {
		t.Fatalf("longest fields: %d-byte name, %d-byte extra, %v", len(n.Name), len(n.Extra), err)
	}
}

// repeatReader yields s over and over, without end.
type repeatReader struct {
	s   string
	off int
}

func (r *repeatReader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		c := copy(p[n:], r.s[r.off:])
		n += c
		r.off = (r.off + c) % len(r.s)
	}
	return n, nil
}

func TestReadNamesResponseBad(t *testing.T) {
	leakcheck.Check(t)
	const port = "\x00\x00\x11\x11"
	tests := []struct {
		name string
		in   string
		want []NameEntry // nil: malformed
	}{
		{"empty", "", nil},
		{"port cut short", "\x00\x00\x11", nil},
		{"port only", port, []NameEntry{}},
		{"one", port + "name a at port 1\n", []NameEntry{{"a", 1}}},
		{"leading zeros in the port", port + "name a at port 0080\n", []NameEntry{{"a", 80}}},
		{"name containing ' at port '", port + "name a at port 1 at port 2\n", nil},
		{"no newline at the end", port + "name a at port 1", nil},
		{"empty line", port + "\n", nil},
		{"CRLF", port + "name a at port 1\r\n", nil},
		{"wrong word", port + "node a at port 1\n", nil},
		{"empty name", port + "name  at port 1\n", nil},
		{"name with a space", port + "name a b at port 1\n", nil},
		{"name with an @", port + "name a@b at port 1\n", nil},
		{"name not UTF-8", port + "name \xff at port 1\n", nil},
		{"name of 256 bytes", port + "name " + strings.Repeat("a", 256) + " at port 1\n", nil},
		{"port 65536", port + "name a at port 65536\n", nil},
		{"negative port", port + "name a at port -1\n", nil},
		{"port with a sign", port + "name a at port +1\n", nil},
		{"no port", port + "name a at port \n", nil},
		{"port not a number", port + "name a at port x\n", nil},
		{"a good line, then a bad one", port + "name a at port 1\nname b\n", nil},
		{"DUMP answer", port + "active name     <a> at port 1, fd = 5\n\x00", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			names, err := readNamesResponse(strings.NewReader(tt.in))
			if tt.want == nil {
				if !errors.Is(err, ErrMalformed) || names != nil {
					t.Fatalf("readNamesResponse(%q) = %v, %v; want ErrMalformed", tt.in, names, err)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(names, tt.want) {
				t.Fatalf("readNamesResponse(%q) = %v, %v; want %v", tt.in, names, err, tt.want)
			}
		})
	}
}

func TestReadNamesResponseBounded(t *testing.T) {
	leakcheck.Check(t)
	const line = "name abcdefghijklmnopqrstuvwxyz at port 65535\n" // 46 bytes
	// Exactly MaxNamesResponse bytes of lines (padded with one longer
	// name) are read whole.
	n := MaxNamesResponse / len(line)
	pad := MaxNamesResponse - n*len(line)
	body := strings.Repeat(line, n-1) + "name " + strings.Repeat("p", pad+len("abcdefghijklmnopqrstuvwxyz")) + " at port 65535\n"
	if len(body) != MaxNamesResponse || pad > MaxNameLen-26 {
		t.Fatalf("test bug: body of %d bytes, pad %d", len(body), pad)
	}
	names, err := readNamesResponse(strings.NewReader("\x00\x00\x11\x11" + body))
	if err != nil || len(names) != n {
		t.Fatalf("answer of exactly %d bytes: %d names, %v; want %d", MaxNamesResponse, len(names), err, n)
	}
	// One byte more is refused.
	names, err = readNamesResponse(strings.NewReader("\x00\x00\x11\x11" + body + "n"))
	if !errors.Is(err, ErrMalformed) || names != nil {
		t.Fatalf("answer of %d bytes: %d names, %v; want ErrMalformed", MaxNamesResponse+1, len(names), err)
	}
	// A server that never stops is cut off after the limit.
	cr := &countingReader{r: &repeatReader{s: line}}
	names, err = readNamesResponse(io.MultiReader(strings.NewReader("\x00\x00\x11\x11"), cr))
	if !errors.Is(err, ErrMalformed) || names != nil {
		t.Fatalf("endless answer: %d names, %v; want ErrMalformed", len(names), err)
	}
	if cr.n > MaxNamesResponse+1 {
		t.Fatalf("endless answer: read %d bytes after the port; want at most %d", cr.n, MaxNamesResponse+1)
	}
}

func TestValidName(t *testing.T) {
	leakcheck.Check(t)
	tests := []struct {
		name string
		ok   bool
	}{
		{"", false},
		{"a", true},
		{"node_1-x.y", true},
		{"ñodo", true},
		{"节点", true},
		{"😀", true},
		{strings.Repeat("a", 255), true},
		{strings.Repeat("a", 256), false},
		{strings.Repeat("ñ", 127) + "a", true}, // 255 bytes
		{strings.Repeat("ñ", 128), false},      // 256 bytes, 128 characters
		{"\xff", false},
		{"a\xc3", false},        // cut UTF-8
		{"\xed\xa0\x80", false}, // a surrogate
		{"\xc0\x80", false},     // overlong NUL
		{"a@b", false},
		{"@", false},
		{"a b", false},
		{" a", false},
		{"a\tb", false},
		{"a\nb", false},
		{"a\rb", false},
		{"a\x00b", false},
		{"\x01", false},
		{"a\x7f", false},
		{"a\u0085b", false}, // C1 control (NEL)
		{"a\u009fb", false},
		{"a\u00a0b", true}, // first character after the C1 controls
	}
	for _, tt := range tests {
		err := ValidName(tt.name)
		if (err == nil) != tt.ok {
			t.Errorf("ValidName(%q) = %v; want ok=%v", tt.name, err, tt.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalidName) {
			t.Errorf("ValidName(%q) = %v; not ErrInvalidName", tt.name, err)
		}
	}
}
