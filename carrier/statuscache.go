package carrier

import (
	"context"
	"sync"
	"sync/atomic"

	"tailscale.com/ipn"
	"tailscale.com/ipn/ipnstate"
)

// netmapView shares one LocalAPI Status among the look-ups that resolve
// names (Candidates) until the netmap changes. A Status is O(peers) and is
// built under the LocalBackend's lock: measured in `make bench`'s 8-node
// meshes, with 50-100 devices in the netmap, a look-up's Status took
// 1.3-5 ms alone and 50-360 ms while the 56 dials of a mesh queued for it,
// so the look-ups, not the tailnet, set the mesh's pace as the tailnet grew.
//
// Freshness is kept by generation: every notification of the node's IPN
// bus (netmap, peer changes, state) bumps it, and a Status fetched at an
// older generation is not reused. A look-up therefore sees every change
// notified before it began, as a Status of its own would.
type netmapView struct {
	watching atomic.Bool   // the bus watch is running; else every look-up fetches
	gen      atomic.Uint64 // bumped at each notification

	mu     sync.Mutex // held while fetching: concurrent look-ups share one Status
	st     *ipnstate.Status
	stGen  uint64
	stSeen bool
}

// status returns a Status no older than the last notification, fetching
// one with fetch if it must. The Status is shared: callers must not change
// it.
func (v *netmapView) status(ctx context.Context, fetch func(context.Context) (*ipnstate.Status, error)) (*ipnstate.Status, error) {
	if !v.watching.Load() {
		return fetch(ctx)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	gen := v.gen.Load()
	if v.stSeen && v.stGen == gen {
		return v.st, nil
	}
	st, err := fetch(ctx)
	if err != nil {
		return nil, err
	}
	v.st, v.stGen, v.stSeen = st, gen, true
	return st, nil
}

// watchNetmap follows the node's IPN bus for netmapView until ctx ends or
// the bus fails (then look-ups fetch a Status each, as before).
func (n *Node) watchNetmap(ctx context.Context) {
	lc, err := n.local()
	if err != nil {
		return
	}
	watcher, err := lc.WatchIPNBus(ctx, ipn.NotifyPeerChanges)
	if err != nil {
		return
	}
	defer watcher.Close()
	n.view.gen.Add(1) // anything before the watch began is not known to be seen
	n.view.watching.Store(true)
	defer n.view.watching.Store(false)
	for {
		if _, err := watcher.Next(); err != nil {
			return
		}
		n.view.gen.Add(1)
	}
}
