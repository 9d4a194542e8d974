package leakcheck

import (
	"os"
	"testing"
	"time"
)

// fakeTB records whether Check failed it, so Check's own failure can be tested.
type fakeTB struct {
	testing.TB
	failed   bool
	cleanups []func()
}

func (f *fakeTB) Helper()                           {}
func (f *fakeTB) Setenv(k, v string)                {}
func (f *fakeTB) Failed() bool                      { return f.failed }
func (f *fakeTB) Errorf(format string, args ...any) { f.failed = true }
func (f *fakeTB) Cleanup(fn func())                 { f.cleanups = append(f.cleanups, fn) }
func (f *fakeTB) finish() {
	for i := len(f.cleanups) - 1; i >= 0; i-- {
		f.cleanups[i]()
	}
}

func init() { settle = 300 * time.Millisecond }

func TestCatchesLeakedFD(t *testing.T) {
	ft := &fakeTB{TB: t}
	Check(ft)
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ft.finish()
	if !ft.failed {
		t.Error("an open descriptor left behind was not reported")
	}
}

func TestCatchesLeakedGoroutine(t *testing.T) {
	ft := &fakeTB{TB: t}
	Check(ft)
	stop := make(chan struct{})
	defer close(stop)
	go func() { <-stop }()
	ft.finish()
	if !ft.failed {
		t.Error("a goroutine left behind was not reported")
	}
}

func TestCleanTestPasses(t *testing.T) {
	ft := &fakeTB{TB: t}
	Check(ft)
	done := make(chan struct{})
	go func() { time.Sleep(50 * time.Millisecond); close(done) }()
	f, _ := os.Open(os.DevNull)
	f.Close()
	ft.finish() // the goroutine exits while Check waits
	if ft.failed {
		t.Error("a test that cleans up after itself was reported as leaking")
	}
}
