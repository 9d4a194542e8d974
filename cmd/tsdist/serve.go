package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/tsdist/tsdist/access"
	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/control"
	"github.com/tsdist/tsdist/epmd"
	"tailscale.com/feature/buildfeatures"
	"tailscale.com/types/logger"
)

func runServe(args []string) error {
	fs := newFlagSet("serve", "--hostname NAME [flags]")
	hostname := fs.String("hostname", envOr("", "TS_HOSTNAME"), "the node's tailnet `name` (env TS_HOSTNAME); required")
	controlURL := fs.String("control-url", envOr("", "TS_CONTROL_URL"), "coordination server `URL` (env TS_CONTROL_URL); empty means Tailscale's")
	authKey := fs.String("authkey", envOr("", "TS_AUTHKEY", "TS_AUTH_KEY"), "auth `key` to join without a person (env TS_AUTHKEY); without one, a login URL is printed")
	stateDir := fs.String("state-dir", envOr("", "TS_STATE_DIR"), "`dir` for the node's keys and login (env TS_STATE_DIR); default $XDG_STATE_HOME/tsdist/NAME or ~/.local/state/tsdist/NAME")
	ephemeral := fs.Bool("ephemeral", envOr("", "TS_EPHEMERAL") == "true" || envOr("", "TS_EPHEMERAL") == "1", "remove the node from the tailnet when it goes offline and keep no state on disk (env TS_EPHEMERAL=1)")
	tags := fs.String("tags", envOr("", "TS_TAGS"), "comma-separated ACL `tags` to advertise, e.g. tag:erlang (env TS_TAGS)")
	socket := fs.String("socket", envOr("", "TSDIST_SOCKET"), "control socket `path` (env TSDIST_SOCKET); default "+filepath.Join(runtimeDir(), "NAME.sock"))
	localOnly := fs.Bool("local-only", false, "keep every packet on loopback (implied when the control URL is on loopback)")
	verbose := fs.Bool("verbose", false, "print tailscale's own logs to stderr")
	allow := fs.String("allow", envOr(access.Default, "TSDIST_ALLOW"), "which tailnet peers may reach this node and its EPMD: comma-separated `rules` owner, user:LOGIN, tag:NAME, host:NAME, * (env TSDIST_ALLOW)")
	pprofAddr := fs.String("pprof", envOr("", "TSDIST_PPROF"), "serve Go's profiler on `addr`, a Unix socket path or a loopback host:port (env TSDIST_PPROF); off by default")
	exitWithStdin := fs.Bool("exit-with-stdin", false, "shut down when standard input closes, so a parent that starts the helper as a port program takes it down when it dies")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *hostname == "" {
		return usageError{errors.New("--hostname is required (or set TS_HOSTNAME)")}
	}
	if err := carrier.ValidHostname(*hostname); err != nil {
		return usageError{err}
	}
	// Checked before anything is created, like the other flags.
	policy, err := access.Parse(*allow)
	if err != nil {
		return usageError{err}
	}
	if *localOnly || carrier.IsLoopbackURL(*controlURL) {
		carrier.KeepToLoopback()
	}
	if *stateDir == "" {
		d, err := defaultStateDir(*hostname)
		if err != nil {
			return err
		}
		*stateDir = d
	}
	if *socket == "" {
		*socket = defaultSocket(*hostname)
	}
	var tagList []string
	for _, t := range strings.Split(*tags, ",") {
		if t = strings.TrimSpace(t); t != "" {
			tagList = append(tagList, t)
		}
	}

	say := log.New(os.Stderr, "tsdist["+*hostname+"]: ", 0).Printf
	if *pprofAddr != "" {
		stopPprof, err := servePprof(*pprofAddr, say)
		if err != nil {
			return err
		}
		defer stopPprof()
	}
	cfg := carrier.Config{
		Hostname:   *hostname,
		ControlURL: *controlURL,
		AuthKey:    *authKey,
		Dir:        *stateDir,
		Ephemeral:  *ephemeral,
		Tags:       tagList,
		UserLogf:   say,
	}
	if *verbose {
		cfg.Logf = log.New(os.Stderr, "tsdist["+*hostname+"] tailscale: ", log.Lmicroseconds).Printf
	}
	if buildfeatures.HasPeerAPIServer {
		say("warning: built without -tags ts_omit_peerapiserver, so tailscale's PeerAPI will hold a TCP port open on this host (it answers tailnet peers only); build with `make build` to leave it out")
	}
	node, err := carrier.New(cfg)
	if err != nil {
		return err
	}
	defer closeNode(node, say)

	ln, err := listenControl(*socket)
	if err != nil {
		return err
	}
	defer os.Remove(*socket)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if *exitWithStdin {
		go stopOnStdinClose(stop, say)
	}
	go carrier.ReleaseMemory(ctx)

	srv := control.NewServer(node, version, say)
	srv.SetPolicy(policy)
	served := make(chan error, 2) // the control socket's and EPMD's
	go func() { served <- fmt.Errorf("control socket: %w", srv.Serve(ln)) }()
	defer func() {
		srv.Close()
		// Peers learn that their connections ended from the FIN or RST
		// the node sends; closing the node at once would drop those, and
		// peers would find out only at their next keepalive (a BEAM
		// node: net_ticktime).
		if wait := finGrace - time.Since(srv.LastCarried()); wait > 0 {
			time.Sleep(wait)
		}
	}()

	// Every tailnet peer can reach the EPMD port, so its complaints are
	// rate-limited: a flood of bad requests must not flood the log.
	epmdSrv := &epmd.Server{Registry: srv.Registry(), Logf: logger.RateLimitedFn(say, time.Minute, 20, 100)}
	defer epmdSrv.Close()

	upErr := make(chan error, 1)
	start := time.Now()
	go func() { upErr <- node.Up(ctx) }()
	for {
		select {
		case err := <-upErr:
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return err
			}
			upErr = nil
			st, err := node.Status(ctx)
			if err != nil {
				return err
			}
			say("running on the tailnet as %s (%s) after %v; control socket %s",
				st.Self.DNSName, strings.Join(st.Self.IPs, ", "), time.Since(start).Round(time.Millisecond), *socket)
			if st.Self.Node != "" && !strings.EqualFold(st.Self.Node, *hostname) {
				say("note: the tailnet named this node %s, not %s: another node holds that name, most likely an earlier run of this one "+
					"that did not log out (an ephemeral node stays until the control server's inactivity timeout, a persistent one until it is removed). "+
					"Peers still reach this node as %s (online nodes win), but its MagicDNS name is %s; "+
					"remove the stale node (Headscale: headscale nodes delete; Tailscale: the admin console) and reuse the state dir (or --ephemeral) to avoid it",
					st.Self.Node, *hostname, *hostname, st.Self.DNSName)
			}
			epmdLn, err := node.Listen(epmd.DefaultPort)
			if err != nil {
				return fmt.Errorf("EPMD on the tailnet: %w", err)
			}
			go func() {
				if err := epmdSrv.Serve(srv.Guard(epmdLn, "EPMD")); !errors.Is(err, epmd.ErrServerClosed) {
					served <- fmt.Errorf("EPMD on the tailnet: %w", err)
				}
			}()
		case err := <-served:
			return err
		case <-ctx.Done():
			say("shutting down")
			return nil
		}
	}
}

// finGrace is how long shutdown lets connections that just ended send their
// last packets.
const finGrace = 300 * time.Millisecond

// nodeCloseTime bounds how long shutdown waits for the node to close.
const nodeCloseTime = 3 * time.Second

// closeNode closes the node, giving up after nodeCloseTime: tsnet's Close
// can block for good. (tailscale v1.102.5: netstack's Close stops draining
// its 512-packet outbound queue, then aborts every TCP endpoint still
// connected, TIME_WAIT ones included, each abort queueing a RST; with more
// than 512 such endpoints, as after a burst of closed connections, the
// 513th waits forever.) The process is about to exit, which releases
// whatever the node still holds.
func closeNode(node *carrier.Node, say func(string, ...any)) {
	done := make(chan struct{})
	go func() {
		node.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(nodeCloseTime):
		say("the tailnet node did not close within %v; exiting anyway", nodeCloseTime)
	}
}

// listenControl creates the control socket at path: in a directory only
// this user can enter, with mode 0600. A stale socket from a helper that
// died is replaced; a live one is an error.
func listenControl(path string) (*net.UnixListener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("control socket dir: %w", err)
	}
	// The default directory is tsdist's own: make sure an older one is
	// private too. A directory the user chose is left as it is; the
	// socket's own 0600 mode still keeps other users out.
	if dir == runtimeDir() {
		if err := os.Chmod(dir, 0o700); err != nil {
			return nil, fmt.Errorf("control socket dir: %w", err)
		}
	}
	if _, err := os.Stat(path); err == nil {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("another helper is already serving %s", path)
		}
		os.Remove(path)
	}
	old := syscall.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	ln.SetUnlinkOnClose(false) // removed by serve itself, after shutdown
	return ln, nil
}
