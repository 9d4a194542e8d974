package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/tsdist/tsdist/devnet"
)

func runDevnet(args []string) error {
	fs := newFlagSet("devnet", "[--url-file FILE]")
	urlFile := fs.String("url-file", "", "also write the control URL to `FILE` (atomically), for scripts")
	sameUser := fs.Bool("same-user", false, "put every node under one tailnet user")
	verbose := fs.Bool("verbose", false, "log the control server's and DERP's activity to stderr")
	exitWithStdin := fs.Bool("exit-with-stdin", false, "shut down when standard input closes (for a parent that runs the devnet as a port program)")
	if err := parseFlags(fs, args); err != nil {
		return err
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

// writeFileAtomic writes data to path so that a reader never sees it half
// written.
func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
