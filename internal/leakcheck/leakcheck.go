// Package leakcheck makes a test fail when it leaves goroutines or open file
// descriptors behind.
package leakcheck

import (
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// settle is how long Check waits for goroutines and descriptors that are
// still on their way out (a closed listener's accept loop, say).
var settle = 5 * time.Second

// Check records the process's goroutines and open descriptors now and, when
// the test ends, fails it if either count grew and did not come back down
// within a few seconds. It must not be used in parallel tests, whose
// neighbours would be counted too.
func Check(t testing.TB) {
	t.Helper()
	t.Setenv("TSDIST_LEAKCHECK", "1") // panics in a parallel test, as it must
	startG, startFD := runtime.NumGoroutine(), OpenFDs()
	t.Cleanup(func() {
		if t.Failed() {
			return
		}
		deadline := time.Now().Add(settle)
		for {
			g, fd := runtime.NumGoroutine(), OpenFDs()
			if g <= startG && fd <= startFD {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("leak: goroutines %d -> %d, open fds %d -> %d (%s)\n%s",
					startG, g, startFD, fd, strings.Join(FDTargets(), " "), buf)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// OpenFDs is the number of descriptors this process has open, or -1 where
// /proc is not available.
func OpenFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents) - 1 // the directory's own descriptor
}

// FDTargets lists what each open descriptor refers to, for leak reports.
func FDTargets() []string {
	ents, _ := os.ReadDir("/proc/self/fd")
	var out []string
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil {
			out = append(out, e.Name()+"="+l)
		}
	}
	return out
}
