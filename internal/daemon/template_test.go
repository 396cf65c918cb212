package daemon_test

import (
	"archive/tar"
	"bufio"
	"bytes"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/pandastack/pandastack/internal/api"
	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/wire"
)

// contextTar returns a build context archive of the files (name → content;
// names ending in .sh are executable).
func contextTar(t testing.TB, files map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for name, body := range files {
		mode := int64(0o644)
		if strings.HasSuffix(name, ".sh") {
			mode = 0o755
		}
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: mode, Size: int64(len(body)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// buildTemplate posts a build and returns its status, its events (for a
// stream) or its body (for an error answer).
func buildTemplate(t testing.TB, s *daemontest.Server, query string, files map[string]string) (int, []wire.TemplateBuildEvent, []byte) {
	t.Helper()
	resp, body := s.Do(t, "POST", "/v1/templates?"+query, string(contextTar(t, files)), "Content-Type", "application/x-tar")
	if resp.StatusCode != http.StatusOK {
		return resp.StatusCode, nil, body
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/x-ndjson" {
		t.Fatalf("build answered %s, want application/x-ndjson", ct)
	}
	var evs []wire.TemplateBuildEvent
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var e wire.TemplateBuildEvent
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("build event %q: %v", sc.Text(), err)
		}
		evs = append(evs, e)
	}
	return resp.StatusCode, evs, body
}

// lastTemplate returns the build's final template, failing unless it
// succeeded.
func lastTemplate(t testing.TB, evs []wire.TemplateBuildEvent, raw []byte) wire.Template {
	t.Helper()
	if len(evs) == 0 || evs[len(evs)-1].Type != wire.BuildEventTemplate || evs[len(evs)-1].Template == nil {
		t.Fatalf("build did not end with a template:\n%s", raw)
	}
	return *evs[len(evs)-1].Template
}

const appScript = "#!/bin/sh\necho \"made by $1\"\n"

func appDockerfile(cmd string) string {
	return `FROM base
COPY hello.sh /opt/app/hello.sh
RUN /opt/app/hello.sh build > /opt/app/made.txt && mkdir -p /opt/app/data
ENV GREETING=hola APP_MODE="custom template"
WORKDIR /opt/app
CMD ` + cmd + "\n"
}

// TestTemplateBuildEndToEnd builds a Dockerfile through the API (COPY of a
// script, a RUN that makes a file, ENV, WORKDIR, CMD), creates a sandbox
// from it whose commands see the file, the environment and the working
// directory; rebuilds with the last line changed (the earlier steps
// CACHED, the running sandbox undisturbed); checks that another tenant
// cannot see, use or delete it; and that a delete is refused while a
// sandbox uses it and allowed after.
func TestTemplateBuildEndToEnd(t *testing.T) {
	s := daemontest.Start(t, nil)
	files := map[string]string{"Dockerfile": appDockerfile(`["/opt/app/hello.sh", "serve"]`), "hello.sh": appScript}
	status, evs, raw := buildTemplate(t, s, "name=myapp&tag=v1", files)
	if status != http.StatusOK {
		t.Fatalf("build: %d %s", status, raw)
	}
	// Each line of the stream is what the spec says.
	doc := loadSpec(t)
	media := doc.operation(t, "POST", "/v1/templates").Responses["200"].Content["application/x-ndjson"]
	for _, line := range bytes.Split(bytes.TrimSpace(raw), []byte("\n")) {
		var v any
		if err := json.Unmarshal(line, &v); err != nil {
			t.Fatal(err)
		}
		if errs := doc.validate(media.Schema, v, "$"); len(errs) > 0 {
			t.Errorf("build event %s does not match the spec:\n%s", line, strings.Join(errs, "\n"))
		}
	}
	tpl := lastTemplate(t, evs, raw)
	if tpl.Ref != "myapp:v1" || tpl.Builtin || tpl.Hash == "" || tpl.SizeBytes <= 0 || tpl.WorkingDir != "/opt/app" || tpl.Base != "base" {
		t.Fatalf("built template: %+v", tpl)
	}
	steps := 0
	for _, e := range evs {
		if e.Type == wire.BuildEventStep {
			steps++
			if e.Steps != 6 || e.Line == 0 || e.Instruction == "" {
				t.Errorf("step event %+v", e)
			}
		}
	}
	if steps != 6 {
		t.Errorf("%d step events, want 6:\n%s", steps, raw)
	}

	sb := s.Create(t, wire.CreateSandboxRequest{Template: "myapp:v1"})
	if sb.Template != "myapp:v1" {
		t.Errorf("sandbox template %q", sb.Template)
	}
	check := func(id string) {
		t.Helper()
		res := s.Exec(t, id, wire.ExecRequest{Cmd: `pwd; echo "$GREETING|$APP_MODE"; cat made.txt; whoami; test -d data && echo data`})
		want := "/opt/app\nhola|custom template\nmade by build\nuser\ndata\n"
		if res.ExitCode != 0 || res.Stdout != want {
			t.Fatalf("exec in the built template: exit %d stdout %q stderr %q, want %q", res.ExitCode, res.Stdout, res.Stderr, want)
		}
	}
	check(sb.ID)
	// A call's own cwd and env still win.
	res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: `pwd; echo $GREETING`, Cwd: "/tmp", Env: map[string]string{"GREETING": "hi"}})
	if res.Stdout != "/tmp\nhi\n" {
		t.Errorf("exec with cwd and env: %q", res.Stdout)
	}
	// A background process gets the same defaults.
	var p wire.Process
	resp, b := s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/processes", wire.StartProcessRequest{Cmd: `pwd > /tmp/p; echo "$GREETING" >> /tmp/p`})
	if resp.StatusCode != http.StatusCreated || json.Unmarshal(b, &p) != nil {
		t.Fatalf("start process: %d %s", resp.StatusCode, b)
	}
	if resp, b := s.Do(t, "POST", "/v1/sandboxes/"+sb.ID+"/processes/"+strconv.Itoa(p.PID)+"/wait", nil); resp.StatusCode != http.StatusOK {
		t.Fatalf("wait: %d %s", resp.StatusCode, b)
	}
	if res := s.Exec(t, sb.ID, wire.ExecRequest{Cmd: "cat /tmp/p"}); res.Stdout != "/opt/app\nhola\n" {
		t.Errorf("background process saw %q", res.Stdout)
	}

	// The built-in templates are unchanged: home directory, no ENV.
	plain := s.Create(t, wire.CreateSandboxRequest{})
	if res := s.Exec(t, plain.ID, wire.ExecRequest{Cmd: `pwd; echo "[$GREETING]"`}); res.Stdout != "/home/user\n[]\n" {
		t.Errorf("base sandbox: %q", res.Stdout)
	}

	// Rebuild with only the last line changed: COPY and RUN are cached.
	files["Dockerfile"] = appDockerfile(`["/opt/app/hello.sh", "again"]`)
	status, evs, raw = buildTemplate(t, s, "name=myapp:v1", files)
	if status != http.StatusOK {
		t.Fatalf("rebuild: %d %s", status, raw)
	}
	tpl2 := lastTemplate(t, evs, raw)
	cached := map[int]bool{}
	for _, e := range evs {
		if e.Type == wire.BuildEventCached {
			cached[e.Step] = true
		}
		if e.Type == wire.BuildEventOutput {
			t.Errorf("the rebuild ran a step: output %q", e.Text)
		}
	}
	if !cached[2] || !cached[3] || cached[6] {
		t.Errorf("rebuild cached steps %v, want 2 and 3 and not 6:\n%s", cached, raw)
	}
	if tpl2.Hash == tpl.Hash || len(tpl2.Cmd) != 2 || tpl2.Cmd[1] != "again" {
		t.Errorf("rebuilt template: %+v (first hash %s)", tpl2, tpl.Hash)
	}
	// The running sandbox keeps its build; a new one gets the new one.
	check(sb.ID)
	sb2 := s.Create(t, wire.CreateSandboxRequest{Template: "myapp:v1"})
	check(sb2.ID)

	// Another tenant: not found by any route that takes a template name
	// (from the server's own routes, so a new one cannot be forgotten),
	// nor by a create.
	other := s.WithTenant(t, "tenant-b")
	type attempt struct {
		method, path string
		body         any
	}
	attempts := []attempt{{"POST", "/v1/sandboxes", wire.CreateSandboxRequest{Template: "myapp:v1"}}}
	for _, route := range api.New(api.Config{}).Routes() {
		method, pattern, _ := strings.Cut(route, " ")
		if strings.Contains(pattern, "{name}") {
			attempts = append(attempts, attempt{method, strings.Replace(pattern, "{name}", "myapp:v1", 1), nil})
		}
	}
	if len(attempts) < 3 {
		t.Fatalf("expected template routes with {name}, got %v", attempts)
	}
	for _, c := range attempts {
		resp, b := other.Do(t, c.method, c.path, c.body)
		var e wire.ErrorResponse
		if resp.StatusCode != http.StatusNotFound || json.Unmarshal(b, &e) != nil || e.Error.Code != wire.CodeNotFound {
			t.Errorf("other tenant %s %s: %d %s, want 404", c.method, c.path, resp.StatusCode, b)
		}
	}
	var l wire.TemplateList
	if resp, b := other.Do(t, "GET", "/v1/templates", nil); resp.StatusCode != http.StatusOK || json.Unmarshal(b, &l) != nil {
		t.Fatalf("other tenant's list: %d %s", resp.StatusCode, b)
	}
	for _, x := range l.Templates {
		if !x.Builtin {
			t.Errorf("other tenant lists %+v", x)
		}
	}
	if resp, b := s.Do(t, "GET", "/v1/templates", nil); resp.StatusCode != http.StatusOK || json.Unmarshal(b, &l) != nil || !listed(l, "myapp:v1") || !listed(l, "base") {
		t.Fatalf("owner's list: %d %s", resp.StatusCode, b)
	}

	// Delete: refused while sandboxes use it, then allowed.
	resp, b = s.Do(t, "DELETE", "/v1/templates/myapp:v1", nil)
	if resp.StatusCode != http.StatusConflict || !strings.Contains(string(b), sb.ID) {
		t.Fatalf("delete in use: %d %s, want 409 naming %s", resp.StatusCode, b, sb.ID)
	}
	for _, id := range []string{sb.ID, sb2.ID} {
		if resp, b := s.Do(t, "DELETE", "/v1/sandboxes/"+id, nil); resp.StatusCode != http.StatusNoContent {
			t.Fatalf("kill: %d %s", resp.StatusCode, b)
		}
	}
	if resp, b := s.Do(t, "DELETE", "/v1/templates/myapp:v1", nil); resp.StatusCode != http.StatusNoContent {
		t.Fatalf("delete: %d %s, want 204", resp.StatusCode, b)
	}
	if resp, b := s.Do(t, "GET", "/v1/templates/myapp:v1", nil); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("get after delete: %d %s", resp.StatusCode, b)
	}
	if resp, b := s.Do(t, "DELETE", "/v1/templates/base", nil); resp.StatusCode != http.StatusConflict {
		t.Errorf("delete base: %d %s, want 409", resp.StatusCode, b)
	}
}

func listed(l wire.TemplateList, ref string) bool {
	for _, x := range l.Templates {
		if x.Ref == ref {
			return true
		}
	}
	return false
}

// TestTemplateBuildRefusals: bad Dockerfiles and requests get a 400 JSON
// naming the problem (the line for a Dockerfile), a failing step ends the
// stream with an error naming its line, and no error names the server's
// directories.
func TestTemplateBuildRefusals(t *testing.T) {
	s := daemontest.Start(t, nil)
	for _, c := range []struct {
		query string
		files map[string]string
		want  string
	}{
		{"name=bad", map[string]string{"Dockerfile": "FROM base\nRUN true\nHEALTHCHECK CMD true\n"}, "line 3"},
		{"name=bad", map[string]string{"Dockerfile": "FROM base\nCOPY --from=x /a /b\n"}, "line 2"},
		{"name=bad", map[string]string{"Dockerfile": "RUN true\n"}, "line 1"},
		{"name=bad", map[string]string{"other": "x"}, "Dockerfile"},
		{"name=Bad!", map[string]string{"Dockerfile": "FROM base\n"}, "template name"},
		{"", map[string]string{"Dockerfile": "FROM base\n"}, "name is required"},
		{"name=base", map[string]string{"Dockerfile": "FROM base\n"}, "built-in"},
		{"name=bad&dockerfile=../x", map[string]string{"Dockerfile": "FROM base\n"}, "relative path"},
	} {
		status, _, raw := buildTemplate(t, s, c.query, c.files)
		var e wire.ErrorResponse
		if status/100 != 4 || json.Unmarshal(raw, &e) != nil || !strings.Contains(e.Error.Message, c.want) {
			t.Errorf("build %s %v: %d %s, want 4xx naming %q", c.query, c.files, status, raw, c.want)
		}
		if strings.Contains(string(raw), s.DataDir) {
			t.Errorf("error names the data directory: %s", raw)
		}
	}
	// Failures found while building end the stream with an error event.
	for _, c := range []struct {
		df, want string
	}{
		{"FROM base\nRUN echo out; exit 3\n", "line 2"},
		{"FROM base\nCOPY missing.txt /x\n", "line 2"},
		{"FROM base\nCOPY ../escape /x\n", "line 2"},
		{"FROM oci-layout:/etc\n", "line 1: FROM a path on the server"},
		{"FROM docker-archive:/etc/passwd\n", "line 1: FROM a path on the server"},
	} {
		status, evs, raw := buildTemplate(t, s, "name=bad", map[string]string{"Dockerfile": c.df})
		if status != http.StatusOK || len(evs) == 0 {
			t.Fatalf("build %q: %d %s", c.df, status, raw)
		}
		last := evs[len(evs)-1]
		if last.Type != wire.BuildEventError || last.Error == nil || !strings.Contains(last.Error.Message, c.want) {
			t.Errorf("build %q ended with %s, want an error naming %q", c.df, raw, c.want)
		}
		if strings.Contains(string(raw), s.DataDir) || strings.Contains(string(raw), "runsc") {
			t.Errorf("build %q: the stream names the server's files: %s", c.df, raw)
		}
	}
	if resp, b := s.Do(t, "GET", "/v1/templates/bad", nil); resp.StatusCode != http.StatusNotFound {
		t.Errorf("a failed build left a template: %d %s", resp.StatusCode, b)
	}
}
