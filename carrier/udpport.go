package carrier

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// udpPortFile, in a node's state directory, holds the UDP port of its last
// run.
//
// A node restarted on its state keeps its node key but gets a new disco key.
// Its peers' magicsock keeps trusting the old direct path (address and UDP
// port) for up to 6.5 s after its last pong, since a disco key change does not
// reset it (wgengine/magicsock, endpoint.updateFromNode, v1.102.5), and
// WireGuard's next try comes 5 s later: with a new port the restarted node
// was unreachable for 5-10 s. On the same port the old path is right at once,
// as it is for tailscaled, which keeps port 41641 (docs/connection.md).
const udpPortFile = "wireguard-udp-port"

// storedUDPPort is the port of the node's last run in dir, or 0 when there is
// none (first run, or a file this version cannot read: a fresh port is then
// as good as any).
func storedUDPPort(dir string) uint16 {
	b, err := os.ReadFile(filepath.Join(dir, udpPortFile))
	if err != nil {
		return 0
	}
	p, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 16)
	if err != nil {
		return 0
	}
	return uint16(p)
}

// rememberUDPPort writes the port magicsock bound, for the next run on the
// node's state directory. It needs the node Up.
func (n *Node) rememberUDPPort() error {
	port := n.UDPPort()
	if port == 0 || port == storedUDPPort(n.cfg.Dir) {
		return nil
	}
	path := filepath.Join(n.cfg.Dir, udpPortFile)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(strconv.Itoa(int(port))+"\n"), 0o600); err != nil {
		return fmt.Errorf("carrier: remembering the UDP port: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("carrier: remembering the UDP port: %w", err)
	}
	return nil
}

// UDPPort is the UDP port the node's WireGuard traffic uses, once Up; 0
// before.
func (n *Node) UDPPort() uint16 {
	if n.lc.Load() == nil {
		return 0
	}
	ms, ok := n.ts.Sys().MagicSock.GetOK()
	if !ok {
		return 0
	}
	return ms.LocalPort()
}
