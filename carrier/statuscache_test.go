package carrier

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"tailscale.com/ipn/ipnstate"
)

// TestNetmapView: look-ups share one Status until a notification, never
// across one, and not at all while the bus is not watched; look-ups that
// come while one is fetched wait for it rather than fetch again.
func TestNetmapView(t *testing.T) {
	var fetches atomic.Int32
	fetch := func(context.Context) (*ipnstate.Status, error) {
		fetches.Add(1)
		time.Sleep(20 * time.Millisecond)
		return &ipnstate.Status{}, nil
	}
	var v netmapView
	ctx := context.Background()
	get := func() *ipnstate.Status {
		st, err := v.status(ctx, fetch)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	get()
	get()
	if n := fetches.Load(); n != 2 {
		t.Errorf("not watching: %d fetches for 2 look-ups, want 2", n)
	}
	v.watching.Store(true)
	v.gen.Add(1)
	a, b := get(), get()
	if n := fetches.Load(); n != 3 || a != b {
		t.Errorf("watching: %d fetches (want 3), shared = %v", n, a == b)
	}
	v.gen.Add(1) // a notification
	if c := get(); c == a || fetches.Load() != 4 {
		t.Errorf("a Status from before a notification was reused")
	}
	v.gen.Add(1)
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() { defer wg.Done(); get() }()
	}
	wg.Wait()
	if n := fetches.Load(); n != 5 {
		t.Errorf("8 concurrent look-ups made %d fetches, want 1", n-4)
	}
}
