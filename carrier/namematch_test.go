package carrier

import (
	"testing"
	"time"
)

// TestPick checks which of several devices answering to one name Pick
// chooses: the successor of a node killed without logging out ("alpha-1",
// hostname "alpha", same owner) takes the name over; a device of another
// owner that asked for the same hostname never does while an exact match
// exists.
func TestPick(t *testing.T) {
	old := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	alice := Identity{User: "alice@example.com", Tags: []string{}}
	mallory := Identity{User: "mallory@example.com", Tags: []string{}}
	erlang := Identity{Tags: []string{"tag:erlang"}}
	other := Identity{Tags: []string{"tag:other"}}
	dev := func(name string, id Identity, online, exact bool, age time.Duration) Candidate {
		id.Node = name
		return Candidate{Identity: id, Online: online, Exact: exact, Created: old.Add(age)}
	}
	cases := []struct {
		name  string
		cands []Candidate
		want  string // the Node of the pick; "" for none
	}{
		{"nothing", nil, ""},
		{"one exact", []Candidate{dev("alpha", alice, true, true, 0)}, "alpha"},
		{"online successor of the same user beats the lingering node, online too",
			[]Candidate{dev("alpha", alice, true, true, 0), dev("alpha-1", alice, true, false, time.Hour)}, "alpha-1"},
		{"online successor beats the offline node",
			[]Candidate{dev("alpha", alice, false, true, 0), dev("alpha-1", alice, true, false, time.Hour)}, "alpha-1"},
		{"a newer device of another user never takes over an online exact match",
			[]Candidate{dev("beta", alice, true, true, 0), dev("beta-1", mallory, true, false, time.Hour)}, "beta"},
		{"nor an offline one",
			[]Candidate{dev("beta", alice, false, true, 0), dev("beta-1", mallory, true, false, time.Hour)}, "beta"},
		{"listed first or last makes no difference",
			[]Candidate{dev("beta-1", mallory, true, false, time.Hour), dev("beta", alice, true, true, 0)}, "beta"},
		{"a tagged successor sharing a tag takes over",
			[]Candidate{dev("kappa", erlang, true, true, 0), dev("kappa-1", erlang, true, false, time.Hour)}, "kappa-1"},
		{"a device with another tag does not",
			[]Candidate{dev("kappa", erlang, true, true, 0), dev("kappa-1", other, true, false, time.Hour)}, "kappa"},
		{"a user's device does not succeed a tagged one",
			[]Candidate{dev("kappa", erlang, true, true, 0), dev("kappa-1", alice, true, false, time.Hour)}, "kappa"},
		{"without an exact match, the newest online loose match",
			[]Candidate{dev("gamma-1", alice, true, false, 0), dev("gamma-2", mallory, true, false, time.Hour)}, "gamma-2"},
		{"online beats newer",
			[]Candidate{dev("gamma-1", alice, true, false, 0), dev("gamma-2", alice, false, false, time.Hour)}, "gamma-1"},
		{"both offline: exact wins",
			[]Candidate{dev("alpha-1", alice, false, false, time.Hour), dev("alpha", alice, false, true, 0)}, "alpha"},
		{"two exact matches of one owner (a control server that does not suffix names): the online one",
			[]Candidate{dev("old", alice, false, true, time.Hour), dev("new", alice, true, true, 0)}, "new"},
		{"two exact matches of two owners: the name stays with its first holder's, online or not",
			[]Candidate{dev("beta", mallory, true, true, time.Hour), dev("beta", alice, false, true, 0)}, "beta"},
		{"a device of no known owner holds a name alone",
			[]Candidate{dev("nobody", Identity{Tags: []string{}}, true, true, 0)}, "nobody"},
	}
	for _, c := range cases {
		got, ok := Pick(c.cands)
		if ok != (c.want != "") || got.Identity.Node != c.want {
			t.Errorf("%s: Pick = %q (ok %v), want %q", c.name, got.Identity.Node, ok, c.want)
		}
	}
}

func TestSameOwner(t *testing.T) {
	cases := []struct {
		a, b Identity
		want bool
	}{
		{Identity{User: "a@x"}, Identity{User: "A@x"}, true},
		{Identity{User: "a@x"}, Identity{User: "b@x"}, false},
		{Identity{User: ""}, Identity{User: ""}, false},
		{Identity{Tags: []string{"tag:a", "tag:b"}}, Identity{Tags: []string{"tag:b"}}, true},
		{Identity{Tags: []string{"tag:a"}}, Identity{Tags: []string{"tag:b"}}, false},
		{Identity{Tags: []string{"tag:a"}, User: "a@x"}, Identity{User: "a@x"}, false},
		{Identity{User: "a@x"}, Identity{Tags: []string{"tag:a"}, User: "a@x"}, false},
	}
	for _, c := range cases {
		if got := c.a.SameOwner(c.b); got != c.want {
			t.Errorf("%+v.SameOwner(%+v) = %v, want %v", c.a, c.b, got, c.want)
		}
		if got := c.b.SameOwner(c.a); got != c.want {
			t.Errorf("not symmetric: %+v.SameOwner(%+v) = %v", c.b, c.a, got)
		}
	}
}
