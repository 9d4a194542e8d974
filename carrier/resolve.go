package carrier

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"tailscale.com/ipn"
	"tailscale.com/ipn/ipnstate"
	"tailscale.com/net/tsaddr"
)

// Candidate is a device of the tailnet that answers to a name being
// resolved: exactly (its MagicDNS label or name, or the tailnet IP asked
// for) or loosely (the hostname it asked for, which MagicDNS may have
// suffixed: "alpha-1" for a second "alpha").
type Candidate struct {
	// Identity is who the device is, as the control server vouches for it
	// (Addr is empty: no connection yet).
	Identity Identity
	// Hostname is the name the device asked for.
	Hostname string
	// IP is the address to reach it at: the tailnet IP asked for, or its
	// IPv4 address (IPv6 if it has none).
	IP netip.Addr
	// Online is the control server's view of the device being connected.
	Online bool
	// Exact tells an exact match from a loose one.
	Exact bool
	// Self is this node itself.
	Self bool
	// Created is when the device joined the tailnet.
	Created time.Time
}

// Candidates lists the devices (this node included) that answer to host:
// a bare name matches a MagicDNS label exactly or a requested hostname
// loosely; a dotted name matches a MagicDNS name exactly or the requested
// hostname under the tailnet's suffix loosely; a tailnet IP matches the
// device that holds it. Matching ignores case and a trailing dot. A name
// no device answers to, or an IP outside the tailnet's range, fails with
// an error wrapping [ErrUnknownHost]; the system resolver is never asked.
//
// A name or address in the tailnet's range that no device answers to yet
// is looked up again as the netmap changes, for [joinGrace]: a node that
// has just joined reaches some peers' netmaps a moment after others', and
// a look-up that fails then costs the caller a retry (a BEAM's next
// connect, discovery's 250 ms).
func (n *Node) Candidates(ctx context.Context, host string) ([]Candidate, error) {
	cands, missing, err := n.candidates(ctx, host, false)
	if !missing {
		return cands, err
	}
	lc, lerr := n.local()
	if lerr != nil {
		return nil, err
	}
	waitCtx, cancel := context.WithTimeout(ctx, joinGrace)
	defer cancel()
	watcher, werr := lc.WatchIPNBus(waitCtx, ipn.NotifyPeerChanges)
	if werr != nil {
		return nil, err
	}
	defer watcher.Close()
	// The netmap may have changed before the watch began. (A Status of
	// its own each time: the shared one may not have heard of the change
	// that woke this loop yet.)
	if cands, missing, err2 := n.candidates(ctx, host, true); !missing {
		return cands, err2
	}
	for {
		note, werr := watcher.Next()
		if werr != nil {
			return nil, fmt.Errorf("%w (looked for it for %v)", err, joinGrace)
		}
		if note.NetMap == nil && note.PeersChanged == nil {
			continue
		}
		if cands, missing, err2 := n.candidates(ctx, host, true); !missing {
			return cands, err2
		}
	}
}

// joinGrace is how long a look-up waits for a device that is not in the
// netmap to appear (see [Node.Candidates]).
const joinGrace = 300 * time.Millisecond

// candidates is one look-up of [Node.Candidates], on the shared Status
// (netmapView) or, if fresh, on a Status of its own; missing reports that
// no device answers to host, which a later netmap may change.
func (n *Node) candidates(ctx context.Context, host string, fresh bool) (_ []Candidate, missing bool, _ error) {
	ip, ipErr := netip.ParseAddr(host)
	if ipErr == nil && !tsaddr.IsTailscaleIP(ip) {
		return nil, false, fmt.Errorf("carrier: %s is not a tailnet address: %w", host, ErrUnknownHost)
	}
	fetch := n.rawStatus
	if !fresh {
		fetch = func(ctx context.Context) (*ipnstate.Status, error) { return n.view.status(ctx, n.rawStatus) }
	}
	st, err := fetch(ctx)
	if err != nil {
		return nil, false, err
	}
	var out []Candidate
	add := func(p *ipnstate.PeerStatus, self, exact bool, at netip.Addr) {
		dns := strings.TrimSuffix(p.DNSName, ".")
		id := Identity{Node: shortName(dns, p.HostName), DNSName: dns, Tags: []string{},
			IPs: addrStrings(p.TailscaleIPs)}
		if p.Tags != nil && p.Tags.Len() > 0 {
			id.Tags = p.Tags.AsSlice()
		} else {
			id.User = loginName(st, p.UserID)
		}
		out = append(out, Candidate{Identity: id, Hostname: p.HostName, IP: at,
			Online: self || p.Online, Exact: exact, Self: self, Created: p.Created})
	}
	devices := func(yield func(p *ipnstate.PeerStatus, self bool) bool) {
		if st.Self != nil && !yield(st.Self, true) {
			return
		}
		for _, p := range st.Peer {
			if !yield(p, false) {
				return
			}
		}
	}
	if ipErr == nil {
		// An address in the tailnet's range that no node holds must not
		// reach tsnet's dialer: for an IP it has no peer for, that dials
		// through the host's own network stack, off the tailnet.
		ip = ip.WithZone("")
		for p, self := range devices {
			if slices.Contains(p.TailscaleIPs, ip) {
				add(p, self, true, ip)
			}
		}
		if len(out) == 0 {
			return nil, true, fmt.Errorf("carrier: no node of the tailnet has address %s: %w", host, ErrUnknownHost)
		}
		return out, false, nil
	}
	want := strings.ToLower(strings.TrimSuffix(host, "."))
	if want == "" {
		return nil, false, fmt.Errorf("carrier: empty host name: %w", ErrUnknownHost)
	}
	dnsName := func(p *ipnstate.PeerStatus) string { return strings.ToLower(strings.TrimSuffix(p.DNSName, ".")) }
	label := func(p *ipnstate.PeerStatus) string { l, _, _ := strings.Cut(dnsName(p), "."); return l }
	hostname := func(p *ipnstate.PeerStatus) string { return strings.ToLower(p.HostName) }
	// hostnameFQDN is the MagicDNS name the node would have had, had
	// nobody else held its hostname: "alpha.example.ts.net" for the
	// "alpha-1.example.ts.net" that asked for "alpha".
	hostnameFQDN := func(p *ipnstate.PeerStatus) string {
		_, suffix, ok := strings.Cut(dnsName(p), ".")
		if !ok {
			return ""
		}
		return hostname(p) + "." + suffix
	}
	exact, loose := label, hostname
	if strings.Contains(want, ".") {
		exact, loose = dnsName, hostnameFQDN
	}
	for p, self := range devices {
		if len(p.TailscaleIPs) == 0 {
			continue
		}
		if e := exact(p) == want; e || loose(p) == want {
			add(p, self, e, preferIPv4(p.TailscaleIPs))
		}
	}
	if len(out) == 0 {
		return nil, true, fmt.Errorf("carrier: host %q is not on the tailnet: %w", host, ErrUnknownHost)
	}
	return out, false, nil
}

// Pick chooses which of the candidates for one name the name means.
//
// A name can match more than one device. A node that was killed without
// logging out lingers on the tailnet (an ephemeral one until the control
// server's inactivity timeout, a persistent one until it is removed, and
// the control server may call it online for a while: Headscale, about
// 15 s), and the device that takes its place with the same hostname gets a
// suffixed MagicDNS name ("alpha-1"; a control server that does not suffix
// names, like the offline tailnet's, gives it the same name). Nodes name
// themselves by the hostname they asked for (app@alpha), so that successor
// must be what "alpha" means. But anybody can ask for any hostname, so a
// name passes only between devices of one owner (see
// [Identity.SameOwner]):
//
//   - The name belongs to the owner of its first holder: the oldest exact
//     match. Only that device and the others of its owner are considered;
//     without an exact match, every candidate is.
//   - Of those, online devices win over offline ones; among online ones
//     the newest wins; then exact beats loose, and the first listed wins
//     a tie.
//
// Callers that apply an access policy pass only the devices it admits.
// ok is false for no candidates.
func Pick(cands []Candidate) (best Candidate, ok bool) {
	better := func(a, b Candidate) bool {
		switch {
		case a.Online != b.Online:
			return a.Online
		case a.Online && !a.Created.Equal(b.Created):
			return a.Created.After(b.Created)
		}
		return a.Exact && !b.Exact
	}
	first := -1 // the name's first holder
	for i, c := range cands {
		if c.Exact && (first < 0 || c.Created.Before(cands[first].Created) ||
			c.Created.Equal(cands[first].Created) && c.Online && !cands[first].Online) {
			first = i
		}
	}
	for i, c := range cands {
		if first >= 0 && i != first && !c.Identity.SameOwner(cands[first].Identity) {
			continue
		}
		if !ok || better(c, best) {
			best, ok = c, true
		}
	}
	return best, ok
}

// Resolve finds the tailnet IP of host among this node and its peers: the
// [Pick] of its [Node.Candidates]. IPv4 is preferred. It applies no access
// policy (package host does).
func (n *Node) Resolve(ctx context.Context, host string) (netip.Addr, error) {
	cands, err := n.Candidates(ctx, host)
	if err != nil {
		return netip.Addr{}, err
	}
	best, _ := Pick(cands)
	return best.IP, nil
}

func preferIPv4(ips []netip.Addr) netip.Addr {
	if i := slices.IndexFunc(ips, netip.Addr.Is4); i >= 0 {
		return ips[i]
	}
	return ips[0]
}

func (n *Node) rawStatus(ctx context.Context) (*ipnstate.Status, error) {
	lc, err := n.local()
	if err != nil {
		return nil, err
	}
	st, err := lc.Status(ctx)
	if err != nil {
		return nil, fmt.Errorf("carrier: status: %w", err)
	}
	return st, nil
}
