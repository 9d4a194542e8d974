package main

import (
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"strings"
	"syscall"
)

// servePprof serves Go's profiler (net/http/pprof) on a Unix socket at
// path (0600, created with a private umask), for profiling the helper's
// data path. Opt-in only (--pprof or TSDIST_PPROF). Not on TCP: on
// loopback every local user could read the profiles. And not the cmdline
// handler, which would show the helper's arguments to whoever can connect.
//
//	curl --unix-socket PATH http://x/debug/pprof/profile?seconds=10 -o cpu.prof
func servePprof(path string, say func(string, ...any)) (stop func(), err error) {
	if !strings.HasPrefix(path, "/") {
		return nil, usageError{fmt.Errorf("--pprof %q: want the absolute path of a Unix socket", path)}
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		os.Remove(path) // a stale socket of an earlier run
	}
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("pprof: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	say("profiler (pprof) on %s", path)
	return func() {
		srv.Close()
		os.Remove(path)
	}, nil
}
