package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
)

// The daemon's side of the background process operations (process.go).

// ErrUnsupported reports an agent that does not know an operation: a
// sandbox started (or restored) with an agent older than the operation.
var ErrUnsupported = errors.New("the sandbox's agent does not support this operation")

// callProcess is Call for the process operations: an agent that predates
// them answers an Exit naming the unknown op, which becomes ErrUnsupported.
func (c *Client) callProcess(ctx context.Context, op string, args, reply any) error {
	st, err := c.Open(ctx, op, args)
	if err != nil {
		return err
	}
	defer st.Close()
	typ, payload, err := st.ReadFrame()
	if err != nil {
		return ctxErr(ctx, fmt.Errorf("%s: %w", op, err))
	}
	switch typ {
	case FrameReply:
		if err := json.Unmarshal(payload, reply); err != nil {
			return fmt.Errorf("%s: decoding reply: %w", op, err)
		}
		return nil
	case FrameExit:
		return fmt.Errorf("%s: %w", op, ErrUnsupported)
	}
	return fmt.Errorf("%s: unexpected frame %q", op, typ)
}

// StartProcess starts a background process and returns it once it runs.
func (c *Client) StartProcess(ctx context.Context, req ProcessStart) (ProcessInfo, error) {
	var info ProcessInfo
	err := c.callProcess(ctx, OpProcessStart, req, &info)
	return info, err
}

// ListProcesses returns the background processes, oldest first.
func (c *Client) ListProcesses(ctx context.Context) ([]ProcessInfo, error) {
	var l ProcessList
	if err := c.callProcess(ctx, OpProcessList, struct{}{}, &l); err != nil {
		return nil, err
	}
	return l.Processes, nil
}

// GetProcess describes background process pid.
func (c *Client) GetProcess(ctx context.Context, pid int) (ProcessInfo, error) {
	var info ProcessInfo
	err := c.callProcess(ctx, OpProcessGet, ProcessRef{PID: pid}, &info)
	return info, err
}

// WriteProcessStdin queues data for the process's input and closes the
// input after it if eof. It waits while the process's input queue is full.
func (c *Client) WriteProcessStdin(ctx context.Context, pid int, data []byte, eof bool) error {
	return c.callProcess(ctx, OpProcessStdin, ProcessStdin{PID: pid, Data: data, EOF: eof}, &struct{}{})
}

// SignalProcess sends sig to the process's group.
func (c *Client) SignalProcess(ctx context.Context, pid, sig int) error {
	return c.callProcess(ctx, OpProcessSignal, ProcessSignal{PID: pid, Signal: sig}, &struct{}{})
}

// ResizeProcess sets the window size of the process's terminal.
func (c *Client) ResizeProcess(ctx context.Context, pid int, size TermSize) error {
	return c.callProcess(ctx, OpProcessResize, ProcessResize{PID: pid, TermSize: size}, &struct{}{})
}

// WaitProcess blocks until the process has exited and returns it.
func (c *Client) WaitProcess(ctx context.Context, pid int) (ProcessInfo, error) {
	var info ProcessInfo
	err := c.callProcess(ctx, OpProcessWait, ProcessRef{PID: pid}, &info)
	if err != nil && c.sess.IsClosed() && !isOpError(err) {
		err = fmt.Errorf("%w: %w", ErrSessionClosed, err)
	}
	return info, err
}

func isOpError(err error) bool {
	var oe *OpError
	return errors.As(err, &oe)
}

// ProcessInput is what an attached caller sends the process: input bytes,
// the end of its input, a signal for its group, or a new window size for
// its terminal. One field is set.
type ProcessInput struct {
	Data   []byte
	EOF    bool
	Signal int
	Resize *TermSize
}

// AttachIO connects an attached process to its caller. Any field may be
// nil.
type AttachIO struct {
	// Attached is called once the agent has found the process and the
	// attach runs, before any output.
	Attached func(ProcessInfo)
	// Output receives output as it arrives; stream is FrameStdout or
	// FrameStderr. An error detaches.
	Output func(stream byte, data []byte) error
	// Dropped is told of output the caller will not get (see Dropped).
	Dropped func(Dropped) error
	// Input, when set, is sent to the process until it is closed or the
	// attach ends.
	Input <-chan ProcessInput
}

// AttachProcess attaches to a background process (OpProcessAttach): what
// it wrote since it started, as far as its rings reach, then with Follow its
// output as it comes, until it exits. It returns the process as it was at
// the end and whether it has exited; without Follow a running process ends
// the attach at once. Cancelling ctx detaches: the process goes on.
func (c *Client) AttachProcess(ctx context.Context, args ProcessAttach, aio AttachIO) (ProcessInfo, bool, error) {
	st, err := c.Open(ctx, OpProcessAttach, args)
	if err != nil {
		return ProcessInfo{}, false, err
	}
	var inputs sync.WaitGroup
	stopInput := make(chan struct{})
	// The input goroutine's writes end with the stream: close it first,
	// then wait.
	defer func() {
		close(stopInput)
		st.Close()
		inputs.Wait()
	}()
	if aio.Input != nil {
		var wmu sync.Mutex
		send := func(typ byte, p []byte) error {
			wmu.Lock()
			defer wmu.Unlock()
			return st.WriteFrame(typ, p)
		}
		inputs.Go(func() {
			for {
				var in ProcessInput
				var ok bool
				select {
				case <-stopInput:
					return
				case in, ok = <-aio.Input:
					if !ok {
						return
					}
				}
				var err error
				switch {
				case len(in.Data) > 0:
					err = sendStdin(send, in.Data)
				case in.EOF:
					err = send(FrameStdinEOF, nil)
				case in.Signal != 0:
					b, _ := json.Marshal(Signal{Signal: in.Signal})
					err = send(FrameSignal, b)
				case in.Resize != nil:
					b, _ := json.Marshal(*in.Resize)
					err = send(FrameResize, b)
				}
				if err != nil {
					return
				}
			}
		})
	}
	for {
		typ, payload, err := st.ReadFrame()
		if err != nil {
			if !isOpError(err) && (errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || c.sess.IsClosed()) {
				err = fmt.Errorf("%w: %w", ErrSessionClosed, err)
			}
			return ProcessInfo{}, false, ctxErr(ctx, fmt.Errorf("reading process output: %w", err))
		}
		switch typ {
		case FrameStarted:
			var info ProcessInfo
			if err := json.Unmarshal(payload, &info); err != nil {
				return ProcessInfo{}, false, fmt.Errorf("decoding process: %w", err)
			}
			if aio.Attached != nil {
				aio.Attached(info)
			}
		case FrameStdout, FrameStderr:
			if aio.Output != nil {
				if err := aio.Output(typ, payload); err != nil {
					return ProcessInfo{}, false, fmt.Errorf("delivering output: %w", err)
				}
			}
		case FrameDropped:
			var d Dropped
			if err := json.Unmarshal(payload, &d); err != nil {
				return ProcessInfo{}, false, fmt.Errorf("decoding dropped output: %w", err)
			}
			if aio.Dropped != nil {
				if err := aio.Dropped(d); err != nil {
					return ProcessInfo{}, false, fmt.Errorf("delivering output: %w", err)
				}
			}
		case FrameExit, FrameReply:
			var info ProcessInfo
			if err := json.Unmarshal(payload, &info); err != nil {
				return ProcessInfo{}, false, fmt.Errorf("decoding process: %w", err)
			}
			if info.PID == 0 {
				// An older agent's Exit for an unknown op.
				return ProcessInfo{}, false, fmt.Errorf("%s: %w", OpProcessAttach, ErrUnsupported)
			}
			return info, typ == FrameExit, nil
		default:
			return ProcessInfo{}, false, fmt.Errorf("unexpected frame %q while attached", typ)
		}
	}
}
