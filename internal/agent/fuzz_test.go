package agent

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/metrics"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/yamux"
)

// heapAllocated returns the bytes allocated on the heap so far. Large
// allocations (a frame payload near MaxFrame is one) are counted at once.
func heapAllocated() uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// allocSlack is what ReadFrame may allocate besides its payload, plus noise
// from small-object accounting.
const allocSlack = 256 << 10

// fuzzAllocLimit bounds ReadFrame's allocation while fuzzing, where the
// fuzzing machinery allocates concurrently: loose, but far below what a
// length taken from the header unchecked (up to 4 GiB) would cost.
const fuzzAllocLimit = 2 * MaxFrame

func frameBytes(typ byte, n uint32, payload []byte) []byte {
	b := []byte{typ, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(b[1:], n)
	return append(b, payload...)
}

func TestReadFrameLimits(t *testing.T) {
	full := bytes.Repeat([]byte{'x'}, MaxFrame)
	tests := []struct {
		name        string
		in          []byte
		wantErr     bool
		wantPayload int
		// refused frames are rejected from their header, before any
		// allocation for the payload.
		refused bool
	}{
		{name: "empty input", in: nil, wantErr: true},
		{name: "short header", in: []byte{'R', 0, 0}, wantErr: true},
		{name: "empty payload", in: frameBytes('R', 0, nil), wantPayload: 0},
		{name: "exactly MaxFrame", in: frameBytes('O', MaxFrame, full), wantPayload: MaxFrame},
		{name: "one past MaxFrame", in: frameBytes('O', MaxFrame+1, append(full, 'x')), wantErr: true, refused: true},
		{name: "huge length, no payload", in: frameBytes('O', 0xffffffff, nil), wantErr: true, refused: true},
		{name: "truncated payload", in: frameBytes('O', 10, []byte("abc")), wantErr: true},
		{name: "MaxFrame claimed, little sent", in: frameBytes('O', MaxFrame, []byte("abc")), wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := heapAllocated()
			_, payload, err := ReadFrame(bytes.NewReader(tt.in))
			limit := uint64(MaxFrame + allocSlack)
			if tt.refused {
				limit = allocSlack
			}
			if allocated := heapAllocated() - before; allocated > limit {
				t.Errorf("allocated %d bytes, want at most %d", allocated, limit)
			}
			if gotErr := err != nil; gotErr != tt.wantErr {
				t.Fatalf("error: got %v, want error %v", err, tt.wantErr)
			}
			if err == nil && len(payload) != tt.wantPayload {
				t.Errorf("payload: got %d bytes, want %d", len(payload), tt.wantPayload)
			}
		})
	}
	if err := WriteFrame(io.Discard, 'O', append(full, 'x')); err == nil {
		t.Error("WriteFrame of MaxFrame+1 bytes: got nil error")
	}
}

func FuzzReadFrame(f *testing.F) {
	f.Add(FrameRequest, []byte(`{"op":"ping"}`))
	f.Add(FrameStdout, []byte{})
	f.Add(FrameExit, []byte(`{"exit_code":0}`))
	f.Add(byte(0), frameBytes('O', 3, []byte("abc")))
	f.Add(byte(0xff), frameBytes('O', 0xffffffff, nil))
	f.Add(byte('O'), frameBytes('O', MaxFrame, []byte("short")))
	f.Add(byte('O'), frameBytes('O', MaxFrame+1, nil))
	f.Add(byte('E'), []byte{1, 2, 3, 4})
	f.Fuzz(func(t *testing.T, typ byte, data []byte) {
		// Arbitrary bytes: no panic, a bounded allocation, and a frame
		// exactly as the header describes it.
		r := bytes.NewReader(data)
		before := heapAllocated()
		gotTyp, payload, err := ReadFrame(r)
		if allocated := heapAllocated() - before; allocated > fuzzAllocLimit {
			t.Fatalf("ReadFrame(%d bytes) allocated %d bytes, want at most %d", len(data), allocated, fuzzAllocLimit)
		}
		fits := len(data) >= 5 && binary.BigEndian.Uint32(data[1:5]) <= MaxFrame &&
			len(data)-5 >= int(binary.BigEndian.Uint32(data[1:5]))
		if err != nil {
			if fits {
				t.Fatalf("ReadFrame of a complete frame: %v", err)
			}
		} else {
			if !fits {
				t.Fatalf("ReadFrame of an incomplete or oversized frame: got %d bytes, want an error", len(payload))
			}
			n := int(binary.BigEndian.Uint32(data[1:5]))
			if gotTyp != data[0] || !bytes.Equal(payload, data[5:5+n]) {
				t.Fatalf("got frame %q %q, want %q %q", gotTyp, payload, data[0], data[5:5+n])
			}
			if r.Len() != len(data)-5-n {
				t.Fatalf("ReadFrame consumed %d bytes, want %d", len(data)-r.Len(), 5+n)
			}
		}

		// Frames written by WriteFrame read back unchanged, one at a time.
		var buf bytes.Buffer
		if err := WriteFrame(&buf, typ, data); err != nil {
			if len(data) <= MaxFrame {
				t.Fatalf("WriteFrame: %v", err)
			}
			return
		}
		second := data[:len(data)/2]
		if err := WriteFrame(&buf, typ^1, second); err != nil {
			t.Fatalf("WriteFrame: %v", err)
		}
		written := bytes.Clone(buf.Bytes())
		for i, want := range []struct {
			typ     byte
			payload []byte
		}{{typ, data}, {typ ^ 1, second}} {
			gotTyp, got, err := ReadFrame(&buf)
			if err != nil || gotTyp != want.typ || !bytes.Equal(got, want.payload) {
				t.Fatalf("frame %d: got %q %q %v, want %q %q", i, gotTyp, got, err, want.typ, want.payload)
			}
		}
		if _, _, err := ReadFrame(&buf); err != io.EOF {
			t.Fatalf("after the last frame: got %v, want io.EOF", err)
		}
		// A frame cut anywhere is an error, never a shorter frame nor the
		// bare io.EOF of a stream that ended cleanly.
		for _, cut := range []int{1, 4, 5, 5 + len(data) - 1} {
			if cut <= 0 || cut >= 5+len(data) {
				continue
			}
			if _, _, err := ReadFrame(bytes.NewReader(written[:cut])); err == nil || err == io.EOF {
				t.Fatalf("frame cut at %d of %d: got %v, want an error", cut, 5+len(data), err)
			}
		}
	})
}

// readReply reads frames from st until it ends and checks that they make a
// well-formed reply: output frames, then at most one exit or reply frame
// with valid JSON, then the end of the stream.
func readReply(st *yamux.Stream) ([]byte, error) {
	var last byte
	for {
		typ, payload, err := ReadFrame(st)
		if errors.Is(err, io.EOF) {
			return []byte{last}, nil
		}
		if err != nil {
			return nil, fmt.Errorf("reading reply: %w", err)
		}
		if last == FrameExit || last == FrameReply {
			return nil, fmt.Errorf("frame %q after the final frame %q", typ, last)
		}
		switch typ {
		case FrameStdout, FrameStderr, FrameStarted:
		case FrameExit:
			var ex Exit
			if err := json.Unmarshal(payload, &ex); err != nil {
				return nil, fmt.Errorf("exit frame %q: %w", payload, err)
			}
		case FrameReply:
			var p Pong
			if err := json.Unmarshal(payload, &p); err != nil || p.Version != ProtocolVersion {
				return nil, fmt.Errorf("reply frame %q: %v", payload, err)
			}
		default:
			return nil, fmt.Errorf("unexpected frame type %q", typ)
		}
		last = typ
	}
}

// roundTrip sends one frame on a new stream of sess and reads the reply.
func roundTrip(sess *yamux.Session, typ byte, payload []byte) (last byte, err error) {
	st, err := sess.OpenStream()
	if err != nil {
		return 0, fmt.Errorf("opening stream: %w", err)
	}
	defer st.Close()
	if err := st.SetReadDeadline(time.Now().Add(patience)); err != nil {
		return 0, err
	}
	if err := WriteFrame(st, typ, payload); err != nil {
		return 0, fmt.Errorf("sending frame: %w", err)
	}
	r, err := readReply(st)
	if err != nil {
		return 0, err
	}
	return r[0], nil
}

func ping(sess *yamux.Session) error {
	last, err := roundTrip(sess, FrameRequest, []byte(`{"op":"ping"}`))
	if err == nil && last != FrameReply {
		err = fmt.Errorf("ping: got final frame %q, want %q", last, FrameReply)
	}
	return err
}

func TestServerBadRequests(t *testing.T) {
	sess := rawSession(t)
	tests := []struct {
		name      string
		typ       byte
		payload   string
		wantLast  byte   // the final frame, 0 for none
		wantError string // in the Exit's Error
	}{
		{name: "ping", typ: FrameRequest, payload: `{"op":"ping"}`, wantLast: FrameReply},
		{name: "not a request", typ: FrameStdin, payload: `{"op":"ping"}`},
		{name: "invalid JSON", typ: FrameRequest, payload: `{"op":`, wantLast: FrameExit, wantError: "decoding request"},
		{name: "unknown op", typ: FrameRequest, payload: `{"op":"reboot"}`, wantLast: FrameExit, wantError: "unknown op"},
		{name: "exec without body", typ: FrameRequest, payload: `{"op":"exec"}`, wantLast: FrameExit, wantError: "without argv"},
		{name: "exec with empty argv", typ: FrameRequest, payload: `{"op":"exec","exec":{"argv":[]}}`, wantLast: FrameExit, wantError: "without argv"},
		{name: "exec of empty name", typ: FrameRequest, payload: `{"op":"exec","exec":{"argv":[""]}}`, wantLast: FrameExit},
		{name: "exec with NUL in argv", typ: FrameRequest, payload: `{"op":"exec","exec":{"argv":["true","a\u0000b"]}}`, wantLast: FrameExit},
		{name: "exec with NUL in env", typ: FrameRequest, payload: `{"op":"exec","exec":{"argv":["true"],"env":["A=\u0000"]}}`, wantLast: FrameExit},
		{name: "null", typ: FrameRequest, payload: `null`, wantLast: FrameExit, wantError: "unknown op"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st, err := sess.OpenStream()
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			if err := st.SetReadDeadline(time.Now().Add(patience)); err != nil {
				t.Fatal(err)
			}
			if err := WriteFrame(st, tt.typ, []byte(tt.payload)); err != nil {
				t.Fatal(err)
			}
			var last byte
			var exit Exit
			for {
				typ, payload, err := ReadFrame(st)
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				last = typ
				if typ == FrameExit {
					if err := json.Unmarshal(payload, &exit); err != nil {
						t.Fatal(err)
					}
				}
			}
			if last != tt.wantLast {
				t.Errorf("final frame: got %q, want %q", last, tt.wantLast)
			}
			if last == FrameExit && (exit.ExitCode == 0 || !strings.Contains(exit.Error, tt.wantError)) {
				t.Errorf("exit: got %+v, want a failure mentioning %q", exit, tt.wantError)
			}
		})
	}
	if err := ping(sess); err != nil {
		t.Fatalf("after bad requests: %v", err)
	}
}

// fuzzAgent is a Server on a raw yamux session, started on first use.
type fuzzAgent struct {
	sess *yamux.Session
	stop func() error
}

func startFuzzAgent(t testing.TB) (*fuzzAgent, error) {
	h := startServer(t)
	daemonEnd, agentEnd := newPipeConns(t)
	sess, err := yamux.Client(daemonEnd, yamuxConfig())
	if err != nil {
		return nil, errors.Join(err, h.stop())
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- h.srv.Serve(ctx, agentEnd) }()
	stop := func() error {
		sess.Close()
		cancel()
		daemonEnd.Close()
		agentEnd.Close()
		err := <-served
		return errors.Join(err, h.stop())
	}
	return &fuzzAgent{sess: sess, stop: stop}, nil
}

func FuzzServerRequest(f *testing.F) {
	seeds := []struct {
		typ     byte
		payload string
	}{
		{FrameRequest, `{"op":"ping"}`},
		{FrameRequest, `{"op":"exec","exec":{"argv":["echo","hello"]}}`},
		{FrameRequest, `{"op":"exec","exec":{"argv":["false"],"timeout_ms":1}}`},
		{FrameRequest, `{"op":"exec","exec":{"argv":["true"],"stdin":true,"env":["A=1","B"],"cwd":"/"}}`},
		{FrameRequest, `{"op":"exec","exec":{"argv":["echo"],"cwd":"/nonexistent","timeout_ms":-5}}`},
		{FrameRequest, `{"op":"exec","exec":{"argv":["no-such-command"]}}`},
		{FrameRequest, `{"op":"exec","exec":null}`},
		{FrameRequest, `{"op":"exec","exec":{"argv":"echo"}}`},
		{FrameRequest, `{"op":"nope"}`},
		{FrameRequest, `[]`},
		{FrameRequest, ``},
		{FrameRequest, "\xff\xfe"},
		{FrameStdin, `hello`},
		{FrameSignal, `{"signal":9}`},
		{0, ``},
	}
	for _, s := range seeds {
		f.Add(s.typ, []byte(s.payload))
	}
	// Requests may run commands, as root: only harmless ones are on PATH,
	// and commands named by a path are not sent (see below).
	bin := f.TempDir()
	for _, name := range []string{"true", "false", "echo"} {
		p, err := exec.LookPath(name)
		if err != nil {
			f.Fatal(err)
		}
		if err := os.Symlink(p, filepath.Join(bin, name)); err != nil {
			f.Fatal(err)
		}
	}
	f.Setenv("PATH", bin)

	// The Server starts inside the fuzz function, never in the process that
	// coordinates fuzzing: its reaper would reap the fuzzing workers.
	var fa *fuzzAgent
	f.Cleanup(func() {
		if fa != nil {
			if err := fa.stop(); err != nil {
				f.Error(err)
			}
		}
	})
	f.Fuzz(func(t *testing.T, typ byte, payload []byte) {
		if len(payload) > MaxFrame {
			t.Skip()
		}
		var req Request
		if json.Unmarshal(payload, &req) == nil && req.Exec != nil && len(req.Exec.Argv) > 0 && strings.Contains(req.Exec.Argv[0], "/") {
			t.Skip("not running a command named by a path")
		}
		if fa == nil {
			a, err := startFuzzAgent(t)
			if err != nil {
				t.Fatal(err)
			}
			fa = a
		}
		if _, err := roundTrip(fa.sess, typ, payload); err != nil {
			t.Fatalf("request %q %q: %v", typ, payload, err)
		}
		if err := ping(fa.sess); err != nil {
			t.Fatalf("after request %q %q: %v", typ, payload, err)
		}
	})
}
