package test

import (
	"context"
	"errors"
	"io"
	"os"
	"strings"
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
