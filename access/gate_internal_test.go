package access

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestRefusalLogRateLimited: a device refused again and again is logged
// once a minute, the next line counting the refusals in between; another
// device still gets its own line at once; the memory of devices is bounded.
func TestRefusalLogRateLimited(t *testing.T) {
	var lines []string
	g := NewGate(nil, func(format string, args ...any) { lines = append(lines, fmt.Sprintf(format, args...)) })
	lines = nil // NewGate's own line
	for range 1000 {
		g.refused("mallory", "refused %s", "mallory")
	}
	g.refused("eve", "refused %s", "eve")
	if len(lines) != 2 || !strings.Contains(lines[0], "mallory") || !strings.Contains(lines[1], "eve") {
		t.Fatalf("1,000 refusals of one device and one of another logged %d lines: %q", len(lines), lines)
	}
	g.mu.Lock()
	g.refusals["mallory"].last = time.Now().Add(-refusalLogEvery - time.Second)
	g.mu.Unlock()
	g.refused("mallory", "refused %s", "mallory")
	if len(lines) != 3 || !strings.Contains(lines[2], "and 999 more refusals") {
		t.Fatalf("after a minute, the next refusal logged %q; want the 999 not logged counted", lines[2:])
	}
	for i := range 3 * refusalKeys {
		g.refused(fmt.Sprint("device", i), "refused %d", i)
	}
	if n := len(g.refusals); n > refusalKeys {
		t.Errorf("%d devices remembered, more than %d", n, refusalKeys)
	}
}
