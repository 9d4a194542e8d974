// Command tsdist is the tsdist helper and CLI: it owns a tailnet node and
// hands the node's connections to local programs (BEAM nodes above all) as
// file descriptors, and it runs the offline tailnet used by the tests and
// the demo.
//
//	tsdist serve   --hostname alpha [--control-url URL] [--authkey KEY] ...
//	tsdist status  [--socket PATH | --hostname alpha] [--json]
//	tsdist names   HOST [--socket PATH | --hostname alpha] [--json]
//	tsdist devnet  [--url-file FILE]
//	tsdist version
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// version is the helper's version, reported by hello and `tsdist version`.
// Release builds set it with -ldflags "-X main.version=...".
var version = "0.1.0-dev"

type command struct {
	name, summary string
	run           func(args []string) error
}

func commands() []command {
	return []command{
		{"serve", "run one tailnet node and serve the control protocol on a Unix socket", runServe},
		{"status", "print a helper's view of the tailnet", runStatus},
		{"names", "print the node names registered on a tailnet host, like epmd -names", runNames},
		{"devnet", "run an offline tailnet on loopback (control server, DERP, STUN)", runDevnet},
		{"version", "print the version", func([]string) error { fmt.Println("tsdist", version); return nil }},
	}
}

func usage() {
	fmt.Fprintf(os.Stderr, "usage: tsdist COMMAND [flags]\n\ncommands:\n")
	for _, c := range commands() {
		fmt.Fprintf(os.Stderr, "  %-8s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(os.Stderr, "\n`tsdist COMMAND -h` lists a command's flags.\n")
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	name := os.Args[1]
	if name == "-h" || name == "--help" || name == "help" {
		usage()
		return
	}
	for _, c := range commands() {
		if c.name == name {
			err := c.run(os.Args[2:])
			if errors.Is(err, flag.ErrHelp) {
				return
			}
			if err != nil {
				fmt.Fprintf(os.Stderr, "tsdist %s: %v\n", name, err)
				var ue usageError
				if errors.As(err, &ue) {
					os.Exit(2)
				}
				os.Exit(1)
			}
			return
		}
	}
	fmt.Fprintf(os.Stderr, "tsdist: unknown command %q\n\n", name)
	usage()
	os.Exit(2)
}

// usageError is a mistake on the command line (exit status 2).
type usageError struct{ error }

func newFlagSet(name, synopsis string) *flag.FlagSet {
	fs := flag.NewFlagSet("tsdist "+name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: tsdist %s %s\n\nflags:\n", name, synopsis)
		fs.PrintDefaults()
	}
	return fs
}

func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("unexpected argument %q", fs.Arg(0))}
	}
	return nil
}

// parseFlagsWithArg parses flags around exactly one positional argument,
// named what in errors, and returns it: `tsdist names beta --json` and
// `tsdist names --json beta` both work.
func parseFlagsWithArg(fs *flag.FlagSet, args []string, what string) (string, error) {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return "", err
		}
		return "", usageError{err}
	}
	if fs.NArg() == 0 {
		return "", usageError{fmt.Errorf("missing %s", what)}
	}
	arg := fs.Arg(0)
	if err := parseFlags(fs, fs.Args()[1:]); err != nil {
		return "", err
	}
	return arg, nil
}

// stopOnStdinClose calls stop once standard input ends: a parent that
// runs tsdist as a port program (a BEAM node, a test) closes it by exiting,
// however it exits, so the helper cannot outlive it.
//
// The parent that is gone also held the read end of our stdout and stderr:
// a log line written there now would raise SIGPIPE, which kills a Go
// program writing to fd 1 or 2, before it could close its connections
// cleanly. So SIGPIPE is ignored, and such writes just fail.
func stopOnStdinClose(stop func(), say func(string, ...any)) {
	signal.Ignore(syscall.SIGPIPE)
	io.Copy(io.Discard, os.Stdin)
	say("standard input closed; shutting down")
	stop()
}

// envOr returns the first non-empty environment variable of names, or def.
func envOr(def string, names ...string) string {
	for _, n := range names {
		if v := os.Getenv(n); v != "" {
			return v
		}
	}
	return def
}
