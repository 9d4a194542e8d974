package epmd

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tsdist/tsdist/internal/leakcheck"
)

// These tests hold this package to the real thing, Erlang/OTP as installed
// from the distribution (make test installs it): OTP's own EPMD client (a
// running node and erl_epmd) against our Server, and our Client against a
// real epmd. Everything listens on 127.0.0.1 only.

// otpTool finds an OTP executable, or skips the test.
func otpTool(t *testing.T, name string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	if m, _ := filepath.Glob("/usr/lib/erlang/erts-*/bin/" + name); len(m) > 0 {
		return m[0]
	}
	t.Skipf("%s is not installed: these interop tests need Erlang/OTP (make test installs it)", name)
	return ""
}

// syncBuffer is a bytes.Buffer safe for a process's output and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// proc is a child process of the test.
type proc struct {
	cmd  *exec.Cmd
	out  *syncBuffer // stdout and stderr
	done chan struct{}
	err  error // from Wait, once done is closed
}

// startProc starts name in a scratch directory (where a crash dump would
// land) with env added to the test's environment. The test's cleanup stops
// it by its PID, and stops the children it left (erl_child_setup) by
// theirs.
func startProc(t *testing.T, env []string, name string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(name, args...), out: &syncBuffer{}, done: make(chan struct{})}
	p.cmd.Dir = t.TempDir()
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.WaitDelay = 5 * time.Second
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() { p.stop(t) })
	return p
}

// running reports whether p has not exited.
func (p *proc) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// children lists the PIDs of pid's child processes.
func children(pid int) []int {
	var out []int
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, f := range tasks {
		b, _ := os.ReadFile(f)
		for _, s := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(s); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

// alive reports whether pid is a live (not zombie) process.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// pid (comm) state ...: the state follows the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

// stop kills p by its PID (SIGKILL, as a crash would) and waits for it; its
// children must then exit by themselves, or are killed by their PIDs.
func (p *proc) stop(t *testing.T) {
	t.Helper()
	if !p.running() {
		return
	}
	kids := children(p.cmd.Process.Pid)
	p.cmd.Process.Kill()
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Errorf("%s: still running 10s after SIGKILL", p.cmd.Path)
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, k := range kids {
		for alive(k) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if alive(k) {
			t.Errorf("%s: child %d outlived it; killing it", p.cmd.Path, k)
			syscall.Kill(k, syscall.SIGKILL)
		}
	}
}

// wait waits up to d for p to exit by itself and returns its output.
func (p *proc) wait(t *testing.T, d time.Duration) string {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(d):
		t.Fatalf("%s still running after %v; output:\n%s", p.cmd.Path, d, p.out)
	}
	if p.err != nil {
		t.Fatalf("%s: %v; output:\n%s", p.cmd.Path, p.err, p.out)
	}
	return p.out.String()
}

// otpRelease is the OTP release of the erl on PATH, e.g. "25".
func otpRelease(t *testing.T, erl string) string {
	t.Helper()
	p := startProc(t, nil, erl, "-noshell", "-start_epmd", "false", "-eval",
		`io:put_chars(erlang:system_info(otp_release)), halt().`)
	return strings.TrimSpace(p.wait(t, 30*time.Second))
}

// TestInteropOTPAgainstServer runs a real Erlang node against our Server:
// it registers with ALIVE2_REQ, and another erl finds it, and the names
// registered from Go, with erl_epmd:names/1 and erl_epmd:port_please/2.
func TestInteropOTPAgainstServer(t *testing.T) {
	leakcheck.Check(t)
	erl := otpTool(t, "erl")
	t.Logf("OTP %s", otpRelease(t, erl))

	ts := startServer(t, nil) // loopback may register; NAMES reports the real port
	// erl_epmd:names/1 refuses an answer whose port is not the one it asked.
	if ts.srv.Port != ts.port {
		t.Fatal("test bug: the server reports another port")
	}
	gonode := Node{Name: "gonode", Port: 45001, Type: NodeTypeHidden, Protocol: ProtocolTCP, HighestVersion: 6, LowestVersion: 5}
	direct, err := ts.srv.Registry.Register(gonode)
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	ts.register(t, node("gotcp", 45002))

	env := []string{"ERL_EPMD_PORT=" + strconv.Itoa(int(ts.port)), "HOME=" + t.TempDir()}
	// -start_epmd false: no epmd of its own, only ours. The distribution
	// listener is kept on 127.0.0.1.
	a := startProc(t, env, erl, "-sname", "a@localhost", "-setcookie", "tsdist-interop", "-noshell",
		"-start_epmd", "false", "-kernel", "inet_dist_use_interface", "{127,0,0,1}")
	var na Node
	deadline := time.Now().Add(30 * time.Second)
	for {
		var ok bool
		if na, ok = ts.srv.Registry.Lookup("a"); ok {
			break
		}
		if !a.running() || time.Now().After(deadline) {
			t.Fatalf("node a never registered; its output:\n%s", a.out)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("node a registered: %+v", na)
	if na.Port == 0 || na.Type != NodeTypeNormal || na.Protocol != ProtocolTCP || na.HighestVersion != 6 || na.LowestVersion != 5 || na.Extra != nil {
		t.Fatalf("node a registered as %+v; want a normal TCP node speaking 5 to 6, no extra", na)
	}
	// The port is the node's distribution listener.
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(int(na.Port))), 5*time.Second)
	if err != nil {
		t.Fatalf("node a's port %d: %v", na.Port, err)
	}
	c.Close()

	// OTP's client reads our answers as it reads real epmd's.
	script := `
		{ok, Ns} = erl_epmd:names("localhost"),
		[io:format("name ~s ~b~n", [N, P]) || {N, P} <- lists:sort(Ns)],
		[io:format("port ~s ~w~n", [N, erl_epmd:port_please(N, "localhost")])
		 || N <- ["a", "gonode", "gotcp", "missing"]],
		halt().`
	ask := func() string {
		t.Helper()
		return startProc(t, env, erl, "-noshell", "-start_epmd", "false", "-eval", script).wait(t, 30*time.Second)
	}
	got := ask()
	want := fmt.Sprintf(`name a %d
name gonode 45001
name gotcp 45002
port a {port,%d,6}
port gonode {port,45001,6}
port gotcp {port,45002,6}
port missing noport
`, na.Port, na.Port)
	if got != want {
		t.Fatalf("erl_epmd saw:\n%s\nwant:\n%s", got, want)
	}
	var lines []string
	for _, e := range ts.srv.Registry.Names() {
		lines = append(lines, fmt.Sprintf("name %s %d", e.Name, e.Port))
	}
	if reg := strings.Join(lines, "\n") + "\n"; !strings.HasPrefix(got, reg) {
		t.Fatalf("erl_epmd's names:\n%s\nthe registry's:\n%s", got, reg)
	}

	// A node that dies is unregistered at once.
	a.stop(t)
	poll(t, "node a to be unregistered", func() bool { _, ok := ts.srv.Registry.Lookup("a"); return !ok })
	if got, want := ask(), "name gonode 45001\nname gotcp 45002\nport a noport\n"; !strings.HasPrefix(got, want) {
		t.Fatalf("after node a died, erl_epmd saw:\n%s\nwant it to begin:\n%s", got, want)
	}
	if n := ts.logs.count("malformed"); n != 0 {
		t.Fatalf("the server found %d malformed requests from OTP", n)
	}
}

// freePort is a TCP port on 127.0.0.1 that nothing listened on a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// startEPMD runs a real epmd in the foreground on 127.0.0.1 (epmd adds
// ::1, loopback too) and returns its port once it accepts.
func startEPMD(t *testing.T) (port int, p *proc) {
	t.Helper()
	bin := otpTool(t, "epmd")
	port = freePort(t)
	p = startProc(t, nil, bin, "-port", strconv.Itoa(port), "-address", "127.0.0.1")
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			break
		}
		if !p.running() || time.Now().After(deadline) {
			t.Fatalf("epmd -port %d never accepted (%v); its output:\n%s", port, err, p.out)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// epmd exits quietly if another holds the port: make sure it is ours.
	time.Sleep(50 * time.Millisecond)
	if !p.running() {
		t.Fatalf("epmd exited: %v; output:\n%s", p.err, p.out)
	}
	return port, p
}

// TestInteropClientAgainstEPMD runs our Client against a real epmd.
func TestInteropClientAgainstEPMD(t *testing.T) {
	leakcheck.Check(t)
	port, _ := startEPMD(t)
	c := &Client{Port: uint16(port)}
	ctx := t.Context()

	n6 := Node{Name: "gov6", Port: 40001, Type: NodeTypeHidden, Protocol: ProtocolTCP, HighestVersion: 6, LowestVersion: 5, Extra: []byte("extra\x00\xff")}
	reg6, err := c.Register(ctx, "127.0.0.1", n6)
	if err != nil {
		t.Fatalf("Register version 6: %v", err)
	}
	defer reg6.Close()
	n5 := Node{Name: "gov5", Port: 40002, Type: NodeTypeNormal, Protocol: ProtocolTCP, HighestVersion: 5, LowestVersion: 5}
	reg5, err := c.Register(ctx, "127.0.0.1", n5)
	if err != nil {
		t.Fatalf("Register version 5: %v", err)
	}
	defer reg5.Close()
	if reg5.Creation < 1 || reg5.Creation > 3 {
		t.Errorf("epmd gave a version-5 node creation %d; want 1..3", reg5.Creation)
	}
	t.Logf("creations: version 6 %d, version 5 %d", reg6.Creation, reg5.Creation)

	names, err := c.Names(ctx, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(names, func(a, b NameEntry) int { return strings.Compare(a.Name, b.Name) })
	if want := []NameEntry{{"gov5", 40002}, {"gov6", 40001}}; !reflect.DeepEqual(names, want) {
		t.Fatalf("Names = %v; want %v", names, want)
	}
	for _, n := range []Node{n6, n5} {
		got, err := c.PortPlease(ctx, "127.0.0.1", n.Name)
		if err != nil || !reflect.DeepEqual(got, n) {
			t.Fatalf("PortPlease %s = %+v, %v; want %+v", n.Name, got, err, n)
		}
	}
	if _, err := c.PortPlease(ctx, "127.0.0.1", "missing"); !errors.Is(err, ErrNotRegistered) {
		t.Fatalf("PortPlease missing: %v; want ErrNotRegistered", err)
	}
	if _, err := c.Register(ctx, "127.0.0.1", node("gov5", 40003)); !errors.Is(err, ErrRefused) {
		t.Fatalf("Register of a taken name: %v; want ErrRefused", err)
	}

	reg6.Close()
	poll(t, "gov6 to be unregistered", func() bool {
		_, err := c.PortPlease(ctx, "127.0.0.1", "gov6")
		return errors.Is(err, ErrNotRegistered)
	})
	if names, err := c.Names(ctx, "127.0.0.1"); err != nil || !reflect.DeepEqual(names, []NameEntry{{"gov5", 40002}}) {
		t.Fatalf("Names after gov6 closed = %v, %v", names, err)
	}
}

// TestInteropSameAnswers sends the same bytes to a real epmd and to our
// Server, and compares the answers byte for byte (creations aside).
func TestInteropSameAnswers(t *testing.T) {
	leakcheck.Check(t)
	epmdPort, _ := startEPMD(t)
	ts := startServer(t, nil)
	servers := []struct {
		name string
		addr string
		port int
	}{
		{"epmd", net.JoinHostPort("127.0.0.1", strconv.Itoa(epmdPort)), epmdPort},
		{"ours", ts.addr, int(ts.port)},
	}
	// The same name is taken on both.
	for _, s := range servers {
		c := &Client{Port: uint16(s.port)}
		reg, err := c.Register(t.Context(), "127.0.0.1", node("taken", 40010))
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		defer reg.Close()
	}

	alive2 := func(name string, highest uint16) []byte {
		n := node(name, 40011)
		n.HighestVersion = highest
		return appendAlive2Request(nil, n)
	}
	tests := []struct {
		name string
		send []byte
		// size: the answer's length, for ALIVE2 (epmd keeps even a
		// refused registration's connection open); 0: read to the close.
		size int
		// creation: the answer ends in a creation, which may differ.
		creation bool
		want     func(port int) []byte
	}{
		// First, while "taken" is all either holds.
		{"NAMES", req("n"), 0, false, func(port int) []byte {
			return append([]byte{0, 0, byte(port >> 8), byte(port)}, "name taken at port 40010\n"...)
		}},
		{"KILL with a node registered", req("k"), 0, false, func(int) []byte { return []byte("NO") }},
		{"ALIVE2 version 6", alive2("new6", 6), 6, true, func(int) []byte { return []byte{'v', 0} }},
		{"ALIVE2 version 7", alive2("new7", 7), 6, true, func(int) []byte { return []byte{'v', 0} }},
		{"ALIVE2 version 5", alive2("new5", 5), 4, true, func(int) []byte { return []byte{'y', 0} }},
		{"ALIVE2 version 0", alive2("new0", 0), 4, true, func(int) []byte { return []byte{'y', 0} }},
		{"ALIVE2 taken, version 6", alive2("taken", 6), 6, false, func(int) []byte { return []byte{'v', 1, 0, 0, 0, 99} }},
		{"ALIVE2 taken, version 5", alive2("taken", 5), 4, false, func(int) []byte { return []byte{'y', 1, 0, 99} }},
		{"ALIVE2 name of 256 bytes", alive2(strings.Repeat("a", 256), 6), 6, false, func(int) []byte { return []byte{'v', 1, 0, 0, 0, 99} }},
		{"ALIVE2 name not UTF-8", alive2("a\xffb", 6), 6, false, func(int) []byte { return []byte{'v', 1, 0, 0, 0, 99} }},
		{"PORT_PLEASE2 missing", req("zmissing"), 0, false, func(int) []byte { return []byte{'w', 1} }},
		{"PORT_PLEASE2 a name with a space", req("za b"), 0, false, func(int) []byte { return []byte{'w', 1} }},
		{"PORT_PLEASE2 no name", req("z"), 0, false, func(int) []byte { return nil }},
		{"PORT_PLEASE2 not UTF-8", req("z\xff"), 0, false, func(int) []byte { return nil }},
		{"length 0", []byte{0, 0}, 0, false, func(int) []byte { return nil }},
		{"unknown tag", req("Q"), 0, false, func(int) []byte { return nil }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, s := range servers {
				c, err := net.Dial("tcp", s.addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close() // a registration lasts the subtest
				if _, err := c.Write(tt.send); err != nil {
					t.Fatal(err)
				}
				c.SetReadDeadline(time.Now().Add(3 * time.Second))
				var got []byte
				if tt.size > 0 {
					got = make([]byte, tt.size)
					_, err = io.ReadFull(c, got)
				} else {
					got, err = io.ReadAll(c)
				}
				if err != nil {
					t.Fatalf("%s: % x, %v", s.name, got, err)
				}
				want := tt.want(s.port)
				if tt.creation {
					if len(got) != tt.size || !bytes.Equal(got[:2], want) {
						t.Fatalf("%s answered % x; want % x and a creation", s.name, got, want)
					}
					if got[0] == 'y' && (got[3] < 1 || got[3] > 3 || got[2] != 0) {
						t.Fatalf("%s answered % x: creation not 1..3", s.name, got)
					}
					continue
				}
				if !bytes.Equal(got, want) {
					t.Fatalf("%s answered % x; want % x", s.name, got, want)
				}
			}
		})
	}
}
