package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tsdist/tsdist/access"
	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/epmd"
)

// client is one control connection.
type client struct {
	s        *Server
	conn     *net.UnixConn
	ctx      context.Context // done when the connection is gone
	cancel   context.CancelFunc
	inflight chan struct{}
	wmu      sync.Mutex

	watching atomic.Bool // watch_peers was asked for

	regMu  sync.Mutex
	regs   map[string]*epmd.Registration // by name
	closed bool                          // regMu; no registration after close
}

func (c *client) serve() {
	defer c.close()
	r := bufio.NewReaderSize(c.conn, controlReadBytes)
	hello := false
	for {
		payload, err := ReadFrame(r, MaxRequestSize)
		if errors.Is(err, ErrFrameTooLarge) {
			c.s.logf("control: dropping client: %v", err)
			c.reply(0, nil, &Error{Code: CodeTooLarge, Message: err.Error()})
			return
		}
		if errors.Is(err, ErrEmptyFrame) {
			c.reply(0, nil, &Error{Code: CodeBadRequest, Message: "empty frame"})
			continue
		}
		if err != nil {
			return // end of stream or a broken connection
		}
		req, perr := ParseRequest(payload)
		switch {
		case perr != nil:
			c.s.logf("control: bad request: %s", perr.Message)
			c.reply(req.ID, nil, perr)
		case req.Op == OpHello:
			hello = c.hello(req) || hello // a failed repeat keeps the first
		case !hello:
			c.reply(req.ID, nil, &Error{Code: CodeHelloRequired, Message: "the first request must be hello"})
		default:
			select {
			case c.inflight <- struct{}{}:
				c.s.wg.Go(func() {
					defer func() { <-c.inflight }()
					c.handle(req)
				})
			default:
				c.reply(req.ID, nil, &Error{Code: CodeBusy, Message: strconv.Itoa(MaxInFlight) + " requests already in flight"})
			}
		}
	}
}

// close releases everything the connection owns but its carried
// connections, which belong to the descriptors the client received.
func (c *client) close() {
	c.cancel()
	c.conn.Close()
	s := c.s
	s.mu.Lock()
	delete(s.clients, c)
	for port, l := range s.listeners {
		if l.owner == c {
			l.ln.Close()
			delete(s.listeners, port)
		}
	}
	s.mu.Unlock()
	c.regMu.Lock()
	c.closed = true
	for _, reg := range c.regs {
		reg.Close()
	}
	c.regs = nil
	c.regMu.Unlock()
}

func (c *client) hello(req Request) bool {
	if req.Version != Version {
		c.reply(req.ID, nil, &Error{Code: CodeVersion, Message: fmt.Sprintf("version %d requested; this helper speaks version %d", req.Version, Version)})
		return false
	}
	state := "Unknown"
	if st, err := c.s.node.Status(c.ctx); err == nil {
		state = st.State
	}
	c.reply(req.ID, HelloResult{
		Version:   Version,
		Helper:    c.s.version,
		Hostname:  c.s.node.Hostname(),
		State:     state,
		LocalOnly: carrier.KeepsToLoopback(),
		Policy:    c.s.Policy().String(),
	}, nil)
	return true
}

func (c *client) handle(req Request) {
	switch req.Op {
	case OpStatus:
		st, err := c.s.host.Status(c.ctx)
		c.replyErr(req.ID, st, err)
	case OpStats:
		c.reply(req.ID, c.s.Stats(), nil)
	case OpWhoIs:
		if req.Addr == "" {
			c.reply(req.ID, nil, &Error{Code: CodeBadRequest, Message: `whois needs "addr"`})
			return
		}
		ctx, cancel := c.requestContext(req)
		defer cancel()
		if !c.waitRunning(req.ID, ctx) {
			return
		}
		id, err := c.s.node.WhoIs(ctx, req.Addr)
		c.replyErr(req.ID, id, err)
	case OpListen:
		c.listen(req)
	case OpUnlisten:
		c.unlisten(req)
	case OpDial:
		c.dial(req)
	case OpRegister:
		c.register(req)
	case OpUnregister:
		c.unregister(req)
	case OpPortPlease:
		c.portPlease(req)
	case OpNames:
		c.names(req)
	case OpWatchPeers:
		c.watchPeers(req)
	case OpSetPolicy:
		p, err := access.Parse(req.Rules)
		if err != nil {
			c.reply(req.ID, nil, &Error{Code: CodeBadRequest, Message: err.Error()})
			return
		}
		c.s.SetPolicy(p)
		c.reply(req.ID, PolicyResult{Policy: p.String()}, nil)
	default:
		c.reply(req.ID, nil, &Error{Code: CodeUnknownOp, Message: fmt.Sprintf("unknown op %q", req.Op)})
	}
}

// waitRunning waits for the node to be on the tailnet, answering the request
// with an error and returning false if ctx ends first.
func (c *client) waitRunning(id uint64, ctx context.Context) bool {
	select {
	case <-c.s.node.Running():
		return true
	case <-ctx.Done():
		if c.ctx.Err() == nil {
			c.reply(id, nil, &Error{Code: CodeNotRunning, Message: c.s.node.Hostname() + " did not reach the Running state in time"})
		}
		return false
	}
}

// requestContext is the context of a request that waits on the tailnet: it
// ends with the connection, or after the request's timeout_ms (default
// DefaultDialTime, at most MaxDialTime).
func (c *client) requestContext(req Request) (context.Context, context.CancelFunc) {
	limit := DefaultDialTime
	if req.TimeoutMS > 0 {
		limit = MaxDialTime
		if int64(req.TimeoutMS) < MaxDialTime.Milliseconds() {
			limit = time.Duration(req.TimeoutMS) * time.Millisecond
		}
	}
	return context.WithTimeout(c.ctx, limit)
}

func mustJSON(v any) json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("control: marshal %T: %v", v, err))
	}
	return b
}

// replyErr answers with result, or with err classified into an error code.
func (c *client) replyErr(id uint64, result any, err error) {
	if err == nil {
		c.reply(id, result, nil)
		return
	}
	c.reply(id, nil, c.errorFor(c.ctx, err, CodeInternal))
}

func (c *client) reply(id uint64, result any, e *Error) {
	resp := Response{ID: id, OK: e == nil, Error: e}
	if e == nil {
		resp.Result = mustJSON(result)
	}
	if err := c.send(resp, nil); err != nil && c.ctx.Err() == nil {
		c.s.logf("control: reply to request %d lost: %v", id, err)
	}
}

// send writes one message, with fd attached if non-nil. A client that does
// not take the message within WriteTimeout is disconnected.
func (c *client) send(msg any, fd *os.File) error {
	frame := AppendFrame(nil, mustJSON(msg))
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.conn.SetWriteDeadline(time.Now().Add(WriteTimeout))
	var err error
	if fd != nil {
		err = carrier.SendFD(c.conn, frame, fd)
	} else {
		_, err = c.conn.Write(frame)
	}
	if err != nil {
		c.conn.Close() // a half-written frame leaves the stream unusable
	}
	return err
}
