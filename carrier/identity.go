package carrier

import (
	"context"
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"time"

	"tailscale.com/ipn"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/tailcfg"
)

// Identity is who is at the other end of a tailnet connection, as the
// tailnet's coordination server vouches for it.
type Identity struct {
	// Addr is the peer's end of the connection ("100.64.0.2:41234").
	Addr string `json:"addr"`
	// Node is the peer's short name: its MagicDNS label ("beta").
	Node string `json:"node"`
	// DNSName is its MagicDNS name without the trailing dot
	// ("beta.example.ts.net").
	DNSName string `json:"dns_name"`
	// User is the login name of the node's owner; empty for tagged nodes,
	// which belong to their tags rather than a person.
	User string `json:"user"`
	// Tags are the node's ACL tags ("tag:erlang").
	Tags []string `json:"tags"`
	// IPs are the node's tailnet addresses.
	IPs []string `json:"ips"`
}

// SameOwner reports whether two devices belong to the same owner: both
// tagged and sharing a tag (a tagged device belongs to its tags), or both
// untagged and owned by the same user. The relation is symmetric.
func (id Identity) SameOwner(other Identity) bool {
	if len(id.Tags) > 0 || len(other.Tags) > 0 {
		for _, t := range other.Tags {
			if slices.Contains(id.Tags, t) {
				return true
			}
		}
		return false
	}
	return id.User != "" && strings.EqualFold(id.User, other.User)
}

// WhoIs returns the identity of the tailnet peer at addr (a tailnet IP, with
// or without a port). It fails, wrapping [ErrUnknownHost], when addr belongs
// to no node of the tailnet.
func (n *Node) WhoIs(ctx context.Context, addr string) (Identity, error) {
	lc, err := n.local()
	if err != nil {
		return Identity{}, err
	}
	who, err := lc.WhoIs(ctx, addr)
	if err != nil {
		return Identity{}, fmt.Errorf("carrier: whois %s: %w (%w)", addr, ErrUnknownHost, err)
	}
	id := Identity{Addr: addr, Tags: []string{}, IPs: []string{}}
	if who.Node != nil {
		id.DNSName = strings.TrimSuffix(who.Node.Name, ".")
		id.Node = shortName(id.DNSName, who.Node.Hostinfo.Hostname())
		id.Tags = append([]string{}, who.Node.Tags...)
		for _, p := range who.Node.Addresses {
			id.IPs = append(id.IPs, p.Addr().String())
		}
		if who.UserProfile != nil && !who.Node.IsTagged() {
			id.User = who.UserProfile.LoginName
		}
	}
	return id, nil
}

// shortName is the MagicDNS label of dnsName, or hostname when the node has
// no MagicDNS name.
func shortName(dnsName, hostname string) string {
	if dnsName == "" {
		return hostname
	}
	label, _, _ := strings.Cut(dnsName, ".")
	return label
}

// Peer is one node of the tailnet as this node sees it.
type Peer struct {
	// Node is the short name, as in [Identity.Node].
	Node string `json:"node"`
	// Hostname is the name the node asked for; MagicDNS may have made
	// Node differ from it ("alpha-1") when two nodes asked for one name.
	Hostname string `json:"hostname"`
	// DNSName is the MagicDNS name without the trailing dot.
	DNSName string `json:"dns_name"`
	// IPs are the node's tailnet addresses.
	IPs []string `json:"ips"`
	// Online is the coordination server's view of the node being connected.
	Online bool `json:"online"`
	// Tags are the node's ACL tags.
	Tags []string `json:"tags"`
	// User is the owner's login name; empty for tagged nodes.
	User string `json:"user"`
	// OS is the node's operating system as it reported it.
	OS string `json:"os"`
	// Direct is the peer's address on the direct UDP path this node uses
	// to reach it ("127.0.0.1:41641"); empty while traffic goes through a
	// DERP relay, or before there has been any.
	Direct string `json:"direct"`
	// Relay is the DERP region this node reaches the peer through when
	// there is no direct path (or would, were there traffic).
	Relay string `json:"relay"`
	// Allowed tells whether the access policy of this node admits the
	// peer. The carrier knows no policy: package host fills it in.
	Allowed bool `json:"allowed"`
}

// Identity is the peer's identity, as a policy judges it (Addr is empty).
func (p Peer) Identity() Identity {
	return Identity{Node: p.Node, DNSName: p.DNSName, User: p.User, Tags: p.Tags, IPs: p.IPs}
}

// Status is the node's view of the tailnet.
type Status struct {
	// State is the node's backend state: "NeedsLogin", "Starting",
	// "Running", ...
	State string `json:"state"`
	// AuthURL is the pending interactive login URL, if any.
	AuthURL string `json:"auth_url,omitempty"`
	// MagicDNSSuffix is the tailnet's DNS suffix ("example.ts.net").
	MagicDNSSuffix string `json:"magic_dns_suffix"`
	// Self is this node.
	Self Peer `json:"self"`
	// Peers are the other nodes, sorted by Node.
	Peers []Peer `json:"peers"`
}

// Status returns the node's current view of the tailnet. It works before
// the node is Running too, reporting State and AuthURL.
func (n *Node) Status(ctx context.Context) (Status, error) {
	lc, err := n.ts.LocalClient()
	if err != nil {
		return Status{}, fmt.Errorf("carrier: status: %w", err)
	}
	st, err := lc.Status(ctx)
	if err != nil {
		return Status{}, fmt.Errorf("carrier: status: %w", err)
	}
	out := Status{
		State:          st.BackendState,
		AuthURL:        st.AuthURL,
		MagicDNSSuffix: st.MagicDNSSuffix,
		Peers:          []Peer{},
	}
	// Before login tsnet reports the machine's hostname for itself, which
	// is not the name this node will have on the tailnet.
	out.Self = Peer{Hostname: n.cfg.Hostname, Node: n.cfg.Hostname, IPs: []string{}, Tags: []string{}}
	if st.Self != nil && len(st.Self.TailscaleIPs) > 0 {
		out.Self = peerOf(st, st.Self)
	}
	for _, p := range st.Peer {
		out.Peers = append(out.Peers, peerOf(st, p))
	}
	slices.SortFunc(out.Peers, func(a, b Peer) int { return strings.Compare(a.Node, b.Node) })
	return out, nil
}

func peerOf(st *ipnstate.Status, p *ipnstate.PeerStatus) Peer {
	dns := strings.TrimSuffix(p.DNSName, ".")
	out := Peer{
		Node:     shortName(dns, p.HostName),
		Hostname: p.HostName,
		DNSName:  dns,
		Online:   p.Online,
		OS:       p.OS,
		IPs:      addrStrings(p.TailscaleIPs),
		Tags:     []string{},
		Direct:   p.CurAddr,
		Relay:    p.Relay,
	}
	if p.Tags != nil {
		out.Tags = p.Tags.AsSlice()
	}
	if len(out.Tags) == 0 {
		out.User = loginName(st, p.UserID)
	}
	return out
}

func loginName(st *ipnstate.Status, id tailcfg.UserID) string {
	if u, ok := st.User[id]; ok {
		return u.LoginName
	}
	return ""
}

func addrStrings(ips []netip.Addr) []string {
	out := make([]string, len(ips))
	for i, ip := range ips {
		out[i] = ip.String()
	}
	return out
}

// peerPoll is how often WatchPeers also compares the tailnet with what it
// last reported, in case a change came without a notification.
const peerPoll = 2 * time.Second

// WatchPeers calls fn with the node's peers (as in [Status], without the
// ever-changing Direct and Relay) once the node is Running, and again after
// every change, until ctx ends or the node stops; it returns why it
// stopped. annotate, if not nil, fills in what the carrier does not know
// (Allowed) before peers are compared with the last report, so a change
// it makes is reported too (within peerPoll). fn runs on WatchPeers's
// goroutine, one call at a time.
func (n *Node) WatchPeers(ctx context.Context, annotate, fn func([]Peer)) error {
	lc, err := n.local()
	if err != nil {
		return err
	}
	watcher, err := lc.WatchIPNBus(ctx, ipn.NotifyInitialNetMap|ipn.NotifyPeerChanges)
	if err != nil {
		return fmt.Errorf("carrier: watch peers: %w", err)
	}
	defer watcher.Close()
	changed := make(chan struct{}, 1)
	go func() {
		for {
			note, err := watcher.Next()
			if err != nil {
				close(changed)
				return
			}
			if note.NetMap != nil || note.State != nil || note.PeersChanged != nil || note.PeersRemoved != nil {
				select {
				case changed <- struct{}{}:
				default:
				}
			}
		}
	}()
	tick := time.NewTicker(peerPoll)
	defer tick.Stop()
	var last []Peer
	report := func() error {
		st, err := n.Status(ctx)
		if err != nil {
			return err
		}
		peers := st.Peers
		for i := range peers {
			peers[i].Direct, peers[i].Relay = "", ""
		}
		if annotate != nil {
			annotate(peers)
		}
		if last == nil || !reflect.DeepEqual(peers, last) {
			last = peers
			fn(peers)
		}
		return nil
	}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case _, ok := <-changed:
			if !ok {
				return fmt.Errorf("carrier: watch peers: the node's notifications ended")
			}
		case <-tick.C:
		}
		if err := report(); err != nil {
			return fmt.Errorf("carrier: watch peers: %w", err)
		}
	}
}
