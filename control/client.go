package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"

	"github.com/tsdist/tsdist/carrier"
	"github.com/tsdist/tsdist/epmd"
)

// Conn is a tailnet connection received from the helper: an ordinary Unix
// stream socket whose other end the helper splices to the tailnet.
type Conn struct {
	*net.UnixConn
	// Peer is the identity of the tailnet node at the other end.
	Peer carrier.Identity
	// ListenerPort is the tailnet port the connection was accepted on;
	// 0 for a dialled connection.
	ListenerPort int
}

// Client is a Go client of the control protocol. Its methods are safe for
// concurrent use; accepted connections are queued until Accept takes them.
type Client struct {
	conn *net.UnixConn
	fdr  *carrier.FDReader

	wmu sync.Mutex

	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan Response
	accepts []*Conn
	acceptC chan struct{}       // signalled when accepts grows
	peers   chan []carrier.Peer // the latest peers event, after WatchPeers
	err     error               // set once the connection is gone
	done    chan struct{}

	// Hello is the helper's answer to this client's hello.
	Hello HelloResult
}

// Dial connects to the helper's control socket at path and says hello.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("control: connect to helper at %s: %w", path, err)
	}
	conn := nc.(*net.UnixConn)
	c := &Client{
		conn:    conn,
		fdr:     carrier.NewFDReader(conn),
		pending: map[uint64]chan Response{},
		acceptC: make(chan struct{}, 1),
		peers:   make(chan []carrier.Peer, 1),
		done:    make(chan struct{}),
	}
	go c.readLoop()
	if err := c.call(ctx, Request{Op: OpHello, Version: Version, Client: "tsdist-go"}, &c.Hello); err != nil {
		c.Close()
		return nil, fmt.Errorf("control: hello to helper at %s: %w", path, err)
	}
	return c, nil
}

// Close closes the control connection. Listeners made through it close, and
// so do accepted connections not yet taken by Accept; connections already
// returned stay open.
func (c *Client) Close() error {
	err := c.conn.Close()
	<-c.done
	c.mu.Lock()
	for _, a := range c.accepts {
		a.Close()
	}
	c.accepts = nil
	c.mu.Unlock()
	return err
}

// Status returns the helper node's view of the tailnet.
func (c *Client) Status(ctx context.Context) (carrier.Status, error) {
	var st carrier.Status
	err := c.call(ctx, Request{Op: OpStatus}, &st)
	return st, err
}

// Stats returns the helper's resource use.
func (c *Client) Stats(ctx context.Context) (Stats, error) {
	var st Stats
	err := c.call(ctx, Request{Op: OpStats}, &st)
	return st, err
}

// WhoIs returns the identity of the tailnet node at addr (IP or IP:port).
func (c *Client) WhoIs(ctx context.Context, addr string) (carrier.Identity, error) {
	var id carrier.Identity
	err := c.call(ctx, Request{Op: OpWhoIs, Addr: addr}, &id)
	return id, err
}

// Listen asks the helper to accept tailnet connections on port (0: any) and
// returns the port. Accepted connections are taken with Accept.
func (c *Client) Listen(ctx context.Context, port int) (int, error) {
	var res ListenResult
	err := c.call(ctx, Request{Op: OpListen, Port: port}, &res)
	return res.Port, err
}

// Unlisten stops listening on port.
func (c *Client) Unlisten(ctx context.Context, port int) error {
	return c.call(ctx, Request{Op: OpUnlisten, Port: port}, nil)
}

// DialTailnet opens a connection to port on host (bare name, MagicDNS name or
// tailnet IP) through the helper. timeoutMS 0 means the helper's default.
func (c *Client) DialTailnet(ctx context.Context, host string, port, timeoutMS int) (*Conn, error) {
	var res DialResult
	var fd *os.File
	err := c.callFD(ctx, Request{Op: OpDial, Host: host, Port: port, TimeoutMS: timeoutMS}, &res, &fd)
	if err != nil {
		return nil, err
	}
	uc, err := unixConn(fd)
	if err != nil {
		return nil, err
	}
	return &Conn{UnixConn: uc, Peer: res.Peer}, nil
}

// Accept waits for the next connection accepted on any of this client's
// listeners.
func (c *Client) Accept(ctx context.Context) (*Conn, error) {
	for {
		c.mu.Lock()
		if len(c.accepts) > 0 {
			a := c.accepts[0]
			c.accepts = c.accepts[1:]
			c.mu.Unlock()
			return a, nil
		}
		err := c.err
		c.mu.Unlock()
		if err != nil {
			return nil, err
		}
		select {
		case <-c.acceptC:
		case <-c.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func unixConn(f *os.File) (*net.UnixConn, error) {
	defer f.Close()
	nc, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("control: received descriptor: %w", err)
	}
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		nc.Close()
		return nil, fmt.Errorf("control: received descriptor is a %T, not a Unix socket", nc)
	}
	return uc, nil
}

// Register registers a node name on the helper's EPMD, so tailnet peers
// find the node's distribution port by asking this host. The registration
// lasts until Unregister or until the client closes. req.Op is ignored;
// Name and Port are required.
func (c *Client) Register(ctx context.Context, req Request) (uint32, error) {
	req.Op = OpRegister
	var res RegisterResult
	err := c.call(ctx, req, &res)
	return res.Creation, err
}

// Unregister ends a registration made by this client.
func (c *Client) Unregister(ctx context.Context, name string) error {
	return c.call(ctx, Request{Op: OpUnregister, Name: name}, nil)
}

// PortPlease asks the EPMD of a tailnet host for the node registered there
// as name.
func (c *Client) PortPlease(ctx context.Context, host, name string) (NodeInfo, error) {
	var res NodeInfo
	err := c.call(ctx, Request{Op: OpPortPlease, Host: host, Name: name}, &res)
	return res, err
}

// Names lists the nodes registered on the EPMD of a tailnet host.
func (c *Client) Names(ctx context.Context, host string) ([]epmd.NameEntry, error) {
	var res NamesResult
	err := c.call(ctx, Request{Op: OpNames, Host: host}, &res)
	return res.Names, err
}

// SetPolicy replaces the helper's access policy (see package access) and
// returns the policy now in force.
func (c *Client) SetPolicy(ctx context.Context, rules string) (string, error) {
	var res PolicyResult
	err := c.call(ctx, Request{Op: OpSetPolicy, Rules: rules}, &res)
	return res.Policy, err
}

func (c *Client) call(ctx context.Context, req Request, result any) error {
	return c.callFD(ctx, req, result, nil)
}

// callFD sends req and waits for its response. If fdOut is non-nil the
// response must bring a descriptor, stored there.
func (c *Client) callFD(ctx context.Context, req Request, result any, fdOut **os.File) error {
	ch := make(chan Response, 1)
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return c.err
	}
	c.nextID++
	req.ID = c.nextID
	c.pending[req.ID] = ch
	c.mu.Unlock()

	payload, err := json.Marshal(req)
	if err != nil {
		return err
	}
	c.wmu.Lock()
	_, err = c.conn.Write(AppendFrame(nil, payload))
	c.wmu.Unlock()
	if err != nil {
		c.forget(req.ID)
		return fmt.Errorf("control: send %s: %w", req.Op, err)
	}
	select {
	case resp := <-ch:
		return decodeResponse(resp, result, fdOut)
	case <-ctx.Done():
		c.forget(req.ID)
		// The response may have landed meanwhile; later ones find no
		// pending request and the read loop closes their descriptor.
		select {
		case resp := <-ch:
			closeFile(resp.fdFile)
		default:
		}
		return ctx.Err()
	case <-c.done:
		select {
		case resp := <-ch:
			return decodeResponse(resp, result, fdOut)
		default:
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.err
	}
}

func decodeResponse(resp Response, result any, fdOut **os.File) error {
	fd := resp.fdFile
	if !resp.OK {
		closeFile(fd)
		if resp.Error == nil {
			return &Error{Code: CodeInternal, Message: "error response without error"}
		}
		return resp.Error
	}
	if result != nil && len(resp.Result) > 0 {
		if err := json.Unmarshal(resp.Result, result); err != nil {
			closeFile(fd)
			return fmt.Errorf("control: decode result: %w", err)
		}
	}
	if fdOut == nil {
		closeFile(fd)
		return nil
	}
	if fd == nil {
		return errors.New("control: response lacks the connection's descriptor")
	}
	*fdOut = fd
	return nil
}

func (c *Client) forget(id uint64) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

// readLoop reads every message from the helper, pairing each "fd": true
// message with the next descriptor received.
func (c *Client) readLoop() {
	defer close(c.done)
	r := bufio.NewReaderSize(c.fdr, 64<<10)
	err := func() error {
		for {
			payload, err := ReadFrame(r, MaxResponseSize)
			if err != nil {
				return err
			}
			var kind struct {
				Event string `json:"event"`
				FD    bool   `json:"fd"`
			}
			if err := json.Unmarshal(payload, &kind); err != nil {
				return fmt.Errorf("control: bad message from helper: %w", err)
			}
			var fd *os.File
			if kind.FD {
				if fd = c.fdr.TakeFD(); fd == nil {
					return errors.New("control: message announces a descriptor that did not arrive")
				}
			}
			if kind.Event == EventPeers && !kind.FD {
				var ev PeersEvent
				if err := json.Unmarshal(payload, &ev); err != nil {
					return fmt.Errorf("control: bad peers event from helper: %w", err)
				}
				c.latestPeers(ev.Peers)
				continue
			}
			if kind.Event != "" {
				var ev Event
				if err := json.Unmarshal(payload, &ev); err != nil {
					closeFile(fd)
					return fmt.Errorf("control: bad event from helper: %w", err)
				}
				c.queueEvent(ev, fd)
				continue
			}
			var resp Response
			if err := json.Unmarshal(payload, &resp); err != nil {
				closeFile(fd)
				return fmt.Errorf("control: bad response from helper: %w", err)
			}
			resp.fdFile = fd
			// Delivered under the lock (ch is buffered), so a caller that
			// gives up either finds the response or is never sent it.
			c.mu.Lock()
			ch, ok := c.pending[resp.ID]
			delete(c.pending, resp.ID)
			if ok {
				ch <- resp
			}
			c.mu.Unlock()
			if !ok {
				closeFile(fd) // its request was abandoned
			}
		}
	}()
	c.mu.Lock()
	c.err = fmt.Errorf("control: connection to helper closed: %w", err)
	c.mu.Unlock()
	c.fdr.Close()
}

func closeFile(f *os.File) {
	if f != nil {
		f.Close()
	}
}

// latestPeers keeps only the newest peers event: a watcher wants the
// tailnet as it is, not every step on the way.
func (c *Client) latestPeers(peers []carrier.Peer) {
	select {
	case <-c.peers:
	default:
	}
	c.peers <- peers
}

// WatchPeers asks the helper for the tailnet's peers now and on every
// change. The channel holds the newest list; it is the same channel on
// every call.
func (c *Client) WatchPeers(ctx context.Context) (<-chan []carrier.Peer, error) {
	if err := c.call(ctx, Request{Op: OpWatchPeers}, nil); err != nil {
		return nil, err
	}
	return c.peers, nil
}

func (c *Client) queueEvent(ev Event, fd *os.File) {
	if ev.Event != EventAccept || fd == nil || ev.Peer == nil {
		closeFile(fd)
		return
	}
	uc, err := unixConn(fd)
	if err != nil {
		return
	}
	c.mu.Lock()
	c.accepts = append(c.accepts, &Conn{UnixConn: uc, Peer: *ev.Peer, ListenerPort: ev.ListenerPort})
	c.mu.Unlock()
	select {
	case c.acceptC <- struct{}{}:
	default:
	}
}
