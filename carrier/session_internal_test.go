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
