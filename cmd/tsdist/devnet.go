package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/devnet"
	"tailscale.com/types/logger"
)

func runDevnet(args []string) error {
	fs := newFlagSet("devnet", "[--url-file FILE] | --relay-only --derp-map-file FILE")
	urlFile := fs.String("url-file", "", "also write the control URL to `FILE` (atomically), for scripts")
	sameUser := fs.Bool("same-user", false, "put every node under one tailnet user")
	verbose := fs.Bool("verbose", false, "log the control server's and DERP's activity to stderr")
	exitWithStdin := fs.Bool("exit-with-stdin", false, "shut down when standard input closes (for a parent that runs the devnet as a port program)")
	relayOnly := fs.Bool("relay-only", false, "run only the DERP relay and STUN server, for a coordination server of your own (Headscale) that keeps its tailnet on loopback")
	derpMapFile := fs.String("derp-map-file", "", "with --relay-only: write the relay's DERP map, as a Headscale derp.paths file, to `FILE` (atomically)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *relayOnly != (*derpMapFile != "") {
		return usageError{errors.New("--relay-only and --derp-map-file go together")}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if *exitWithStdin {
		go stopOnStdinClose(stop, func(format string, a ...any) { fmt.Fprintf(os.Stderr, "tsdist devnet: "+format+"\n", a...) })
	}
	opts := devnet.Options{SameUser: *sameUser}
	if *verbose {
		opts.Logf = func(format string, a ...any) { fmt.Fprintf(os.Stderr, "devnet: "+format+"\n", a...) }
	}
	if *relayOnly {
		return runRelay(ctx, opts.Logf, *derpMapFile)
	}
	net, err := devnet.Start(ctx, opts)
	if err != nil {
		return err
	}
	defer net.Close()
	fmt.Println(net.ControlURL)
	if *urlFile != "" {
		if err := writeFileAtomic(*urlFile, []byte(net.ControlURL+"\n")); err != nil {
			return err
		}
	}
	fmt.Fprintf(os.Stderr, "tsdist devnet: offline tailnet up; control URL %s (MagicDNS suffix %s); stop with SIGINT or SIGTERM\n",
		net.ControlURL, devnet.MagicDNSDomain)
	<-ctx.Done()
	return nil
}

// runRelay runs the offline tailnet's DERP relay and STUN server alone, on
// 127.0.0.1, until ctx is done, and writes their DERP map to derpMapFile for
// a coordination server to hand its nodes.
func runRelay(ctx context.Context, logf logger.Logf, derpMapFile string) error {
	carrier.KeepToLoopback()
	relay, err := devnet.StartRelay(logf)
	if err != nil {
		return err
	}
	defer relay.Close()
	if err := writeFileAtomic(derpMapFile, relay.HeadscaleDERPMap()); err != nil {
		return fmt.Errorf("DERP map: %w", err)
	}
	node := relay.DERPMap.Regions[1].Nodes[0]
	fmt.Fprintf(os.Stderr, "tsdist devnet: DERP relay on 127.0.0.1:%d, STUN on 127.0.0.1:%d; DERP map in %s; stop with SIGINT or SIGTERM\n",
		node.DERPPort, node.STUNPort, derpMapFile)
	<-ctx.Done()
	return nil
}

// writeFileAtomic writes data to path so that a reader never sees it half
// written.
func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
