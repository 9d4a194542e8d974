package epmd

import (
	"cmp"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
)

// Registry holds the nodes registered on one host. It is safe for
// concurrent use. The zero value is not ready; use [NewRegistry].
type Registry struct {
	mu    sync.Mutex
	nodes map[string]*Registration
	// nextCreation numbers registrations, so a node that restarts under
	// the same name gets a different creation and its old pids, ports and
	// references are told apart from the new ones.
	nextCreation uint32
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{
		nodes: make(map[string]*Registration),
		// Random start: two helpers restarted at once should not hand out
		// the same creations. Values 0 to 3 are left to legacy nodes.
		nextCreation: 4 + rand.Uint32N(1<<31),
	}
}

// Registration is one live registration. It lasts until Close.
type Registration struct {
	r *Registry
	// Node is what was registered.
	Node Node
	// Creation tells this incarnation of the node name from earlier ones.
	Creation uint32
}

// Register adds n. It fails with ErrInvalidName for a name [ValidName]
// refuses and with ErrNameTaken while another registration holds the name.
func (r *Registry) Register(n Node) (*Registration, error) {
	if err := ValidName(n.Name); err != nil {
		return nil, err
	}
	if n.Port == 0 {
		return nil, fmt.Errorf("epmd: register %q: port 0", n.Name)
	}
	if len(n.Extra) > MaxExtraLen {
		return nil, fmt.Errorf("epmd: register %q: extra of %d bytes, more than %d", n.Name, len(n.Extra), MaxExtraLen)
	}
	n.Extra = slices.Clone(n.Extra)
	r.mu.Lock()
	defer r.mu.Unlock()
	if old, ok := r.nodes[n.Name]; ok {
		return nil, fmt.Errorf("%w: %q (port %d)", ErrNameTaken, n.Name, old.Node.Port)
	}
	reg := &Registration{r: r, Node: n, Creation: r.nextCreation}
	r.nextCreation++
	if r.nextCreation < 4 {
		r.nextCreation = 4
	}
	r.nodes[n.Name] = reg
	return reg, nil
}

// Close removes the registration. Closing it again does nothing.
func (g *Registration) Close() {
	g.r.mu.Lock()
	defer g.r.mu.Unlock()
	if g.r.nodes[g.Node.Name] == g {
		delete(g.r.nodes, g.Node.Name)
	}
}

// Lookup returns the node registered under name. The Node is a copy: its
// Extra may be changed without changing the registration.
func (r *Registry) Lookup(name string) (Node, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	reg, ok := r.nodes[name]
	if !ok {
		return Node{}, false
	}
	n := reg.Node
	n.Extra = slices.Clone(n.Extra)
	return n, true
}

// Names lists the registered nodes, sorted by name.
func (r *Registry) Names() []NameEntry {
	r.mu.Lock()
	out := make([]NameEntry, 0, len(r.nodes))
	for name, reg := range r.nodes {
		out = append(out, NameEntry{Name: name, Port: int(reg.Node.Port)})
	}
	r.mu.Unlock()
	slices.SortFunc(out, func(a, b NameEntry) int { return cmp.Compare(a.Name, b.Name) })
	return out
}
