package ergonode

import (
	"fmt"

	"github.com/ergo-services/ergo/etf"
	"github.com/ergo-services/ergo/gen"
	"github.com/ergo-services/ergo/node"
)

// netKernel stands in for ergo's net_kernel, which answers every call
// with nothing, so that net_adm:ping from a BEAM node ({is_auth, Node})
// says pang although the connection works.
type netKernel struct {
	gen.Server
}

// HandleCall answers is_auth as OTP's net_kernel does for a connected
// node, and refuses what ergo cannot do.
func (nk *netKernel) HandleCall(process *gen.ServerProcess, from gen.ServerFrom, message etf.Term) (etf.Term, gen.ServerStatus) {
	if t, ok := message.(etf.Tuple); ok && len(t) == 2 && t[0] == etf.Atom("is_auth") {
		return etf.Atom("yes"), gen.ServerStatusOK
	}
	return etf.Tuple{etf.Atom("error"), etf.Atom("not_supported_by_ergo")}, gen.ServerStatusOK
}

// replaceNetKernel gives the name net_kernel to a netKernel. ergo's own
// process keeps running, nameless and idle, under its supervisor.
func replaceNetKernel(n node.Node) error {
	p, err := n.Spawn("", gen.ProcessOptions{}, &netKernel{})
	if err != nil {
		return fmt.Errorf("ergonode: starting net_kernel: %w", err)
	}
	if err := n.UnregisterName("net_kernel"); err != nil {
		p.Kill()
		return fmt.Errorf("ergonode: replacing ergo's net_kernel: %w", err)
	}
	if err := n.RegisterName("net_kernel", p.Self()); err != nil {
		p.Kill()
		return fmt.Errorf("ergonode: replacing ergo's net_kernel: %w", err)
	}
	return nil
}
