package access_test

// Unit tests of the policy language alone: Parse, MustParse, String and
// Allow. The gate that applies a policy to accepted connections is tested
// with real tailnet nodes elsewhere (control/, test/).

import (
	"errors"
	"strings"
	"testing"

	"github.com/tsdist/tsdist/access"
	"github.com/tsdist/tsdist/carrier"
)

// Identities used throughout: two people's untagged devices, tagged
// devices, and devices with no known owner.
var (
	aliceLaptop = carrier.Identity{Node: "laptop", DNSName: "laptop.example.ts.net", User: "alice@example.com"}
	aliceUpper  = carrier.Identity{Node: "desk", DNSName: "desk.example.ts.net", User: "Alice@Example.COM"}
	bobBox      = carrier.Identity{Node: "box", DNSName: "box.example.ts.net", User: "bob@example.com"}
	erlangBeta  = carrier.Identity{Node: "beta", DNSName: "beta.example.ts.net", Tags: []string{"tag:erlang"}}
	erlangGamma = carrier.Identity{Node: "gamma", DNSName: "gamma.example.ts.net", Tags: []string{"tag:erlang", "tag:db"}}
	webDelta    = carrier.Identity{Node: "delta", DNSName: "delta.example.ts.net", Tags: []string{"tag:web"}}
	// A tagged device that still reports a user: tagged devices belong to
	// their tags, so that user is not its owner.
	taggedAlice = carrier.Identity{Node: "ci", DNSName: "ci.example.ts.net", User: "alice@example.com", Tags: []string{"tag:ci"}}
	nobody      = carrier.Identity{Node: "ghost", DNSName: "ghost.example.ts.net"}
	upperBeta   = carrier.Identity{Node: "Beta", DNSName: "Beta.Example.TS.net", User: "carol@example.com"}
)

func TestParseAccepts(t *testing.T) {
	for _, tc := range []struct {
		in, want string // want: String() of the parsed policy
	}{
		// blank means the default
		{"", "owner"},
		{"   ", "owner"},
		{"\t\n ", "owner"},
		// every rule form on its own
		{"owner", "owner"},
		{"*", "*"},
		{"user:alice@example.com", "user:alice@example.com"},
		{"user:alice", "user:alice"},
		{"tag:erlang", "tag:erlang"},
		{"host:beta", "host:beta"},
		{"host:beta.example.ts.net", "host:beta.example.ts.net"},
		{"host:beta.example.ts.net.", "host:beta.example.ts.net."},
		// case is kept in the text (the comparison decides what it means)
		{"user:Alice@Example.com", "user:Alice@Example.com"},
		{"host:BETA", "host:BETA"},
		{"tag:Erlang", "tag:Erlang"},
		// whitespace around rules is dropped
		{"  owner  ", "owner"},
		{" owner , tag:erlang ,\thost:beta ", "owner,tag:erlang,host:beta"},
		// several rules, repeats and all forms at once
		{"owner,owner", "owner,owner"},
		{"owner,user:alice,tag:erlang,host:beta,*", "owner,user:alice,tag:erlang,host:beta,*"},
		// a value may itself contain a colon
		{"user:a:b", "user:a:b"},
		// Blanks around a value are not part of it.
		{"user: alice", "user:alice"},
	} {
		p, err := access.Parse(tc.in)
		if err != nil {
			t.Errorf("Parse(%q): %v", tc.in, err)
			continue
		}
		if got := p.String(); got != tc.want {
			t.Errorf("Parse(%q).String() = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestParseRejects(t *testing.T) {
	for _, tc := range []struct {
		in, rule string // rule: the offending rule, as the error quotes it
	}{
		{"user:", "user:"},
		{"user: ", "user:"},
		{"tag:", "tag:"},
		{"host:", "host:"},
		{"host:.", "host:."}, // would match a peer with no name
		{"host: . ", "host: ."},
		{"tag: ", "tag:"},
		{"tag", "tag"},
		{"user", "user"},
		{"host", "host"},
		{"users:alice", "users:alice"},
		{"group:admins", "group:admins"},
		{"autogroup:member", "autogroup:member"},
		{":alice", ":alice"},
		{"**", "**"},
		{"all", "all"},
		{"garbage", "garbage"},
		{"owner tag:erlang", "owner tag:erlang"}, // a space is not a separator
		{"owner;tag:erlang", "owner;tag:erlang"},
		// kinds and keywords are lower case
		{"OWNER", "OWNER"},
		{"Owner", "Owner"},
		{"USER:alice", "USER:alice"},
		{"Tag:erlang", "Tag:erlang"},
		{"HOST:beta", "HOST:beta"},
		// an empty rule in a list: leading, trailing, doubled commas
		{",", ""},
		{"owner,", ""},
		{",owner", ""},
		{"owner,,tag:erlang", ""},
		{"owner, ,tag:erlang", ""},
		// one bad rule spoils the list, wherever it is
		{"owner,tag", "tag"},
		{"garbage,owner", "garbage"},
	} {
		p, err := access.Parse(tc.in)
		if err == nil {
			t.Errorf("Parse(%q) = %q, want an error", tc.in, p.String())
			continue
		}
		if !errors.Is(err, access.ErrBadRule) {
			t.Errorf("Parse(%q): %v, want it to wrap ErrBadRule", tc.in, err)
		}
		if quoted := `"` + tc.rule + `"`; !strings.Contains(err.Error(), quoted) {
			t.Errorf("Parse(%q): %q does not name the rule %s", tc.in, err, quoted)
		}
		if !strings.Contains(err.Error(), "owner, user:LOGIN, tag:NAME, host:NAME or *") {
			t.Errorf("Parse(%q): %q does not say which rules exist", tc.in, err)
		}
		if p.String() != "" {
			t.Errorf("Parse(%q) failed but returned policy %q, want the zero Policy", tc.in, p.String())
		}
	}
}

// allPeers are the identities a round trip is checked against.
var allPeers = []carrier.Identity{aliceLaptop, aliceUpper, bobBox, erlangBeta, erlangGamma, webDelta, taggedAlice, nobody, upperBeta}

func TestStringRoundTrip(t *testing.T) {
	selves := []carrier.Identity{aliceLaptop, erlangBeta, nobody}
	for _, in := range []string{
		"", "owner", "*", " owner , tag:erlang ", "user:Alice@Example.com", "host:BETA.example.ts.net.",
		"host:beta,tag:web,user:bob@example.com", "owner,user:a:b,tag:db,host:delta,*",
	} {
		p := access.MustParse(in)
		q, err := access.Parse(p.String())
		if err != nil {
			t.Errorf("Parse(Parse(%q).String() = %q): %v", in, p.String(), err)
			continue
		}
		if q.String() != p.String() {
			t.Errorf("round trip of %q: %q, then %q", in, p.String(), q.String())
		}
		for _, self := range selves {
			for _, peer := range allPeers {
				ok1, why1 := p.Allow(self, peer)
				ok2, why2 := q.Allow(self, peer)
				if ok1 != ok2 || why1 != why2 {
					t.Errorf("round trip of %q changes the verdict for %s on %s: %v %q, then %v %q",
						in, peer.Node, self.Node, ok1, why1, ok2, why2)
				}
			}
		}
	}
}

func TestMustParse(t *testing.T) {
	if got := access.MustParse("tag:erlang, owner").String(); got != "tag:erlang,owner" {
		t.Errorf("MustParse: %q", got)
	}
	if got := access.MustParse("").String(); got != access.Default {
		t.Errorf("MustParse(\"\") = %q, want %q", got, access.Default)
	}
	for _, bad := range []string{"tag", "user:", "owner,", "garbage"} {
		func() {
			defer func() {
				r := recover()
				if r == nil {
					t.Errorf("MustParse(%q) did not panic", bad)
					return
				}
				err, ok := r.(error)
				if !ok || !errors.Is(err, access.ErrBadRule) {
					t.Errorf("MustParse(%q) panicked with %v, want an error wrapping ErrBadRule", bad, r)
				}
			}()
			access.MustParse(bad)
		}()
	}
}

func TestDefault(t *testing.T) {
	if access.Default != "owner" {
		t.Fatalf("Default = %q; the docs say owner", access.Default)
	}
	a, b := access.MustParse(""), access.MustParse(access.Default)
	for _, self := range []carrier.Identity{aliceLaptop, erlangBeta} {
		for _, peer := range allPeers {
			ok1, _ := a.Allow(self, peer)
			ok2, _ := b.Allow(self, peer)
			if ok1 != ok2 {
				t.Errorf("blank and %q disagree on %s for %s", access.Default, peer.Node, self.Node)
			}
		}
	}
}

func TestAllow(t *testing.T) {
	for _, tc := range []struct {
		name   string
		rules  string
		self   carrier.Identity
		peer   carrier.Identity
		ok     bool
		why    string // checked when not empty: the whole text
		whyHas string // checked when not empty: a part of it
	}{
		// *: everyone, whatever the owner
		{name: "any/person", rules: "*", self: aliceLaptop, peer: bobBox, ok: true, why: "every peer is allowed"},
		{name: "any/tagged", rules: "*", self: aliceLaptop, peer: erlangBeta, ok: true, why: "every peer is allowed"},
		{name: "any/no owner", rules: "*", self: erlangBeta, peer: nobody, ok: true, why: "every peer is allowed"},

		// owner, untagged self: the same user, case-insensitively, and only untagged peers
		{name: "owner/same user", rules: "owner", self: aliceLaptop, peer: aliceLaptop, ok: true, why: "same owner"},
		{name: "owner/same user other case", rules: "owner", self: aliceLaptop, peer: aliceUpper, ok: true, why: "same owner"},
		{name: "owner/other user", rules: "owner", self: aliceLaptop, peer: bobBox, ok: false,
			why: `box (user bob@example.com) matches no rule of "owner"`},
		{name: "owner/tagged peer never matches a person", rules: "owner", self: aliceLaptop, peer: erlangBeta, ok: false,
			why: `beta (tags tag:erlang) matches no rule of "owner"`},
		{name: "owner/tagged peer with the same user", rules: "owner", self: aliceLaptop, peer: taggedAlice, ok: false,
			why: `ci (tags tag:ci) matches no rule of "owner"`},
		{name: "owner/peer with no owner", rules: "owner", self: aliceLaptop, peer: nobody, ok: false,
			why: `ghost (no known owner) matches no rule of "owner"`},
		{name: "owner/self with no owner admits nobody", rules: "owner", self: nobody, peer: nobody, ok: false,
			why: `ghost (no known owner) matches no rule of "owner"`},
		{name: "owner/self with no owner, peer a person", rules: "owner", self: nobody, peer: aliceLaptop, ok: false},
		{name: "owner/blank is owner", rules: "", self: aliceLaptop, peer: aliceUpper, ok: true, why: "same owner"},

		// owner, tagged self: a shared tag, never a person
		{name: "owner/shared tag", rules: "owner", self: erlangBeta, peer: erlangGamma, ok: true, why: "same owner"},
		{name: "owner/one of several tags shared", rules: "owner", self: erlangGamma, peer: erlangBeta, ok: true, why: "same owner"},
		{name: "owner/other tag", rules: "owner", self: erlangBeta, peer: webDelta, ok: false,
			why: `delta (tags tag:web) matches no rule of "owner"`},
		{name: "owner/person to a tagged self", rules: "owner", self: erlangBeta, peer: aliceLaptop, ok: false,
			why: `laptop (user alice@example.com) matches no rule of "owner"`},
		{name: "owner/tagged self, the user of a tagged peer does not count", rules: "owner", self: taggedAlice, peer: aliceLaptop, ok: false},
		{name: "owner/tagged self, peer with no owner", rules: "owner", self: erlangBeta, peer: nobody, ok: false},
		{name: "owner/tags compare exactly", rules: "owner", self: erlangBeta,
			peer: carrier.Identity{Node: "e", Tags: []string{"tag:Erlang"}}, ok: false},

		// user:LOGIN: the peer's user, case-insensitively
		{name: "user/match", rules: "user:bob@example.com", self: aliceLaptop, peer: bobBox, ok: true, why: "user bob@example.com is allowed"},
		{name: "user/rule in upper case", rules: "user:BOB@Example.com", self: aliceLaptop, peer: bobBox, ok: true, why: "user bob@example.com is allowed"},
		{name: "user/peer in upper case", rules: "user:alice@example.com", self: bobBox, peer: aliceUpper, ok: true, why: "user Alice@Example.COM is allowed"},
		{name: "user/other user", rules: "user:bob@example.com", self: aliceLaptop, peer: aliceUpper, ok: false,
			why: `desk (user Alice@Example.COM) matches no rule of "user:bob@example.com"`},
		{name: "user/not a prefix", rules: "user:bob", self: aliceLaptop, peer: bobBox, ok: false},
		{name: "user/tagged peer without a user", rules: "user:alice@example.com", self: aliceLaptop, peer: erlangBeta, ok: false},
		{name: "user/does not imply owner", rules: "user:bob@example.com", self: aliceLaptop, peer: aliceLaptop, ok: false},

		// tag:NAME: a tag the peer carries, compared whole and exactly
		{name: "tag/match", rules: "tag:erlang", self: aliceLaptop, peer: erlangBeta, ok: true, why: "tag:erlang is allowed"},
		{name: "tag/one of the peer's tags", rules: "tag:db", self: aliceLaptop, peer: erlangGamma, ok: true, why: "tag:db is allowed"},
		{name: "tag/other tag", rules: "tag:erlang", self: aliceLaptop, peer: webDelta, ok: false,
			why: `delta (tags tag:web) matches no rule of "tag:erlang"`},
		{name: "tag/case matters", rules: "tag:Erlang", self: aliceLaptop, peer: erlangBeta, ok: false},
		{name: "tag/not a prefix", rules: "tag:erl", self: aliceLaptop, peer: erlangBeta, ok: false},
		{name: "tag/untagged peer", rules: "tag:erlang", self: erlangBeta, peer: aliceLaptop, ok: false,
			why: `laptop (user alice@example.com) matches no rule of "tag:erlang"`},
		{name: "tag/no owner rule: a tagged self does not admit its own tag", rules: "tag:web", self: erlangBeta, peer: erlangGamma, ok: false},

		// host:NAME: the peer's MagicDNS label or whole name, case-insensitively, trailing dot or not
		{name: "host/label", rules: "host:beta", self: aliceLaptop, peer: erlangBeta, ok: true, why: "host beta is allowed"},
		{name: "host/label in upper case", rules: "host:BETA", self: aliceLaptop, peer: erlangBeta, ok: true, why: "host beta is allowed"},
		{name: "host/peer in upper case", rules: "host:beta", self: aliceLaptop, peer: upperBeta, ok: true, why: "host Beta is allowed"},
		{name: "host/MagicDNS name", rules: "host:beta.example.ts.net", self: aliceLaptop, peer: erlangBeta, ok: true, why: "host beta is allowed"},
		{name: "host/MagicDNS name with trailing dot", rules: "host:beta.example.ts.net.", self: aliceLaptop, peer: erlangBeta, ok: true},
		{name: "host/MagicDNS name, both in mixed case", rules: "host:BETA.example.TS.NET", self: aliceLaptop, peer: upperBeta, ok: true},
		{name: "host/other host", rules: "host:beta", self: aliceLaptop, peer: webDelta, ok: false,
			why: `delta (tags tag:web) matches no rule of "host:beta"`},
		{name: "host/not a prefix", rules: "host:bet", self: aliceLaptop, peer: erlangBeta, ok: false},
		{name: "host/a successor is another host", rules: "host:beta", self: aliceLaptop,
			peer: carrier.Identity{Node: "beta-1", DNSName: "beta-1.example.ts.net", Tags: []string{"tag:erlang"}}, ok: false},
		{name: "host/other tailnet's name", rules: "host:beta.other.ts.net", self: aliceLaptop, peer: erlangBeta, ok: false},
		{name: "host/peer without DNS name", rules: "host:beta.example.ts.net", self: aliceLaptop,
			peer: carrier.Identity{Node: "beta", Tags: []string{"tag:erlang"}}, ok: false},

		// lists: any rule that matches admits; the reason is the first kind that does
		{name: "list/second rule", rules: "tag:web,host:box", self: aliceLaptop, peer: bobBox, ok: true, why: "host box is allowed"},
		{name: "list/any wins", rules: "owner,*", self: aliceLaptop, peer: aliceLaptop, ok: true, why: "every peer is allowed"},
		{name: "list/owner before tag", rules: "tag:erlang,owner", self: erlangBeta, peer: erlangGamma, ok: true, why: "same owner"},
		{name: "list/no rule", rules: "owner,tag:web,user:carol@example.com,host:delta", self: aliceLaptop, peer: bobBox, ok: false,
			why: `box (user bob@example.com) matches no rule of "owner,tag:web,user:carol@example.com,host:delta"`},
		{name: "list/deny quotes the trimmed rules", rules: " owner , tag:web ", self: aliceLaptop, peer: bobBox, ok: false,
			whyHas: `"owner,tag:web"`},
		{name: "list/deny names every tag", rules: "tag:web", self: aliceLaptop, peer: erlangGamma, ok: false,
			why: `gamma (tags tag:erlang,tag:db) matches no rule of "tag:web"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := access.Parse(tc.rules)
			if err != nil {
				t.Fatalf("Parse(%q): %v", tc.rules, err)
			}
			ok, why := p.Allow(tc.self, tc.peer)
			if ok != tc.ok {
				t.Errorf("%q: Allow(self %s, peer %s) = %v (%s), want %v", tc.rules, tc.self.Node, tc.peer.Node, ok, why, tc.ok)
			}
			if why == "" {
				t.Errorf("%q: Allow gave no reason", tc.rules)
			}
			if tc.why != "" && why != tc.why {
				t.Errorf("%q: why = %q, want %q", tc.rules, why, tc.why)
			}
			if tc.whyHas != "" && !strings.Contains(why, tc.whyHas) {
				t.Errorf("%q: why = %q, want it to contain %q", tc.rules, why, tc.whyHas)
			}
		})
	}
}

// The zero Policy, as the package documents, allows nobody: not even the
// node's own user, nor anyone with no owner at all.
func TestZeroPolicyAllowsNobody(t *testing.T) {
	var p access.Policy
	if p.String() != "" {
		t.Errorf("zero Policy String() = %q", p.String())
	}
	for _, self := range []carrier.Identity{aliceLaptop, erlangBeta, nobody} {
		for _, peer := range allPeers {
			if ok, why := p.Allow(self, peer); ok {
				t.Errorf("zero Policy admits %s on %s: %s", peer.Node, self.Node, why)
			} else if !strings.HasSuffix(why, `matches no rule of ""`) {
				t.Errorf("zero Policy: why = %q", why)
			}
		}
	}
}
