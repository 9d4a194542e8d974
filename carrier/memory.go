package carrier

import (
	"context"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Returning memory after bursts of traffic (ReleaseMemory).
//
// Every packet in flight through a node holds a 64 KiB wireguard-go
// message buffer, whatever its size, so a bulk transfer grows the heap by
// tens of MB of buffers. When it ends they sit in sync.Pools, and the heap
// goal stays at twice the peak, until a GC happens to run: with little
// allocation that is Go's forced GC, every two minutes, so a helper at
// rest kept 100+ MB resident after a transfer (docs/BENCHMARKS.md). Every
// releaseEvery, if the heap holds more than releaseAbove and less than
// quietAllocs were allocated since the last look (the burst is over), the
// process collects twice (a pool's buffers go on the second) and returns
// the free memory to the OS: a few milliseconds, once per burst.
const (
	releaseEvery = 2 * time.Second
	releaseAbove = 24 << 20
	quietAllocs  = 8 << 20
)

// ReleaseMemory returns the process's free memory to the operating system
// after each burst of traffic, until ctx is done. It acts on the whole
// process: a program that runs tailnet nodes runs it once (the tsdist
// helper and ergonode do).
func ReleaseMemory(ctx context.Context) {
	sample := []metrics.Sample{
		{Name: "/gc/heap/allocs:bytes"},
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/heap/unused:bytes"},
		{Name: "/memory/classes/heap/free:bytes"},
	}
	tick := time.NewTicker(releaseEvery)
	defer tick.Stop()
	var lastAllocs uint64
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		metrics.Read(sample)
		allocs := sample[0].Value.Uint64()
		var held uint64
		for _, s := range sample[1:] {
			held += s.Value.Uint64()
		}
		quiet := allocs-lastAllocs < quietAllocs
		lastAllocs = allocs
		if quiet && held > releaseAbove {
			runtime.GC()
			debug.FreeOSMemory()
		}
	}
}
