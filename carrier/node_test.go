package carrier_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/devnet"
	"github.com/tsdist/tsdist/internal/leakcheck"
)

// startNode brings a node up on the offline tailnet and closes it when the
// test ends.
func startNode(t *testing.T, ctx context.Context, controlURL, hostname string, tags ...string) *carrier.Node {
	t.Helper()
	n, err := carrier.New(carrier.Config{
		Hostname:   hostname,
		ControlURL: controlURL,
		Dir:        t.TempDir(),
		Ephemeral:  true,
		Tags:       tags,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	if err := n.Up(ctx); err != nil {
		t.Fatalf("Up(%s): %v", hostname, err)
	}
	return n
}

func startDevnet(t *testing.T, ctx context.Context, opts devnet.Options) *devnet.Net {
	t.Helper()
	dn, err := devnet.Start(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dn.Close)
	return dn
}

func TestResolve(t *testing.T) {
	leakcheck.Check(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dn := startDevnet(t, ctx, devnet.Options{})
	alpha := startNode(t, ctx, dn.ControlURL, "alpha")
	beta := startNode(t, ctx, dn.ControlURL, "beta", "tag:erlang")

	st, err := alpha.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	alphaIP := st.Self.IPs[0]
	// beta may not be in alpha's netmap the instant it is Running.
	var betaIP string
	for betaIP == "" && ctx.Err() == nil {
		st, _ := alpha.Status(ctx)
		for _, p := range st.Peers {
			if p.Node == "beta" {
				betaIP = p.IPs[0]
			}
		}
		time.Sleep(20 * time.Millisecond)
	}

	tests := []struct {
		host    string
		want    string
		unknown bool
	}{
		{host: "beta", want: betaIP},
		{host: "BETA", want: betaIP},
		{host: "beta.tsdist.test", want: betaIP},
		{host: "beta.tsdist.test.", want: betaIP},
		{host: "alpha", want: alphaIP}, // itself
		{host: betaIP, want: betaIP},
		{host: "gamma", unknown: true},
		{host: "beta.example.com", unknown: true},
		{host: "127.0.0.1", unknown: true}, // not a tailnet address
		{host: "", unknown: true},
	}
	for _, tt := range tests {
		start := time.Now()
		ip, err := alpha.Resolve(ctx, tt.host)
		if tt.unknown {
			if !errors.Is(err, carrier.ErrUnknownHost) {
				t.Errorf("Resolve(%q) = %v, %v; want ErrUnknownHost", tt.host, ip, err)
			} else if !strings.Contains(err.Error(), fmt.Sprintf("%q", tt.host)) && !strings.Contains(err.Error(), tt.host) {
				t.Errorf("Resolve(%q) error %q does not name the host", tt.host, err)
			}
			if d := time.Since(start); d > time.Second {
				t.Errorf("Resolve(%q) took %v to fail; want fast failure", tt.host, d)
			}
			continue
		}
		if err != nil || ip.String() != tt.want {
			t.Errorf("Resolve(%q) = %v, %v; want %s", tt.host, ip, err, tt.want)
		}
	}

	// Identity: beta is tagged, so it has no user; alpha is owned by a user.
	id, err := alpha.WhoIs(ctx, betaIP)
	if err != nil {
		t.Fatal(err)
	}
	if id.Node != "beta" || id.DNSName != "beta.tsdist.test" || id.User != "" || len(id.Tags) != 1 || id.Tags[0] != "tag:erlang" {
		t.Errorf("WhoIs(beta) = %+v", id)
	}
	id, err = beta.WhoIs(ctx, alphaIP+":1234")
	if err != nil {
		t.Fatal(err)
	}
	if id.Node != "alpha" || !strings.HasPrefix(id.User, "user-") || len(id.Tags) != 0 || id.Addr != alphaIP+":1234" {
		t.Errorf("WhoIs(alpha) = %+v", id)
	}
	if _, err := alpha.WhoIs(ctx, "100.100.100.100"); !errors.Is(err, carrier.ErrUnknownHost) {
		t.Errorf("WhoIs(stranger) = %v; want ErrUnknownHost", err)
	}
}

// TestResolveJustJoined looks up nodes the moment they are Running, when
// alpha's netmap may not have them yet (in process it mostly has; it lags
// when many nodes boot at once, as in `make bench`'s meshes), and a name
// that never appears: it fails, but only after the grace (joinGrace).
func TestResolveJustJoined(t *testing.T) {
	leakcheck.Check(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dn := startDevnet(t, ctx, devnet.Options{})
	alpha := startNode(t, ctx, dn.ControlURL, "alpha")
	for i := range 5 {
		name := fmt.Sprintf("joiner%d", i)
		startNode(t, ctx, dn.ControlURL, name)
		start := time.Now()
		if _, err := alpha.Resolve(ctx, name); err != nil {
			t.Errorf("Resolve(%s) right after it joined: %v", name, err)
		} else {
			t.Logf("Resolve(%s) right after it joined: %v", name, time.Since(start).Round(time.Millisecond))
		}
	}
	start := time.Now()
	_, err := alpha.Resolve(ctx, "never")
	took := time.Since(start)
	if !errors.Is(err, carrier.ErrUnknownHost) || !strings.Contains(err.Error(), "looked for it") {
		t.Errorf("Resolve(never) = %v; want ErrUnknownHost after looking for it", err)
	}
	if took < 250*time.Millisecond || took > 2*time.Second {
		t.Errorf("Resolve(never) failed after %v; want the grace (300 ms), no more", took)
	}
}

func TestListenDial(t *testing.T) {
	leakcheck.Check(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dn := startDevnet(t, ctx, devnet.Options{})
	alpha := startNode(t, ctx, dn.ControlURL, "alpha")
	beta := startNode(t, ctx, dn.ControlURL, "beta")

	ln, err := alpha.Listen(0)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, portStr, _ := net.SplitHostPort(ln.Addr().String())
	var port uint16
	fmt.Sscan(portStr, &port)
	if port == 0 {
		t.Fatalf("Listen(0) gave address %v", ln.Addr())
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("hi " + c.RemoteAddr().String()))
			c.Close()
		}
	}()
	// From a peer, and from the node itself (two BEAM nodes on one host).
	for _, from := range []*carrier.Node{beta, alpha} {
		c, err := from.Dial(ctx, "alpha", port)
		if err != nil {
			t.Fatalf("dial alpha from %s: %v", from.Hostname(), err)
		}
		buf := make([]byte, 64)
		n, _ := c.Read(buf)
		c.Close()
		if got := string(buf[:n]); !strings.HasPrefix(got, "hi 100.64.") {
			t.Errorf("from %s: read %q", from.Hostname(), got)
		}
	}
}

func TestInteractiveLogin(t *testing.T) {
	leakcheck.Check(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dn := startDevnet(t, ctx, devnet.Options{RequireAuth: true})

	var mu sync.Mutex
	var said []string
	loginURL := make(chan string, 1)
	urlRE := regexp.MustCompile(`https?://\S+/auth/\S+`)
	n, err := carrier.New(carrier.Config{
		Hostname:   "alpha",
		ControlURL: dn.ControlURL,
		Dir:        t.TempDir(),
		Ephemeral:  true,
		UserLogf: func(format string, args ...any) {
			line := fmt.Sprintf(format, args...)
			mu.Lock()
			said = append(said, line)
			mu.Unlock()
			if u := urlRE.FindString(line); u != "" {
				select {
				case loginURL <- u:
				default:
				}
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	upErr := make(chan error, 1)
	go func() { upErr <- n.Up(ctx) }()

	var u string
	select {
	case u = <-loginURL:
	case err := <-upErr:
		t.Fatalf("Up returned %v before any login", err)
	case <-ctx.Done():
		t.Fatal("no login URL printed")
	}
	st, err := n.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.State != "NeedsLogin" || st.AuthURL != u {
		t.Errorf("before approval: state %q, auth URL %q; want NeedsLogin, %q", st.State, st.AuthURL, u)
	}
	select {
	case err := <-upErr:
		t.Fatalf("Up returned %v before the login was approved", err)
	case <-time.After(200 * time.Millisecond):
	}
	if !dn.CompleteAuth(u) {
		t.Fatalf("control server does not know login URL %q", u)
	}
	if err := <-upErr; err != nil {
		t.Fatalf("Up after approval: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(said) != 1 {
		t.Errorf("login URL printed %d times: %q", len(said), said)
	}
}

func TestConfigErrors(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name string
		cfg  carrier.Config
		want string
	}{
		{"no hostname", carrier.Config{Dir: dir}, "hostname is empty"},
		{"bad hostname", carrier.Config{Hostname: "al_pha", Dir: dir}, "only letters"},
		{"no dir", carrier.Config{Hostname: "alpha"}, "Dir is required"},
		{"bad tag", carrier.Config{Hostname: "alpha", Dir: dir, Tags: []string{"erlang"}}, "tag:NAME"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := carrier.New(tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("New = %v; want error containing %q", err, tt.want)
			}
		})
	}
	n, err := carrier.New(carrier.Config{Hostname: "alpha", Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.Listen(1); !errors.Is(err, carrier.ErrNotUp) {
		t.Errorf("Listen before Up = %v; want ErrNotUp", err)
	}
}
