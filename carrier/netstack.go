package carrier

import (
	"errors"
	"fmt"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// timeWait is how long a closed TCP connection of this node lingers in
// TIME_WAIT; netstack's default is the Internet's 60 s. See tuneNetstack.
const timeWait = time.Second

// tuneNetstack sets the node's TCP options: a short TIME_WAIT, and small
// socket buffers.
//
// TIME_WAIT (timeWait): the side that closes first holds the connection in
// TIME_WAIT, and an EPMD server closes first after every answer (clients
// wait for it), so a node that looks up ports often would soon reuse a
// source port the server still holds: its SYN then waits out
// retransmission, several seconds. Inside a WireGuard tunnel, with its own
// sequence numbers and replay protection, a stray old segment needs far
// less than 60 s to drain.
//
// Buffers (tcpBufMax): tailscale lets a connection's send and receive
// buffers grow to 6 and 8 MiB, for long fat paths. Each 1280-byte packet
// in flight then holds a 64 KiB wireguard-go message buffer, so one bulk
// connection kept several hundred MB of them (pprof, docs/BENCHMARKS.md),
// and a receiver that stops reading had MiBs queued in the helper. Capped
// at tcpBufMax, a connection still fills a 1 Gb/s path with 8 ms of round
// trip, and a stuck one holds about 1 MiB here.
func (n *Node) tuneNetstack() error {
	impl, ok := n.ts.Sys().Netstack.GetOK()
	if !ok {
		return errors.New("tsnet has no userspace network stack")
	}
	ns, ok := impl.(interface {
		SetTransportProtocolOption(tcpip.TransportProtocolNumber, tcpip.SettableTransportProtocolOption) tcpip.Error
	})
	if !ok {
		return fmt.Errorf("netstack %T cannot set TCP options", impl)
	}
	opt := tcpip.TCPTimeWaitTimeoutOption(timeWait)
	if err := ns.SetTransportProtocolOption(tcp.ProtocolNumber, &opt); err != nil {
		return fmt.Errorf("set TCP TIME_WAIT to %v: %v", timeWait, err)
	}
	// tailscale's own minimum and default (gVisor's), with a lower maximum.
	rx := tcpip.TCPReceiveBufferSizeRangeOption{Min: tcp.MinBufferSize, Default: min(tcp.DefaultReceiveBufferSize, tcpBufMax), Max: tcpBufMax}
	if err := ns.SetTransportProtocolOption(tcp.ProtocolNumber, &rx); err != nil {
		return fmt.Errorf("set TCP receive buffer sizes: %v", err)
	}
	tx := tcpip.TCPSendBufferSizeRangeOption{Min: tcp.MinBufferSize, Default: min(tcp.DefaultSendBufferSize, tcpBufMax), Max: tcpBufMax}
	if err := ns.SetTransportProtocolOption(tcp.ProtocolNumber, &tx); err != nil {
		return fmt.Errorf("set TCP send buffer sizes: %v", err)
	}
	return nil
}

// tcpBufMax caps each TCP connection's send and receive buffer in the
// node's network stack; see tuneNetstack.
const tcpBufMax = 1 << 20
