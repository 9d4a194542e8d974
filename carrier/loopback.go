package carrier

import (
	"net/netip"
	"net/url"
	"sync"

	"tailscale.com/envknob"
	"tailscale.com/net/netns"
)

// loopbackKnobs are the environment knobs tailscale's own integration tests
// set, plus TS_DEBUG_OMIT_LOCAL_ADDRS, without which a node advertises the
// machine's non-loopback addresses as endpoints and sends disco packets there.
var loopbackKnobs = [][2]string{
	{"TS_NO_LOGS_NO_SUPPORT", "true"},
	{"TS_DISABLE_PORTMAPPER", "1"},
	{"TS_ASSUME_NETWORK_UP_FOR_TEST", "1"},
	{"TS_PANIC_IF_HIT_MAIN_CONTROL", "1"},
	{"TS_DEBUG_OMIT_LOCAL_ADDRS", "1"},
}

var loopbackOnce sync.Once

// KeepToLoopback sets this process's tailscale knobs so that tsnet nodes
// created afterwards keep every packet on loopback, as the offline tailnet
// needs: no local endpoints are advertised, no port mapping is attempted, no
// logs are uploaded, and reaching Tailscale's public control plane panics
// rather than leaks. It also turns off policy-routing sockets (netns), as
// tailscale's tests do.
//
// Knobs are read when nodes start, so call it before the first node starts.
// Only the first call does anything: later ones would race with running
// nodes reading the knobs.
func KeepToLoopback() {
	loopbackOnce.Do(func() {
		for _, kv := range loopbackKnobs {
			envknob.Setenv(kv[0], kv[1])
		}
		netns.SetEnabled(false)
	})
}

// KeepsToLoopback reports whether this process's tailscale knobs keep its
// nodes on loopback, whether set by [KeepToLoopback] or in the environment.
func KeepsToLoopback() bool {
	for _, kv := range loopbackKnobs {
		if envknob.String(kv[0]) == "" {
			return false
		}
	}
	return true
}

// IsLoopbackURL reports whether a control URL names a loopback host, as the
// offline tailnet's does. A node whose control server is on loopback has
// every peer on loopback too, so callers apply [KeepToLoopback] for it.
func IsLoopbackURL(raw string) bool {
	u, err := url.Parse(raw)
	if err != nil || u.Hostname() == "" {
		return false
	}
	if u.Hostname() == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(u.Hostname())
	return err == nil && ip.IsLoopback()
}
