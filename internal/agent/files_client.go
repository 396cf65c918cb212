package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// The daemon's side of the file operations (files.go). Data is streamed
// both ways in FrameFileData frames: nothing here holds more than one frame
// of a file or archive, and yamux's window (1 MiB) bounds what is in
// flight, so a slow reader back-pressures the agent and a slow agent the
// uploader.

// errAgentGone: the agent's stream ended before the operation did (the
// sandbox died, was paused, or the call was cancelled).
var errAgentGone = errors.New("the sandbox's agent stream ended")

// StatFile describes a path (lstat).
func (c *Client) StatFile(ctx context.Context, a FileArgs) (FileInfo, error) {
	var fi FileInfo
	return fi, c.Call(ctx, OpFileStat, a, &fi)
}

// MakeDir makes a directory.
func (c *Client) MakeDir(ctx context.Context, a FileArgs) (FileInfo, error) {
	var fi FileInfo
	return fi, c.Call(ctx, OpFileMkdir, a, &fi)
}

// RemoveFile removes a path.
func (c *Client) RemoveFile(ctx context.Context, a FileArgs) error {
	return c.Call(ctx, OpFileRemove, a, &struct{}{})
}

// RenameFile moves a.Path to a.To.
func (c *Client) RenameFile(ctx context.Context, a FileArgs) (FileInfo, error) {
	var fi FileInfo
	return fi, c.Call(ctx, OpFileRename, a, &fi)
}

// ListFiles lists a directory. It takes at most max entries of the
// agent's, whatever it sends.
func (c *Client) ListFiles(ctx context.Context, a FileArgs, max int) ([]FileInfo, bool, error) {
	st, err := c.Open(ctx, OpFileList, a)
	if err != nil {
		return nil, false, err
	}
	defer st.Close()
	var out []FileInfo
	for {
		typ, payload, err := st.ReadFrame()
		if err != nil {
			return nil, false, ctxErr(ctx, fmt.Errorf("%s: %w", OpFileList, err))
		}
		switch typ {
		case FrameFileData:
			batch, err := jsonBatch[FileInfo](payload)
			if err != nil {
				return nil, false, err
			}
			if len(out)+len(batch) > max {
				return append(out, batch[:max-len(out)]...), true, nil
			}
			out = append(out, batch...)
		case FrameReply:
			var end ListEnd
			if err := json.Unmarshal(payload, &end); err != nil {
				return nil, false, fmt.Errorf("decoding list end: %w", err)
			}
			return out, end.Truncated, nil
		default:
			return nil, false, fmt.Errorf("unexpected frame %q in a listing", typ)
		}
	}
}

// ReadFile opens a file for reading: the agent's ReadStart, and its bytes.
// Close the reader when done (early, to stop the transfer); cancelling ctx
// also ends it. A failure half-way is the reader's error (an *OpError for
// the agent's own).
func (c *Client) ReadFile(ctx context.Context, a FileArgs) (ReadStart, io.ReadCloser, error) {
	var rs ReadStart
	rc, err := c.download(ctx, OpFileRead, a, &rs)
	return rs, rc, err
}

// TarGet opens a tar archive of a path, like ReadFile.
func (c *Client) TarGet(ctx context.Context, a FileArgs) (io.ReadCloser, error) {
	return c.download(ctx, OpTarGet, a, &struct{}{})
}

func (c *Client) download(ctx context.Context, op string, a FileArgs, start any) (io.ReadCloser, error) {
	st, err := c.Open(ctx, op, a)
	if err != nil {
		return nil, err
	}
	if err := st.ReadJSON(FrameReply, start); err != nil {
		st.Close()
		return nil, ctxErr(ctx, fmt.Errorf("%s: %w", op, err))
	}
	dr := &dataReader{r: st.rw, lost: errAgentGone, onFrame: opErrorFrame}
	return &dataStream{ctx: ctx, r: dr, st: st}, nil
}

// opErrorFrame turns a FrameError in the middle of data into its *OpError.
func opErrorFrame(typ byte, payload []byte) error {
	if typ != FrameError {
		return fmt.Errorf("unexpected frame %q in file data", typ)
	}
	var oe OpError
	if err := json.Unmarshal(payload, &oe); err != nil {
		return fmt.Errorf("decoding operation error: %w", err)
	}
	return &oe
}

// dataStream is a download's reader.
type dataStream struct {
	ctx context.Context
	r   io.Reader
	st  *Stream
}

func (d *dataStream) Read(p []byte) (int, error) {
	n, err := d.r.Read(p)
	if err != nil && err != io.EOF {
		err = ctxErr(d.ctx, err)
	}
	return n, err
}

func (d *dataStream) Close() error {
	d.st.Close()
	return nil
}

// WriteFile writes r's bytes to a file (OpFileWrite). An error reading r
// ends the write, the file left as it was, and is returned as it is; the
// agent's failure (a full disk) comes back as its *OpError as soon as the
// agent reports it, without waiting for the rest of r.
func (c *Client) WriteFile(ctx context.Context, a FileArgs, r io.Reader) (FileInfo, error) {
	var fi FileInfo
	return fi, c.upload(ctx, OpFileWrite, a, r, &fi)
}

// TarPut extracts the tar archive r into a directory (OpTarPut), like
// WriteFile.
func (c *Client) TarPut(ctx context.Context, a FileArgs, r io.Reader) (TarResult, error) {
	var res TarResult
	return res, c.upload(ctx, OpTarPut, a, r, &res)
}

// ErrUploadSource wraps an error reading what an upload sends, so that the
// caller can tell it from the agent's.
type ErrUploadSource struct{ Err error }

func (e *ErrUploadSource) Error() string { return "reading the upload: " + e.Err.Error() }
func (e *ErrUploadSource) Unwrap() error { return e.Err }

func (c *Client) upload(ctx context.Context, op string, a FileArgs, r io.Reader, reply any) error {
	// Cancelling sctx closes the stream, which stops the agent (it
	// removes what it had written) and unblocks the sender.
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := c.Open(sctx, op, a)
	if err != nil {
		return err
	}
	defer st.Close()
	if err := st.ReadJSON(FrameReply, &struct{}{}); err != nil {
		return ctxErr(ctx, fmt.Errorf("%s: %w", op, err))
	}
	// The agent answers when it is done, which may be before the data
	// ends: a failure (a full disk, a refused archive entry), or an
	// archive that ends before its padding. The answer stops the sender.
	answer := make(chan error, 1)
	go func() {
		err := st.ReadJSON(FrameReply, reply)
		cancel()
		answer <- err
	}()
	dw := newDataWriter(st.rw)
	dw.lost = errAgentGone
	_, err = dw.ReadFrom(r)
	if err == nil {
		if werr := st.WriteFrame(FrameFileEnd, nil); werr != nil {
			err = fmt.Errorf("%w: %v", errAgentGone, werr)
		}
	}
	if err != nil && !errors.Is(err, errAgentGone) {
		// The source failed: stop the agent, which leaves the file
		// as it was.
		cancel()
		<-answer
		return &ErrUploadSource{Err: err}
	}
	aerr := <-answer
	if aerr != nil {
		if err != nil && !errors.As(aerr, new(*OpError)) {
			return ctxErr(ctx, fmt.Errorf("%s: %w", op, err))
		}
		return ctxErr(ctx, fmt.Errorf("%s: %w", op, aerr))
	}
	return nil
}

// FileWatch is a watch in progress on the daemon's side.
type FileWatch struct {
	ctx context.Context
	st  *Stream
}

// WatchFiles starts a watch; it returns once the agent watches.
func (c *Client) WatchFiles(ctx context.Context, a FileArgs) (*FileWatch, error) {
	st, err := c.Open(ctx, OpFileWatch, a)
	if err != nil {
		return nil, err
	}
	if err := st.ReadJSON(FrameReply, &struct{}{}); err != nil {
		st.Close()
		return nil, ctxErr(ctx, fmt.Errorf("%s: %w", OpFileWatch, err))
	}
	return &FileWatch{ctx: ctx, st: st}, nil
}

// Next returns the next batch of events; io.EOF when the watched directory
// went away.
func (w *FileWatch) Next() ([]FileEvent, error) {
	typ, payload, err := w.st.ReadFrame()
	if err != nil {
		return nil, ctxErr(w.ctx, fmt.Errorf("%s: %w", OpFileWatch, err))
	}
	switch typ {
	case FrameFileData:
		return jsonBatch[FileEvent](payload)
	case FrameFileEnd:
		return nil, io.EOF
	}
	return nil, fmt.Errorf("unexpected frame %q in a watch", typ)
}

// Close ends the watch.
func (w *FileWatch) Close() { w.st.Close() }
