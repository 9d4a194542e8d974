package carrier

import (
	"testing"
	"time"

	"tailscale.com/ipn/ipnstate"
)

// TestNameMatchOrder checks which of several nodes answering to one name
// Resolve picks: the case of a node killed without logging out ("alpha",
// lingering) and its successor ("alpha-1", hostname "alpha").
func TestNameMatchOrder(t *testing.T) {
	old := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	stale := &ipnstate.PeerStatus{HostName: "alpha", DNSName: "alpha.example.net.", Created: old}
	successor := &ipnstate.PeerStatus{HostName: "alpha", DNSName: "alpha-1.example.net.", Created: old.Add(time.Hour)}
	m := func(p *ipnstate.PeerStatus, online, exact bool) *nameMatch {
		return &nameMatch{peer: p, online: online, exact: exact}
	}
	cases := []struct {
		name      string
		a, b      *nameMatch
		wantAOver bool
	}{
		{"anything beats nothing", m(stale, false, false), nil, true},
		{"online successor beats offline stale node", m(successor, true, false), m(stale, false, true), true},
		{"offline stale node loses to online successor", m(stale, false, true), m(successor, true, false), false},
		{"both online (control has not noticed the kill yet): newer wins", m(successor, true, false), m(stale, true, true), true},
		{"both online: older loses", m(stale, true, true), m(successor, true, false), false},
		{"both offline: exact name wins", m(stale, false, true), m(successor, false, false), true},
		{"same creation time, both online: exact wins", m(&ipnstate.PeerStatus{Created: old}, true, true), m(stale, true, false), true},
		{"a tie keeps the first", m(stale, true, true), m(stale, true, true), false},
	}
	for _, c := range cases {
		if got := c.a.better(c.b); got != c.wantAOver {
			t.Errorf("%s: better = %v, want %v", c.name, got, c.wantAOver)
		}
	}
}
