package main

import (
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"strings"
)

// servePprof serves Go's profiler (net/http/pprof) on addr, for profiling
// the helper's data path: a Unix socket path (made 0600), or a loopback
// host:port. Opt-in only (--pprof or TSDIST_PPROF); anything but loopback
// is refused, since a profile shows what the helper is doing.
//
//	go tool pprof -seconds 10 http://127.0.0.1:6060/debug/pprof/profile
func servePprof(addr string, say func(string, ...any)) (stop func(), err error) {
	var ln net.Listener
	if strings.HasPrefix(addr, "/") {
		os.Remove(addr)
		ln, err = net.Listen("unix", addr)
		if err == nil {
			err = os.Chmod(addr, 0o600)
		}
	} else {
		ap, perr := netip.ParseAddrPort(addr)
		if perr != nil || !ap.Addr().IsLoopback() {
			return nil, usageError{fmt.Errorf("--pprof %q: want a Unix socket path or a loopback address like 127.0.0.1:6060", addr)}
		}
		ln, err = net.Listen("tcp", addr)
	}
	if err != nil {
		return nil, fmt.Errorf("pprof: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	say("profiler (pprof) on %s", addr)
	return func() {
		srv.Close()
		if strings.HasPrefix(addr, "/") {
			os.Remove(addr)
		}
	}, nil
}
