package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/errdefs"
	"github.com/pandastack/pandastack/internal/sandbox"
	"github.com/pandastack/pandastack/wire"
)

// patience bounds every wait in these tests. It is generous: the tests
// never assume how fast the machine is, only that it gets there.
const patience = 60 * time.Second

// logRecorder is a slog.Handler that keeps every record and lets a test
// wait for one.
type logRecorder struct {
	mu      sync.Mutex
	recs    []logRecord
	changed chan struct{}
}

type logRecord struct {
	level slog.Level
	msg   string
	attrs map[string]string
}

func newLogRecorder() *logRecorder { return &logRecorder{changed: make(chan struct{})} }

func (l *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecorder) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *logRecorder) WithGroup(string) slog.Handler            { return l }

func (l *logRecorder) Handle(_ context.Context, r slog.Record) error {
	rec := logRecord{level: r.Level, msg: r.Message, attrs: map[string]string{}}
	r.Attrs(func(a slog.Attr) bool {
		rec.attrs[a.Key] = a.Value.String()
		return true
	})
	l.mu.Lock()
	defer l.mu.Unlock()
	l.recs = append(l.recs, rec)
	close(l.changed)
	l.changed = make(chan struct{})
	return nil
}

// records returns the records kept so far.
func (l *logRecorder) records() []logRecord {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]logRecord(nil), l.recs...)
}

// wait returns the first record with the message msg, waiting for it.
func (l *logRecorder) wait(t *testing.T, msg string) logRecord {
	t.Helper()
	deadline := time.After(patience)
	for {
		l.mu.Lock()
		for _, r := range l.recs {
			if r.msg == msg {
				l.mu.Unlock()
				return r
			}
		}
		ch := l.changed
		l.mu.Unlock()
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("no log record %q after %s; have %+v", msg, patience, l.records())
		}
	}
}

// errSandboxes is fakeSandboxes whose Create and Exec fail with what
// fail returns for the call's context.
type errSandboxes struct {
	fakeSandboxes
	fail func(ctx context.Context) error
}

func (f *errSandboxes) Create(ctx context.Context, _ string, _ wire.CreateSandboxRequest) (wire.Sandbox, error) {
	return wire.Sandbox{}, f.fail(ctx)
}

func (f *errSandboxes) Exec(ctx context.Context, _, _ string, _ wire.ExecRequest, _ sandbox.Output) (wire.ExecResult, error) {
	return wire.ExecResult{}, f.fail(ctx)
}

var requestIDPattern = regexp.MustCompile(`^[0-9a-f]{16}$`)

// TestErrorsDoNotLeak checks that error bodies carry the public message and
// the request id, never the internal cause, and that the log has the cause.
func TestErrorsDoNotLeak(t *testing.T) {
	cause := errors.New(`runsc create: exit status 128: "/var/lib/pandastack/runtime/sandboxes/sb-1/log": database is locked`)
	secrets := []string{"/var/lib/pandastack", "runsc", "database is locked", "exit status"}
	tests := []struct {
		name       string
		err        error
		wantStatus int
		wantCode   string
		wantMsg    string
	}{
		{"wrapped cause", errdefs.Wrap(errdefs.ErrUnavailable, cause, "sandbox failed to start"), 503, wire.CodeUnavailable, "sandbox failed to start"},
		{"wrapped cause in fmt", fmt.Errorf("creating %s: %w", "/var/lib/pandastack/x", errdefs.Wrap(errdefs.ErrUnavailable, cause, "sandbox failed to start")), 503, wire.CodeUnavailable, "sandbox failed to start"},
		{"no kind", fmt.Errorf("starting sandbox: %w", cause), 500, wire.CodeInternal, "internal error"},
		{"kind without a public message", fmt.Errorf("%w: %w", errdefs.ErrUnavailable, cause), 503, wire.CodeUnavailable, "unavailable"},
		{"disk full", errdefs.Wrap(errdefs.ErrInsufficientStorage, cause, "not enough disk space for the sandbox"), 507, wire.CodeInsufficientStorage, "not enough disk space for the sandbox"},
		{"timeout", errdefs.Wrap(errdefs.ErrTimeout, cause, "the sandbox did not start in time"), 504, wire.CodeTimeout, "the sandbox did not start in time"},
		{"server deadline", fmt.Errorf("%v: %w", cause, context.DeadlineExceeded), 504, wire.CodeTimeout, "timed out"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			logs := newLogRecorder()
			s := newTestServerWith(func(c *Config) {
				c.Sandboxes = &errSandboxes{fail: func(context.Context) error { return tt.err }}
				c.Log = slog.New(logs)
			})
			srv := httptest.NewServer(s)
			defer srv.Close()
			req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v1/sandboxes", strings.NewReader(`{}`))
			req.Header.Set("Authorization", "Bearer "+testKey)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.wantStatus {
				t.Fatalf("status: got %d, want %d (body %s)", resp.StatusCode, tt.wantStatus, body)
			}
			for _, secret := range secrets {
				if strings.Contains(string(body), secret) {
					t.Errorf("body %s holds %q", body, secret)
				}
			}
			e := checkErrorBody(t, resp.StatusCode, body)
			id := resp.Header.Get("X-Request-Id")
			if !requestIDPattern.MatchString(id) {
				t.Errorf("X-Request-Id: got %q, want 16 hex digits", id)
			}
			if want := (wire.Error{Code: tt.wantCode, Message: tt.wantMsg, RequestID: id}); e != want {
				t.Errorf("error: got %+v, want %+v", e, want)
			}
			rec := logs.wait(t, "request failed")
			if rec.level != slog.LevelError {
				t.Errorf("log level: got %v, want %v", rec.level, slog.LevelError)
			}
			want := map[string]string{"request_id": id, "method": "POST", "path": "/v1/sandboxes", "tenant": testTenant, "err": tt.err.Error()}
			for k, v := range want {
				if rec.attrs[k] != v {
					t.Errorf("log attribute %s: got %q, want %q", k, rec.attrs[k], v)
				}
			}
		})
	}
}

// TestRequestIDs checks that every answer, success or error, has its own id.
func TestRequestIDs(t *testing.T) {
	srv := httptest.NewServer(newTestServer())
	defer srv.Close()
	seen := map[string]bool{}
	for _, path := range []string{"/v1/health", "/v1/health", "/v1/sandboxes", "/v1/nope"} {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		id := resp.Header.Get("X-Request-Id")
		if !requestIDPattern.MatchString(id) {
			t.Errorf("GET %s: X-Request-Id %q, want 16 hex digits", path, id)
		}
		if seen[id] {
			t.Errorf("GET %s: X-Request-Id %q used twice", path, id)
		}
		seen[id] = true
		if resp.StatusCode >= 400 {
			if e := checkErrorBody(t, resp.StatusCode, body); e.RequestID != id {
				t.Errorf("GET %s: request_id %q, want the header's %q", path, e.RequestID, id)
			}
		}
	}
}

func TestPanicIsInternal(t *testing.T) {
	logs := newLogRecorder()
	s := newTestServerWith(func(c *Config) {
		c.Sandboxes = &errSandboxes{fail: func(context.Context) error { panic("nil map in /var/lib/pandastack/x") }}
		c.Log = slog.New(logs)
	})
	r := httptest.NewRequest(http.MethodPost, "/v1/sandboxes", strings.NewReader(`{}`))
	r.Header.Set("Authorization", "Bearer "+testKey)
	w := httptest.NewRecorder()
	s.ServeHTTP(w, r)
	if w.Code != http.StatusInternalServerError {
		t.Fatalf("status: got %d, want %d", w.Code, http.StatusInternalServerError)
	}
	e := checkErrorBody(t, w.Code, w.Body.Bytes())
	if want := (wire.Error{Code: wire.CodeInternal, Message: "internal error", RequestID: w.Header().Get("X-Request-Id")}); e != want {
		t.Errorf("error: got %+v, want %+v", e, want)
	}
	if rec := logs.wait(t, "request failed"); !strings.Contains(rec.attrs["err"], "nil map in /var/lib/pandastack/x") {
		t.Errorf("log err %q lacks the panic", rec.attrs["err"])
	}
}

// TestClientWentAway checks that a failure of a request whose client hung
// up is no server error, and that a deadline of the server's own is.
func TestClientWentAway(t *testing.T) {
	tests := []struct {
		name       string
		cancel     bool // the client has hung up
		err        func(ctx context.Context) error
		wantStatus int
		wantLog    string // message of the one log record at Info or above; "" for none
		wantLevel  slog.Level
	}{
		{
			name: "hung up, error from the cancellation", cancel: true,
			err: func(ctx context.Context) error {
				return errdefs.Wrap(errdefs.ErrUnavailable, ctx.Err(), "agent stream closed")
			},
			wantStatus: StatusClientClosedRequest, wantLog: "client went away", wantLevel: slog.LevelInfo,
		},
		{
			name: "hung up, plain context error", cancel: true,
			err:        func(ctx context.Context) error { return fmt.Errorf("exec: %w", ctx.Err()) },
			wantStatus: StatusClientClosedRequest, wantLog: "client went away", wantLevel: slog.LevelInfo,
		},
		{
			name: "hung up, a client error stays one", cancel: true,
			err:        func(context.Context) error { return errdefs.NotFound("no such sandbox") },
			wantStatus: http.StatusNotFound,
		},
		{
			name:       "server deadline is not a cancellation",
			err:        func(context.Context) error { return fmt.Errorf("waiting for the agent: %w", context.DeadlineExceeded) },
			wantStatus: http.StatusGatewayTimeout, wantLog: "request failed", wantLevel: slog.LevelError,
		},
		{
			name: "server deadline after a hang-up", cancel: true,
			err:        func(context.Context) error { return context.DeadlineExceeded },
			wantStatus: StatusClientClosedRequest, wantLog: "client went away", wantLevel: slog.LevelInfo,
		},
		{
			name:       "internal error without a hang-up",
			err:        func(context.Context) error { return errors.New("boom") },
			wantStatus: http.StatusInternalServerError, wantLog: "request failed", wantLevel: slog.LevelError,
		},
	}
	for _, tt := range tests {
		for _, accept := range []string{"", "application/x-ndjson"} {
			t.Run(tt.name+" "+accept, func(t *testing.T) {
				logs := newLogRecorder()
				s := newTestServerWith(func(c *Config) {
					c.Sandboxes = &errSandboxes{fail: tt.err}
					c.Log = slog.New(logs)
				})
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				if tt.cancel {
					cancel()
				}
				r := httptest.NewRequestWithContext(ctx, http.MethodPost, "/v1/sandboxes/"+knownID+"/exec", strings.NewReader(`{"cmd":"x"}`))
				r.Header.Set("Authorization", "Bearer "+testKey)
				if accept != "" {
					r.Header.Set("Accept", accept)
				}
				w := httptest.NewRecorder()
				s.ServeHTTP(w, r)
				if w.Code != tt.wantStatus {
					t.Errorf("status: got %d, want %d (body %q)", w.Code, tt.wantStatus, w.Body)
				}
				var got []logRecord
				for _, rec := range logs.records() {
					if rec.level >= slog.LevelInfo {
						got = append(got, rec)
					}
				}
				switch {
				case tt.wantLog == "" && len(got) > 0:
					t.Errorf("logged %+v, want nothing", got)
				case tt.wantLog != "" && (len(got) != 1 || got[0].msg != tt.wantLog || got[0].level != tt.wantLevel):
					t.Errorf("logged %+v, want one %v %q", got, tt.wantLevel, tt.wantLog)
				}
			})
		}
	}
}

// blockingSandboxes is fakeSandboxes whose Exec announces itself on
// entered, then waits until release is closed or its context ends.
type blockingSandboxes struct {
	fakeSandboxes
	entered chan struct{}
	release chan struct{}
}

func (f *blockingSandboxes) Exec(ctx context.Context, tenant, id string, req wire.ExecRequest, out sandbox.Output) (wire.ExecResult, error) {
	f.entered <- struct{}{}
	select {
	case <-f.release:
		return f.fakeSandboxes.Exec(ctx, tenant, id, req, out)
	case <-ctx.Done():
		return wire.ExecResult{}, errdefs.Wrap(errdefs.ErrUnavailable, ctx.Err(), "exec ended")
	}
}

// TestClientWentAwayOverHTTP hangs up a real client in the middle of an
// exec.
func TestClientWentAwayOverHTTP(t *testing.T) {
	logs := newLogRecorder()
	fake := &blockingSandboxes{entered: make(chan struct{}, 1), release: make(chan struct{})}
	srv := httptest.NewServer(newTestServerWith(func(c *Config) {
		c.Sandboxes = fake
		c.Log = slog.New(logs)
	}))
	defer srv.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+"/v1/sandboxes/"+knownID+"/exec", strings.NewReader(`{"cmd":"sleep"}`))
	req.Header.Set("Authorization", "Bearer "+testKey)
	done := make(chan error, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		done <- err
	}()
	<-fake.entered
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("client: got %v, want %v", err, context.Canceled)
	}
	rec := logs.wait(t, "client went away")
	if rec.level != slog.LevelInfo || !strings.Contains(rec.attrs["err"], "context canceled") {
		t.Errorf("log: got %+v, want Info with the cause", rec)
	}
	srv.Close() // waits for the handler
	for _, r := range logs.records() {
		if r.level >= slog.LevelWarn {
			t.Errorf("logged %+v, want nothing above Info", r)
		}
	}
}

// rawRequest sends raw bytes on a new connection and returns the
// connection and a reader of it.
func rawRequest(t *testing.T, addr, raw string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.SetDeadline(time.Now().Add(patience)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	return c, bufio.NewReader(c)
}

func readResponse(t *testing.T, br *bufio.Reader) (*http.Response, []byte) {
	t.Helper()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading the answer: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the answer's body: %v", err)
	}
	resp.Body.Close()
	return resp, body
}

// TestRawBodies sends bodies with both framings: an empty chunked body is
// as empty as Content-Length: 0, and only a JSON object is a request.
func TestRawBodies(t *testing.T) {
	fake := &fakeSandboxes{}
	srv := httptest.NewServer(newTestServerWith(func(c *Config) { c.Sandboxes = fake }))
	defer srv.Close()
	chunked := func(body string) string {
		if body == "" {
			return "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
		}
		return fmt.Sprintf("Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n", len(body), body)
	}
	length := func(body string) string {
		return fmt.Sprintf("Content-Length: %d\r\n\r\n%s", len(body), body)
	}
	tests := []struct {
		name       string
		path       string
		framing    func(string) string
		body       string
		wantStatus int
		wantInMsg  string
	}{
		{name: "create, Content-Length 0", path: "/v1/sandboxes", framing: length, body: "", wantStatus: 201},
		{name: "create, empty chunked", path: "/v1/sandboxes", framing: chunked, body: "", wantStatus: 201},
		{name: "create, chunked object", path: "/v1/sandboxes", framing: chunked, body: `{"template":"base"}`, wantStatus: 201},
		{name: "fork, empty chunked", path: "/v1/sandboxes/" + knownID + "/fork", framing: chunked, body: "", wantStatus: 201},
		{name: "timeout, empty chunked", path: "/v1/sandboxes/" + knownID + "/timeout", framing: chunked, body: "", wantStatus: 400, wantInMsg: "empty"},
		{name: "timeout, Content-Length 0", path: "/v1/sandboxes/" + knownID + "/timeout", framing: length, body: "", wantStatus: 400, wantInMsg: "empty"},
		{name: "create, null", path: "/v1/sandboxes", framing: length, body: "null", wantStatus: 400, wantInMsg: "JSON object, not null"},
		{name: "create, chunked null", path: "/v1/sandboxes", framing: chunked, body: "null", wantStatus: 400, wantInMsg: "JSON object, not null"},
		{name: "create, array", path: "/v1/sandboxes", framing: length, body: "[]", wantStatus: 400, wantInMsg: "JSON object, not an array"},
		{name: "exec, null", path: "/v1/sandboxes/" + knownID + "/exec", framing: length, body: "null", wantStatus: 400, wantInMsg: "JSON object, not null"},
		{name: "fork, chunked string", path: "/v1/sandboxes/" + knownID + "/fork", framing: chunked, body: `"x"`, wantStatus: 400, wantInMsg: "JSON object, not a string"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fake.mu.Lock()
			before := fake.created
			fake.mu.Unlock()
			raw := "POST " + tt.path + " HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + testKey + "\r\n" + tt.framing(tt.body)
			_, br := rawRequest(t, srv.Listener.Addr().String(), raw)
			resp, body := readResponse(t, br)
			if resp.StatusCode != tt.wantStatus {
				t.Fatalf("status: got %d, want %d (body %s)", resp.StatusCode, tt.wantStatus, body)
			}
			if tt.wantStatus >= 400 {
				if e := checkErrorBody(t, resp.StatusCode, body); !strings.Contains(e.Message, tt.wantInMsg) {
					t.Errorf("message %q does not contain %q", e.Message, tt.wantInMsg)
				}
				fake.mu.Lock()
				after := fake.created
				fake.mu.Unlock()
				if after != before {
					t.Errorf("a rejected request created a sandbox")
				}
			}
		})
	}
}

// TestSlowBodiesAreCut holds or trickles request bodies on raw connections:
// the server must answer and close the connection in bounded time, not
// wait for the body.
func TestSlowBodiesAreCut(t *testing.T) {
	s := newTestServerWith(func(c *Config) {
		// Short so that the test is quick on a quick machine; the test
		// itself waits up to patience.
		c.BodyReadTimeout = 300 * time.Millisecond
	})
	s.drainGrace = 300 * time.Millisecond
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close) // after the parallel subtests
	auth := "Authorization: Bearer " + testKey + "\r\n"
	tests := []struct {
		name       string
		head       string // request line and headers, without the blank line
		first      string // body bytes sent at once
		trickle    bool   // then one byte at a time, for ever
		wantStatus int
	}{
		{name: "401 withheld body", head: "POST /v1/sandboxes HTTP/1.1\r\nContent-Length: 1000\r\n", wantStatus: 401},
		{name: "401 trickled body", head: "POST /v1/sandboxes HTTP/1.1\r\nContent-Length: 1000\r\n", first: "{", trickle: true, wantStatus: 401},
		{name: "401 trickled chunked body", head: "POST /v1/sandboxes/" + knownID + "/exec HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", first: "1000\r\n{", trickle: true, wantStatus: 401},
		{name: "401 wrong key", head: "POST /v1/sandboxes HTTP/1.1\r\nAuthorization: Bearer nope\r\nContent-Length: 1000\r\n", wantStatus: 401},
		{name: "404 unknown route", head: "POST /v1/nope HTTP/1.1\r\n" + auth + "Content-Length: 1000\r\n", wantStatus: 404},
		{name: "404 wrong method", head: "PUT /v1/sandboxes HTTP/1.1\r\nContent-Length: 1000\r\n", first: "{", trickle: true, wantStatus: 404},
		{name: "413 body over the limit", head: "POST /v1/sandboxes HTTP/1.1\r\n" + auth + "Content-Length: 100000\r\n", first: `{"template":"` + strings.Repeat("x", 5000), wantStatus: 413},
		{name: "400 bad JSON before the end", head: "POST /v1/sandboxes HTTP/1.1\r\n" + auth + "Content-Length: 1000\r\n", first: `{"template": x`, trickle: true, wantStatus: 400},
		{name: "400 body withheld", head: "POST /v1/sandboxes/" + knownID + "/exec HTTP/1.1\r\n" + auth + "Content-Length: 100\r\n", first: `{"cmd":`, wantStatus: 400},
		{name: "400 body trickled", head: "POST /v1/sandboxes/" + knownID + "/exec HTTP/1.1\r\n" + auth + "Content-Length: 4000\r\n", first: `{"cmd":"`, trickle: true, wantStatus: 400},
		{name: "400 chunked body trickled", head: "POST /v1/sandboxes HTTP/1.1\r\n" + auth + "Transfer-Encoding: chunked\r\n", first: "1000\r\n{\"template\":\"", trickle: true, wantStatus: 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c, br := rawRequest(t, srv.Listener.Addr().String(), tt.head+"Host: x\r\n\r\n"+tt.first)
			if tt.trickle {
				stop := make(chan struct{})
				defer close(stop)
				go func() {
					tick := time.NewTicker(20 * time.Millisecond)
					defer tick.Stop()
					for {
						select {
						case <-stop:
							return
						case <-tick.C:
						}
						if _, err := c.Write([]byte("x")); err != nil {
							return
						}
					}
				}()
			}
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Fatalf("no answer within %s", patience)
				}
				// The connection was reset under a trickle: closed all the
				// same, though the answer was lost.
				t.Logf("reading the answer: %v", err)
				return
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.wantStatus {
				t.Errorf("status: got %d, want %d (body %s)", resp.StatusCode, tt.wantStatus, body)
			}
			if !resp.Close {
				t.Errorf("answer without Connection: close (headers %v)", resp.Header)
			}
			// The server must now close the connection.
			_, err = io.Copy(io.Discard, br)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("connection still open after %s", patience)
			}
		})
	}
}

// TestKeepAliveAfterReadBody checks that answers to requests whose body was
// read keep the connection, errors included.
func TestKeepAliveAfterReadBody(t *testing.T) {
	srv := httptest.NewServer(newTestServer())
	defer srv.Close()
	body := `{"ttl_seconds":5}`
	req := "POST /v1/sandboxes/" + knownID + "/timeout HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + testKey + "\r\n" +
		fmt.Sprintf("Content-Length: %d\r\n\r\n%s", len(body), body)
	bad := `{"ttl_seconds":-5}`
	badReq := "POST /v1/sandboxes/" + knownID + "/timeout HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + testKey + "\r\n" +
		fmt.Sprintf("Content-Length: %d\r\n\r\n%s", len(bad), bad)
	c, br := rawRequest(t, srv.Listener.Addr().String(), req)
	for i, want := range []int{200, 400, 200} {
		if i > 0 {
			next := req
			if want == 400 {
				next = badReq
			}
			if _, err := io.WriteString(c, next); err != nil {
				t.Fatalf("request %d: %v", i, err)
			}
		}
		resp, b := readResponse(t, br)
		if resp.StatusCode != want || resp.Close {
			t.Fatalf("request %d: got %d (close %v), want %d on a kept connection (body %s)", i, resp.StatusCode, resp.Close, want, b)
		}
	}
}

// TestExecConcurrencyCap checks that execs beyond MaxConcurrentExecs are
// refused before they start, and that finished ones free their places.
func TestExecConcurrencyCap(t *testing.T) {
	fake := &blockingSandboxes{entered: make(chan struct{}, 10), release: make(chan struct{})}
	s := newTestServerWith(func(c *Config) {
		c.Sandboxes = fake
		c.MaxConcurrentExecs = 2
	})
	exec := func(accept string) *httptest.ResponseRecorder {
		r := httptest.NewRequest(http.MethodPost, "/v1/sandboxes/"+knownID+"/exec", strings.NewReader(`{"cmd":"x"}`))
		r.Header.Set("Authorization", "Bearer "+testKey)
		if accept != "" {
			r.Header.Set("Accept", accept)
		}
		w := httptest.NewRecorder()
		s.ServeHTTP(w, r)
		return w
	}
	var wg sync.WaitGroup
	codes := make([]int, 2)
	for i, accept := range []string{"", "application/x-ndjson"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			codes[i] = exec(accept).Code
		}()
	}
	<-fake.entered
	<-fake.entered
	for _, accept := range []string{"", "application/x-ndjson", "text/event-stream"} {
		w := exec(accept)
		if w.Code != http.StatusTooManyRequests {
			t.Fatalf("exec past the cap (%q): got %d, want %d (body %q)", accept, w.Code, http.StatusTooManyRequests, w.Body)
		}
		if e := checkErrorBody(t, w.Code, w.Body.Bytes()); e.Code != wire.CodeQuota || !strings.Contains(e.Message, "at most 2 commands") {
			t.Errorf("exec past the cap: got %+v, want %s naming the cap", e, wire.CodeQuota)
		}
	}
	if n := len(fake.entered); n != 0 {
		t.Errorf("%d refused execs reached the sandbox, want 0", n)
	}
	close(fake.release)
	wg.Wait()
	for i, code := range codes {
		if code != http.StatusOK {
			t.Errorf("exec %d under the cap: got %d, want 200", i, code)
		}
	}
	if w := exec(""); w.Code != http.StatusOK {
		t.Errorf("exec after the others ended: got %d, want 200 (body %q)", w.Code, w.Body)
	}
}

// floodSandboxes is fakeSandboxes whose Exec writes size bytes to each of
// stdout and stderr in small pieces; then, if barrier is set, it waits
// until all of barrier's execs have written theirs (so that their buffers
// are all held at once).
type floodSandboxes struct {
	fakeSandboxes
	size    int
	barrier *barrier
}

type barrier struct {
	mu   sync.Mutex
	left int
	all  chan struct{}
}

func (b *barrier) arrive() error {
	b.mu.Lock()
	b.left--
	if b.left == 0 {
		close(b.all)
	}
	b.mu.Unlock()
	select {
	case <-b.all:
		return nil
	case <-time.After(patience):
		return errors.New("the other execs never came")
	}
}

func (f *floodSandboxes) Exec(_ context.Context, _, _ string, _ wire.ExecRequest, out sandbox.Output) (wire.ExecResult, error) {
	piece := []byte(strings.Repeat("y", 4<<10))
	for n := 0; n < f.size; n += len(piece) {
		for _, stream := range []string{wire.EventStdout, wire.EventStderr} {
			if err := out(stream, piece); err != nil {
				return wire.ExecResult{}, err
			}
		}
	}
	if f.barrier != nil {
		if err := f.barrier.arrive(); err != nil {
			return wire.ExecResult{}, err
		}
	}
	return wire.ExecResult{}, nil
}

// TestBlockingExecOutputBudget runs blocking execs that together print far
// more than MaxBufferedOutputBytes: what they hold never exceeds it, they
// report truncated, and the budget is whole again afterwards.
func TestBlockingExecOutputBudget(t *testing.T) {
	const (
		budget  = 256 << 10
		perExec = 128 << 10 // MaxOutputBytes: per stream
		execs   = 8
	)
	fake := &floodSandboxes{size: 512 << 10, barrier: &barrier{left: execs, all: make(chan struct{})}}
	s := newTestServerWith(func(c *Config) {
		c.Sandboxes = fake
		c.MaxOutputBytes = perExec
		c.MaxBufferedOutputBytes = budget
	})
	var wg sync.WaitGroup
	results := make([]*httptest.ResponseRecorder, execs)
	for i := range execs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := httptest.NewRequest(http.MethodPost, "/v1/sandboxes/"+knownID+"/exec", strings.NewReader(`{"cmd":"flood"}`))
			r.Header.Set("Authorization", "Bearer "+testKey)
			results[i] = httptest.NewRecorder()
			s.ServeHTTP(results[i], r)
		}()
	}
	wg.Wait()
	total := 0
	for i, w := range results {
		if w.Code != http.StatusOK {
			t.Fatalf("exec %d: got %d, want 200 (body %.200s)", i, w.Code, w.Body)
		}
		var res wire.ExecResult
		if err := json.Unmarshal(w.Body.Bytes(), &res); err != nil {
			t.Fatal(err)
		}
		if !res.Truncated {
			t.Errorf("exec %d: truncated: got %v, want %v", i, res.Truncated, true)
		}
		total += len(res.Stdout) + len(res.Stderr)
	}
	used, peak := s.output.stats()
	if peak > budget {
		t.Errorf("reserved at most: got %d, want <= %d", peak, budget)
	}
	if total > budget {
		t.Errorf("output held by the execs together: got %d, want <= %d", total, budget)
	}
	if total == 0 {
		t.Errorf("output held by the execs together: got 0, want some")
	}
	if used != 0 {
		t.Errorf("reserved after the execs: got %d, want 0", used)
	}
}

// TestStreamedExecIgnoresOutputBudget checks that with the budget too small
// for a blocking exec's output, a streamed exec still gets all of it.
func TestStreamedExecIgnoresOutputBudget(t *testing.T) {
	const size = 64 << 10
	s := newTestServerWith(func(c *Config) {
		c.Sandboxes = &floodSandboxes{size: size}
		c.MaxOutputBytes = 1 << 20
		c.MaxBufferedOutputBytes = 1000
	})
	do := func(accept string) *httptest.ResponseRecorder {
		r := httptest.NewRequest(http.MethodPost, "/v1/sandboxes/"+knownID+"/exec", strings.NewReader(`{"cmd":"flood"}`))
		r.Header.Set("Authorization", "Bearer "+testKey)
		r.Header.Set("Accept", accept)
		w := httptest.NewRecorder()
		s.ServeHTTP(w, r)
		return w
	}
	w := do("application/json")
	var res wire.ExecResult
	if err := json.Unmarshal(w.Body.Bytes(), &res); err != nil {
		t.Fatal(err)
	}
	if n := len(res.Stdout) + len(res.Stderr); !res.Truncated || n > 1000 {
		t.Errorf("blocking: got %d bytes, truncated %v; want at most 1000, truncated", n, res.Truncated)
	}
	w = do("application/x-ndjson")
	got := map[string]int{}
	var last wire.ExecEvent
	sc := bufio.NewScanner(w.Body)
	for sc.Scan() {
		if err := json.Unmarshal(sc.Bytes(), &last); err != nil {
			t.Fatal(err)
		}
		got[last.Type] += len(last.Data)
	}
	if got[wire.EventStdout] != size || got[wire.EventStderr] != size {
		t.Errorf("streamed: got %d and %d bytes, want %d each", got[wire.EventStdout], got[wire.EventStderr], size)
	}
	if last.Type != wire.EventExit || last.Result.Truncated {
		t.Errorf("streamed: last event %+v, want an exit that is not truncated", last)
	}
	if used, _ := s.output.stats(); used != 0 {
		t.Errorf("reserved after the execs: got %d, want 0", used)
	}
}
