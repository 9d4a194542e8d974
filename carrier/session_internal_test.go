package carrier

import (
	"testing"
	"time"

	"tailscale.com/types/key"
)

// TestCrossingsFromLog feeds the crossing recogniser the log calls that
// wireguard-go and tailscale's wglog make (wglog prefixes the format), and
// lines that only look alike.
func TestCrossingsFromLog(t *testing.T) {
	peer := key.NewNode().Public()
	other := key.NewNode().Public()
	tests := []struct {
		name   string
		format string
		args   []any
		want   bool // a crossing with peer is recorded
	}{
		{"wireguard's line", "wg: [v2] Received invalid response message from %s", []any{peer.UntypedHexString()}, true},
		{"already formatted", "wg: [v2] Received invalid response message from " + peer.UntypedHexString(), nil, true},
		{"another peer's", "wg: [v2] Received invalid response message from %s", []any{other.UntypedHexString()}, false},
		{"a valid response", "wg: [v2] %v - Received handshake response", []any{"[abcde]"}, false},
		{"an invalid initiation", "wg: [v2] Received invalid initiation message from %s", []any{peer.UntypedHexString()}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newCrossings()
			signal := c.watch(peer)
			var forwarded int
			c.logf(func(string, ...any) { forwarded++ })(tt.format, tt.args...)
			if forwarded != 1 {
				t.Errorf("line forwarded %d times, want once", forwarded)
			}
			if got := c.fresh(peer, time.Minute); got != tt.want {
				t.Errorf("crossing recorded = %v, want %v", got, tt.want)
			}
			select {
			case <-signal:
				if !tt.want && !c.fresh(other, time.Minute) {
					t.Error("signalled without a crossing")
				}
			default:
				if tt.want {
					t.Error("crossing recorded but not signalled")
				}
			}
			if tt.want {
				if _, ok := c.take(peer, time.Minute); !ok {
					t.Error("take: crossing not there")
				}
				if _, ok := c.take(peer, time.Minute); ok {
					t.Error("take: a crossing allows one reset, got two")
				}
			}
		})
	}
	if c := newCrossings(); c.watch(key.NodePublic{}) != nil {
		t.Error("watch of the zero key (the end that does not reset) must never fire")
	}
}

// TestRacedHandshakeFromLog feeds the race recogniser the sequences of
// handshake lines wireguard-go logs for one peer: only a valid response
// that comes after this node answered the peer's initiation, with no new
// initiation of its own in between, is the race (see resetRaced).
func TestRacedHandshakeFromLog(t *testing.T) {
	peer := key.NewNode().Public()
	short := peer.ShortString()
	wgName := logNames(peer)[1]
	line := func(name, event string) [2]string { return [2]string{"wg: [v2] %v" + event, name} }
	tests := []struct {
		name  string
		lines [][2]string
		want  bool
	}{
		{"raced", [][2]string{line(short, sentInitiationLog), line(short, gotInitiationLog), line(short, " - Sending handshake response"), line(short, gotResponseLog)}, true},
		{"raced, wireguard-go's own peer name", [][2]string{line(wgName, sentInitiationLog), line(wgName, gotInitiationLog), line(wgName, gotResponseLog)}, true},
		{"raced, the keys not made", [][2]string{line(short, sentInitiationLog), line(short, gotResponseLog), line(short, noKeypairLog), line(short, gotInitiationLog)}, true},
		{"a plain handshake", [][2]string{line(short, sentInitiationLog), line(short, gotResponseLog)}, false},
		{"answered after the session was made", [][2]string{line(short, sentInitiationLog), line(short, gotResponseLog), line(short, gotInitiationLog)}, false},
		{"only answering", [][2]string{line(short, gotInitiationLog), line(short, gotResponseLog)}, false},
		{"a new initiation in between", [][2]string{line(short, sentInitiationLog), line(short, gotInitiationLog), line(short, sentInitiationLog), line(short, gotResponseLog)}, false},
		{"the answer could not be created", [][2]string{line(short, sentInitiationLog), line(short, gotInitiationLog), line(short, gotResponseLog), line(short, noResponseLog)}, false},
		{"another peer's lines", [][2]string{line("[zzzzz]", sentInitiationLog), line("[zzzzz]", gotInitiationLog), line("[zzzzz]", gotResponseLog)}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newCrossings()
			signal := c.watch(peer)
			logf := c.logf(func(string, ...any) {})
			for _, l := range tt.lines {
				logf(l[0], l[1])
			}
			signalled := false
			select {
			case <-signal:
				signalled = true
			default:
			}
			_, raced := c.takeRace(peer, time.Minute)
			if got := raced && !c.raceUndone(peer); got != tt.want {
				t.Errorf("race to reset = %v, want %v", got, tt.want)
			}
			if tt.want && !signalled {
				t.Error("race recorded but not signalled")
			}
			if _, again := c.takeRace(peer, time.Minute); again {
				t.Error("takeRace: a race allows one reset, got two")
			}
		})
	}
}

// TestPathlessFromLog: a handshake message that could not be sent for
// want of an address names its peer to the hook; other send errors do not.
func TestPathlessFromLog(t *testing.T) {
	tests := []struct {
		name   string
		format string
		args   []any
		want   string
	}{
		{"a response", "wg: %v - Failed to send handshake response: %v", []any{"[kcUU4]", "no UDP or DERP addr"}, "[kcUU4]"},
		{"an initiation", "wg: %v - Failed to send handshake initiation: %v", []any{"peer(kcUU…9Xs=)", "no UDP or DERP addr"}, "peer(kcUU…9Xs=)"},
		{"another error", "wg: %v - Failed to send handshake response: %v", []any{"[kcUU4]", "peer's node key has expired"}, ""},
		{"a data packet", "wg: %v - Failed to send data packets: %v", []any{"[kcUU4]", "no UDP or DERP addr"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newCrossings()
			var got string
			c.pathless = func(peer string) { got = peer }
			c.logf(func(string, ...any) {})(tt.format, tt.args...)
			if got != tt.want {
				t.Errorf("pathless peer = %q, want %q", got, tt.want)
			}
		})
	}
}
