package test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// These tests play another local user against the helper: one who prepares
// the control socket's directory before the helper starts, replaces its
// socket, or reads the process list and the profiler.

// serveCmd is `tsdist serve` for hostname on the offline tailnet, with the
// environment less tailscale's knobs, XDG_RUNTIME_DIR and TMPDIR, plus env.
func serveCmd(t *testing.T, hostname string, env []string, args ...string) (*exec.Cmd, *lockedBuffer) {
	t.Helper()
	cmd := exec.Command(tsdistBin, append([]string{"serve", "--hostname", hostname,
		"--control-url", tailnet.ControlURL, "--ephemeral", "--state-dir", filepath.Join(t.TempDir(), "state"), "--allow=*"}, args...)...)
	cmd.Env = append(slices.DeleteFunc(os.Environ(), func(kv string) bool {
		return strings.HasPrefix(kv, "TS_") || strings.HasPrefix(kv, "XDG_RUNTIME_DIR=") || strings.HasPrefix(kv, "TMPDIR=")
	}), env...)
	out := new(lockedBuffer)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd, out
}

// lockedBuffer is an output buffer the test may read while the helper
// writes it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// runToExit runs cmd, which must exit by itself within a few seconds, and
// returns its exit code.
func runToExit(t *testing.T, cmd *exec.Cmd) int {
	t.Helper()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("%v did not exit by itself", cmd.Args)
	}
	return cmd.ProcessState.ExitCode()
}

// startServe starts cmd and stops it (by PID) when the test ends.
func startServe(t *testing.T, cmd *exec.Cmd, out *lockedBuffer) {
	t.Helper()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if t.Failed() {
			t.Logf("helper output:\n%s", out)
		}
	})
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// squatter listens on a Unix socket at path and counts who connects.
func squatter(t *testing.T, path string) *atomic.Int64 {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var n atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			c.Close()
		}
	}()
	return &n
}

// TestSquattedSocketDir: with no XDG_RUNTIME_DIR, the helper's default
// socket is $TMPDIR/tsdist-UID/H.sock. Another user who made that directory
// first (and listens in it), or put a symbolic link there, gets a helper
// that refuses to start, naming the path and what it found, and that
// never connects to the squatter's socket. A fresh TMPDIR is the positive
// control: the helper makes the directory, private, and serves there.
func TestSquattedSocketDir(t *testing.T) {
	uid := strconv.Itoa(os.Getuid())
	t.Run("owned by another user", func(t *testing.T) {
		if os.Getuid() != 0 {
			t.Skip("making a directory of another user's needs root")
		}
		tmp := t.TempDir()
		dir := filepath.Join(tmp, "tsdist-"+uid)
		if err := os.Mkdir(dir, 0o777); err != nil {
			t.Fatal(err)
		}
		os.Chmod(dir, 0o777)
		knocks := squatter(t, filepath.Join(dir, "sq.sock"))
		if err := os.Chown(dir, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		cmd, out := serveCmd(t, "sq", []string{"TMPDIR=" + tmp})
		if code := runToExit(t, cmd); code != 1 {
			t.Fatalf("exit code %d, want 1; output:\n%s", code, out)
		}
		if want := dir + " belongs to uid 65534"; !strings.Contains(out.String(), want) {
			t.Errorf("output does not say %q:\n%s", want, out)
		}
		if n := knocks.Load(); n != 0 {
			t.Errorf("the squatter's socket was connected to %d times", n)
		}
		if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o777 {
			t.Errorf("the helper changed the squatter's directory: %v %v", fi.Mode(), err)
		}
	})
	t.Run("symbolic link", func(t *testing.T) {
		tmp := t.TempDir()
		elsewhere := t.TempDir()
		knocks := squatter(t, filepath.Join(elsewhere, "sq.sock"))
		dir := filepath.Join(tmp, "tsdist-"+uid)
		if err := os.Symlink(elsewhere, dir); err != nil {
			t.Fatal(err)
		}
		cmd, out := serveCmd(t, "sq", []string{"TMPDIR=" + tmp})
		if code := runToExit(t, cmd); code != 1 {
			t.Fatalf("exit code %d, want 1; output:\n%s", code, out)
		}
		if want := dir + " is a symbolic link"; !strings.Contains(out.String(), want) {
			t.Errorf("output does not say %q:\n%s", want, out)
		}
		if n := knocks.Load(); n != 0 {
			t.Errorf("the squatter's socket was connected to %d times", n)
		}
	})
	t.Run("fresh directory", func(t *testing.T) {
		tmp := t.TempDir()
		cmd, out := serveCmd(t, "sq", []string{"TMPDIR=" + tmp})
		startServe(t, cmd, out)
		sock := filepath.Join(tmp, "tsdist-"+uid, "sq.sock")
		waitFor(t, "the socket "+sock, func() bool { _, err := os.Stat(sock); return err == nil })
		fi, err := os.Stat(filepath.Dir(sock))
		if err != nil || fi.Mode().Perm() != 0o700 {
			t.Errorf("socket dir mode %v (%v), want 0700", fi.Mode().Perm(), err)
		}
	})
}

// TestSocketRemovedOnlyIfOurs: a helper that shuts down removes its socket,
// but not a newer helper's socket that took its path meanwhile.
func TestSocketRemovedOnlyIfOurs(t *testing.T) {
	for _, replaced := range []bool{false, true} {
		t.Run(fmt.Sprintf("replaced=%v", replaced), func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "c.sock")
			cmd, out := serveCmd(t, "rm", nil, "--socket", sock)
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer cmd.Process.Kill()
			waitFor(t, "the socket", func() bool { _, err := os.Stat(sock); return err == nil })
			if replaced {
				os.Remove(sock)
				squatter(t, sock) // the newer helper's
			}
			cmd.Process.Signal(syscall.SIGTERM)
			cmd.Wait()
			_, err := os.Lstat(sock)
			if replaced && err != nil {
				t.Errorf("the helper removed the socket that replaced its own: %v\n%s", err, out)
			}
			if !replaced && err == nil {
				t.Errorf("the helper left its socket behind\n%s", out)
			}
		})
	}
}

// TestSecretsNotShown: the auth key from a 0600 file never reaches the
// process list, while a key given with --authkey does (and is warned
// about), which shows the check can fail; a key file others can read is
// refused; the profiler serves profiles on its Unix socket but not the
// command line, and is refused on TCP.
func TestSecretsNotShown(t *testing.T) {
	dir := t.TempDir()
	key := fmt.Sprintf("tskey-test-%d", time.Now().UnixNano())
	keyFile := filepath.Join(dir, "key")
	if err := os.WriteFile(keyFile, []byte(key+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cmdline := func(pid int) string {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		return string(bytes.ReplaceAll(b, []byte{0}, []byte{' '}))
	}
	pprofSock := filepath.Join(dir, "pprof.sock")
	cmd, out := serveCmd(t, "keyfile", nil, "--authkey-file", keyFile, "--socket", filepath.Join(dir, "c.sock"), "--pprof", pprofSock)
	startServe(t, cmd, out)
	waitFor(t, "the profiler's socket", func() bool { _, err := os.Stat(pprofSock); return err == nil })
	if strings.Contains(cmdline(cmd.Process.Pid), key) {
		t.Errorf("the key from --authkey-file is in the helper's command line")
	}
	if fi, err := os.Stat(pprofSock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("profiler socket mode %v (%v), want 0600", fi.Mode().Perm(), err)
	}
	hc := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", pprofSock)
	}}}
	get := func(path string) (int, string) {
		resp, err := hc.Get("http://pprof" + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := get("/debug/pprof/heap?debug=1"); code != http.StatusOK {
		t.Errorf("heap profile: HTTP %d, want 200", code)
	}
	if code, body := get("/debug/pprof/cmdline"); code == http.StatusOK || strings.Contains(body, "keyfile") {
		t.Errorf("cmdline: HTTP %d %q; want it not served", code, body)
	}

	shown, shownOut := serveCmd(t, "keyflag", nil, "--authkey", key, "--socket", filepath.Join(dir, "c2.sock"))
	startServe(t, shown, shownOut)
	waitFor(t, "the warning", func() bool {
		return strings.Contains(shownOut.String(), "warning: --authkey puts the auth key in the process list")
	})
	if !strings.Contains(cmdline(shown.Process.Pid), key) {
		t.Errorf("positive control: the key given with --authkey is not in the command line %q", cmdline(shown.Process.Pid))
	}

	open := filepath.Join(dir, "open-key")
	os.WriteFile(open, []byte(key), 0o644)
	bad, badOut := serveCmd(t, "keyopen", nil, "--authkey-file", open, "--socket", filepath.Join(dir, "c3.sock"))
	if code := runToExit(t, bad); code != 2 || !strings.Contains(badOut.String(), "chmod 600") {
		t.Errorf("a key file of mode 0644: exit %d, output %q; want 2 and advice to chmod 600", code, badOut)
	}
	tcp, tcpOut := serveCmd(t, "pproftcp", nil, "--pprof", "127.0.0.1:6060", "--socket", filepath.Join(dir, "c4.sock"))
	if code := runToExit(t, tcp); code != 2 || !strings.Contains(tcpOut.String(), "Unix socket") {
		t.Errorf("--pprof on TCP: exit %d, output %q; want 2, asking for a Unix socket", code, tcpOut)
	}
}
