// Package nettest holds network fixtures shared by the tests of several
// packages.
package nettest

import (
	"net"
	"sync"
	"testing"
)

// Silent accepts connections on ln and holds them open, never reading or
// writing, until the test ends; then it closes ln and every connection and
// waits for its goroutine, so leak checks see nothing of it. It stands in
// for a peer that connects and then says nothing.
func Silent(t testing.TB, ln net.Listener) {
	var (
		mu    sync.Mutex
		conns []net.Conn
		wg    sync.WaitGroup
	)
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	})
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
		for _, c := range conns {
			c.Close()
		}
	})
}
