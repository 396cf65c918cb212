package cli

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pandastack/pandastack/internal/daemontest"
	"github.com/pandastack/pandastack/wire"
)

// signalOnText is a stdout that sends the test process SIGINT once what is
// written contains text, so that the signal lands while a build runs.
type signalOnText struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	text string
	once sync.Once
}

func (w *signalOnText) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n, err := w.buf.Write(p)
	if strings.Contains(w.buf.String(), w.text) {
		w.once.Do(func() { syscall.Kill(syscall.Getpid(), syscall.SIGINT) })
	}
	return n, err
}

// TestTemplateCLIRealServer drives `pandastack template` against a real
// server: a build from a directory prints a line per step and the RUN
// output; a rebuild with the last line changed says CACHED for the earlier
// steps; list, get and a sandbox made from it see the build; delete is
// refused while the sandbox runs and allowed after; a bad Dockerfile fails
// naming its line; Ctrl-C cancels a build.
func TestTemplateCLIRealServer(t *testing.T) {
	s := daemontest.Start(t, nil)
	cli := func(args ...string) (string, string, error) {
		t.Helper()
		var out, errOut bytes.Buffer
		root := NewRoot()
		root.SetArgs(append([]string{"--url", s.URL, "--api-key", s.Key}, args...))
		root.SetOut(&out)
		root.SetErr(&errOut)
		err := root.Execute()
		return out.String(), errOut.String(), err
	}
	dir := t.TempDir()
	write := func(name, body string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("greeting.txt", "hello from the context\n")
	dockerfile := func(cmd string) {
		write("Dockerfile", "FROM base\n"+
			"COPY greeting.txt /opt/app/greeting.txt\n"+
			"ARG MODE\n"+
			"RUN echo \"built with $MODE\" | tee /opt/app/built.txt\n"+
			"ENV APP_COLOUR=teal\n"+
			"CMD "+cmd+"\n")
	}
	dockerfile(`["cat", "/opt/app/greeting.txt"]`)
	write("Dockerfile.other", "FROM base\nARG MODE\nRUN echo \"mode $MODE\" > /opt-mode\n")

	out, errOut, err := cli("template", "build", "-t", "cli-app:v1", "--build-arg", "MODE=cli", dir)
	if err != nil {
		t.Fatalf("build: %v\n%s%s", err, out, errOut)
	}
	for _, want := range []string{
		"Step 1/6: FROM base\n",
		"Step 2/6: COPY greeting.txt /opt/app/greeting.txt\n",
		"Step 4/6: RUN echo \"built with $MODE\" | tee /opt/app/built.txt\n",
		"Step 6/6: CMD [\"cat\", \"/opt/app/greeting.txt\"]\n",
		"Built cli-app:v1 (",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("build output lacks %q:\n%s", want, out)
		}
	}
	// The RUN output comes between its step line and the next.
	if !regexp.MustCompile(`(?s)Step 4/6: RUN [^\n]*\n.*built with cli\n.*Step 5/6`).MatchString(out) {
		t.Errorf("RUN output not under its step:\n%s", out)
	}
	if strings.Contains(out, "CACHED") {
		t.Errorf("a first build says CACHED:\n%s", out)
	}

	dockerfile(`["cat", "/opt/app/built.txt"]`)
	out, errOut, err = cli("template", "build", "-t", "cli-app:v1", "--build-arg", "MODE=cli", dir)
	if err != nil {
		t.Fatalf("rebuild: %v\n%s%s", err, out, errOut)
	}
	if !regexp.MustCompile(`(?s)Step 2/6: COPY [^\n]*\n ---> CACHED\nStep 3/6: ARG .*Step 4/6: RUN [^\n]*\n ---> CACHED\n`).MatchString(out) ||
		regexp.MustCompile(`Step 6/6: [^\n]*\n ---> CACHED`).MatchString(out) || strings.Contains(out, "built with cli") {
		t.Errorf("rebuild: want COPY and RUN cached, CMD not:\n%s", out)
	}
	// -f from elsewhere, a build arg, --quiet: only the reference.
	out, errOut, err = cli("template", "build", "-q", "-t", "cli-other", "-f", filepath.Join(dir, "Dockerfile.other"), "--build-arg", "MODE=quiet", dir)
	if err != nil || out != "cli-other:latest\n" {
		t.Errorf("quiet build: %q %q %v", out, errOut, err)
	}

	out, _, err = cli("template", "list")
	if err != nil || !regexp.MustCompile(`(?m)^cli-app:v1\s+base\s+\d`).MatchString(out) || !regexp.MustCompile(`(?m)^base\s+\(built-in\)`).MatchString(out) {
		t.Errorf("list: %v\n%s", err, out)
	}
	out, _, err = cli("template", "list", "--json")
	var l []wire.Template
	if err != nil || json.Unmarshal([]byte(out), &l) != nil || len(l) < 4 {
		t.Errorf("list --json: %v\n%s", err, out)
	}
	out, _, err = cli("template", "get", "cli-app:v1")
	var tpl wire.Template
	if err != nil || json.Unmarshal([]byte(out), &tpl) != nil || tpl.Ref != "cli-app:v1" || len(tpl.Cmd) != 2 || tpl.Cmd[1] != "/opt/app/built.txt" {
		t.Errorf("get: %v\n%s", err, out)
	}

	out, _, err = cli("sandbox", "create", "--template", "cli-app:v1", "--ttl", "600")
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	id := strings.TrimSpace(out)
	out, _, err = cli("sandbox", "exec", id, "--", "sh", "-c", "cat /opt/app/greeting.txt /opt/app/built.txt; echo $APP_COLOUR")
	if err != nil || out != "hello from the context\nbuilt with cli\nteal\n" {
		t.Errorf("exec in the built template: %q %v", out, err)
	}
	_, _, err = cli("template", "delete", "cli-app:v1")
	if err == nil || !strings.Contains(err.Error(), "conflict") || !strings.Contains(err.Error(), id) {
		t.Errorf("delete in use: got %v, want a conflict naming %s", err, id)
	}
	if _, _, err := cli("sandbox", "kill", id); err != nil {
		t.Fatal(err)
	}
	if _, _, err := cli("template", "delete", "cli-app:v1", "cli-other"); err != nil {
		t.Errorf("delete: %v", err)
	}
	if _, _, err := cli("template", "get", "cli-app:v1"); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Errorf("get after delete: %v", err)
	}

	// A bad Dockerfile: an error naming the line, no template.
	write("Dockerfile", "FROM base\nRUN true\nHEALTHCHECK CMD true\n")
	if _, _, err := cli("template", "build", "-t", "cli-bad", dir); err == nil || !strings.Contains(err.Error(), "line 3") {
		t.Errorf("bad Dockerfile: got %v, want an error naming line 3", err)
	}
	// A failing step: the step's line and the error.
	write("Dockerfile", "FROM base\nRUN echo about to fail; exit 7\n")
	out, _, err = cli("template", "build", "-t", "cli-bad", dir)
	if err == nil || !strings.Contains(err.Error(), "line 2") || !strings.Contains(out, "about to fail") {
		t.Errorf("failing step: got %v, want an error naming line 2\n%s", err, out)
	}

	// Ctrl-C during a RUN cancels the build: exit 130, no template.
	write("Dockerfile", "FROM base\nRUN echo started; sleep 600\n")
	w := &signalOnText{text: "started"}
	var errOutBuf bytes.Buffer
	root := NewRoot()
	root.SetArgs([]string{"--url", s.URL, "--api-key", s.Key, "template", "build", "-t", "cli-slow", dir})
	root.SetOut(w)
	root.SetErr(&errOutBuf)
	err = root.Execute()
	var ec ExitCodeError
	if !errors.As(err, &ec) || ec.Code != exitInterrupted || !strings.Contains(errOutBuf.String(), "cancelled") {
		t.Errorf("interrupted build: %v %q", err, errOutBuf.String())
	}
	if _, _, err := cli("template", "get", "cli-slow"); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Errorf("a cancelled build left a template: %v", err)
	}
	waitBuildsCleaned(t, s.DataDir)
}

// waitBuildsCleaned waits until no build has a step directory left on the
// server: a cancelled build's RUN is stopped and cleaned up after the
// client has gone.
func waitBuildsCleaned(t *testing.T, dataDir string) {
	t.Helper()
	work := filepath.Join(dataDir, "build-cache", "work")
	deadline := time.Now().Add(2 * time.Minute)
	for {
		ents, err := os.ReadDir(work)
		if (err == nil && len(ents) == 0) || os.IsNotExist(err) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("step directories left after the builds ended: %v %v", ents, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
