package epmd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"reflect"
	"slices"
	"testing"
	"unicode/utf8"
)

// Seed corpora live in testdata/fuzz/<FuzzName>/ as well as in the f.Add
// calls below; `go test` runs both as ordinary tests, and
// scripts/fuzz.sh fuzzes each target.

// FuzzParseRequest feeds arbitrary request bodies to readRequest and
// parseRequest. Properties: neither panics; readRequest takes exactly the
// framed body when its length is 1 to MaxRequestLen and refuses it with
// ErrMalformed otherwise; parseRequest either fails with ErrMalformed or
// returns a request that encodes back to the very bytes it came from (an
// ALIVE2_REQ through appendAlive2Request, a PORT_PLEASE2_REQ as its tag and
// name, less a trailing NUL) and shares no memory with them.
func FuzzParseRequest(f *testing.F) {
	f.Add(appendAlive2Request(nil, Node{Name: "a", Port: 4370, Type: NodeTypeNormal, HighestVersion: 6, LowestVersion: 5})[2:])
	f.Add(appendAlive2Request(nil, Node{Name: "ñodo", Port: 1, Type: NodeTypeHidden, HighestVersion: 6, LowestVersion: 5, Extra: []byte{0, 1}})[2:])
	f.Add([]byte("zalpha"))
	f.Add([]byte("n"))
	f.Fuzz(func(t *testing.T, body []byte) {
		if len(body) <= 0xffff {
			framed := append(appendRequestHeader(nil, len(body)), body...)
			cr := &countingReader{r: bytes.NewReader(append(framed, "next"...))}
			got, err := readRequest(cr)
			if len(body) == 0 || len(body) > MaxRequestLen {
				if !errors.Is(err, ErrMalformed) || got != nil || cr.n != 2 {
					t.Fatalf("readRequest of a %d-byte body = %d bytes, %v after reading %d; want ErrMalformed after the header", len(body), len(got), err, cr.n)
				}
			} else if err != nil || !bytes.Equal(got, body) || cr.n != len(framed) {
				t.Fatalf("readRequest = % x, %v after reading %d; want the body", got, err, cr.n)
			}
		}

		buf := slices.Clone(body)
		req, err := parseRequest(buf)
		if err != nil {
			if req != nil || !errors.Is(err, ErrMalformed) {
				t.Fatalf("parseRequest(%q) = %#v, %v; a failure must be ErrMalformed alone", body, req, err)
			}
			return
		}
		clear(buf) // what was parsed must not change with its buffer
		orig := body
		switch r := req.(type) {
		case alive2Request:
			n := r.node
			if n.Extra != nil && len(n.Extra) == 0 {
				t.Fatalf("empty Extra is not nil")
			}
			if enc := appendAlive2Request(nil, n); !bytes.Equal(enc[2:], orig) || int(binary.BigEndian.Uint16(enc)) != len(orig) {
				t.Fatalf("ALIVE2_REQ %q parsed as %+v, which encodes as %q", orig, n, enc)
			}
			again, err := parseRequest(orig)
			if err != nil || !reflect.DeepEqual(again, req) {
				t.Fatalf("ALIVE2_REQ parsed twice: %+v, then %+v, %v", req, again, err)
			}
		case portPleaseRequest:
			name := r.name
			if name == "" || !utf8.ValidString(name) || utf8.RuneCountInString(name) > MaxNameLen || bytes.IndexByte([]byte(name), 0) >= 0 {
				t.Fatalf("PORT_PLEASE2_REQ %q accepted with name %q", orig, name)
			}
			if s := string(orig); s != "z"+name && s != "z"+name+"\x00" {
				t.Fatalf("PORT_PLEASE2_REQ %q parsed as name %q", orig, name)
			}
		case namesRequest:
			if string(orig) != "n" {
				t.Fatalf("%q parsed as NAMES_REQ", orig)
			}
		case refusedRequest:
			if r.t != orig[0] || !bytes.ContainsRune([]byte("dks"), rune(r.t)) || r.name() == "" {
				t.Fatalf("%q parsed as refused %q", orig, r.t)
			}
		default:
			t.Fatalf("%q parsed as %T", orig, req)
		}
	})
}

// FuzzClientResponses feeds arbitrary server answers to the Client's three
// response parsers. Properties: none panics; each reads no more than its
// message can hold (6 bytes for ALIVE2, one full PORT2_RESP, the 4-byte port
// and MaxNamesResponse+1 bytes for NAMES); each fails only with the
// package's errors (ErrMalformed, or ErrRefused / ErrNotRegistered for an
// answer that says so); and what each accepts encodes back to the bytes it
// read (NAMES: to lines that parse to the same entries).
func FuzzClientResponses(f *testing.F) {
	f.Add(appendAlive2Response(nil, 6, 0, 0x01020304))
	f.Add(appendAlive2Response(nil, 5, 1, 0))
	f.Add(appendPort2Response(nil, &Node{Name: "a", Port: 4370, Type: NodeTypeNormal, HighestVersion: 6, LowestVersion: 5, Extra: []byte("x")}))
	f.Add([]byte("\x00\x00\x11\x11name a at port 4370\nname b at port 1\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		// ALIVE2_RESP / ALIVE2_X_RESP.
		cr := &countingReader{r: bytes.NewReader(data)}
		creation, err := readAlive2Response(cr)
		if cr.n > 6 {
			t.Fatalf("readAlive2Response read %d bytes", cr.n)
		}
		switch {
		case err == nil && data[0] == tagAlive2XResp:
			if cr.n != 6 || !bytes.Equal(appendAlive2Response(nil, 6, 0, creation), data[:6]) {
				t.Fatalf("ALIVE2_X_RESP % x read as creation %d after %d bytes", data, creation, cr.n)
			}
		case err == nil && data[0] == tagAlive2Resp:
			if cr.n != 4 || data[1] != 0 || creation != uint32(binary.BigEndian.Uint16(data[2:])) {
				t.Fatalf("ALIVE2_RESP % x read as creation %d after %d bytes", data, creation, cr.n)
			}
		case err == nil:
			t.Fatalf("% x read as an ALIVE2 answer, creation %d", data, creation)
		case errors.Is(err, ErrRefused):
			if creation != 0 || data[1] == 0 || (data[0] != tagAlive2XResp && data[0] != tagAlive2Resp) {
				t.Fatalf("% x read as a refusal (%v)", data, err)
			}
		case !errors.Is(err, ErrMalformed):
			t.Fatalf("readAlive2Response(% x): %v", data, err)
		}

		// PORT2_RESP.
		cr = &countingReader{r: bytes.NewReader(data)}
		n, err := readPort2Response(cr)
		if cr.n > 2+8+2+MaxNameLen+2+MaxExtraLen {
			t.Fatalf("readPort2Response read %d bytes", cr.n)
		}
		switch {
		case err == nil:
			if enc := appendPort2Response(nil, &n); !bytes.Equal(enc, data[:cr.n]) {
				t.Fatalf("PORT2_RESP % x read as %+v, which encodes as % x", data[:cr.n], n, enc)
			}
			if n.Extra != nil && len(n.Extra) == 0 {
				t.Fatalf("empty Extra is not nil")
			}
		case err == ErrNotRegistered:
			if cr.n != 2 || data[0] != tagPort2Resp || data[1] == 0 {
				t.Fatalf("% x read as not registered", data)
			}
		case !errors.Is(err, ErrMalformed):
			t.Fatalf("readPort2Response(% x): %v", data, err)
		}

		// NAMES.
		cr = &countingReader{r: bytes.NewReader(data)}
		names, err := readNamesResponse(cr)
		if cr.n > 4+MaxNamesResponse+1 {
			t.Fatalf("readNamesResponse read %d bytes", cr.n)
		}
		switch {
		case err == nil:
			if names == nil || cr.n != len(data) {
				t.Fatalf("NAMES answer %q: %v after %d bytes", data, names, cr.n)
			}
			for _, e := range names {
				if ValidName(e.Name) != nil || e.Port < 0 || e.Port > 0xffff {
					t.Fatalf("NAMES answer %q gave entry %+v", data, e)
				}
			}
			enc := appendNamesResponse(nil, binary.BigEndian.Uint32(data), names)
			again, err := readNamesResponse(bytes.NewReader(enc))
			if err != nil || !reflect.DeepEqual(again, names) || len(enc) > len(data) {
				t.Fatalf("NAMES %q read as %v; encoded again as %q, read as %v, %v", data, names, enc, again, err)
			}
		case !errors.Is(err, ErrMalformed):
			t.Fatalf("readNamesResponse(%q): %v", data, err)
		}
	})
}
