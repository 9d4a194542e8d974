package control

import (
	"cmp"
	"context"
	"errors"
	"fmt"

	"github.com/tsdist/tsdist/epmd"
	"github.com/tsdist/tsdist/host"
)

// register adds a node name to this helper's EPMD for as long as the
// control connection lives.
func (c *client) register(req Request) {
	n := epmd.Node{
		Name:           req.Name,
		Port:           uint16(req.Port),
		Type:           epmd.NodeTypeNormal,
		Protocol:       epmd.ProtocolTCP,
		HighestVersion: uint16(cmp.Or(req.HighestVersion, DefaultHighestVersion)),
		LowestVersion:  uint16(cmp.Or(req.LowestVersion, DefaultLowestVersion)),
		Extra:          req.Extra,
	}
	if req.Hidden {
		n.Type = epmd.NodeTypeHidden
	}
	if err := epmd.ValidName(n.Name); err != nil {
		c.reply(req.ID, nil, &Error{Code: CodeInvalidName, Message: err.Error()})
		return
	}
	if n.Port == 0 || len(n.Extra) > epmd.MaxExtraLen || n.LowestVersion > n.HighestVersion {
		c.reply(req.ID, nil, &Error{Code: CodeBadRequest, Message: fmt.Sprintf(`register needs a non-zero "port", lowest_version <= highest_version and at most %d bytes of "extra"`, epmd.MaxExtraLen)})
		return
	}
	c.regMu.Lock()
	defer c.regMu.Unlock()
	if c.closed {
		return
	}
	reg, err := c.s.host.Registry().Register(n)
	switch {
	case errors.Is(err, epmd.ErrNameTaken):
		c.reply(req.ID, nil, &Error{Code: CodeNameTaken, Message: fmt.Sprintf("%s@%s is already registered by a live node: %v", n.Name, c.s.node.Hostname(), err)})
		return
	case err != nil:
		c.reply(req.ID, nil, &Error{Code: CodeInternal, Message: err.Error()})
		return
	}
	if c.regs == nil {
		c.regs = make(map[string]*epmd.Registration)
	}
	c.regs[n.Name] = reg
	c.reply(req.ID, RegisterResult{Creation: reg.Creation}, nil)
}

func (c *client) unregister(req Request) {
	c.regMu.Lock()
	reg, ok := c.regs[req.Name]
	delete(c.regs, req.Name)
	c.regMu.Unlock()
	if !ok {
		c.reply(req.ID, nil, &Error{Code: CodeNotRegistered, Message: fmt.Sprintf("this client has not registered %q", req.Name)})
		return
	}
	reg.Close()
	c.reply(req.ID, struct{}{}, nil)
}

// portPlease asks the EPMD of a tailnet host, over the tailnet, for a node's
// registration. A lookup on this helper's own host goes over the tailnet
// too, so it sees exactly what peers see.
func (c *client) portPlease(req Request) {
	if req.Host == "" {
		c.reply(req.ID, nil, &Error{Code: CodeBadRequest, Message: `port_please needs "host" and "name"`})
		return
	}
	if err := epmd.ValidName(req.Name); err != nil {
		c.reply(req.ID, nil, &Error{Code: CodeInvalidName, Message: err.Error()})
		return
	}
	ctx, cancel := c.requestContext(req)
	defer cancel()
	if !c.waitRunning(req.ID, ctx) {
		return
	}
	n, err := c.s.host.PortPlease(ctx, req.Host, req.Name)
	if err != nil {
		c.reply(req.ID, nil, c.epmdError(ctx, req, err))
		return
	}
	if n.Extra == nil {
		n.Extra = []byte{} // "" rather than null in JSON
	}
	c.reply(req.ID, NodeInfo{
		Name:           n.Name,
		Host:           req.Host,
		Port:           int(n.Port),
		Hidden:         n.Type == epmd.NodeTypeHidden,
		Protocol:       int(n.Protocol),
		HighestVersion: int(n.HighestVersion),
		LowestVersion:  int(n.LowestVersion),
		Extra:          n.Extra,
	}, nil)
}

// names lists the nodes registered on the EPMD of a tailnet host.
func (c *client) names(req Request) {
	if req.Host == "" {
		c.reply(req.ID, nil, &Error{Code: CodeBadRequest, Message: `names needs "host"`})
		return
	}
	ctx, cancel := c.requestContext(req)
	defer cancel()
	if !c.waitRunning(req.ID, ctx) {
		return
	}
	names, dropped, err := c.s.host.Names(ctx, req.Host)
	if err != nil {
		c.reply(req.ID, nil, c.epmdError(ctx, req, err))
		return
	}
	if dropped > 0 {
		c.s.logf("control: names of %s: %d entries left out (more than %d)", req.Host, dropped, host.MaxNames)
	}
	c.reply(req.ID, NamesResult{Host: req.Host, Names: names, Dropped: dropped}, nil)
}

// epmdError maps a failed EPMD lookup to its error code.
func (c *client) epmdError(ctx context.Context, req Request, err error) *Error {
	if errors.Is(err, epmd.ErrNotRegistered) {
		return &Error{Code: CodeNotRegistered, Message: fmt.Sprintf("no node %q is registered on %s", req.Name, req.Host)}
	}
	return c.errorFor(ctx, err, CodeEPMDFailed)
}
