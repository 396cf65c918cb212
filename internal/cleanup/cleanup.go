// Package cleanup undoes partial work: each step that made something adds
// the function that removes it, and a failure before Release runs them all,
// newest first.
//
//	cu := cleanup.Make(func() { os.RemoveAll(dir) })
//	defer cu.Clean()
//	... more steps, cu.Add(...) after each ...
//	cu.Release() // success: keep everything
package cleanup

// Cleanup is a stack of undo functions. It is not safe for concurrent use.
type Cleanup struct {
	fns []func()
}

// Make returns a Cleanup holding fn (nil for none).
func Make(fn func()) Cleanup {
	c := Cleanup{}
	c.Add(fn)
	return c
}

// Add pushes fn; nil is ignored.
func (c *Cleanup) Add(fn func()) {
	if fn != nil {
		c.fns = append(c.fns, fn)
	}
}

// Clean runs every function not yet released, newest first, and empties
// the stack.
func (c *Cleanup) Clean() {
	for i := len(c.fns) - 1; i >= 0; i-- {
		c.fns[i]()
	}
	c.fns = nil
}

// Release forgets every function: the work is kept.
func (c *Cleanup) Release() { c.fns = nil }
