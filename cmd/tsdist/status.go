package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/control"
)

func runStatus(args []string) error {
	fs := newFlagSet("status", "[--socket PATH | --hostname NAME] [--json]")
	helper := addHelperFlags(fs)
	asJSON := fs.Bool("json", false, "print the status as JSON")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), helper.timeout)
	defer cancel()
	c, err := helper.dial(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	st, err := c.Status(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	fmt.Printf("%s is %s", c.Hello.Hostname, st.State)
	if st.AuthURL != "" {
		fmt.Printf("; log in at %s", st.AuthURL)
	}
	fmt.Printf(" (helper %s)\n", c.Hello.Helper)
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NODE\tIP\tDNS NAME\tOWNER\tSTATE")
	row := func(p carrier.Peer, self bool) {
		owner := p.User
		if len(p.Tags) > 0 {
			owner = strings.Join(p.Tags, ",")
		}
		state := "offline"
		if p.Online || self {
			state = "online"
		}
		if self {
			state += " (this node)"
		}
		ip := "-"
		if len(p.IPs) > 0 {
			ip = p.IPs[0]
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", p.Node, ip, p.DNSName, owner, state)
	}
	row(st.Self, true)
	for _, p := range st.Peers {
		row(p, false)
	}
	return w.Flush()
}

// helperFlags are the flags of a command that talks to a running helper.
type helperFlags struct {
	socket, hostname string
	timeout          time.Duration
}

func addHelperFlags(fs *flag.FlagSet) *helperFlags {
	h := new(helperFlags)
	fs.StringVar(&h.socket, "socket", envOr("", "TSDIST_SOCKET"), "the helper's control socket `path` (env TSDIST_SOCKET)")
	fs.StringVar(&h.hostname, "hostname", envOr("", "TS_HOSTNAME"), "find the helper of tailnet node `NAME` at its default socket")
	fs.DurationVar(&h.timeout, "timeout", 10*time.Second, "give up after this long")
	return h
}

// dial connects to the helper the flags name.
func (h *helperFlags) dial(ctx context.Context) (*control.Client, error) {
	path, err := resolveSocket(h.socket, h.hostname)
	if err != nil {
		return nil, err
	}
	return control.Dial(ctx, path)
}

// resolveSocket picks the control socket: the one given, the default one of
// a hostname, or the only one in the default directory.
func resolveSocket(socket, hostname string) (string, error) {
	switch {
	case socket != "":
		return socket, nil
	case hostname != "":
		return defaultSocket(hostname), nil
	}
	matches, _ := filepath.Glob(filepath.Join(runtimeDir(), "*.sock"))
	switch len(matches) {
	case 1:
		return matches[0], nil
	case 0:
		return "", usageError{fmt.Errorf("no helper socket in %s; give --socket or --hostname", runtimeDir())}
	default:
		return "", usageError{fmt.Errorf("several helpers in %s (%s); give --socket or --hostname", runtimeDir(), strings.Join(matches, ", "))}
	}
}
