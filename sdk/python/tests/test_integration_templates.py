"""Templates against a real PandaStack server: build from a directory, a sandbox from the build,
a rebuild with the last line changed reusing the earlier steps, list/get/delete, failures.

Skipped unless PANDASTACK_URL is set (PANDASTACK_API_KEY, or the server's key file, gives the
key). With PANDASTACK_REQUIRE_SERVER=1 a missing PANDASTACK_URL fails them instead. Every
sandbox and template a test makes is killed or deleted at its end.
"""

import os
import subprocess
import sys
import uuid

import pytest

from pandastack import (BuildError, ConflictError, InvalidArgumentError, NotFoundError, Sandbox, Template)

PATIENCE = 180  # seconds any request may take; machines differ several-fold in speed


@pytest.fixture(scope="module", autouse=True)
def server_url():
    url = os.environ.get("PANDASTACK_URL")
    if not url:
        if os.environ.get("PANDASTACK_REQUIRE_SERVER") == "1":
            pytest.fail("PANDASTACK_REQUIRE_SERVER=1 but PANDASTACK_URL is not set", pytrace=False)
        pytest.skip("PANDASTACK_URL is not set: no PandaStack server to test against")
    return url


def dockerfile(cmd):
    return ("FROM base\n"
            "COPY app/ /opt/app/\n"
            "ARG FLAVOUR=plain\n"
            "RUN echo \"flavour $FLAVOUR\" | tee /opt/app/built.txt\n"
            "ENV APP_MODE=py WORKDIR_NOTE=yes\n"
            "WORKDIR /opt/app\n"
            "CMD " + cmd + "\n")


def test_build_use_rebuild_delete(tmp_path):
    name = "py-" + uuid.uuid4().hex[:8]
    ctx = tmp_path / "ctx"
    (ctx / "app").mkdir(parents=True)
    (ctx / "app" / "hello.txt").write_text("hello from python\n")
    (ctx / "app" / "big.tmp").write_text("ignored\n")
    (ctx / ".dockerignore").write_text("**/*.tmp\n")
    (ctx / "Dockerfile").write_text(dockerfile('["cat", "hello.txt"]'))

    events = []
    # The flavour is new to the server's build cache (another run's RUN is cached there).
    flavour = "mint-" + name
    t = Template.build(name, str(ctx), tag="v1", build_args={"FLAVOUR": flavour}, on_log=events.append)
    try:
        assert t.ref == name + ":v1" and not t.builtin and t.hash and t.base == "base"
        assert t.working_dir == "/opt/app" and t.cmd == ["cat", "hello.txt"]
        steps = [e for e in events if e.type == "step"]
        assert [e.step for e in steps] == list(range(1, 8)) and all(e.steps == 7 for e in steps)
        assert steps[3].instruction.startswith("RUN ") and steps[3].line == 4
        assert "flavour " + flavour in "".join(e.text for e in events if e.type == "output")
        assert events[-1].type == "template" and events[-1].template == t

        sb = Sandbox.create(template=t.ref, ttl_seconds=600, request_timeout=PATIENCE)
        try:
            r = sb.exec("pwd; cat hello.txt built.txt; echo $APP_MODE; ls", timeout_seconds=PATIENCE)
            assert r.exit_code == 0, r
            assert r.stdout.startswith("/opt/app\nhello from python\nflavour %s\npy\n" % flavour)
            assert "big.tmp" not in r.stdout

            # Only the last line changed: COPY and RUN come from the cache.
            (ctx / "Dockerfile").write_text(dockerfile('["cat", "built.txt"]'))
            events.clear()
            t2 = Template.build(name, str(ctx), tag="v1", build_args={"FLAVOUR": flavour}, on_log=events.append)
            cached = {e.step for e in events if e.type == "cached"}
            assert {2, 4} <= cached and 7 not in cached, events
            assert not [e for e in events if e.type == "output"]
            assert t2.hash != t.hash and t2.cmd == ["cat", "built.txt"]

            assert t.ref in [x.ref for x in Template.list()]
            assert "base" in [x.ref for x in Template.list() if x.builtin]
            assert Template.get(t.ref).hash == t2.hash
            with pytest.raises(ConflictError) as e:
                Template.delete(t.ref)
            assert sb.id in str(e.value)
        finally:
            try:
                sb.kill()
            except NotFoundError:
                pass
        Template.delete(t.ref)
        with pytest.raises(NotFoundError):
            Template.get(t.ref)
    finally:
        try:
            Template.delete(t.ref)
        except NotFoundError:
            pass


def test_build_failures(tmp_path):
    name = "py-bad-" + uuid.uuid4().hex[:8]
    (tmp_path / "Dockerfile").write_text("FROM base\nRUN true\nHEALTHCHECK CMD true\n")
    with pytest.raises(InvalidArgumentError) as e:
        Template.build(name, str(tmp_path))
    assert "line 3" in str(e.value)

    (tmp_path / "Dockerfile").write_text("FROM base\nRUN echo failing; exit 3\n")
    out = []
    with pytest.raises(BuildError) as e:
        Template.build(name, str(tmp_path), on_log=lambda ev: out.append(ev.text))
    assert e.value.step == 2 and "line 2" in str(e.value)
    assert "failing" in "".join(out)
    with pytest.raises(NotFoundError):
        Template.get(name)


def test_readme_example(tmp_path):
    """The README's template example, verbatim, with the Dockerfile its comment shows."""
    readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "README.md")
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    block = text.split("Your own templates", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "Template.build" in block
    dockerfile = [line.split(":", 1)[1].strip() if "Dockerfile:" in line else line.lstrip("# ").strip()
                  for line in block.splitlines() if line.startswith("#")]
    app = tmp_path / "myapp"
    app.mkdir()
    os.chmod(str(tmp_path), 0o755)  # COPY keeps modes: pytest's 0700 would hide the files from the user
    os.chmod(str(app), 0o755)
    (app / "Dockerfile").write_text("\n".join(dockerfile) + "\n")
    # New content: no earlier run's COPY is reused from the server's cache.
    (app / "main.py").write_text("print(%r)\n" % uuid.uuid4().hex)
    env = dict(os.environ)
    sdk_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = sdk_dir + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-c", block], env=env, cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=PATIENCE)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        out = proc.stdout.decode()
        assert "step FROM code-interpreter" in out and "template" in out, out
        assert out.rstrip().endswith("Dockerfile\nmain.py"), out
    finally:
        try:
            Template.delete("myapp:v1")
        except NotFoundError:
            pass
