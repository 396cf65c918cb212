package sandbox

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/pandastack/pandastack/internal/agent"
	"github.com/pandastack/pandastack/internal/network"
	"github.com/pandastack/pandastack/internal/store"
	"github.com/pandastack/pandastack/wire"
)

// phase is where a sandbox is in its lifecycle. The stable phases are the
// states the store records (creating, running, paused, and the ended
// states); the others mark an operation in progress:
//
//	creating ──► running ──► pausing ──► paused ──► resuming ──► running
//	   │            │            │  └──► running        │  └──► paused
//	   └────────────┴────────────┴────────┴─────────────┴──► stopping ──► ended
//
// Only the transitions in phaseNext are allowed; setPhase checks them, as
// runsc's Container checks its own.
type phase int

const (
	phaseCreating phase = iota
	phaseRunning
	phasePausing  // saving for a pause; the sandbox still runs
	phasePaused   // saved to disk; no process or memory left
	phaseResuming // being restored from its pause image
	phaseStopping // being destroyed
	phaseEnded
)

var phaseNames = [...]string{"creating", "running", "pausing", "paused", "resuming", "stopping", "ended"}

func (p phase) String() string { return phaseNames[p] }

var phaseNext = map[phase][]phase{
	phaseCreating: {phaseRunning, phaseStopping},
	phaseRunning:  {phasePausing, phaseStopping},
	phasePausing:  {phasePaused, phaseRunning, phaseStopping},
	phasePaused:   {phaseResuming, phaseStopping},
	phaseResuming: {phaseRunning, phasePaused, phaseStopping},
	phaseStopping: {phaseEnded},
}

// opLock serialises the lifecycle operations of one sandbox (create, pause,
// resume, snapshot, the checkpoint of a fork, destroy), which call runsc and
// can take seconds. Unlike a mutex, waiting for it honours a context.
// Nothing global (list, reaper, shutdown) ever waits for it.
type opLock chan struct{}

func newOpLock() opLock { return make(opLock, 1) }

func (l opLock) lock(ctx context.Context) error {
	select {
	case l <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (l opLock) unlock() { <-l }

// instance is one live sandbox: from the start of its create until it has
// ended.
//
// Concurrency: op serialises lifecycle operations; mu guards the fields
// below it and is only ever held for short work (no runsc, no agent calls;
// at most a store write that must change with the fields, such as an
// expiry), so that List, Get and the reaper never wait on a slow
// operation. Lock order: op before mu; mu before Manager.mu.
type instance struct {
	id     string
	tenant string
	op     opLock

	mu    sync.Mutex
	phase phase
	rec   store.Sandbox
	// client is the agent session while running; nil otherwise.
	client *agent.Client
	// netSlot is the sandbox's network while its runtime sandbox exists
	// (a sandbox with a network); nil otherwise.
	netSlot *network.Slot
	// slot reports whether the sandbox counts against MaxSandboxes (it
	// has, or is about to have, runtime processes).
	slot bool
	// cancelOp cuts short the operation holding op, where it can be (a
	// checkpoint); Kill uses it so that destroying never waits for a
	// pause or snapshot of gigabytes.
	cancelOp context.CancelFunc
	// saving is set while a checkpoint saves the sandbox: it stops every
	// process inside, the agent too, so an agent that does not answer
	// meanwhile is frozen, not dead.
	saving bool
	// ending is set once an end was asked for (end): an operation that
	// sets cancelOp afterwards is cut short at once, since the end could
	// not cut it before it had begun.
	ending bool
	// endReason says why the last agent session ended, for the commands
	// that were running in it.
	endReason string
	// execs counts commands running now.
	execs int
	// reaping is set while the reaper works on the sandbox; retryAt is
	// when it may try again after a failed pause at the TTL.
	reaping bool
	retryAt time.Time
	// ended is closed once the sandbox has ended.
	ended chan struct{}
	// samples are its recent usage samples, oldest first (usage.go).
	samples []wire.MetricsSample
}

func newInstance(id, tenant string, rec store.Sandbox, p phase) *instance {
	return &instance{id: id, tenant: tenant, op: newOpLock(), rec: rec, phase: p, ended: make(chan struct{})}
}

// setPhase moves the sandbox to phase to, or reports a bug; the caller
// holds in.mu.
func (in *instance) setPhase(to phase) error {
	for _, p := range phaseNext[in.phase] {
		if p == to {
			in.phase = to
			if to == phaseEnded {
				close(in.ended)
			}
			return nil
		}
	}
	return fmt.Errorf("sandbox %s: invalid lifecycle transition %s → %s", in.id, in.phase, to)
}

// setCancelOp records cancel as what cuts short the operation in progress
// (nil when it is done); the caller holds in.op. When an end is already
// waiting for the operation, cancel is called at once.
func (in *instance) setCancelOp(cancel context.CancelFunc) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.cancelOp = cancel
	if cancel != nil && in.ending {
		cancel()
	}
}

// isSaving reports whether a checkpoint is saving the sandbox now.
func (in *instance) isSaving() bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.saving
}

// visibleState is the state the API shows, or "" while the sandbox is not
// shown (being created, or ending); the caller holds in.mu. An operation in
// progress shows as the state the sandbox is in until it completes.
func (in *instance) visibleState() string {
	switch in.phase {
	case phaseRunning, phasePausing:
		return wire.StateRunning
	case phasePaused, phaseResuming:
		return wire.StatePaused
	}
	return ""
}
