// Command ergoprobe is the Go node the cross-language tests and the
// benchmark drive: an ergo node on the tailnet (package ergonode) with a
// gen server, probe, whose calls make the Go side do what a test needs of
// it: answer, call an Erlang process, ping, link, monitor and unlink, echo
// and count messages. It prints "ready NAME
// PORT" once the node is published, and stops when its standard input
// closes (it runs as a port program).
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/ergo-services/ergo/etf"
	"github.com/ergo-services/ergo/gen"
	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/ergonode"
)

func main() {
	name := flag.String("name", "", "node `name@host` (required)")
	cookie := flag.String("cookie", "", "distribution `cookie` (required)")
	allow := flag.String("allow", os.Getenv("TSDIST_ALLOW"), "access `policy` (package access)")
	flag.Parse()
	if *name == "" || *cookie == "" {
		log.Fatal("ergoprobe: -name and -cookie are required")
	}
	_, host, _ := strings.Cut(*name, "@")
	label, _, _ := strings.Cut(host, ".")
	stateDir := os.Getenv("TS_STATE_DIR")
	if stateDir == "" {
		stateDir = fmt.Sprintf("%s/ergoprobe-%s", os.TempDir(), label)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	go func() { // a port program ends when its port closes
		bufio.NewReader(os.Stdin).ReadString(0)
		stop()
	}()
	upCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	start := time.Now()
	node, err := ergonode.Start(upCtx, *name, *cookie, ergonode.Options{
		Tailnet: carrier.Config{
			ControlURL: os.Getenv("TS_CONTROL_URL"),
			AuthKey:    os.Getenv("TS_AUTHKEY"),
			Dir:        stateDir,
			Ephemeral:  os.Getenv("TS_EPHEMERAL") == "1" || os.Getenv("TS_EPHEMERAL") == "true",
		},
		Allow: *allow,
		Logf:  func(format string, a ...any) { log.Printf(format, a...) },
	})
	if err != nil {
		log.Fatalf("ergoprobe: %v", err)
	}
	defer node.Stop()
	if _, err := node.Spawn("probe", gen.ProcessOptions{}, &probe{node: node}); err != nil {
		log.Fatalf("ergoprobe: %v", err)
	}
	fmt.Printf("ready %s %d %d\n", *name, node.TailnetPort(), time.Since(start).Milliseconds())
	<-ctx.Done()
}

// probe answers the tests' calls.
type probe struct {
	gen.Server
	node *ergonode.Node
}

func (p *probe) HandleCall(sp *gen.ServerProcess, from gen.ServerFrom, message etf.Term) (etf.Term, gen.ServerStatus) {
	t, _ := message.(etf.Tuple)
	if len(t) == 0 {
		return etf.Tuple{etf.Atom("error"), etf.Atom("bad_request")}, gen.ServerStatusOK
	}
	switch t[0] {
	case etf.Atom("echo"): // {echo, Term}
		return t[1], gen.ServerStatusOK
	case etf.Atom("ping"): // {ping, Node}: what net_adm:ping does
		peer, _ := t[1].(etf.Atom)
		reply, err := sp.CallWithTimeout(gen.ProcessID{Name: "net_kernel", Node: string(peer)},
			etf.Tuple{etf.Atom("is_auth"), etf.Atom(sp.NodeName())}, 10)
		if err == nil && reply == etf.Atom("yes") {
			return etf.Atom("pong"), gen.ServerStatusOK
		}
		return etf.Atom("pang"), gen.ServerStatusOK
	case etf.Atom("call"): // {call, Name, Node, Request}
		to := gen.ProcessID{Name: string(t[1].(etf.Atom)), Node: string(t[2].(etf.Atom))}
		reply, err := sp.CallWithTimeout(to, t[3], 10)
		if err != nil {
			return etf.Tuple{etf.Atom("error"), err.Error()}, gen.ServerStatusOK
		}
		return etf.Tuple{etf.Atom("ok"), reply}, gen.ServerStatusOK
	case etf.Atom("call_n"): // {call_n, Name, Node, N}: N calls {echo, I}, each checked
		to := gen.ProcessID{Name: string(t[1].(etf.Atom)), Node: string(t[2].(etf.Atom))}
		n, _ := toInt(t[3])
		for i := range n {
			reply, err := sp.CallWithTimeout(to, etf.Tuple{etf.Atom("echo"), i}, 10)
			if got, ok := toInt(reply); err != nil || !ok || got != i {
				return etf.Tuple{etf.Atom("failed_at"), i, fmt.Sprint(reply, err)}, gen.ServerStatusOK
			}
		}
		return etf.Tuple{etf.Atom("ok"), n}, gen.ServerStatusOK
	case etf.Atom("watcher"): // {watcher, ReportTo}: a process to link and monitor with
		w, err := sp.Spawn("", gen.ProcessOptions{}, &watcher{report: t[1].(etf.Pid)})
		if err != nil {
			return etf.Tuple{etf.Atom("error"), err.Error()}, gen.ServerStatusOK
		}
		return w.Self(), gen.ServerStatusOK
	case etf.Atom("echo_process"): // {echo_process}: a process that sends {Self, Msg} back for each {From, Msg}
		e, err := sp.Spawn("", gen.ProcessOptions{MailboxSize: benchMailbox}, &echoProcess{})
		if err != nil {
			return etf.Tuple{etf.Atom("error"), err.Error()}, gen.ServerStatusOK
		}
		return e.Self(), gen.ServerStatusOK
	case etf.Atom("sink"): // {sink, From, N}: a process that tells From {sink_done, Self} after N messages
		n, _ := toInt(t[2])
		k, err := sp.Spawn("", gen.ProcessOptions{MailboxSize: benchMailbox}, &sinkProcess{report: t[1].(etf.Pid), left: n})
		if err != nil {
			return etf.Tuple{etf.Atom("error"), err.Error()}, gen.ServerStatusOK
		}
		return k.Self(), gen.ServerStatusOK
	case etf.Atom("collector"): // {collector, From, N}: checks that N {seq, I, _} arrive in order
		n, _ := toInt(t[2])
		c, err := sp.Spawn("", gen.ProcessOptions{MailboxSize: benchMailbox}, &collector{report: t[1].(etf.Pid), want: n, firstBad: -1})
		if err != nil {
			return etf.Tuple{etf.Atom("error"), err.Error()}, gen.ServerStatusOK
		}
		return c.Self(), gen.ServerStatusOK
	case etf.Atom("send_seq"): // {send_seq, To, N}: sends {seq, I, Payload} for I in 0..N-1
		n, _ := toInt(t[2])
		for i := range n {
			sp.Send(t[1].(etf.Pid), etf.Tuple{etf.Atom("seq"), i, seqPayload(i)})
		}
		return etf.Atom("ok"), gen.ServerStatusOK
	case etf.Atom("identity"): // {identity, Node}: the peer's tailnet identity
		peer, _ := t[1].(etf.Atom)
		id, ok := p.node.Identity(string(peer))
		if !ok {
			return etf.Atom("not_connected"), gen.ServerStatusOK
		}
		return etf.Map{etf.Atom("node"): []byte(id.Node), etf.Atom("user"): []byte(id.User)}, gen.ServerStatusOK
	}
	return etf.Tuple{etf.Atom("error"), etf.Atom("unknown_request")}, gen.ServerStatusOK
}

// watcher links to, unlinks from and monitors the pids it is told to, and
// reports the exits and downs it gets to a test process.
type watcher struct {
	gen.Server
	report etf.Pid
}

func (w *watcher) Init(sp *gen.ServerProcess, args ...etf.Term) error {
	sp.SetTrapExit(true)
	return nil
}

func (w *watcher) HandleCall(sp *gen.ServerProcess, from gen.ServerFrom, message etf.Term) (etf.Term, gen.ServerStatus) {
	t, _ := message.(etf.Tuple)
	if len(t) != 2 {
		return etf.Atom("bad_request"), gen.ServerStatusOK
	}
	switch t[0] {
	case etf.Atom("link"):
		return result(sp.Link(t[1].(etf.Pid))), gen.ServerStatusOK
	case etf.Atom("unlink"):
		return result(sp.Unlink(t[1].(etf.Pid))), gen.ServerStatusOK
	case etf.Atom("monitor"):
		return sp.MonitorProcess(t[1].(etf.Pid)), gen.ServerStatusOK
	case etf.Atom("exit"): // stop with this reason
		reason, _ := t[1].(etf.Atom)
		return etf.Atom("ok"), gen.ServerStatus(fmt.Errorf("%s", reason))
	}
	return etf.Atom("bad_request"), gen.ServerStatusOK
}

func (w *watcher) HandleInfo(sp *gen.ServerProcess, message etf.Term) gen.ServerStatus {
	switch m := message.(type) {
	case gen.MessageExit:
		sp.Send(w.report, etf.Tuple{etf.Atom("ergo_exit"), sp.Self(), m.Pid, etf.Atom(m.Reason)})
	case gen.MessageDown:
		sp.Send(w.report, etf.Tuple{etf.Atom("ergo_down"), sp.Self(), m.Pid, etf.Atom(m.Reason)})
	}
	return gen.ServerStatusOK
}

func result(err error) etf.Term {
	if err != nil {
		return etf.Tuple{etf.Atom("error"), err.Error()}
	}
	return etf.Atom("ok")
}

// toInt is an Erlang integer as ergo decodes it (int, int32 or int64 by
// size).
func toInt(t etf.Term) (int, bool) {
	switch v := t.(type) {
	case int:
		return v, true
	case int32:
		return int(v), true
	case int64:
		return int(v), true
	}
	return 0, false
}

// benchMailbox is the mailbox of the benchmark's processes: ergo drops
// what arrives at a full mailbox (its default holds 100 messages).
const benchMailbox = 65535

// echoProcess answers each {From, Msg} with {Self, Msg}, as the
// benchmark's echo on BEAM nodes does, until it gets stop.
type echoProcess struct{ gen.Server }

func (e *echoProcess) HandleInfo(sp *gen.ServerProcess, message etf.Term) gen.ServerStatus {
	if message == etf.Atom("stop") {
		return gen.ServerStatusStop
	}
	if t, ok := message.(etf.Tuple); ok && len(t) == 2 {
		if from, ok := t[0].(etf.Pid); ok {
			sp.Send(from, etf.Tuple{sp.Self(), t[1]})
		}
	}
	return gen.ServerStatusOK
}

// sinkProcess counts messages and tells report {sink_done, Self} when
// left reaches zero, as the benchmark's sink on BEAM nodes does.
type sinkProcess struct {
	gen.Server
	report etf.Pid
	left   int
}

func (k *sinkProcess) HandleInfo(sp *gen.ServerProcess, message etf.Term) gen.ServerStatus {
	k.left--
	if k.left > 0 {
		return gen.ServerStatusOK
	}
	sp.Send(k.report, etf.Tuple{etf.Atom("sink_done"), sp.Self()})
	return gen.ServerStatusStop
}

// seqPayload is the payload of message i of a sequence: every seventh is
// 100,000 bytes, long enough to be fragmented, the others 64.
func seqPayload(i int) []byte {
	if i%7 == 0 {
		return make([]byte, 100000)
	}
	return make([]byte, 64)
}

// collector checks that {seq, I, Payload} messages arrive with I = 0, 1,
// 2, ... and the payload sizes of seqPayload, and tells report
// {collected, N, FirstBad} (-1 when all were in order) after want of them.
type collector struct {
	gen.Server
	report   etf.Pid
	want     int
	next     int
	firstBad int
}

func (c *collector) HandleInfo(sp *gen.ServerProcess, message etf.Term) gen.ServerStatus {
	t, _ := message.(etf.Tuple)
	ok := len(t) == 3 && t[0] == etf.Atom("seq")
	if ok {
		i, isInt := toInt(t[1])
		payload, isBin := t[2].([]byte)
		ok = isInt && isBin && i == c.next && len(payload) == len(seqPayload(i))
	}
	if !ok && c.firstBad < 0 {
		c.firstBad = c.next
	}
	c.next++
	if c.next < c.want {
		return gen.ServerStatusOK
	}
	sp.Send(c.report, etf.Tuple{etf.Atom("collected"), c.next, c.firstBad})
	return gen.ServerStatusStop
}
