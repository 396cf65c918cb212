"""sb.files against a real PandaStack server (skipped without PANDASTACK_URL, see test_integration.py).

Creates two sandboxes: one for the file operations, a small-disk one for a full disk.
"""

import hashlib
import io
import os
import threading

import pytest

from pandastack import (ConflictError, FileEvent, InsufficientStorageError, InvalidArgumentError, NotFoundError,
                        Sandbox)

PATIENCE = 600


@pytest.fixture(scope="module", autouse=True)
def server_url():
    url = os.environ.get("PANDASTACK_URL")
    if not url:
        if os.environ.get("PANDASTACK_REQUIRE_SERVER") == "1":
            pytest.fail("PANDASTACK_REQUIRE_SERVER=1 but PANDASTACK_URL is not set", pytrace=False)
        pytest.skip("PANDASTACK_URL is not set: no PandaStack server to test against")
    return url


@pytest.fixture(scope="module")
def sb(server_url):
    s = Sandbox.create(template="base", ttl_seconds=1800, request_timeout=PATIENCE)
    yield s
    try:
        s.kill()
    except NotFoundError:
        pass


def sh(sb, cmd):
    res = sb.exec(cmd, user="root", timeout_seconds=PATIENCE)
    assert res.exit_code == 0, (cmd, res.stdout, res.stderr)
    return res.stdout


def test_write_read_text_and_bytes(sb):
    fi = sb.files.write("/home/user/notes/hello.txt", "héllo\n", parents=True)
    assert (fi.size, fi.owner, fi.type) == (len("héllo\n".encode()), "user", "file")
    assert sb.files.read("/home/user/notes/hello.txt") == "héllo\n"
    blob = bytes(range(256)) * 100
    sb.files.write("/home/user/notes/blob.bin", blob, mode=0o600)
    assert sb.files.read_bytes("/home/user/notes/blob.bin") == blob
    assert sb.files.read_bytes("/home/user/notes/blob.bin", offset=256, length=3) == b"\x00\x01\x02"
    assert sh(sb, "stat -c '%U %a' /home/user/notes /home/user/notes/blob.bin") == "user 755\nuser 600\n"
    sb.files.write("/home/user/notes/root.txt", "r", user="root")
    assert sh(sb, "stat -c %U /home/user/notes/root.txt") == "root\n"


def test_stream_a_file_both_ways(sb, tmp_path):
    src = tmp_path / "src.bin"
    data = os.urandom(20 << 20)
    src.write_bytes(data)
    with open(src, "rb") as f:
        assert sb.files.write("/home/user/big.bin", f).size == len(data)
    assert sh(sb, "sha256sum /home/user/big.bin | cut -d' ' -f1").strip() == hashlib.sha256(data).hexdigest()
    out = io.BytesIO()
    assert sb.files.read_to("/home/user/big.bin", out) == len(data)
    assert out.getvalue() == data


def test_stat_exists_list_mkdir_rename_remove(sb):
    sb.files.make_dir("/home/user/tree/a/b")
    sb.files.write("/home/user/tree/a/f", "f")
    st = sb.files.stat("/home/user/tree/a")
    assert st.is_dir and st.owner == "user"
    assert sb.files.exists("/home/user/tree/a/f") and not sb.files.exists("/home/user/tree/nope")
    with pytest.raises(NotFoundError):
        sb.files.stat("/home/user/tree/nope")
    assert [e.path for e in sb.files.list("/home/user/tree", depth=3)] == [
        "/home/user/tree/a", "/home/user/tree/a/b", "/home/user/tree/a/f"]
    assert sb.files.rename("/home/user/tree/a/f", "/home/user/tree/g").path == "/home/user/tree/g"
    with pytest.raises(ConflictError):
        sb.files.remove("/home/user/tree/a")  # not empty
    sb.files.remove("/home/user/tree", recursive=True)
    assert not sb.files.exists("/home/user/tree")


def test_paths_resolve_inside_with_the_users_rights(sb):
    with pytest.raises(InvalidArgumentError):
        sb.files.read("etc/passwd")
    sb.exec("ln -sf /etc ~/etc-link")
    with pytest.raises(ConflictError):
        sb.files.write("/home/user/etc-link/evil", "x")  # permission denied for "user"
    assert "absent" in sh(sb, "test -e /etc/evil || echo absent")
    with pytest.raises(ConflictError):
        sb.files.read("/etc/shadow")


def test_upload_and_download_a_directory(sb, tmp_path):
    local = tmp_path / "project"
    (local / "pkg").mkdir(parents=True)
    (local / "main.py").write_text("print('hi')\n")
    (local / "pkg" / "data.csv").write_text("a,b\n1,2\n")
    os.symlink("main.py", local / "link")
    res = sb.files.upload_dir(str(local), "/home/user/project")
    assert (res.files, res.dirs, res.symlinks) == (2, 1, 1)
    assert sh(sb, "cat /home/user/project/link; stat -c %U /home/user/project/pkg/data.csv") == "print('hi')\nuser\n"
    back = tmp_path / "back"
    sb.files.download_dir("/home/user/project", str(back))
    assert (back / "pkg" / "data.csv").read_text() == "a,b\n1,2\n"
    assert os.readlink(back / "link") == "main.py"


def test_watch(sb):
    sb.files.make_dir("/home/user/watched/sub")
    seen = []
    done = threading.Event()
    with sb.files.watch("/home/user/watched", recursive=True, timeout=PATIENCE) as w:
        def collect():
            for ev in w:
                seen.append(ev)
                if ev.type == "removed" and ev.path == "/home/user/watched/sub/x":
                    break
            done.set()

        t = threading.Thread(target=collect, daemon=True)
        t.start()
        sb.exec("echo 1 > ~/watched/sub/x; mv ~/watched/sub/x ~/watched/sub/y; mv ~/watched/sub/y ~/watched/sub/x; "
                "rm ~/watched/sub/x")
        assert done.wait(PATIENCE), "events seen: %r" % seen
    types = [(e.type, e.path) for e in seen]
    assert ("created", "/home/user/watched/sub/x") in types
    assert ("written", "/home/user/watched/sub/x") in types
    assert FileEvent("renamed", "/home/user/watched/sub/y", "/home/user/watched/sub/x") in seen
    assert ("removed", "/home/user/watched/sub/x") in types


class _Zeros(io.RawIOBase):
    """n zero bytes, of a size nobody can ask for."""

    def __init__(self, n):
        self.left = n

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def test_full_disk_is_507_and_the_sandbox_lives_on(server_url):
    small = Sandbox.create(template="base", ttl_seconds=600, disk_mb=64, request_timeout=PATIENCE)
    try:
        # Its size said up front: refused before it is sent.
        with pytest.raises(InsufficientStorageError):
            small.files.write("/home/user/big", b"\0" * (100 << 20))
        # A stream of unknown size: the sandbox's full disk stops it.
        with pytest.raises(InsufficientStorageError):
            small.files.write("/home/user/big", _Zeros(100 << 20))
        small.files.write("/home/user/after", "still works")
        assert small.files.read("/home/user/after") == "still works"
        assert small.exec("echo ok").stdout == "ok\n"
    finally:
        small.kill()
