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
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tsdist/tsdist/access"
	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/control"
	"github.com/tsdist/tsdist/host"
)

func runServe(args []string) error {
	fs := newFlagSet("serve", "--hostname NAME [flags]")
	hostname := fs.String("hostname", envOr("", "TS_HOSTNAME"), "the node's tailnet `name` (env TS_HOSTNAME); required")
	controlURL := fs.String("control-url", envOr("", "TS_CONTROL_URL"), "coordination server `URL` (env TS_CONTROL_URL); empty means Tailscale's")
	authKey := fs.String("authkey", "", "auth `key` to join without a person; visible to every local user in the process list: prefer env TS_AUTHKEY or --authkey-file. Without a key, a login URL is printed")
	authKeyFile := fs.String("authkey-file", envOr("", "TS_AUTHKEY_FILE"), "read the auth key from `file`, which must not be readable by group or others (env TS_AUTHKEY_FILE)")
	stateDir := fs.String("state-dir", envOr("", "TS_STATE_DIR"), "`dir` for the node's keys and login (env TS_STATE_DIR); default $XDG_STATE_HOME/tsdist/NAME or ~/.local/state/tsdist/NAME")
	ephemeral := fs.Bool("ephemeral", envOr("", "TS_EPHEMERAL") == "true" || envOr("", "TS_EPHEMERAL") == "1", "remove the node from the tailnet when it goes offline and keep no state on disk (env TS_EPHEMERAL=1)")
	udpPort := fs.String("udp-port", envOr("", "TS_UDP_PORT"), "UDP `port` for WireGuard (env TS_UDP_PORT); default: the port of the last run, kept in the state dir, or a free one")
	tags := fs.String("tags", envOr("", "TS_TAGS"), "comma-separated ACL `tags` to advertise, e.g. tag:erlang (env TS_TAGS)")
	socket := fs.String("socket", envOr("", "TSDIST_SOCKET"), "control socket `path` (env TSDIST_SOCKET); default "+filepath.Join(runtimeDir(), "NAME.sock"))
	localOnly := fs.Bool("local-only", false, "keep every packet on loopback (implied when the control URL is on loopback)")
	verbose := fs.Bool("verbose", false, "print tailscale's own logs to stderr")
	allow := fs.String("allow", envOr(access.Default, "TSDIST_ALLOW"), "which tailnet peers may reach this node and its EPMD: comma-separated `rules` owner, user:LOGIN, tag:NAME, host:NAME, * (env TSDIST_ALLOW)")
	pprofAddr := fs.String("pprof", envOr("", "TSDIST_PPROF"), "serve Go's profiler on the Unix socket `path` (made 0600; env TSDIST_PPROF); off by default")
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
	key, err := readAuthKey(*authKey, *authKeyFile)
	if err != nil {
		return usageError{err}
	}
	var wgPort uint16
	if *udpPort != "" {
		p, err := strconv.ParseUint(*udpPort, 10, 16)
		if err != nil || p == 0 {
			return usageError{fmt.Errorf("--udp-port %q: want a port number from 1 to 65535", *udpPort)}
		}
		wgPort = uint16(p)
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
	if *authKey != "" {
		say("warning: --authkey puts the auth key in the process list, where every local user can read it; use env TS_AUTHKEY or --authkey-file")
	}
	if *pprofAddr != "" {
		stopPprof, err := servePprof(*pprofAddr, say)
		if err != nil {
			return err
		}
		defer stopPprof()
	}
	cfg := host.Config{
		Tailnet: carrier.Config{
			Hostname:   *hostname,
			ControlURL: *controlURL,
			AuthKey:    key,
			Dir:        *stateDir,
			Ephemeral:  *ephemeral,
			Tags:       tagList,
			UDPPort:    wgPort,
			UserLogf:   say,
		},
		Policy:    policy,
		LocalOnly: *localOnly,
		Logf:      say,
	}
	if *verbose {
		cfg.Tailnet.Logf = log.New(os.Stderr, "tsdist["+*hostname+"] tailscale: ", log.Lmicroseconds).Printf
	}
	h, err := host.New(cfg)
	if err != nil {
		return err
	}
	defer h.Close()

	ln, sockInfo, err := listenControl(*socket)
	if err != nil {
		return err
	}
	defer removeIfSame(*socket, sockInfo)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if *exitWithStdin {
		go stopOnStdinClose(stop, say)
	}

	srv := control.NewServer(h, version, say)
	// Closed before the host, whose Close lets the carried connections'
	// last packets out.
	defer srv.Close()
	served := make(chan error, 1)
	go func() { served <- fmt.Errorf("control socket: %w", srv.Serve(ln)) }()

	upErr := make(chan error, 1)
	start := time.Now()
	go func() { upErr <- h.Up(ctx) }()
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
			st, err := h.Node().Status(ctx)
			if err != nil {
				return err
			}
			say("running on the tailnet as %s (%s) after %v; control socket %s",
				st.Self.DNSName, strings.Join(st.Self.IPs, ", "), time.Since(start).Round(time.Millisecond), *socket)
			if st.Self.Node != "" && !strings.EqualFold(st.Self.Node, *hostname) {
				say("note: the tailnet named this node %s, not %s: another node holds that name, most likely an earlier run of this one "+
					"that did not log out (an ephemeral node stays until the control server's inactivity timeout, a persistent one until it is removed). "+
					"Peers of the same owner still reach this node as %s (see docs/security.md, names), but its MagicDNS name is %s; "+
					"remove the stale node (Headscale: headscale nodes delete; Tailscale: the admin console) and reuse the state dir (or --ephemeral) to avoid it",
					st.Self.Node, *hostname, *hostname, st.Self.DNSName)
			}
		case err := <-h.Failed():
			return err
		case err := <-served:
			return err
		case <-ctx.Done():
			say("shutting down")
			return nil
		}
	}
}

// readAuthKey returns the auth key given by flag, else read from file,
// else from the environment (TS_AUTHKEY, or TS_AUTH_KEY as tailscale
// spells it too). A key file readable by others is refused: it is the
// tailnet's word that this machine may join.
func readAuthKey(flagKey, file string) (string, error) {
	if flagKey != "" {
		return flagKey, nil
	}
	if file == "" {
		return envOr("", "TS_AUTHKEY", "TS_AUTH_KEY"), nil
	}
	fi, err := os.Stat(file)
	if err != nil {
		return "", fmt.Errorf("--authkey-file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("--authkey-file %s: mode %04o lets other users read the key; chmod 600 it", file, fi.Mode().Perm())
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("--authkey-file: %w", err)
	}
	key := strings.TrimSpace(string(b))
	if key == "" {
		return "", fmt.Errorf("--authkey-file %s is empty", file)
	}
	return key, nil
}

// listenControl creates the control socket at path, with mode 0600, in a
// directory of this user's own (see checkSocketDir), and returns it with
// the socket file's identity, for removeIfSame. A stale socket from a
// helper that died is replaced; a live one is an error.
func listenControl(path string) (*net.UnixListener, os.FileInfo, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("control socket dir: %w", err)
	}
	if err := checkSocketDir(dir, dir == runtimeDir()); err != nil {
		return nil, nil, err
	}
	if _, err := os.Lstat(path); err == nil {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, nil, fmt.Errorf("another helper is already serving %s", path)
		}
		os.Remove(path)
	}
	old := syscall.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	if err != nil {
		return nil, nil, fmt.Errorf("control socket: %w", err)
	}
	ln.SetUnlinkOnClose(false) // removed by serve itself, after shutdown
	fi, err := os.Lstat(path)
	if err != nil {
		ln.Close()
		return nil, nil, fmt.Errorf("control socket: %w", err)
	}
	return ln, fi, nil
}

// checkSocketDir refuses a control socket directory that another local user
// could have prepared: a symbolic link, or not owned by this user. The
// socket hands out this node's tailnet connections and identity, and a BEAM
// node attaches to whatever listens at the default path, so a squatter
// there would receive its dials. tsdist's own default directory (own) is
// also made private (0700) if an older run left it otherwise.
func checkSocketDir(dir string, own bool) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("control socket dir: %w", err)
	}
	if fi.Mode()&os.ModeSymlink != 0 {
		return fmt.Errorf("control socket dir %s is a symbolic link; refusing it (use a real directory of your own)", dir)
	}
	if !fi.IsDir() {
		return fmt.Errorf("control socket dir %s is not a directory", dir)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("control socket dir %s: no owner information", dir)
	}
	if me := os.Getuid(); int(st.Uid) != me {
		return fmt.Errorf("control socket dir %s belongs to uid %d, not to this user (uid %d); another user may have created it: remove it, or set XDG_RUNTIME_DIR or --socket", dir, st.Uid, me)
	}
	if own && fi.Mode().Perm() != 0o700 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("control socket dir: %w", err)
		}
	}
	return nil
}

// removeIfSame removes the control socket at path if it is still the file
// listenControl made: a newer helper may have replaced it since (after
// finding this one unresponsive), and its socket must stay.
func removeIfSame(path string, made os.FileInfo) {
	if now, err := os.Lstat(path); err == nil && os.SameFile(now, made) {
		os.Remove(path)
	}
}
