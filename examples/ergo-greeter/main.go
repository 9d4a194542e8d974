// Command ergo-greeter is a Go node of an Erlang cluster on a tailnet: an
// ergo gen server, greeter, that BEAM nodes call by the Go node's tailnet
// hostname. It answers with who called, as the tailnet vouches for it.
//
// On the offline tailnet of this repository (`bin/tsdist devnet` prints
// its control URL):
//
//	go run ./examples/ergo-greeter -name greeter@delta -cookie secret \
//	    -control-url http://127.0.0.1:PORT -state-dir /tmp/delta
//
// and from a BEAM node on the same tailnet:
//
//	gen_server:call({greeter, 'greeter@delta'}, {hello, <<"Ada">>}).
//	%% => <<"Hello, Ada! This is Go on tailnet device delta; you are app@alpha on alpha (owner alice@example.com).">>
//
// On a real tailnet, pass an auth key (-authkey or TS_AUTHKEY) and leave
// -control-url empty for Tailscale's, or give your Headscale's URL.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"

	"github.com/ergo-services/ergo/etf"
	"github.com/ergo-services/ergo/gen"
	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/ergonode"
)

func main() {
	name := flag.String("name", "greeter@delta", "node `name@host`; host is the node's tailnet hostname")
	cookie := flag.String("cookie", os.Getenv("ERLANG_COOKIE"), "distribution `cookie` (env ERLANG_COOKIE)")
	controlURL := flag.String("control-url", os.Getenv("TS_CONTROL_URL"), "coordination server `URL` (env TS_CONTROL_URL); empty means Tailscale's")
	authKey := flag.String("authkey", os.Getenv("TS_AUTHKEY"), "auth `key` (env TS_AUTHKEY); without one, a login URL is printed")
	stateDir := flag.String("state-dir", os.Getenv("TS_STATE_DIR"), "`dir` for the device's keys and login (env TS_STATE_DIR)")
	ephemeral := flag.Bool("ephemeral", false, "leave the tailnet when the node stops, keeping no state")
	allow := flag.String("allow", os.Getenv("TSDIST_ALLOW"), "which tailnet peers the node accepts connections from and connects to (env TSDIST_ALLOW); default owner")
	flag.Parse()
	if *cookie == "" || (*stateDir == "" && !*ephemeral) {
		log.Fatal("ergo-greeter: -cookie and -state-dir (or -ephemeral) are required")
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	node, err := ergonode.Start(ctx, *name, *cookie, ergonode.Options{
		Tailnet: carrier.Config{
			ControlURL: *controlURL,
			AuthKey:    *authKey,
			Dir:        *stateDir,
			Ephemeral:  *ephemeral,
			UserLogf:   log.Printf, // the login URL, when there is no auth key
		},
		Allow: *allow,
	})
	if err != nil {
		log.Fatalf("ergo-greeter: %v", err)
	}
	defer node.Stop()
	if _, err := node.Spawn("greeter", gen.ProcessOptions{}, &greeter{node: node}); err != nil {
		log.Fatalf("ergo-greeter: %v", err)
	}
	log.Printf("ergo-greeter: %s is up; call {greeter, '%s'}", node.Name(), node.Name())
	<-ctx.Done()
}

// greeter answers {hello, Name} with a greeting that names the caller's
// tailnet device and owner.
type greeter struct {
	gen.Server
	node *ergonode.Node
}

func (g *greeter) HandleCall(p *gen.ServerProcess, from gen.ServerFrom, message etf.Term) (etf.Term, gen.ServerStatus) {
	req, ok := message.(etf.Tuple)
	if !ok || len(req) != 2 || req[0] != etf.Atom("hello") {
		return etf.Tuple{etf.Atom("error"), etf.Atom("unknown_request")}, gen.ServerStatusOK
	}
	caller := string(from.Pid.Node)
	who := caller
	if id, ok := g.node.Identity(caller); ok {
		who = fmt.Sprintf("%s on %s (owner %s)", caller, id.Node, id.User)
	}
	greeting := fmt.Sprintf("Hello, %s! This is Go on tailnet device %s; you are %s.",
		nameOf(req[1]), g.node.Tailnet().Hostname(), who)
	return []byte(greeting), gen.ServerStatusOK
}

// nameOf renders a name sent as a binary, a charlist or an atom.
func nameOf(t etf.Term) string {
	switch v := t.(type) {
	case []byte:
		return string(v)
	case string:
		return v
	case etf.Atom:
		return string(v)
	case etf.List:
		if s, ok := etf.TermToString(v); ok {
			return s
		}
	}
	return fmt.Sprint(t)
}
