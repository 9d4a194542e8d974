// Command echo is the demo's client: through helper A it listens on the
// tailnet and echoes what arrives; through helper B it dials A by hostname,
// sends a few lines and a bulk payload, and shows what came back and who was
// at each end. Every byte crosses the tailnet (WireGuard over loopback on
// the offline tailnet) and reaches this program as a plain file descriptor.
//
//	echo --serve-socket alpha.sock --dial-socket beta.sock --host alpha
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"time"

	"github.com/tsdist/tsdist/control"
)

func main() {
	serveSock := flag.String("serve-socket", "", "control socket of the helper that listens (required)")
	dialSock := flag.String("dial-socket", "", "control socket of the helper that dials (required)")
	host := flag.String("host", "", "tailnet name of the listening helper's node, as the dialer should use it (required)")
	port := flag.Int("port", 7, "tailnet port to listen on")
	bulkMiB := flag.Int("bulk-mib", 32, "size of the bulk echo, in MiB")
	flag.Parse()
	if *serveSock == "" || *dialSock == "" || *host == "" {
		flag.Usage()
		os.Exit(2)
	}
	log.SetFlags(0)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := run(ctx, *serveSock, *dialSock, *host, *port, *bulkMiB); err != nil {
		log.Fatalf("echo demo: %v", err)
	}
}

func run(ctx context.Context, serveSock, dialSock, host string, port, bulkMiB int) error {
	server, err := control.Dial(ctx, serveSock)
	if err != nil {
		return err
	}
	defer server.Close()
	client, err := control.Dial(ctx, dialSock)
	if err != nil {
		return err
	}
	defer client.Close()

	if _, err := server.Listen(ctx, port); err != nil {
		return err
	}
	fmt.Printf("%s listens on tailnet port %d\n", server.Hello.Hostname, port)
	go func() {
		for {
			c, err := server.Accept(ctx)
			if err != nil {
				return
			}
			fmt.Printf("%s accepted a connection from %s (user %s, address %s), as fd-backed socket %s\n",
				server.Hello.Hostname, c.Peer.Node, c.Peer.User, c.Peer.Addr, c.LocalAddr().Network())
			go func() {
				defer c.Close()
				io.Copy(c, c) // echo until the dialer half-closes, then finish
			}()
		}
	}()

	start := time.Now()
	conn, err := client.DialTailnet(ctx, host, port, 0)
	if err != nil {
		return err
	}
	defer conn.Close()
	fmt.Printf("%s dialled %q in %v: connected to %s (%s, user %s)\n",
		client.Hello.Hostname, host, time.Since(start).Round(time.Microsecond), conn.Peer.Node, conn.Peer.DNSName, conn.Peer.User)

	// Lines first, to show the echo; then a bulk payload with a checksum.
	r := bufio.NewReader(conn)
	for _, line := range []string{"hello over the tailnet", "carried as a file descriptor", "bye"} {
		fmt.Fprintln(conn, line)
		back, err := r.ReadString('\n')
		if err != nil {
			return fmt.Errorf("echo of %q: %w", line, err)
		}
		fmt.Printf("  sent %-32q got back %q\n", line, back[:len(back)-1])
	}
	payload := make([]byte, bulkMiB<<20)
	rand.Read(payload)
	want := sha256.Sum256(payload)
	start = time.Now()
	errc := make(chan error, 1)
	go func() {
		_, err := io.Copy(conn, bytes.NewReader(payload))
		if err == nil {
			err = conn.CloseWrite() // half-close: the echo side sees EOF and finishes
		}
		errc <- err
	}()
	h := sha256.New()
	n, err := io.Copy(h, r)
	if err != nil {
		return fmt.Errorf("bulk echo: %w", err)
	}
	if err := <-errc; err != nil {
		return fmt.Errorf("bulk send: %w", err)
	}
	elapsed := time.Since(start)
	if n != int64(len(payload)) || !bytes.Equal(h.Sum(nil), want[:]) {
		return fmt.Errorf("bulk echo corrupted: got %d bytes, sha256 mismatch=%v", n, !bytes.Equal(h.Sum(nil), want[:]))
	}
	fmt.Printf("  bulk: %d MiB there and back in %v (%.1f MB/s each way), sha256 verified\n",
		bulkMiB, elapsed.Round(time.Millisecond), float64(len(payload))/elapsed.Seconds()/1e6)
	return nil
}
