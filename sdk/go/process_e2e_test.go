package pandastack_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemontest"
	pandastack "github.com/pandastack/pandastack/sdk/go"
	"github.com/pandastack/pandastack/wire"
)

// patience bounds every wait for something that must happen: machines
// differ several-fold in speed, and the tests only assume they get there.
const patience = 5 * time.Minute

// readOutput reads events until the text of stdout and stderr holds want
// and returns that text; an exit or end before it fails the test.
func readOutput(t *testing.T, o *pandastack.OutputStream, want string) string {
	t.Helper()
	var text strings.Builder
	for {
		ev, err := o.Next()
		if err != nil {
			t.Fatalf("output ended before %q (%v); got %q", want, err, text.String())
		}
		text.WriteString(ev.Data)
		if strings.Contains(text.String(), want) {
			return text.String()
		}
		if ev.Type == wire.EventExit || ev.Type == wire.EventEnd {
			t.Fatalf("output ended (%s) before %q; got %q", ev.Type, want, text.String())
		}
	}
}

// eventually polls check until it holds or patience runs out.
func eventually(t *testing.T, what string, check func() bool) {
	t.Helper()
	deadline := time.Now().Add(patience)
	delay := 10 * time.Millisecond
	for !check() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(delay)
		delay = min(2*delay, 500*time.Millisecond)
	}
}

// TestProcessesRealServer runs the SDK's background processes against a
// real server: start, output followed, re-attach from a second client
// after the first left, stdin and its end, signals, wait, timeout, user.
func TestProcessesRealServer(t *testing.T) {
	s := daemontest.Start(t, nil)
	c := s.Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*patience)
	defer cancel()
	sb, err := c.Create(ctx, pandastack.CreateOptions{TTL: 10 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer sb.Close()

	t.Run("reattach", func(t *testing.T) {
		p, err := sb.Start(ctx, "echo before; read a; echo meanwhile:$a; read b; echo last:$b >&2; cat; exit 4",
			pandastack.StartOptions{Stdin: true, Tag: "reattach"})
		if err != nil {
			t.Fatal(err)
		}
		if info := p.Info(); p.PID() <= 0 || p.Tag() != "reattach" || info.State != wire.ProcessRunning || !info.Stdin || info.User != "user" {
			t.Fatalf("started: %+v", info)
		}
		out, err := p.Output(ctx, true)
		if err != nil {
			t.Fatal(err)
		}
		if got := readOutput(t, out, "before\n"); got != "before\n" {
			t.Errorf("first attach: %q", got)
		}
		out.Close()
		// The first client has left: the process goes on, and writes
		// while nobody is attached.
		if err := p.Refresh(ctx); err != nil || p.Info().State != wire.ProcessRunning {
			t.Fatalf("after the first client left: %+v %v", p.Info(), err)
		}
		if err := p.SendStdin(ctx, []byte("x\n")); err != nil {
			t.Fatal(err)
		}
		eventually(t, "the second line", func() bool {
			return p.Refresh(ctx) == nil && p.Info().StdoutBytes >= int64(len("before\nmeanwhile:x\n"))
		})

		// A second client, with connections of its own.
		c2, err := pandastack.NewClient(pandastack.WithURL(s.URL), pandastack.WithAPIKey(s.Key),
			pandastack.WithHTTPClient(&http.Client{Transport: &http.Transport{}}))
		if err != nil {
			t.Fatal(err)
		}
		sb2, err := c2.Connect(ctx, sb.ID())
		if err != nil {
			t.Fatal(err)
		}
		list, err := sb2.Processes().List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, l := range list {
			if l.PID == p.PID() {
				found = l.Tag == "reattach" && l.State == wire.ProcessRunning
			}
		}
		if !found {
			t.Fatalf("list from the second client: %+v", list)
		}
		q, err := sb2.Processes().Connect(ctx, p.PID())
		if err != nil || q.Tag() != "reattach" {
			t.Fatalf("connect: %+v %v", q, err)
		}
		out2, err := q.Output(ctx, true)
		if err != nil {
			t.Fatal(err)
		}
		defer out2.Close()
		if got := readOutput(t, out2, "meanwhile:x\n"); got != "before\nmeanwhile:x\n" {
			t.Errorf("re-attach replayed %q, want what was written before and meanwhile", got)
		}
		// The process reads one more line, then its input to the end.
		if err := q.SendStdin(ctx, []byte("y\n")); err != nil {
			t.Fatal(err)
		}
		if err := q.CloseStdin(ctx); err != nil {
			t.Fatal(err)
		}
		var rest []wire.ProcessEvent
		for {
			ev, err := out2.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			rest = append(rest, ev)
		}
		if n := len(rest); n != 2 || rest[0].Type != wire.EventStderr || rest[0].Data != "last:y\n" ||
			rest[1].Type != wire.EventExit || rest[1].Process == nil || *rest[1].Process.ExitCode != 4 {
			t.Errorf("after the input: %+v", rest)
		}
		if code := q.Info().ExitCode; code == nil || *code != 4 {
			t.Errorf("the exit event did not update the handle: %+v", q.Info())
		}
		if code, err := p.Wait(ctx); err != nil || code != 4 {
			t.Errorf("wait from the first client: %d %v", code, err)
		}
		// An exited process replays its output and ends with its exit.
		out3, err := p.Output(ctx, false)
		if err != nil {
			t.Fatal(err)
		}
		defer out3.Close()
		if got := readOutput(t, out3, "last:y\n"); got != "before\nmeanwhile:x\nlast:y\n" {
			t.Errorf("replay after exit: %q", got)
		}
		if err := p.SendStdin(ctx, []byte("late")); !errors.Is(err, pandastack.ErrConflict) {
			t.Errorf("stdin after exit: %v, want ErrConflict", err)
		}
	})

	t.Run("output without follow", func(t *testing.T) {
		p, err := sb.Start(ctx, "echo up; exec sleep 1000", pandastack.StartOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer p.Kill(ctx)
		eventually(t, "the first line", func() bool { return p.Refresh(ctx) == nil && p.Info().StdoutBytes >= 3 })
		out, err := p.Output(ctx, false)
		if err != nil {
			t.Fatal(err)
		}
		defer out.Close()
		ev, err := out.Next()
		if err != nil || ev.Type != wire.EventStdout || ev.Data != "up\n" {
			t.Fatalf("first event: %+v %v", ev, err)
		}
		ev, err = out.Next()
		if err != nil || ev.Type != wire.EventEnd || ev.Process == nil || ev.Process.State != wire.ProcessRunning {
			t.Fatalf("without follow the last event is end, the process running: %+v %v", ev, err)
		}
		if _, err := out.Next(); !errors.Is(err, io.EOF) {
			t.Errorf("after the end: %v, want io.EOF", err)
		}
	})

	t.Run("signals", func(t *testing.T) {
		p, err := sb.Start(ctx, "trap 'echo got TERM; exit 5' TERM; echo ready; while :; do sleep 1; done", pandastack.StartOptions{})
		if err != nil {
			t.Fatal(err)
		}
		out, err := p.Output(ctx, true)
		if err != nil {
			t.Fatal(err)
		}
		defer out.Close()
		readOutput(t, out, "ready\n")
		if err := p.Signal(ctx, "TERM"); err != nil {
			t.Fatal(err)
		}
		readOutput(t, out, "got TERM\n")
		if code, err := p.Wait(ctx); err != nil || code != 5 {
			t.Errorf("trapped TERM: %d %v, want 5", code, err)
		}

		for _, tc := range []struct {
			sig  string
			want int
		}{{"SIGKILL", 137}, {"usr1", 138}, {"15", 143}} {
			p, err := sb.StartArgv(ctx, []string{"sleep", "1000"}, pandastack.StartOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if tc.sig == "SIGKILL" {
				err = p.Kill(ctx)
			} else {
				err = p.Signal(ctx, tc.sig)
			}
			if err != nil {
				t.Fatal(err)
			}
			if code, err := p.Wait(ctx); err != nil || code != tc.want {
				t.Errorf("%s: exit %d %v, want %d", tc.sig, code, err, tc.want)
			}
		}
		if err := p.Signal(ctx, "NOPE"); !errors.Is(err, pandastack.ErrInvalidArgument) {
			t.Errorf("unknown signal: %v, want ErrInvalidArgument", err)
		}
		if _, err := sb.Processes().Connect(ctx, 999999); !errors.Is(err, pandastack.ErrNotFound) {
			t.Errorf("unknown pid: %v, want ErrNotFound", err)
		}
	})

	t.Run("timeout and user", func(t *testing.T) {
		p, err := sb.Start(ctx, "sleep 1000", pandastack.StartOptions{Timeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if code, err := p.Wait(ctx); err != nil || code != 124 || !p.Info().TimedOut {
			t.Errorf("timeout: %d %v %+v", code, err, p.Info())
		}
		for user, want := range map[string]string{"": "1000\n", "root": "0\n"} {
			p, err := sb.StartArgv(ctx, []string{"id", "-u"}, pandastack.StartOptions{User: user})
			if err != nil {
				t.Fatal(err)
			}
			out, err := p.Output(ctx, true)
			if err != nil {
				t.Fatal(err)
			}
			got := readOutput(t, out, "\n")
			out.Close()
			if got != want {
				t.Errorf("user %q: id -u printed %q, want %q", user, got, want)
			}
		}
	})
}

// screen collects a terminal's output as it comes.
type screen struct {
	mu   sync.Mutex
	buf  strings.Builder
	done chan struct{}
	err  error
}

func newScreen(r io.Reader) *screen {
	s := &screen{done: make(chan struct{})}
	go func() {
		defer close(s.done)
		b := make([]byte, 4096)
		for {
			n, err := r.Read(b)
			s.mu.Lock()
			s.buf.Write(b[:n])
			if err != nil {
				if !errors.Is(err, io.EOF) {
					s.err = err
				}
				s.mu.Unlock()
				return
			}
			s.mu.Unlock()
		}
	}()
	return s
}

func (s *screen) text() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

// waitFor waits until the output after offset from holds want and returns
// the offset just past it.
func (s *screen) waitFor(t *testing.T, from int, want string) int {
	t.Helper()
	var got string
	eventually(t, "the terminal to show "+want, func() bool {
		got = s.text()
		return strings.Contains(got[from:], want)
	})
	return from + strings.Index(got[from:], want) + len(want)
}

// TestTerminalRealServer drives terminals over the WebSocket: a login
// shell (input, resize seen by stty, exit code), a PTY process attached
// later, a signal, the end of input, and the hang-up of a shell whose
// client went away.
func TestTerminalRealServer(t *testing.T) {
	s := daemontest.Start(t, nil)
	c := s.Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*patience)
	defer cancel()
	sb, err := c.Create(ctx, pandastack.CreateOptions{TTL: 10 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer sb.Close()

	t.Run("login shell", func(t *testing.T) {
		term, err := sb.OpenTerminal(ctx, pandastack.TerminalOptions{Cols: 80, Rows: 24})
		if err != nil {
			t.Fatal(err)
		}
		defer term.Close()
		scr := newScreen(term)
		// The shell's own words, not the echo of what was typed.
		if _, err := term.Write([]byte("echo \"$(id -u)-$(pwd)-$TERM\"; stty size\n")); err != nil {
			t.Fatal(err)
		}
		at := scr.waitFor(t, 0, "1000-/home/user-xterm-256color")
		at = scr.waitFor(t, at, "24 80")
		if err := term.Resize(ctx, 132, 43); err != nil {
			t.Fatal(err)
		}
		if _, err := term.Write([]byte("stty size\n")); err != nil {
			t.Fatal(err)
		}
		scr.waitFor(t, at, "43 132")
		if _, err := term.Write([]byte("exit 3\n")); err != nil {
			t.Fatal(err)
		}
		select {
		case <-scr.done:
		case <-ctx.Done():
			t.Fatal("the terminal's output did not end after exit")
		}
		if scr.err != nil {
			t.Errorf("reading the terminal: %v", scr.err)
		}
		if code, err := term.Wait(ctx); err != nil || code != 3 {
			t.Errorf("exit code: %d %v, want 3", code, err)
		}
	})

	t.Run("root", func(t *testing.T) {
		term, err := sb.OpenTerminal(ctx, pandastack.TerminalOptions{User: "root", Cmd: "id -u; exit 0"})
		if err != nil {
			t.Fatal(err)
		}
		defer term.Close()
		out, err := io.ReadAll(term)
		if err != nil || strings.TrimSpace(string(out)) != "0" {
			t.Errorf("root terminal: %q %v", out, err)
		}
		if code, err := term.Wait(ctx); err != nil || code != 0 {
			t.Errorf("exit code: %d %v", code, err)
		}
	})

	t.Run("attach to a pty process", func(t *testing.T) {
		p, err := sb.Start(ctx, "stty size; read x; echo got:$x; exit 2", pandastack.StartOptions{PTY: &wire.PTYSize{Cols: 100, Rows: 30}, Tag: "tty"})
		if err != nil {
			t.Fatal(err)
		}
		if !p.Info().PTY {
			t.Fatalf("not on a pty: %+v", p.Info())
		}
		term, err := p.Terminal(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer term.Close()
		scr := newScreen(term)
		at := scr.waitFor(t, 0, "30 100")
		if _, err := term.Write([]byte("hi\n")); err != nil {
			t.Fatal(err)
		}
		scr.waitFor(t, at, "got:hi")
		<-scr.done
		if code, err := term.Wait(ctx); err != nil || code != 2 {
			t.Errorf("exit code: %d %v, want 2", code, err)
		}
		if code, err := p.Wait(ctx); err != nil || code != 2 {
			t.Errorf("process wait: %d %v, want 2", code, err)
		}
	})

	t.Run("output dropped before the attach", func(t *testing.T) {
		const total = 3 << 20
		p, err := sb.Start(ctx, fmt.Sprintf("head -c %d /dev/zero | tr '\\0' a; echo; echo MARK; read x", total),
			pandastack.StartOptions{PTY: &wire.PTYSize{Cols: 80, Rows: 24}})
		if err != nil {
			t.Fatal(err)
		}
		eventually(t, "the process's output", func() bool { return p.Refresh(ctx) == nil && p.Info().StdoutBytes > total })
		term, err := p.Terminal(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer term.Close()
		var dropped atomic.Int64
		term.OnDropped = func(stream string, n int64) {
			if stream == wire.EventStdout {
				dropped.Add(n)
			}
		}
		scr := newScreen(term)
		scr.waitFor(t, 0, "MARK")
		if _, err := term.Write([]byte("\n")); err != nil {
			t.Fatal(err)
		}
		<-scr.done
		if code, err := term.Wait(ctx); err != nil || code != 0 {
			t.Errorf("exit: %d %v", code, err)
		}
		// What the server no longer held is reported, and with what it
		// replayed makes up all the process wrote.
		if d, kept, all := dropped.Load(), int64(len(scr.text())), p.Info().StdoutBytes; d <= 0 || d+kept < all {
			t.Errorf("dropped %d + replayed %d bytes, the process wrote %d", d, kept, all)
		}
	})

	t.Run("signal and end of input", func(t *testing.T) {
		term, err := sb.OpenTerminal(ctx, pandastack.TerminalOptions{Cmd: "echo ready; exec sleep 1000"})
		if err != nil {
			t.Fatal(err)
		}
		defer term.Close()
		scr := newScreen(term)
		scr.waitFor(t, 0, "ready")
		if err := term.Signal(ctx, "INT"); err != nil {
			t.Fatal(err)
		}
		<-scr.done
		if code, err := term.Wait(ctx); err != nil || code != 130 {
			t.Errorf("SIGINT: exit %d %v, want 130", code, err)
		}

		term2, err := sb.OpenTerminal(ctx, pandastack.TerminalOptions{Cmd: "cat; echo cat-ended:$?"})
		if err != nil {
			t.Fatal(err)
		}
		defer term2.Close()
		scr2 := newScreen(term2)
		if _, err := term2.Write([]byte("abc\n")); err != nil {
			t.Fatal(err)
		}
		at := scr2.waitFor(t, 0, "abc")
		if err := term2.CloseInput(ctx); err != nil {
			t.Fatal(err)
		}
		scr2.waitFor(t, at, "cat-ended:0")
		<-scr2.done
		if code, err := term2.Wait(ctx); err != nil || code != 0 {
			t.Errorf("after ^D: exit %d %v", code, err)
		}
	})

	t.Run("hang-up", func(t *testing.T) {
		term, err := sb.OpenTerminal(ctx, pandastack.TerminalOptions{Cmd: "echo ready; exec sleep 1000"})
		if err != nil {
			t.Fatal(err)
		}
		scr := newScreen(term)
		scr.waitFor(t, 0, "ready")
		var pid int
		list, err := sb.Processes().List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range list {
			if p.State == wire.ProcessRunning && p.PTY && len(p.Argv) > 0 && strings.Contains(strings.Join(p.Argv, " "), "exec sleep 1000") {
				pid = p.PID
			}
		}
		if pid == 0 {
			t.Fatalf("the terminal's process is not listed: %+v", list)
		}
		term.Close()
		// The client went away: its shell gets SIGHUP, as when a
		// terminal closes.
		p, err := sb.Processes().Connect(ctx, pid)
		if err != nil {
			t.Fatal(err)
		}
		if code, err := p.Wait(ctx); err != nil || code != 129 {
			t.Errorf("after the client left: exit %d %v, want 129 (SIGHUP)", code, err)
		}
	})

	t.Run("bad input", func(t *testing.T) {
		if _, err := sb.OpenTerminal(ctx, pandastack.TerminalOptions{Cols: 80}); !errors.Is(err, pandastack.ErrInvalidArgument) {
			t.Errorf("cols without rows: %v, want ErrInvalidArgument", err)
		}
		p, err := sb.Start(ctx, "true", pandastack.StartOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.Wait(ctx); err != nil {
			t.Fatal(err)
		}
		if err := p.Resize(ctx, 80, 24); !errors.Is(err, pandastack.ErrConflict) {
			t.Errorf("resize of an exited process without a terminal: %v, want ErrConflict", err)
		}
	})
}
