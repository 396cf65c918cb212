"""Unit tests of run_code and the code-context methods against the fake server of test_unit."""

import json

import pytest

from pandastack import (CodeContext, ConflictError, Execution, NotFoundError, PandaStackConnectionError,
                        Result, Sandbox)

from test_unit import API_KEY, FakeServer, isolated_env, last  # noqa: F401 - fixtures


@pytest.fixture
def server():
    s = FakeServer().start()
    yield s
    s.stop()


@pytest.fixture
def sb(server):
    return Sandbox.create(template="code-interpreter", url=server.url, api_key=API_KEY)


EXECUTION = {
    "results": [
        {"text": "<Figure size 400x300 with 1 Axes>", "png": "iVBORw0KGgo=", "is_main_result": False},
        {"text": "   a\n0  1", "html": "<table></table>", "json": {"k": [1]}, "is_main_result": True,
         "extra": {"application/vnd.custom": "x"}},
    ],
    "logs": {"stdout": ["hi\n"], "stderr": []},
    "error": None,
    "execution_count": 3,
    "context": "python",
    "timed_out": False,
    "truncated": False,
    "duration_ms": 12.5,
}


def ndjson(*events):
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


def test_run_code_blocking(server, sb):
    server.canned[("POST", "/v1/sandboxes/%s/code" % sb.id)] = (200, EXECUTION, "application/json")
    exe = sb.run_code("x", context=CodeContext(id="ctx-1"), timeout_seconds=5)
    req = last(server, "POST")
    assert req.json == {"code": "x", "context": "ctx-1", "timeout_seconds": 5}
    assert req.headers["Accept"] == "application/json"
    assert isinstance(exe, Execution)
    assert exe.text == "   a\n0  1"
    assert exe.execution_count == 3 and exe.context == "python" and exe.error is None
    assert exe.logs.stdout == ["hi\n"] and exe.logs.stderr == []
    fig, frame = exe.results
    assert fig.png == "iVBORw0KGgo=" and fig.formats() == ["text", "png"] and not fig.is_main_result
    assert frame.formats() == ["text", "html", "json", "application/vnd.custom"]
    assert frame.json == {"k": [1]} and frame.jpeg is None


def test_run_code_defaults_send_only_code_and_timeout(server, sb):
    server.canned[("POST", "/v1/sandboxes/%s/code" % sb.id)] = (200, EXECUTION, "application/json")
    sb.run_code("1+1")
    assert last(server, "POST").json == {"code": "1+1", "timeout_seconds": 60.0}


def test_run_code_streamed(server, sb):
    err = {"name": "ValueError", "value": "bad", "traceback": "Traceback...\nValueError: bad"}
    events = ndjson(
        {"type": "stdout", "data": "a"},
        {"type": "stderr", "data": "b"},
        {"type": "result", "result": {"text": "1", "is_main_result": True}},
        {"type": "future-event"},
        {"type": "execution_error", "execution_error": err},
        {"type": "end", "execution": {"results": [], "logs": {"stdout": [], "stderr": []}, "error": err,
                                      "execution_count": 4, "context": "python", "timed_out": True}},
    )
    server.canned[("POST", "/v1/sandboxes/%s/code" % sb.id)] = (200, events, "application/x-ndjson")
    seen = []
    exe = sb.run_code("x", on_stdout=lambda s: seen.append(("out", s)), on_stderr=lambda s: seen.append(("err", s)),
                      on_result=lambda r: seen.append(("result", r.text)),
                      on_error=lambda e: seen.append(("error", e.name)))
    assert last(server, "POST").headers["Accept"] == "application/x-ndjson"
    assert seen == [("out", "a"), ("err", "b"), ("result", "1"), ("error", "ValueError")]
    assert exe.logs.stdout == ["a"] and exe.logs.stderr == ["b"]
    assert exe.text == "1" and exe.timed_out and exe.execution_count == 4
    assert exe.error.name == "ValueError" and exe.error.value == "bad" and "ValueError: bad" in exe.error.traceback


def test_run_code_stream_error_event(server, sb):
    events = ndjson({"type": "stdout", "data": "a"},
                    {"type": "error", "error": {"code": "conflict", "message": "it died", "request_id": "r1"}})
    server.canned[("POST", "/v1/sandboxes/%s/code" % sb.id)] = (200, events, "application/x-ndjson")
    with pytest.raises(ConflictError) as e:
        sb.run_code("x", on_stdout=lambda s: None)
    assert "it died" in str(e.value)


def test_run_code_stream_cut_short(server, sb):
    server.canned[("POST", "/v1/sandboxes/%s/code" % sb.id)] = (
        200, ndjson({"type": "stdout", "data": "a"}), "application/x-ndjson")
    with pytest.raises(PandaStackConnectionError):
        sb.run_code("x", on_stdout=lambda s: None)


def test_run_code_http_errors_are_mapped(server, sb):
    server.canned[("POST", "/v1/sandboxes/%s/code" % sb.id)] = (
        409, {"error": {"code": "conflict", "message": "code context \"python\" is dead; restart it"}}, "application/json")
    with pytest.raises(ConflictError):
        sb.run_code("x")


def test_run_code_rejects_bad_types(sb):
    with pytest.raises(TypeError):
        sb.run_code(b"1+1")
    with pytest.raises(TypeError):
        sb.run_code("1", context=3)


def test_code_contexts(server, sb):
    base = "/v1/sandboxes/%s/code/contexts" % sb.id
    ctx = {"id": "ctx-1", "language": "python", "cwd": "/tmp", "user": "root", "state": "idle"}
    server.canned[("POST", base)] = (201, ctx, "application/json")
    c = sb.create_code_context(cwd="/tmp", env={"A": 1}, user="root")
    assert last(server, "POST").json == {"cwd": "/tmp", "env": {"A": "1"}, "user": "root"}
    assert c == CodeContext(id="ctx-1", language="python", cwd="/tmp", user="root", state="idle")

    dead = dict(ctx, id="python", state="dead", error="the kernel died (killed by signal 9)")
    server.canned[("GET", base)] = (200, {"contexts": [dead, ctx]}, "application/json")
    got = sb.list_code_contexts()
    assert [x.id for x in got] == ["python", "ctx-1"] and got[0].error.startswith("the kernel died")

    server.canned[("POST", base + "/ctx%201/restart")] = (200, dict(ctx, id="ctx 1"), "application/json")
    assert sb.restart_code_context("ctx 1").id == "ctx 1"
    server.canned[("POST", base + "/python/restart")] = (200, dict(ctx, id="python"), "application/json")
    assert sb.restart_code_context().id == "python"

    server.canned[("DELETE", base + "/ctx-1")] = (204, b"", "application/json")
    sb.delete_code_context(c)
    server.canned[("DELETE", base + "/gone")] = (
        404, {"error": {"code": "not_found", "message": "code context \"gone\" not found"}}, "application/json")
    with pytest.raises(NotFoundError):
        sb.delete_code_context("gone")


def test_result_repr_and_notebook_hooks():
    r = Result.from_json({"text": "t", "html": "<b>", "png": "p", "is_main_result": True})
    assert repr(r) == "Result(text, html, png, main)"
    assert r._repr_html_() == "<b>" and r._repr_png_() == "p" and r._repr_markdown_() is None
    # Empty strings are absent formats.
    assert Result.from_json({"text": "", "svg": "<svg/>"}).formats() == ["svg"]
