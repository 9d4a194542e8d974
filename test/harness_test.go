// Package test holds the cross-process integration tests: the real tsdist
// binary runs as separate helper processes on an offline tailnet (devnet, in
// this process), and the tests talk to them over their control sockets the
// way a BEAM node would.
package test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/control"
	"github.com/tsdist/tsdist/devnet"
)

// Shared by every test: the helper binary, the offline tailnet and the two
// helpers alpha and beta, set up once by TestMain.
var (
	tsdistBin string
	workDir   string
	tailnet   *devnet.Net
	alpha     *helper
	beta      *helper
)

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(runMain(m))
}

func runMain(m *testing.M) (code int) {
	var err error
	workDir, err = os.MkdirTemp("", "tsdist-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "TestMain:", err)
		return 1
	}
	defer os.RemoveAll(workDir)

	fail := func(format string, a ...any) int {
		fmt.Fprintf(os.Stderr, "TestMain: "+format+"\n", a...)
		return 1
	}

	start := time.Now()
	tsdistBin = filepath.Join(workDir, "tsdist")
	if err := buildHelper(tsdistBin); err != nil {
		return fail("%v", err)
	}
	buildTime := time.Since(start)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tailnet, err = devnet.Start(context.Background(), devnet.Options{})
	if err != nil {
		return fail("devnet: %v", err)
	}
	defer tailnet.Close()

	// Start both helpers at once, as separate processes, then wait for each.
	alpha, err = startHelper("alpha", filepath.Join(workDir, "alpha"))
	if err != nil {
		return fail("%v", err)
	}
	beta, err = startHelper("beta", filepath.Join(workDir, "beta"))
	if err != nil {
		alpha.stopAndReport()
		return fail("%v", err)
	}
	defer func() {
		// Both at once; each must exit cleanly on SIGTERM.
		var wg sync.WaitGroup
		var failed atomic.Bool
		for _, h := range []*helper{alpha, beta} {
			wg.Go(func() {
				if !h.stopAndReport() {
					failed.Store(true)
				}
			})
		}
		wg.Wait()
		if failed.Load() {
			code = 1
		}
	}()
	for _, h := range []*helper{alpha, beta} {
		if err := h.waitRunning(ctx); err != nil {
			h.dumpLog(os.Stderr)
			return fail("%v", err)
		}
	}
	// Running is not yet knowing the other: wait until each has the
	// other in its netmap, so that every test can dial by name at once.
	if err := alpha.waitPeer(ctx, "beta"); err != nil {
		return fail("%v", err)
	}
	if err := beta.waitPeer(ctx, "alpha"); err != nil {
		return fail("%v", err)
	}
	if testing.Verbose() {
		fmt.Fprintf(os.Stderr, "TestMain: helper built in %v; alpha Running %v and beta Running %v after process start\n",
			buildTime.Round(time.Millisecond), alpha.upAfter.Round(time.Millisecond), beta.upAfter.Round(time.Millisecond))
	}

	code = m.Run()
	if code != 0 {
		alpha.dumpLog(os.Stderr)
		beta.dumpLog(os.Stderr)
	}
	return code
}

// buildTags are the helper's build tags, as the Makefile sets them:
// ts_omit_peerapiserver leaves out tailscale's PeerAPI, whose listener would
// otherwise be a TCP port open on the host.
const buildTags = "ts_omit_peerapiserver"

// buildHelper builds ./cmd/tsdist from the module root into out; with the
// race detector on in this test binary, the helper is built with it too.
func buildHelper(out string) error {
	gocmd, err := exec.LookPath("go")
	if err != nil {
		gocmd = filepath.Join(os.Getenv("GOROOT"), "bin", "go")
	}
	gomod, err := exec.Command(gocmd, "env", "GOMOD").Output()
	if err != nil {
		return fmt.Errorf("go env GOMOD: %w", err)
	}
	root := filepath.Dir(strings.TrimSpace(string(gomod)))
	args := []string{"build", "-tags", buildTags, "-o", out}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "./cmd/tsdist")
	cmd := exec.Command(gocmd, args...)
	cmd.Dir = root
	if msg, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, msg)
	}
	return nil
}

// helper is one `tsdist serve` process.
type helper struct {
	name    string
	dir     string // its own temp dir: state, socket, log
	socket  string
	logPath string

	cmd     *exec.Cmd
	started time.Time
	upAfter time.Duration // from process start to State Running

	done    chan struct{} // closed when the process has been waited for
	waitErr error
}

// startHelper starts `tsdist serve` for hostname with its state, socket and
// log under dir. It does not wait for the node to come up.
// Every helper here lets every peer in ("--allow=*", before args, which
// may say otherwise): the tests of the carrier connect nodes of different
// users, and TestAccessPolicy tests the policy itself.
func startHelper(hostname, dir string, args ...string) (*helper, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	h := &helper{
		name:    hostname,
		dir:     dir,
		socket:  filepath.Join(dir, "control.sock"),
		logPath: filepath.Join(dir, "helper.log"),
		done:    make(chan struct{}),
	}
	logf, err := os.Create(h.logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child has its own copy
	cmd := exec.Command(tsdistBin, "serve",
		"--hostname", hostname,
		"--control-url", tailnet.ControlURL,
		"--ephemeral",
		"--state-dir", filepath.Join(dir, "state"),
		"--socket", h.socket,
		"--allow=*",
	)
	cmd.Args = append(cmd.Args, args...)
	// No tailscale knobs in the environment (devnet.Start has put them in
	// this process's): the helper must keep to loopback by itself for a
	// loopback control URL, and TestEndpointsLoopbackOnly checks that it does.
	cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "TS_") })
	cmd.Stdout = logf
	cmd.Stderr = logf
	// Should this test binary die, take the helper with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	h.started = time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start helper %s: %w", hostname, err)
	}
	h.cmd = cmd
	go func() {
		h.waitErr = cmd.Wait()
		close(h.done)
	}()
	return h, nil
}

// startTestHelper starts a helper owned by one test, stopped (by PID) when
// the test ends, and waits for it to be Running.
func startTestHelper(t *testing.T, ctx context.Context, hostname string, args ...string) *helper {
	t.Helper()
	h, err := startHelper(hostname, t.TempDir(), args...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := h.stop(5 * time.Second); err != nil {
			t.Errorf("stopping helper %s: %v", hostname, err)
		}
		if t.Failed() {
			var b bytes.Buffer
			h.dumpLog(&b)
			t.Log(b.String())
		}
	})
	if err := h.waitRunning(ctx); err != nil {
		t.Fatal(err)
	}
	return h
}

func (h *helper) pid() int { return h.cmd.Process.Pid }

// waitRunning waits until the helper's control socket answers and its node
// is Running, and records how long that took from process start.
func (h *helper) waitRunning(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	var lastErr error
	for {
		select {
		case <-h.done:
			return fmt.Errorf("helper %s exited before it was Running: %v", h.name, h.waitErr)
		default:
		}
		if c, err := control.Dial(ctx, h.socket); err != nil {
			lastErr = err
		} else {
			st, err := c.Status(ctx)
			c.Close()
			if err == nil && st.State == "Running" {
				h.upAfter = time.Since(h.started)
				return nil
			}
			lastErr = err
			if err == nil {
				lastErr = fmt.Errorf("state %s", st.State)
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("helper %s not Running within the time allowed: %v", h.name, lastErr)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// waitPeer waits until the helper's node has peer in its netmap.
func (h *helper) waitPeer(ctx context.Context, peer string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := control.Dial(ctx, h.socket)
	if err != nil {
		return err
	}
	defer c.Close()
	for {
		st, err := c.Status(ctx)
		if err != nil {
			return fmt.Errorf("%s waiting for peer %s: %w", h.name, peer, err)
		}
		for _, p := range st.Peers {
			if p.Node == peer {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s never saw peer %s", h.name, peer)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// terminate sends SIGTERM and waits up to timeout for the process to exit,
// returning how it exited. If it does not exit in time it is killed, and an
// error says so.
func (h *helper) terminate(timeout time.Duration) (*os.ProcessState, time.Duration, error) {
	start := time.Now()
	select {
	case <-h.done:
		return h.cmd.ProcessState, 0, nil
	default:
	}
	if err := h.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return nil, 0, fmt.Errorf("SIGTERM to %s (pid %d): %w", h.name, h.pid(), err)
	}
	select {
	case <-h.done:
		return h.cmd.ProcessState, time.Since(start), nil
	case <-time.After(timeout):
		// SIGQUIT makes a Go program dump its goroutines to stderr (the
		// helper's log) and exit; SIGKILL if even that does not work.
		h.cmd.Process.Signal(syscall.SIGQUIT)
		select {
		case <-h.done:
		case <-time.After(3 * time.Second):
			h.cmd.Process.Kill()
			<-h.done
		}
		return h.cmd.ProcessState, time.Since(start), fmt.Errorf("helper %s (pid %d) did not exit within %v of SIGTERM; stopped with SIGQUIT (goroutine dump in its log)", h.name, h.pid(), timeout)
	}
}

// stop terminates the helper and checks that it exited with status 0.
func (h *helper) stop(timeout time.Duration) error {
	ps, _, err := h.terminate(timeout)
	if err != nil {
		return err
	}
	if !ps.Success() {
		return fmt.Errorf("helper %s exited with %v", h.name, ps)
	}
	return nil
}

// stopAndReport stops one of TestMain's helpers, which must exit cleanly
// and promptly on SIGTERM like any other.
func (h *helper) stopAndReport() bool {
	start := time.Now()
	if err := h.stop(8 * time.Second); err != nil {
		fmt.Fprintf(os.Stderr, "TestMain: FAIL: %v\n", err)
		h.dumpLog(os.Stderr)
		return false
	}
	if testing.Verbose() {
		fmt.Fprintf(os.Stderr, "TestMain: %s exited cleanly %v after SIGTERM\n", h.name, time.Since(start).Round(time.Millisecond))
	}
	return true
}

func (h *helper) dumpLog(w io.Writer) {
	b, _ := os.ReadFile(h.logPath)
	fmt.Fprintf(w, "---- log of helper %s (pid %d) ----\n%s---- end of log of %s ----\n", h.name, h.pid(), b, h.name)
}

// testContext is the per-test time limit.
func testContext(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// dialControl opens a control connection to h, closed when the test ends.
func dialControl(t *testing.T, ctx context.Context, h *helper) *control.Client {
	t.Helper()
	c, err := control.Dial(ctx, h.socket)
	if err != nil {
		t.Fatalf("control connection to %s: %v", h.name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// status fetches h's status through a short-lived control connection.
func status(t *testing.T, ctx context.Context, h *helper) carrier.Status {
	t.Helper()
	c := dialControl(t, ctx, h)
	defer c.Close()
	s, err := c.Status(ctx)
	if err != nil {
		t.Fatalf("status of %s: %v", h.name, err)
	}
	return s
}

// deadlineFrom applies ctx's deadline to a connection, so a broken helper
// fails the test instead of hanging it.
func deadlineFrom(ctx context.Context, c net.Conn) {
	if d, ok := ctx.Deadline(); ok {
		c.SetDeadline(d)
	}
}

// wantCode checks that err is a *control.Error with the given code.
func wantCode(t *testing.T, what string, err error, code string) *control.Error {
	t.Helper()
	if err == nil {
		t.Errorf("%s: succeeded; want error %s", what, code)
		return nil
	}
	var ce *control.Error
	if !errors.As(err, &ce) {
		t.Errorf("%s: error %v (%T); want a *control.Error with code %s", what, err, err, code)
		return nil
	}
	if ce.Code != code {
		t.Errorf("%s: error code %q (%s); want %q", what, ce.Code, ce.Message, code)
	}
	return ce
}

// rawClient speaks the control protocol's wire format directly: 4-byte
// big-endian length, then JSON. It is for the cases control.Client is too
// polite to produce.
type rawClient struct {
	t    *testing.T
	conn *net.UnixConn
}

func dialRaw(t *testing.T, ctx context.Context, h *helper) *rawClient {
	t.Helper()
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", h.socket)
	if err != nil {
		t.Fatalf("connect to %s: %v", h.socket, err)
	}
	conn := nc.(*net.UnixConn)
	deadlineFrom(ctx, conn)
	t.Cleanup(func() { conn.Close() })
	return &rawClient{t: t, conn: conn}
}

// sendBytes sends payload as one frame.
func (r *rawClient) sendBytes(payload []byte) {
	r.t.Helper()
	if _, err := r.conn.Write(control.AppendFrame(nil, payload)); err != nil {
		r.t.Fatalf("send frame: %v", err)
	}
}

func (r *rawClient) send(req any) {
	r.t.Helper()
	b, err := json.Marshal(req)
	if err != nil {
		r.t.Fatal(err)
	}
	r.sendBytes(b)
}

// recv reads one frame, failing the test on error. Descriptors are not
// expected on raw connections (no dial or listen goes through them).
func (r *rawClient) recv() control.Response {
	r.t.Helper()
	resp, err := r.tryRecv()
	if err != nil {
		r.t.Fatalf("read response: %v", err)
	}
	return resp
}

func (r *rawClient) tryRecv() (control.Response, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r.conn, hdr[:]); err != nil {
		return control.Response{}, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > control.MaxResponseSize {
		return control.Response{}, fmt.Errorf("response frame of %d bytes", n)
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(r.conn, buf); err != nil {
		return control.Response{}, err
	}
	var resp control.Response
	if err := json.Unmarshal(buf, &resp); err != nil {
		return control.Response{}, fmt.Errorf("bad response %q: %v", buf, err)
	}
	return resp, nil
}

// call sends req and reads the next message, which must answer it.
func (r *rawClient) call(req control.Request) control.Response {
	r.t.Helper()
	r.send(req)
	resp := r.recv()
	if resp.ID != req.ID {
		r.t.Fatalf("response to request %d has id %d", req.ID, resp.ID)
	}
	return resp
}

func (r *rawClient) hello() {
	r.t.Helper()
	resp := r.call(control.Request{ID: 1, Op: control.OpHello, Version: control.Version, Client: "raw-test"})
	if !resp.OK {
		r.t.Fatalf("hello refused: %+v", resp.Error)
	}
}

// wantErrResp checks that resp is an error response with code.
func wantErrResp(t *testing.T, what string, resp control.Response, code string) {
	t.Helper()
	switch {
	case resp.OK:
		t.Errorf("%s: ok response %s; want error %s", what, resp.Result, code)
	case resp.Error == nil:
		t.Errorf("%s: error response without error; want %s", what, code)
	case resp.Error.Code != code:
		t.Errorf("%s: error %s (%s); want %s", what, resp.Error.Code, resp.Error.Message, code)
	}
}

// errList collects errors from many goroutines.
type errList struct {
	mu   sync.Mutex
	errs []error
}

func (e *errList) add(err error) {
	e.mu.Lock()
	e.errs = append(e.errs, err)
	e.mu.Unlock()
}

func (e *errList) report(t *testing.T, what string) {
	t.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
	for i, err := range e.errs {
		if i == 5 {
			t.Errorf("%s: ... %d errors in all", what, len(e.errs))
			break
		}
		t.Errorf("%s: %v", what, err)
	}
}
