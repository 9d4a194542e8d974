package control

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"reflect"
	"runtime"
	"testing"
	"time"

	"github.com/tsdist/tsdist/carrier"
)

// Seed corpora live in testdata/fuzz/<FuzzName>/ as well as in the f.Add
// calls below; `go test` runs both as ordinary tests.

// FuzzReadFrame feeds arbitrary streams to ReadFrame with an arbitrary limit.
// Properties: it never panics; it never takes more of the stream than the
// header and the payload it announces; a frame over the limit is refused
// after the 4 header bytes, without allocating its payload; it never
// allocates more than the limit (plus a little for its error); a frame it
// returns is exactly the bytes after the header.
func FuzzReadFrame(f *testing.F) {
	f.Add([]byte("\x00\x00\x00\x0b{\"id\":1234}"), uint32(MaxRequestSize))
	f.Add([]byte{0, 0, 0, 0}, uint32(MaxRequestSize))
	f.Add([]byte{0, 0}, uint32(MaxRequestSize))
	f.Add([]byte{}, uint32(MaxRequestSize))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff}, uint32(MaxResponseSize))
	f.Add([]byte{0, 1, 0, 1, 'x'}, uint32(MaxRequestSize))
	f.Add([]byte{0, 1, 0, 0, 'x'}, uint32(MaxRequestSize))
	f.Add([]byte{0, 0, 0, 5, 'a', 'b'}, uint32(4))
	f.Add([]byte{0, 0, 0, 2, 0xff, 0xfe, 0, 0, 0, 1, 'x'}, uint32(2))
	f.Add([]byte{0x80, 0, 0, 0}, uint32(0))
	f.Fuzz(func(t *testing.T, data []byte, limit uint32) {
		max := int(limit % (MaxResponseSize + 1))
		// Allocation is measured process-wide, so other goroutines (the
		// fuzzing engine's own) can add to it: take the least of a few runs.
		var (
			cr        *countingReader
			payload   []byte
			err       error
			allocated uint64 = 1<<64 - 1
		)
		for range 3 {
			cr = &countingReader{r: bytes.NewReader(data)}
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			payload, err = ReadFrame(cr, max)
			runtime.ReadMemStats(&after)
			allocated = min(allocated, after.TotalAlloc-before.TotalAlloc)
			if allocated <= 1<<10 {
				break
			}
		}

		if len(data) < 4 {
			want := io.ErrUnexpectedEOF
			if len(data) == 0 {
				want = io.EOF
			}
			if err != want || payload != nil {
				t.Fatalf("short header: %q, %v; want %v", payload, err, want)
			}
			return
		}
		n := int(binary.BigEndian.Uint32(data))
		const slack = 16 << 10 // the error value and its message
		if allocated > uint64(min(n, max))+slack {
			t.Fatalf("ReadFrame allocated %d bytes for a %d-byte frame, limit %d", allocated, n, max)
		}
		switch {
		case n > max:
			if !errors.Is(err, ErrFrameTooLarge) || payload != nil {
				t.Fatalf("oversized frame (%d > %d): %v", n, max, err)
			}
			if cr.n != 4 {
				t.Fatalf("oversized frame: read %d bytes of the stream; want the 4 of the header", cr.n)
			}
		case n == 0:
			if err == nil || errors.Is(err, ErrFrameTooLarge) || payload != nil {
				t.Fatalf("empty frame: %q, %v", payload, err)
			}
		case len(data) < 4+n:
			if err != io.ErrUnexpectedEOF || payload != nil {
				t.Fatalf("truncated payload: %q, %v", payload, err)
			}
		default:
			if err != nil || !bytes.Equal(payload, data[4:4+n]) {
				t.Fatalf("complete frame: %q, %v; want %q", payload, err, data[4:4+n])
			}
			if cr.n != 4+n {
				t.Fatalf("read %d bytes of the stream for a %d-byte frame", cr.n, n)
			}
			if cap(payload) > max {
				t.Fatalf("payload capacity %d over the limit %d", cap(payload), max)
			}
		}
	})
}

// FuzzParseRequest feeds arbitrary payloads to ParseRequest. Properties: it
// never panics; a success has a non-empty op, a port in 0-65535 and a
// non-negative timeout, and survives a marshal/parse round trip unchanged; a
// failure is a bad_request with a message, and keeps the id whenever the
// payload holds a readable one.
func FuzzParseRequest(f *testing.F) {
	for _, s := range []string{
		`{"id":1,"op":"hello","version":1,"client":"erl"}`,
		`{"id":2,"op":"status"}`,
		`{"id":3,"op":"stats"}`,
		`{"id":4,"op":"whois","addr":"100.64.0.2:41234"}`,
		`{"id":5,"op":"listen","port":0}`,
		`{"id":6,"op":"unlisten","port":4370}`,
		`{"id":7,"op":"dial","host":"beta","port":4369,"timeout_ms":2500}`,
		`{"id":8,"op":"dial","host":"beta","port":-1}`,
		`{"id":9,"op":"dial","host":"beta","port":65536}`,
		`{"id":10,"op":"dial","host":"beta","port":1,"timeout_ms":-5}`,
		`{"id":11,"op":"dial","host":"beta","port":1,"timeout_ms":9223372036855}`,
		`{"id":18446744073709551615,"op":"stats"}`,
		`{"id":18446744073709551616,"op":"stats"}`,
		`{"id":-1,"op":"stats"}`,
		`{"id":1e3,"op":"stats"}`,
		`{"id":12,"op":"listen","port":1e400}`,
		`{"id":13,"op":""}`,
		`{"id":14}`,
		`{"id":15,"op":{"nested":{"deeper":[[[[[[[[[[]]]]]]]]]]}}}`,
		`{"id":16,"op":"status","x":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[{}]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}`,
		"{\"id\":17,\"op\":\"dial\",\"host\":\"\xff\xfe\xfd\",\"port\":1}",
		`{"id":18,"op":"\u0000"}`,
		`{"ID":19,"OP":"stats","Port":80}`,
		`{"id":20,"op":"stats"`,
		`[]`,
		`null`,
		`"hello"`,
		``,
		`{"id":21,"op":"stats"} {"id":22}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, payload []byte) {
		req, perr := ParseRequest(payload)
		if perr != nil {
			if perr.Code != CodeBadRequest || perr.Message == "" {
				t.Fatalf("error %+v; want a bad_request with a message", perr)
			}
			var idOnly struct {
				ID uint64 `json:"id"`
			}
			if json.Unmarshal(payload, &idOnly) == nil && req.ID != idOnly.ID {
				t.Fatalf("error response would carry id %d; the payload's id is %d", req.ID, idOnly.ID)
			}
			return
		}
		if req.Op == "" {
			t.Fatalf("success with an empty op: %+v", req)
		}
		if req.Port < 0 || req.Port > 65535 {
			t.Fatalf("success with port %d", req.Port)
		}
		if req.TimeoutMS < 0 {
			t.Fatalf("success with timeout_ms %d", req.TimeoutMS)
		}
		again, err := json.Marshal(req)
		if err != nil {
			t.Fatalf("marshal %+v: %v", req, err)
		}
		back, perr := ParseRequest(again)
		if perr != nil || !reflect.DeepEqual(back, req) {
			t.Fatalf("round trip of %+v through %s: %+v, %v", req, again, back, perr)
		}
	})
}

// FuzzClientMessages feeds arbitrary helper-to-client streams to the Go
// client's read loop, with descriptors attached to any of the frames. The
// stream is cut into frames by its own length headers (what cannot be cut is
// sent as is); bit i of fdMask attaches a descriptor (a socketpair end) to
// frame i. Requests 1 to 3 are pending, as if sent.
//
// Properties: the read loop never panics and always ends once the helper's
// end is closed; every descriptor the client receives ends up either handed
// out (a response for a pending request, an accepted connection) or closed;
// handing out a response never panics.
func FuzzClientMessages(f *testing.F) {
	msgs := func(ms ...string) []byte {
		var b []byte
		for _, m := range ms {
			b = AppendFrame(b, []byte(m))
		}
		return b
	}
	peer := `{"addr":"100.64.0.2:41234","node":"beta","dns_name":"beta.tsdist.test","user":"u@example.com","tags":[],"ips":["100.64.0.2"]}`
	f.Add(msgs(`{"id":1,"ok":true,"result":{"version":1,"helper":"x","hostname":"a","state":"Running"}}`), uint64(0))
	f.Add(msgs(`{"id":1,"ok":true,"fd":true,"result":{"peer":`+peer+`}}`), uint64(1))
	f.Add(msgs(`{"event":"accept","fd":true,"listener_port":4370,"peer":`+peer+`}`), uint64(1))
	f.Add(msgs(`{"event":"accept","fd":true,"listener_port":4370,"peer":null}`), uint64(1))
	f.Add(msgs(`{"event":"other","fd":true}`), uint64(1))
	f.Add(msgs(`{"id":2,"ok":false,"error":{"code":"busy","message":"m"}}`, `{"id":3,"ok":false}`), uint64(0))
	f.Add(msgs(`{"id":2,"ok":true,"fd":true,"result":{}}`, `{"id":2,"ok":true,"fd":true}`), uint64(3))
	f.Add(msgs(`{"id":9,"ok":true,"fd":true}`), uint64(1))
	f.Add(msgs(`{"id":1,"ok":true,"fd":true}`), uint64(0))
	f.Add(msgs(`{"id":1,"ok":true}`), uint64(1))
	f.Add(msgs(`{"id":1,"ok":true,"fd":true,"result":{"peer":5}}`), uint64(1))
	f.Add(msgs(`{"event":"accept","fd":"yes"}`), uint64(1))
	f.Add(msgs(`not json`), uint64(1))
	f.Add(msgs(`{"id":0,"ok":false,"error":{"code":"too_large","message":"m"}}`), uint64(0))
	f.Add([]byte{0, 0, 0, 0}, uint64(0))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff}, uint64(1))
	f.Add([]byte{0, 0, 0, 9, '{'}, uint64(1))

	// Warm up what the runtime opens once (the poller), so descriptor
	// counts compare like with like.
	if a, b, err := carrier.Socketpair(); err == nil {
		a.Close()
		b.Close()
	}
	f.Fuzz(func(t *testing.T, stream []byte, fdMask uint64) {
		fdsBefore := openFDs()
		near, farFile, err := carrier.Socketpair()
		if err != nil {
			t.Skip(err)
		}
		helper, err := net.FileConn(farFile)
		farFile.Close()
		if err != nil {
			near.Close()
			t.Skip(err)
		}
		c := &Client{
			conn:    near,
			fdr:     carrier.NewFDReader(near),
			pending: map[uint64]chan Response{},
			acceptC: make(chan struct{}, 1),
			done:    make(chan struct{}),
		}
		chans := map[uint64]chan Response{}
		for id := uint64(1); id <= 3; id++ {
			chans[id] = make(chan Response, 1)
			c.pending[id] = chans[id]
		}
		go c.readLoop()

		// The helper's side: frames, some with a descriptor, then EOF.
		var kept []*net.UnixConn // near ends of the passed descriptors
		wrote := make(chan struct{})
		go func() {
			defer close(wrote)
			defer helper.Close()
			hc := helper.(*net.UnixConn)
			rest := stream
			for i := 0; len(rest) > 0; i++ {
				if len(rest) < 4 {
					hc.Write(rest)
					return
				}
				n := int(binary.BigEndian.Uint32(rest))
				if n > len(rest)-4 {
					hc.Write(rest)
					return
				}
				fr := rest[:4+n]
				rest = rest[4+n:]
				if i < 64 && fdMask&(1<<i) != 0 {
					kn, kf, err := carrier.Socketpair()
					if err != nil {
						return
					}
					kept = append(kept, kn)
					err = carrier.SendFD(hc, fr, kf)
					kf.Close()
					if err != nil {
						return
					}
				} else if _, err := hc.Write(fr); err != nil {
					return
				}
			}
		}()

		select {
		case <-c.done:
		case <-time.After(10 * time.Second):
			t.Fatal("client read loop did not end after the helper's end closed")
		}
		near.Close() // unblocks the writer if the read loop gave up early
		<-wrote
		for _, k := range kept {
			k.Close()
		}
		c.mu.Lock()
		cerr := c.err
		c.mu.Unlock()
		if cerr == nil {
			t.Fatal("read loop ended without recording an error")
		}

		// Hand out what arrived, as the client's callers would.
		for id, ch := range chans {
			select {
			case resp := <-ch:
				if resp.ID != id {
					t.Fatalf("response %d delivered to request %d", resp.ID, id)
				}
				var fd *os.File
				var res DialResult
				var fdOut **os.File
				if id == 1 {
					fdOut = &fd
				}
				if err := decodeResponse(resp, &res, fdOut); err != nil && fd != nil {
					// decodeResponse handed out a descriptor and failed;
					// the caller (DialTailnet) drops it on error.
					fd.Close()
					t.Logf("decodeResponse returned %v with a descriptor: a caller ignoring it leaks it", err)
				}
				closeFile(fd)
			default:
			}
		}
		c.mu.Lock()
		for _, a := range c.accepts {
			if a.UnixConn == nil {
				t.Fatal("accepted connection without a socket")
			}
			a.Close()
		}
		c.accepts = nil
		c.mu.Unlock()

		// The count is the process's: a descriptor another test's node
		// opens for a moment (a DERP or STUN socket of one still closing)
		// must not count, so a surplus must last to be a leak.
		if fdsBefore >= 0 {
			deadline := time.Now().Add(2 * time.Second)
			for after := openFDs(); after > fdsBefore; after = openFDs() {
				if time.Now().After(deadline) {
					t.Fatalf("descriptors leaked: %d open before, %d after", fdsBefore, after)
				}
				time.Sleep(10 * time.Millisecond)
			}
		}
	})
}

func openFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}
