package ergonode_test

import (
	"context"
	"log"
	"os"
	"time"

	"github.com/ergo-services/ergo/etf"
	"github.com/ergo-services/ergo/gen"
	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/ergonode"
)

// counter is an ergo gen server that BEAM nodes call.
type counter struct {
	gen.Server
	n int
}

func (c *counter) HandleCall(p *gen.ServerProcess, from gen.ServerFrom, message etf.Term) (etf.Term, gen.ServerStatus) {
	c.n++
	return c.n, gen.ServerStatusOK
}

// A Go node on the tailnet as device "delta", with a gen server that an
// Erlang node reaches as gen_server:call({counter, 'go@delta'}, next).
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	node, err := ergonode.Start(ctx, "go@delta", os.Getenv("ERLANG_COOKIE"), ergonode.Options{
		Tailnet: carrier.Config{
			Dir:     "/var/lib/go-node", // the device's keys and login
			AuthKey: os.Getenv("TS_AUTHKEY"),
		},
		Allow: "tag:erlang", // only the cluster's tagged devices, to and from this node
	})
	if err != nil {
		log.Fatal(err)
	}
	defer node.Stop()

	if _, err := node.Spawn("counter", gen.ProcessOptions{}, &counter{}); err != nil {
		log.Fatal(err)
	}
	// From inside any ergo process, an Erlang one is a call away:
	//	process.Call(gen.ProcessID{Name: "db", Node: "app@alpha"}, request)
	if id, ok := node.Identity("app@alpha"); ok {
		log.Printf("app@alpha is tailnet device %s, owned by %s", id.Node, id.User)
	}
}
