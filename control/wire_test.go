package control

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"strings"
	"testing"
)

// countingReader counts the bytes taken from the underlying reader, so a test
// can tell whether ReadFrame read a payload it should have refused.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// oneByteReader hands out one byte per Read, as a slow socket might.
type oneByteReader struct{ r io.Reader }

func (o oneByteReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	return o.r.Read(p[:1])
}

func frame(payload string) []byte { return AppendFrame(nil, []byte(payload)) }

func header(n uint32) []byte { return []byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)} }

func TestReadFrame(t *testing.T) {
	tests := []struct {
		name     string
		in       []byte
		max      int
		want     string // payload, when wantErr is nil and !wantAnyErr
		wantErr  error  // matched with errors.Is
		anyErr   bool   // some error, not a sentinel (empty frame)
		consumed int    // bytes ReadFrame may take from the stream; -1: all
	}{
		{name: "exact bytes", in: []byte("\x00\x00\x00\x0b{\"id\":1234}"), max: 64, want: `{"id":1234}`, consumed: -1},
		{name: "one byte", in: []byte{0, 0, 0, 1, 'x'}, max: 1, want: "x", consumed: -1},
		{name: "at the limit", in: frame(strings.Repeat("a", 100)), max: 100, want: strings.Repeat("a", 100), consumed: -1},
		{name: "at MaxRequestSize", in: frame(strings.Repeat("b", MaxRequestSize)), max: MaxRequestSize, want: strings.Repeat("b", MaxRequestSize), consumed: -1},
		{name: "one over the limit", in: frame(strings.Repeat("a", 101)), max: 100, wantErr: ErrFrameTooLarge, consumed: 4},
		{name: "MaxRequestSize+1", in: frame(strings.Repeat("c", MaxRequestSize+1)), max: MaxRequestSize, wantErr: ErrFrameTooLarge, consumed: 4},
		{name: "4 GiB length, no payload sent", in: header(0xffffffff), max: MaxResponseSize, wantErr: ErrFrameTooLarge, consumed: 4},
		{name: "2 GiB length", in: append(header(0x80000000), "xxxx"...), max: MaxRequestSize, wantErr: ErrFrameTooLarge, consumed: 4},
		{name: "zero limit", in: frame("x"), max: 0, wantErr: ErrFrameTooLarge, consumed: 4},
		{name: "empty frame", in: header(0), max: 64, anyErr: true, consumed: 4},
		{name: "empty stream", in: nil, max: 64, wantErr: io.EOF, consumed: 0},
		{name: "truncated header 1", in: []byte{0}, max: 64, wantErr: io.ErrUnexpectedEOF, consumed: 1},
		{name: "truncated header 3", in: []byte{0, 0, 0}, max: 64, wantErr: io.ErrUnexpectedEOF, consumed: 3},
		{name: "truncated payload, none", in: header(5), max: 64, wantErr: io.ErrUnexpectedEOF, consumed: 4},
		{name: "truncated payload, some", in: append(header(5), "abc"...), max: 64, wantErr: io.ErrUnexpectedEOF, consumed: 7},
		{name: "second frame left alone", in: append(frame("first"), frame("second")...), max: 64, want: "first", consumed: 9},
	}
	for _, tt := range tests {
		for _, slow := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/slow=%v", tt.name, slow), func(t *testing.T) {
				cr := &countingReader{r: bytes.NewReader(tt.in)}
				var r io.Reader = cr
				if slow {
					r = oneByteReader{cr}
				}
				got, err := ReadFrame(r, tt.max)
				switch {
				case tt.wantErr != nil:
					if !errors.Is(err, tt.wantErr) {
						t.Fatalf("ReadFrame = %q, %v; want error %v", got, err, tt.wantErr)
					}
				case tt.anyErr:
					if err == nil {
						t.Fatalf("ReadFrame = %q, nil; want an error", got)
					}
				default:
					if err != nil || string(got) != tt.want {
						t.Fatalf("ReadFrame = %q, %v; want %q", got, err, tt.want)
					}
				}
				if err != nil && got != nil {
					t.Errorf("ReadFrame returned data %q with error %v", got, err)
				}
				want := tt.consumed
				if want < 0 {
					want = len(tt.in)
				}
				if cr.n != want {
					t.Errorf("ReadFrame read %d bytes of the stream; want %d", cr.n, want)
				}
			})
		}
	}
}

// TestReadFrameTooLargeMessage checks the error says how large the frame was,
// since the server sends it to the client in its too_large response.
func TestReadFrameTooLargeMessage(t *testing.T) {
	_, err := ReadFrame(bytes.NewReader(header(70000)), MaxRequestSize)
	if err == nil || !strings.Contains(err.Error(), "70000") || !strings.Contains(err.Error(), "65536") {
		t.Fatalf("error %v should name the size 70000 and the limit 65536", err)
	}
}

func TestReadFrameSequence(t *testing.T) {
	payloads := []string{"a", `{"id":1,"op":"hello","version":1}`, strings.Repeat("z", 1000), "\x00\xff"}
	var stream []byte
	for _, p := range payloads {
		stream = AppendFrame(stream, []byte(p))
	}
	r := bytes.NewReader(stream)
	for i, want := range payloads {
		got, err := ReadFrame(r, 4096)
		if err != nil || string(got) != want {
			t.Fatalf("frame %d: %q, %v; want %q", i, got, err, want)
		}
	}
	if _, err := ReadFrame(r, 4096); err != io.EOF {
		t.Fatalf("after the last frame: %v; want io.EOF", err)
	}
}

func TestAppendFrame(t *testing.T) {
	tests := []struct {
		name    string
		prefix  []byte
		payload []byte
		want    []byte
	}{
		{"empty payload", nil, nil, []byte{0, 0, 0, 0}},
		{"hello", nil, []byte(`{"id":1}`), []byte("\x00\x00\x00\x08{\"id\":1}")},
		{"appends", []byte("keep"), []byte("x"), []byte("keep\x00\x00\x00\x01x")},
		{"256 bytes", nil, bytes.Repeat([]byte{7}, 256), append([]byte{0, 0, 1, 0}, bytes.Repeat([]byte{7}, 256)...)},
		{"65536 bytes", nil, bytes.Repeat([]byte{1}, 65536), append([]byte{0, 1, 0, 0}, bytes.Repeat([]byte{1}, 65536)...)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := AppendFrame(bytes.Clone(tt.prefix), tt.payload)
			if !bytes.Equal(got, tt.want) {
				t.Fatalf("AppendFrame = %x; want %x", got, tt.want)
			}
			if len(tt.payload) == 0 {
				return
			}
			back, err := ReadFrame(bytes.NewReader(got[len(tt.prefix):]), len(tt.payload))
			if err != nil || !bytes.Equal(back, tt.payload) {
				t.Fatalf("round trip: %x, %v", back, err)
			}
		})
	}
}

// TestAppendFrameRoundTripMessages frames every message type and reads it back.
func TestAppendFrameRoundTripMessages(t *testing.T) {
	msgs := []any{
		Request{ID: 1, Op: OpHello, Version: Version, Client: "test"},
		Request{ID: 2, Op: OpDial, Host: "beta", Port: 4369, TimeoutMS: 1500},
		Response{ID: 3, OK: true, Result: json.RawMessage(`{"port":4370}`)},
		Response{ID: 4, OK: false, Error: &Error{Code: CodeBusy, Message: "64 requests already in flight"}},
		Response{ID: 5, OK: true, FD: true, Result: json.RawMessage(`{"peer":{"addr":"100.64.0.2:1","node":"beta","dns_name":"beta.tsdist.test","user":"","tags":[],"ips":[]}}`)},
		Event{Event: EventAccept, FD: true, ListenerPort: 4370},
	}
	for i, m := range msgs {
		payload, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		got, err := ReadFrame(bytes.NewReader(AppendFrame(nil, payload)), MaxResponseSize)
		if err != nil || !bytes.Equal(got, payload) {
			t.Fatalf("message %d: %s, %v", i, got, err)
		}
	}
}

func TestParseRequest(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    Request // checked when wantErr is empty
		wantID  uint64  // the id ParseRequest must salvage on error
		wantErr string  // substring of the error message; "" for success
	}{
		{name: "hello", in: `{"id":1,"op":"hello","version":1,"client":"erl"}`, want: Request{ID: 1, Op: "hello", Version: 1, Client: "erl"}},
		{name: "dial", in: `{"id":7,"op":"dial","host":"beta","port":4369,"timeout_ms":2500}`, want: Request{ID: 7, Op: "dial", Host: "beta", Port: 4369, TimeoutMS: 2500}},
		{name: "whois", in: `{"id":8,"op":"whois","addr":"100.64.0.2:41234"}`, want: Request{ID: 8, Op: "whois", Addr: "100.64.0.2:41234"}},
		{name: "listen 0", in: `{"id":9,"op":"listen","port":0}`, want: Request{ID: 9, Op: "listen"}},
		{name: "port 65535", in: `{"id":9,"op":"listen","port":65535}`, want: Request{ID: 9, Op: "listen", Port: 65535}},
		{name: "unknown op is the server's business", in: `{"id":3,"op":"frobnicate"}`, want: Request{ID: 3, Op: "frobnicate"}},
		{name: "unknown fields ignored", in: `{"id":3,"op":"status","future":{"a":[1,2]},"x":null}`, want: Request{ID: 3, Op: "status"}},
		{name: "no id is id 0", in: `{"op":"stats"}`, want: Request{Op: "stats"}},
		{name: "max uint64 id", in: `{"id":18446744073709551615,"op":"stats"}`, want: Request{ID: 1<<64 - 1, Op: "stats"}},
		{name: "whitespace", in: " \n\t{ \"id\" : 2 , \"op\" : \"stats\" }\n", want: Request{ID: 2, Op: "stats"}},
		{name: "keys match case-insensitively", in: `{"ID":4,"Op":"stats"}`, want: Request{ID: 4, Op: "stats"}},
		{name: "duplicate key: last wins", in: `{"id":1,"op":"x","op":"stats"}`, want: Request{ID: 1, Op: "stats"}},
		{name: "null fields are absent", in: `{"id":5,"op":"stats","port":null,"host":null}`, want: Request{ID: 5, Op: "stats"}},

		{name: "not JSON", in: `hello`, wantErr: "not a JSON object"},
		{name: "empty payload", in: ``, wantErr: "not a JSON object"},
		{name: "truncated JSON keeps no id", in: `{"id":5,"op":"sta`, wantErr: "not a JSON object"},
		{name: "array", in: `[1,2]`, wantErr: "not a JSON object"},
		{name: "string", in: `"op"`, wantErr: "not a JSON object"},
		{name: "null", in: `null`, wantErr: `no "op"`},
		{name: "empty object", in: `{}`, wantErr: `no "op"`},
		{name: "no op, id salvaged", in: `{"id":11}`, wantID: 11, wantErr: `no "op"`},
		{name: "empty op", in: `{"id":12,"op":""}`, wantID: 12, wantErr: `no "op"`},
		{name: "null op", in: `{"id":12,"op":null}`, wantID: 12, wantErr: `no "op"`},
		{name: "op not a string, id salvaged", in: `{"id":13,"op":5}`, wantID: 13, wantErr: "not a JSON object"},
		{name: "port a string, id salvaged", in: `{"id":14,"op":"listen","port":"80"}`, wantID: 14, wantErr: "not a JSON object"},
		{name: "port a float, id salvaged", in: `{"id":14,"op":"listen","port":80.0}`, wantID: 14, wantErr: "not a JSON object"},
		{name: "port 1e3, id salvaged", in: `{"id":14,"op":"listen","port":1e3}`, wantID: 14, wantErr: "not a JSON object"},
		{name: "port too large for int, id salvaged", in: `{"id":15,"op":"listen","port":99999999999999999999}`, wantID: 15, wantErr: "not a JSON object"},
		{name: "version a string", in: `{"id":16,"op":"hello","version":"1"}`, wantID: 16, wantErr: "not a JSON object"},
		{name: "id after the bad field", in: `{"op":"listen","port":"x","id":17}`, wantID: 17, wantErr: "not a JSON object"},
		{name: "negative id lost", in: `{"id":-1,"op":"stats"}`, wantErr: "not a JSON object"},
		{name: "fractional id lost", in: `{"id":1.5,"op":"stats"}`, wantErr: "not a JSON object"},
		{name: "id over uint64 lost", in: `{"id":18446744073709551616,"op":"stats"}`, wantErr: "not a JSON object"},
		{name: "string id lost", in: `{"id":"7","op":"stats"}`, wantErr: "not a JSON object"},
		{name: "trailing garbage", in: `{"id":18,"op":"stats"} x`, wantErr: "not a JSON object"},
		{name: "two objects", in: `{"id":18,"op":"stats"}{"id":19}`, wantErr: "not a JSON object"},
		{name: "port -1", in: `{"id":20,"op":"listen","port":-1}`, wantID: 20, wantErr: "out of range"},
		{name: "port 65536", in: `{"id":21,"op":"dial","host":"b","port":65536}`, wantID: 21, wantErr: "out of range"},
		{name: "port checked for every op", in: `{"id":22,"op":"stats","port":70000}`, wantID: 22, wantErr: "out of range"},
		{name: "huge negative port", in: `{"id":23,"op":"listen","port":-9223372036854775808}`, wantID: 23, wantErr: "out of range"},
		{name: "negative timeout", in: `{"id":24,"op":"dial","host":"b","port":1,"timeout_ms":-1}`, wantID: 24, wantErr: "timeout_ms"},
		{name: "invalid UTF-8 in a string is accepted", in: "{\"id\":25,\"op\":\"dial\",\"host\":\"\xff\xfe\",\"port\":1}", want: Request{ID: 25, Op: "dial", Host: "\ufffd\ufffd", Port: 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, perr := ParseRequest([]byte(tt.in))
			if tt.wantErr == "" {
				if perr != nil {
					t.Fatalf("ParseRequest(%s) = %v", tt.in, perr)
				}
				if !reflect.DeepEqual(got, tt.want) {
					t.Fatalf("ParseRequest(%s) = %+v; want %+v", tt.in, got, tt.want)
				}
				return
			}
			if perr == nil {
				t.Fatalf("ParseRequest(%s) = %+v; want error containing %q", tt.in, got, tt.wantErr)
			}
			if perr.Code != CodeBadRequest {
				t.Errorf("code %q; want %q", perr.Code, CodeBadRequest)
			}
			if !strings.Contains(perr.Message, tt.wantErr) {
				t.Errorf("message %q; want it to contain %q", perr.Message, tt.wantErr)
			}
			if got.ID != tt.wantID {
				t.Errorf("salvaged id %d; want %d", got.ID, tt.wantID)
			}
		})
	}
}

func TestErrorIs(t *testing.T) {
	busy := &Error{Code: CodeBusy, Message: "one"}
	tests := []struct {
		name   string
		err    error
		target error
		want   bool
	}{
		{"same code, other message", busy, &Error{Code: CodeBusy, Message: "two"}, true},
		{"same pointer", busy, busy, true},
		{"other code", busy, &Error{Code: CodeTimeout}, false},
		{"wrapped", fmt.Errorf("call: %w", busy), &Error{Code: CodeBusy}, true},
		{"doubly wrapped", fmt.Errorf("a: %w", fmt.Errorf("b: %w", &Error{Code: CodeUnknownHost, Message: "x"})), &Error{Code: CodeUnknownHost}, true},
		{"target not an *Error", busy, errors.New("busy: one"), false},
		{"target a sentinel", busy, io.EOF, false},
		{"empty codes match", &Error{}, &Error{}, true},
		{"empty vs set", &Error{}, &Error{Code: CodeBusy}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := errors.Is(tt.err, tt.target); got != tt.want {
				t.Fatalf("errors.Is(%v, %v) = %v; want %v", tt.err, tt.target, got, tt.want)
			}
		})
	}
	if got := busy.Error(); got != "busy: one" {
		t.Fatalf("Error() = %q", got)
	}
	var e *Error
	if !errors.As(fmt.Errorf("x: %w", busy), &e) || e.Message != "one" {
		t.Fatalf("errors.As did not find the *Error")
	}
}

// TestWireNames pins the JSON field names the specification promises.
func TestWireNames(t *testing.T) {
	tests := []struct {
		v    any
		want string
	}{
		{Request{ID: 1, Op: OpHello, Version: 1, Client: "c"}, `{"id":1,"op":"hello","version":1,"client":"c"}`},
		{Request{ID: 2, Op: OpDial, Host: "h", Port: 3, TimeoutMS: 4}, `{"id":2,"op":"dial","port":3,"host":"h","timeout_ms":4}`},
		{Request{ID: 3, Op: OpWhoIs, Addr: "a"}, `{"id":3,"op":"whois","addr":"a"}`},
		{Response{ID: 4, OK: true, Result: json.RawMessage(`{}`)}, `{"id":4,"ok":true,"result":{}}`},
		{Response{ID: 5, OK: false, Error: &Error{Code: "c", Message: "m"}}, `{"id":5,"ok":false,"error":{"code":"c","message":"m"}}`},
		{Response{ID: 6, OK: true, FD: true, Result: json.RawMessage(`{"peer":{}}`)}, `{"id":6,"ok":true,"fd":true,"result":{"peer":{}}}`},
		{Event{Event: EventAccept, FD: true, ListenerPort: 7}, `{"event":"accept","fd":true,"listener_port":7,"peer":null}`},
		{HelloResult{Version: 1, Helper: "v", Hostname: "h", State: "Running", LocalOnly: true, Policy: "owner"}, `{"version":1,"helper":"v","hostname":"h","state":"Running","local_only":true,"policy":"owner"}`},
		{ListenResult{Port: 9}, `{"port":9}`},
		{Stats{Goroutines: 1, OpenFDs: 2, Clients: 3, Listeners: 4, Registrations: 6, Bridges: 5}, `{"goroutines":1,"open_fds":2,"clients":3,"listeners":4,"registrations":6,"bridges":5}`},
	}
	for _, tt := range tests {
		got, err := json.Marshal(tt.v)
		if err != nil || string(got) != tt.want {
			t.Errorf("%T: %s, %v; want %s", tt.v, got, err, tt.want)
		}
	}
}
