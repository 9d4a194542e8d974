package test

import (
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tsdist/tsdist/control"
)

// TestAccessPolicy starts a helper with the default policy ("owner": only
// its own user's nodes; alpha and beta belong to other users) and checks
// that strangers get nothing, neither connections nor EPMD names, until
// the policy lets them in, which it can while the helper runs.
func TestAccessPolicy(t *testing.T) {
	ctx := testContext(t, 60*time.Second)
	warden := startTestHelper(t, ctx, "warden", "--allow=owner")
	w := dialControl(t, ctx, warden)
	if w.Hello.Policy != "owner" {
		t.Errorf("hello says policy %q; want owner", w.Hello.Policy)
	}
	a, b := dialControl(t, ctx, alpha), dialControl(t, ctx, beta)
	waitPeer(t, ctx, a, "warden")
	waitPeer(t, ctx, b, "warden")
	port, err := w.Listen(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Register(ctx, control.Request{Name: "guarded", Port: port}); err != nil {
		t.Fatal(err)
	}

	// refused dials from c, and checks that the connection ends at once
	// and warden's client never hears of it.
	refused := func(who string, c *control.Client) {
		t.Helper()
		conn, err := c.DialTailnet(ctx, "warden", port, 0)
		if err != nil {
			t.Fatalf("%s dialling warden: %v (the tailnet connection is made, then closed)", who, err)
		}
		defer conn.Close()
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := conn.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
			t.Errorf("%s's connection to warden: read %d bytes, %v; want it closed", who, n, err)
		}
		acceptCtx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		if got, err := w.Accept(acceptCtx); err == nil {
			got.Close()
			t.Errorf("warden's client was handed %s's connection (peer %s)", who, got.Peer.Node)
		}
		if _, err := c.Names(ctx, "warden"); err == nil {
			t.Errorf("%s listed warden's EPMD names; want the connection refused", who)
		}
	}
	allowed := func(who string, c *control.Client) {
		t.Helper()
		dialed, accepted := connect(t, ctx, c, w, "warden")
		if accepted.Peer.Node != who {
			t.Errorf("accepted peer %q; want %q", accepted.Peer.Node, who)
		}
		dialed.Close()
		accepted.Close()
		if names, err := c.Names(ctx, "warden"); err != nil || !hasName("guarded")(names) {
			t.Errorf("%s lists warden's names: %v, %v; want guarded", who, names, err)
		}
	}

	refused("alpha", a)
	refused("beta", b)
	log, _ := os.ReadFile(warden.logPath)
	if !strings.Contains(string(log), "access: refused alpha") || !strings.Contains(string(log), `matches no rule of "owner"`) {
		t.Errorf("warden's log does not say whom it refused and why:\n%s", log)
	}

	if got, err := w.SetPolicy(ctx, "owner,host:alpha"); err != nil || got != "owner,host:alpha" {
		t.Fatalf("set_policy: %q, %v", got, err)
	}
	allowed("alpha", a)
	refused("beta", b)

	if _, err := w.SetPolicy(ctx, "user:"+selfOf(t, ctx, b).User); err != nil {
		t.Fatal(err)
	}
	allowed("beta", b)
	refused("alpha", a)

	_, err = w.SetPolicy(ctx, "owner,nonsense")
	wantCode(t, "set_policy with a bad rule", err, control.CodeBadRequest)
	if err := w.Unregister(ctx, "guarded"); err != nil {
		t.Fatal(err)
	}
}

// TestAccessByTag lets tagged nodes in by tag.
func TestAccessByTag(t *testing.T) {
	ctx := testContext(t, 60*time.Second)
	warden := startTestHelper(t, ctx, "tagwarden", "--allow=tag:erlang")
	tagged := startTestHelper(t, ctx, "tagged", "--tags=tag:erlang")
	w, tc := dialControl(t, ctx, warden), dialControl(t, ctx, tagged)
	if self := selfOf(t, ctx, tc); len(self.Tags) != 1 || self.Tags[0] != "tag:erlang" {
		t.Fatalf("tagged node's self: %+v; want tag:erlang", self)
	}
	waitPeer(t, ctx, tc, "tagwarden")
	dialed, accepted := connect(t, ctx, tc, w, "tagwarden")
	if len(accepted.Peer.Tags) != 1 || accepted.Peer.Tags[0] != "tag:erlang" {
		t.Errorf("accepted peer %+v; want tag:erlang", accepted.Peer)
	}
	dialed.Close()
	accepted.Close()
	raw := tailnetEPMD(dialControl(t, ctx, alpha))
	if _, err := raw.Names(ctx, "tagwarden"); err == nil || !errors.Is(err, io.ErrUnexpectedEOF) && !strings.Contains(err.Error(), "EOF") {
		t.Errorf("untagged alpha asking tagwarden's EPMD: %v; want the connection closed", err)
	}
}

// TestControlSocketOtherUser loosens a helper's socket and directory so
// that another user can reach it, and checks that the helper still refuses
// that user (SO_PEERCRED): the socket's mode is not the only lock.
func TestControlSocketOtherUser(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root, to run a client as nobody (CI runs as root)")
	}
	ctx := testContext(t, 30*time.Second)
	h := startTestHelper(t, ctx, "locked")
	dir := filepath.Dir(h.socket)
	for _, p := range []struct {
		path string
		mode os.FileMode
	}{{filepath.Dir(dir), 0o755}, {dir, 0o755}, {h.socket, 0o666}} {
		if err := os.Chmod(p.path, p.mode); err != nil {
			t.Fatal(err)
		}
	}
	// A copy of the CLI that nobody may run.
	binDir, err := os.MkdirTemp("", "tsdist-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(binDir) })
	os.Chmod(binDir, 0o755)
	bin := filepath.Join(binDir, "tsdist")
	data, err := os.ReadFile(tsdistBin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}

	cmd := exec.CommandContext(ctx, bin, "status", "--socket", h.socket, "--timeout", "5s")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("tsdist status as nobody succeeded:\n%s", out)
	}
	t.Logf("tsdist status as nobody: %v: %s", err, out)
	log, _ := os.ReadFile(h.logPath)
	if !strings.Contains(string(log), "control: refused a connection") || !strings.Contains(string(log), "uid 65534") {
		t.Errorf("the helper's log does not record the refusal of uid 65534:\n%s", log)
	}
	// Its own user still gets in.
	if st := status(t, ctx, h); st.State != "Running" {
		t.Errorf("status as the helper's user: %+v", st)
	}
}
