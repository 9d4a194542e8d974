// Command tsnetbench measures the carrier's own ceiling: raw tsnet between
// two helper processes, Go to Go, with no BEAM in the path. Through helper
// A it listens on a tailnet port; through helper B it dials A by hostname;
// both ends hold the connection as the plain file descriptor the helpers
// pass (socketpair ⇄ tsnet ⇄ WireGuard over loopback ⇄ tsnet ⇄ socketpair),
// exactly the path a tailscale_dist connection takes.
//
// It prints one JSON object: connection set-up (the dial through B), the
// round trip of a 64-byte ping-pong (median, p99), 64-byte writes per
// second (one write per message, as a distribution sender does) and bulk
// throughput in 1 MiB writes. Run by bench/bench.sh (tsdist_bench.erl).
//
//	tsnetbench --serve-socket a.sock --dial-socket b.sock --host a
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"slices"
	"time"

	"github.com/tsdist/tsdist/control"
)

type result struct {
	SetupUS     float64 `json:"setup_us"`
	RTTMedianUS float64 `json:"rtt_median_us"`
	RTTP99US    float64 `json:"rtt_p99_us"`
	Msg64PerSec float64 `json:"msg64_per_s"`
	MiBMBps     float64 `json:"mib_mb_s"`
}

func main() {
	serveSock := flag.String("serve-socket", "", "control socket of the helper that listens (required)")
	dialSock := flag.String("dial-socket", "", "control socket of the helper that dials (required)")
	host := flag.String("host", "", "tailnet name of the listening helper's node (required)")
	port := flag.Int("port", 9, "tailnet port to listen on")
	pings := flag.Int("pings", 2000, "round trips to time")
	msgs := flag.Int("msgs", 200000, "64-byte messages to send")
	mib := flag.Int("mib", 64, "1 MiB messages to send")
	flag.Parse()
	if *serveSock == "" || *dialSock == "" || *host == "" {
		flag.Usage()
		os.Exit(2)
	}
	log.SetFlags(0)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := run(ctx, *serveSock, *dialSock, *host, *port, *pings, *msgs, *mib)
	if err != nil {
		log.Fatalf("tsnetbench: %v", err)
	}
	json.NewEncoder(os.Stdout).Encode(res)
}

// The phases on the wire, each from the dialer (B) to the listener (A):
// 'p' then pings of 64 bytes echoed back; 'm' + count, then count 64-byte
// messages, answered by one byte once all arrived; 'b' + count, then count
// MiB, answered the same way.
func run(ctx context.Context, serveSock, dialSock, host string, port, pings, msgs, mib int) (result, error) {
	var res result
	a, err := control.Dial(ctx, serveSock)
	if err != nil {
		return res, err
	}
	defer a.Close()
	b, err := control.Dial(ctx, dialSock)
	if err != nil {
		return res, err
	}
	defer b.Close()
	if _, err := a.Listen(ctx, port); err != nil {
		return res, err
	}
	served := make(chan error, 1)
	go func() {
		c, err := a.Accept(ctx)
		if err != nil {
			served <- err
			return
		}
		defer c.Close()
		served <- serve(c)
	}()

	start := time.Now()
	conn, err := b.DialTailnet(ctx, host, port, 0)
	if err != nil {
		return res, err
	}
	defer conn.Close()
	// Set-up ends when the first byte has gone there and back.
	one := []byte{'p'}
	if _, err := conn.Write(one); err != nil {
		return res, err
	}
	ping := make([]byte, 64)
	binary.BigEndian.PutUint32(ping, uint32(pings+1))
	if _, err := conn.Write(ping[:4]); err != nil {
		return res, err
	}
	rtts := make([]time.Duration, 0, pings)
	for i := 0; i <= pings; i++ {
		t := time.Now()
		if _, err := conn.Write(ping); err != nil {
			return res, err
		}
		if _, err := io.ReadFull(conn, ping); err != nil {
			return res, err
		}
		if i == 0 {
			res.SetupUS = us(time.Since(start))
			continue
		}
		rtts = append(rtts, time.Since(t))
	}
	slices.Sort(rtts)
	res.RTTMedianUS = us(rtts[len(rtts)/2])
	res.RTTP99US = us(rtts[len(rtts)*99/100])

	// 64-byte messages, one write each.
	hdr := make([]byte, 5)
	hdr[0] = 'm'
	binary.BigEndian.PutUint32(hdr[1:], uint32(msgs))
	msg := make([]byte, 64)
	t := time.Now()
	if _, err := conn.Write(hdr); err != nil {
		return res, err
	}
	for range msgs {
		if _, err := conn.Write(msg); err != nil {
			return res, err
		}
	}
	if _, err := io.ReadFull(conn, one); err != nil {
		return res, err
	}
	res.Msg64PerSec = float64(msgs) / time.Since(t).Seconds()

	// Bulk, in 1 MiB writes.
	hdr[0] = 'b'
	binary.BigEndian.PutUint32(hdr[1:], uint32(mib))
	big := make([]byte, 1<<20)
	t = time.Now()
	if _, err := conn.Write(hdr); err != nil {
		return res, err
	}
	for range mib {
		if _, err := conn.Write(big); err != nil {
			return res, err
		}
	}
	if _, err := io.ReadFull(conn, one); err != nil {
		return res, err
	}
	res.MiBMBps = float64(mib) * (1 << 20) / 1e6 / time.Since(t).Seconds()

	conn.CloseWrite()
	if err := <-served; err != nil {
		return res, fmt.Errorf("listening side: %w", err)
	}
	return res, nil
}

func serve(c *control.Conn) error {
	hdr := make([]byte, 5)
	buf := make([]byte, 256<<10)
	for {
		if _, err := io.ReadFull(c, hdr[:1]); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
		switch hdr[0] {
		case 'p':
			if _, err := io.ReadFull(c, hdr[1:5]); err != nil {
				return err
			}
			n := int(binary.BigEndian.Uint32(hdr[1:5]))
			ping := make([]byte, 64)
			for range n {
				if _, err := io.ReadFull(c, ping); err != nil {
					return err
				}
				if _, err := c.Write(ping); err != nil {
					return err
				}
			}
		case 'm', 'b':
			if _, err := io.ReadFull(c, hdr[1:5]); err != nil {
				return err
			}
			unit := int64(64)
			if hdr[0] == 'b' {
				unit = 1 << 20
			}
			want := int64(binary.BigEndian.Uint32(hdr[1:5])) * unit
			// Big reads, as the BEAM's would be (io.Discard's ReadFrom
			// would read 8 KiB at a time).
			for want > 0 {
				n, err := c.Read(buf[:min(int64(len(buf)), want)])
				want -= int64(n)
				if err != nil && want > 0 {
					return err
				}
			}
			if _, err := c.Write(hdr[:1]); err != nil {
				return err
			}
		default:
			return fmt.Errorf("unexpected phase %q", hdr[0])
		}
	}
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }
