// Command hostilepeer is a tailnet device that lies, for the Erlang trust
// tests (test/erlang/tailscale_trust_SUITE): it joins the tailnet as an
// ordinary node (package carrier) and answers EPMD on its tailnet port 4369
// with whatever the test asks for, and counts everyone who reaches it.
//
//	hostilepeer -hostname NAME [-names N] [-long-name BYTES] [-register NAME]
//
//   - -names N: NAMES_REQ is answered with N names 0, 1, ..., z, 10, ...
//     (the numbers in base 36, every one a valid EPMD name, 50,000 of
//     them within the 1 MiB an answer may have), after the -register
//     name if any.
//   - -long-name BYTES: the answer also lists one name of BYTES bytes
//     (more than EPMD's 255 makes it invalid), between two valid ones,
//     ok1 and ok2.
//   - -register NAME: PORT_PLEASE2_REQ for NAME is answered with a tailnet
//     port this program listens on (as a BEAM node registered there would
//     be), so that a node that believes it is NAME@HOSTNAME dials it;
//     every other name is answered "not registered".
//
// It never completes a distribution handshake: a connection to the
// registered port is counted, read until it closes, and closed.
//
// It prints one line per event on standard output, so a test can assert
// who reached it:
//
//	ready HOSTNAME IP EPMD_PORT DIST_PORT
//	accept epmd|dist FROM            a connection, before any byte is read
//	request names|port_please NAME|other TAG   what an EPMD connection asked
//	bytes dist N FROM                bytes a distribution connection sent
//
// The control URL, auth key, state directory and tags come from the
// environment as for a helper (TS_CONTROL_URL, TS_AUTHKEY, TS_STATE_DIR,
// TS_TAGS). It stops when its standard input closes (it runs as a port
// program) or on SIGTERM.
package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tsdist/tsdist/carrier"
)

var out struct {
	sync.Mutex
	w *bufio.Writer
}

func say(format string, a ...any) {
	out.Lock()
	defer out.Unlock()
	fmt.Fprintf(out.w, format+"\n", a...)
	out.w.Flush()
}

func main() {
	hostname := flag.String("hostname", "", "tailnet `hostname` to ask for (required)")
	names := flag.Int("names", 0, "answer NAMES_REQ with `N` names")
	longName := flag.Int("long-name", 0, "also list one name of `BYTES` bytes")
	register := flag.String("register", "", "answer PORT_PLEASE2_REQ for `NAME` with a port of this program")
	flag.Parse()
	out.w = bufio.NewWriter(os.Stdout)
	if *hostname == "" {
		log.Fatal("hostilepeer: -hostname is required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	go func() { // a port program ends when its port closes
		io.Copy(io.Discard, os.Stdin)
		stop()
	}()
	controlURL := os.Getenv("TS_CONTROL_URL")
	if carrier.IsLoopbackURL(controlURL) {
		carrier.KeepToLoopback()
	}
	dir := os.Getenv("TS_STATE_DIR")
	if dir == "" {
		dir = fmt.Sprintf("%s/hostilepeer-%s", os.TempDir(), *hostname)
	}
	var tags []string
	if t := os.Getenv("TS_TAGS"); t != "" {
		tags = strings.Split(t, ",")
	}
	node, err := carrier.New(carrier.Config{
		Hostname:   *hostname,
		ControlURL: controlURL,
		AuthKey:    os.Getenv("TS_AUTHKEY"),
		Dir:        dir,
		Tags:       tags,
		UserLogf:   log.Printf,
	})
	if err != nil {
		log.Fatalf("hostilepeer: %v", err)
	}
	defer node.Close()
	upCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := node.Up(upCtx); err != nil {
		log.Fatalf("hostilepeer: %v", err)
	}
	epmdLn, err := node.Listen(4369)
	if err != nil {
		log.Fatalf("hostilepeer: %v", err)
	}
	distLn, err := node.Listen(0)
	if err != nil {
		log.Fatalf("hostilepeer: %v", err)
	}
	distPort, err := carrier.AddrPort(distLn.Addr().String())
	if err != nil {
		log.Fatalf("hostilepeer: %v", err)
	}
	answer := namesAnswer(*register, *names, *longName)
	go serve(epmdLn, "epmd", func(c net.Conn) { epmd(c, answer, *register, distPort) })
	go serve(distLn, "dist", dist)
	ip := ""
	if st, err := node.Status(ctx); err == nil && len(st.Self.IPs) > 0 {
		ip = st.Self.IPs[0]
	}
	say("ready %s %s 4369 %d", *hostname, ip, distPort)
	<-ctx.Done()
}

// namesAnswer is the body of the NAMES answer, after EPMD's port.
func namesAnswer(register string, n, longName int) []byte {
	var b []byte
	if register != "" {
		b = fmt.Appendf(b, "name %s at port %d\n", register, 1)
	}
	// Short lines ("name 12kw at port 1"), as many as fit in the 1 MiB a
	// NAMES answer may have.
	for i := range n {
		b = fmt.Appendf(b, "name %s at port 1\n", strconv.FormatInt(int64(i), 36))
	}
	if longName > 0 {
		b = fmt.Appendf(b, "name ok1 at port 10001\nname %s at port 10002\nname ok2 at port 10003\n",
			strings.Repeat("L", longName))
	}
	return b
}

func serve(ln net.Listener, what string, handle func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		say("accept %s %s", what, c.RemoteAddr())
		go func() {
			defer c.Close()
			handle(c)
		}()
	}
}

func epmd(c net.Conn, names []byte, register string, distPort uint16) {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var head [2]byte
	if _, err := io.ReadFull(c, head[:]); err != nil {
		return
	}
	req := make([]byte, binary.BigEndian.Uint16(head[:]))
	if _, err := io.ReadFull(c, req); err != nil || len(req) == 0 {
		return
	}
	switch req[0] {
	case 'n': // NAMES_REQ
		say("request names")
		w := bufio.NewWriter(c)
		w.Write([]byte{0, 0, 0x11, 0x11})
		w.Write(names)
		w.Flush()
	case 'z': // PORT_PLEASE2_REQ
		name := string(req[1:])
		say("request port_please %s", name)
		if register == "" || name != register {
			c.Write([]byte{'w', 1})
			return
		}
		resp := []byte{'w', 0, 0, 0, 77, 0, 0, 6, 0, 5}
		binary.BigEndian.PutUint16(resp[2:], distPort)
		resp = binary.BigEndian.AppendUint16(resp, uint16(len(name)))
		resp = append(resp, name...)
		resp = append(resp, 0, 0) // no extra
		c.Write(resp)
	default:
		say("request other %d", req[0])
	}
}

func dist(c net.Conn) {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	n, _ := io.Copy(io.Discard, c)
	say("bytes dist %d %s", n, c.RemoteAddr())
}
