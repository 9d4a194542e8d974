// Package access decides which tailnet peers may reach a node at all.
//
// Erlang distribution hands full remote code execution to any node that
// passes the cookie check. A tailnet already authenticates every peer, so
// tsdist checks that identity first: a connection from a peer outside the
// [Policy] is closed before any byte reaches the BEAM, and the node's EPMD
// does not even list its names to such a peer.
//
// A policy is a comma-separated list of rules:
//
//	owner        peers with this node's owner: the same user, or, for a
//	             tagged node (which belongs to its tags), a shared tag
//	user:LOGIN   peers owned by that user (alice@example.com)
//	tag:NAME     peers carrying that ACL tag (tag:erlang)
//	host:NAME    the peer with that MagicDNS name or its first label (beta)
//	*            every peer on the tailnet
//
// The empty policy is [Default], "owner": a tailnet usually holds more
// than one person's devices, and a cluster is one person's or one team's
// (tagged) nodes; anything wider is opt-in.
package access

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/tsdist/tsdist/carrier"
)

// Default is the policy of a node that was given none.
const Default = "owner"

// Policy is a parsed list of rules. The zero Policy allows nobody; use
// [Parse].
type Policy struct {
	any   bool
	owner bool
	users []string
	tags  []string
	hosts []string
	text  string
}

// ErrBadRule is a rule [Parse] does not understand.
var ErrBadRule = errors.New("access: bad rule")

// Parse reads a comma-separated list of rules. Blank means [Default].
func Parse(rules string) (Policy, error) {
	if strings.TrimSpace(rules) == "" {
		rules = Default
	}
	var p Policy
	var kept []string
	for _, r := range strings.Split(rules, ",") {
		r = strings.TrimSpace(r)
		kind, value, _ := strings.Cut(r, ":")
		value = strings.TrimSpace(value)
		host := strings.ToLower(strings.TrimSuffix(value, "."))
		switch {
		case r == "*":
			p.any = true
		case r == "owner":
			p.owner = true
		case kind == "user" && value != "":
			r = "user:" + value
			p.users = append(p.users, strings.ToLower(value))
		case kind == "tag" && value != "":
			r = "tag:" + value
			p.tags = append(p.tags, r) // tags are compared whole: "tag:erlang"
		case kind == "host" && host != "":
			r = "host:" + value
			p.hosts = append(p.hosts, host)
		default:
			return Policy{}, fmt.Errorf("%w %q: want owner, user:LOGIN, tag:NAME, host:NAME or *", ErrBadRule, r)
		}
		kept = append(kept, r)
	}
	p.text = strings.Join(kept, ",")
	return p, nil
}

// MustParse is Parse for rules known to be good; it panics otherwise.
func MustParse(rules string) Policy {
	p, err := Parse(rules)
	if err != nil {
		panic(err)
	}
	return p
}

// String is the policy as rules, as Parse accepts them.
func (p Policy) String() string { return p.text }

// Allow reports whether peer may reach a node whose own identity is self,
// and if not, why not, for the log.
func (p Policy) Allow(self, peer carrier.Identity) (ok bool, why string) {
	switch {
	case p.any:
		return true, "every peer is allowed"
	case p.owner && self.SameOwner(peer):
		return true, "same owner"
	case peer.User != "" && slices.Contains(p.users, strings.ToLower(peer.User)):
		return true, "user " + peer.User + " is allowed"
	}
	for _, t := range peer.Tags {
		if slices.Contains(p.tags, t) {
			return true, t + " is allowed"
		}
	}
	host := strings.ToLower(peer.DNSName)
	if slices.Contains(p.hosts, strings.ToLower(peer.Node)) || (host != "" && slices.Contains(p.hosts, host)) {
		return true, "host " + peer.Node + " is allowed"
	}
	return false, fmt.Sprintf("%s (%s) matches no rule of %q", peer.Node, Owner(peer), p.text)
}

// Owner describes who a device belongs to, for messages: its user, or
// its tags.
func Owner(id carrier.Identity) string {
	if len(id.Tags) > 0 {
		return "tags " + strings.Join(id.Tags, ",")
	}
	if id.User == "" {
		return "no known owner"
	}
	return "user " + id.User
}
