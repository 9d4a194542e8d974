package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/tsdist/tsdist/control"
	"github.com/tsdist/tsdist/epmd"
)

// runNames prints the nodes registered on a tailnet host's EPMD, in the
// lines `epmd -names` prints, so scripts that read one read the other.
func runNames(args []string) error {
	fs := newFlagSet("names", "HOST [--socket PATH | --hostname NAME] [--json]")
	helper := addHelperFlags(fs)
	asJSON := fs.Bool("json", false, "print the names as JSON")
	host, err := parseFlagsWithArg(fs, args, "HOST")
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), helper.timeout)
	defer cancel()
	c, err := helper.dial(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	names, err := c.Names(ctx, host)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(control.NamesResult{Host: host, Names: names})
	}
	fmt.Printf("epmd: up and running on %s, tailnet port %d, with data:\n", host, epmd.DefaultPort)
	for _, n := range names {
		fmt.Printf("name %s at port %d\n", n.Name, n.Port)
	}
	return nil
}
