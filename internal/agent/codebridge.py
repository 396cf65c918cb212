# PandaStack code-context bridge: one live Jupyter kernel, driven by the agent.
#
# The agent (internal/agent/code.go) embeds this file and starts it as the
# context's user with `python3 -I -c <this source>`, in the context's working
# directory and environment. It runs one kernel (ipykernel, started by
# jupyter_client's KernelManager, talking ZeroMQ over Unix sockets in a
# private directory) and speaks JSON lines with the agent:
#
#   requests on fd 3:  {"id": N, "op": "execute", "code": "...", "silent": false}
#                      {"op": "interrupt"}
#   events on fd 4:    {"type": "ready", "kernel_pid": N, "python": "3.11.2"}
#                      {"id": N, "type": "started"}
#                      {"id": N, "type": "stream", "name": "stdout", "text": "..."}
#                      {"id": N, "type": "result", "data": {mime: value}, "main": true}
#                      {"id": N, "type": "error", "ename": "...", "evalue": "...", "traceback": [...]}
#                      {"id": N, "type": "end", "status": "ok", "execution_count": N}
#                      {"type": "dead", "message": "..."}         (then it exits)
#                      {"type": "fatal", "kind": "...", "message": "..."}  (then it exits)
#
# Executions run one at a time, in the order they were asked for. Its own
# stdout and stderr, which the kernel inherits, are a log the agent keeps for
# error messages; nothing on them is part of the protocol. A closed fd 3 (the
# agent ended the context) shuts the kernel down.
import json
import os
import shutil
import signal
import sys
import tempfile
import time

REQ_FD, EV_FD = 3, 4


def emit(ev):
    # ASCII JSON: strings with lone surrogates (undecodable bytes) survive.
    data = (json.dumps(ev, separators=(",", ":")) + "\n").encode("ascii")
    view = memoryview(data)
    while view:
        view = view[os.write(EV_FD, view):]


def fatal(kind, message, code=1):
    try:
        emit({"type": "fatal", "kind": kind, "message": message})
    except OSError:
        pass
    sys.exit(code)


try:
    import zmq
    from jupyter_client import KernelManager
except ImportError as e:
    fatal("missing", "the Jupyter kernel is not installed in this sandbox "
          "(python3-ipykernel and python3-jupyter-client are needed): %s" % e, 3)

# Plain-text tracebacks, and no history database per kernel.
KERNEL_ARGS = ["--HistoryManager.enabled=False", "--InteractiveShell.colors=NoColor"]

# Run silently once the kernel is up: figures come back at the size they
# were made (figsize x dpi), as savefig makes them, not cropped to their
# content.
SETUP = """
def __pandastack_setup():
    try:
        get_ipython().run_line_magic("config", "InlineBackend.print_figure_kwargs = {'bbox_inches': None}")
    except Exception:
        pass
__pandastack_setup()
del __pandastack_setup
"""

START_TIMEOUT = 120.0
# How long an execution that has its reply waits for its last output
# (the iopub "idle" status) before it ends without it.
IDLE_GRACE = 5.0


class Cell:
    def __init__(self, rid, code, silent):
        self.rid = rid
        self.code = code
        self.silent = silent
        self.msg_id = None
        self.idle = False
        self.reply = None
        self.reply_at = 0.0


class Bridge:
    def __init__(self):
        self.rundir = tempfile.mkdtemp(prefix="pandastack-kernel-")
        self.km = KernelManager(kernel_name="python3", transport="ipc",
                                ip=os.path.join(self.rundir, "kernel"))
        self.km.connection_file = os.path.join(self.rundir, "kernel.json")
        self.queue = []
        self.cur = None
        self.inbuf = b""
        self.closed = False

    # ----- kernel ---------------------------------------------------------

    def start(self):
        try:
            self.km.start_kernel(cwd=os.getcwd(), extra_arguments=KERNEL_ARGS)
        except Exception as e:  # noqa: BLE001 - reported to the agent
            fatal("start", "starting the kernel failed: %s: %s" % (type(e).__name__, e))
        self.session = self.km.session
        self.shell = self.km.connect_shell()
        self.iopub = self.km.connect_iopub()
        self.poller = zmq.Poller()
        self.poller.register(REQ_FD, zmq.POLLIN)
        self.poller.register(self.shell, zmq.POLLIN)
        self.poller.register(self.iopub, zmq.POLLIN)
        # SIGCHLD (the kernel died) wakes the loop through a pipe.
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(self.wake_r, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.poller.register(self.wake_r, zmq.POLLIN)
        self.wait_ready(time.monotonic() + START_TIMEOUT)
        self.send_execute(SETUP, silent=True)
        pid = getattr(self.km.provisioner, "pid", None) or 0
        emit({"type": "ready", "kernel_pid": pid, "python": "%d.%d.%d" % sys.version_info[:3]})

    def wait_ready(self, deadline):
        """Waits until the kernel answers on shell and publishes on iopub
        (a subscription misses what is published before it is connected)."""
        poller = zmq.Poller()
        poller.register(self.shell, zmq.POLLIN)
        poller.register(self.iopub, zmq.POLLIN)
        while time.monotonic() < deadline:
            if not self.km.is_alive():
                self.die("the kernel exited while starting")
            msg = self.session.msg("kernel_info_request")
            self.session.send(self.shell, msg)
            replied = published = False
            end = time.monotonic() + 1.0
            while time.monotonic() < end and not (replied and published):
                for sock, _ in self.poll(0.1, poller):
                    if sock is self.shell:
                        for m in self.recv_all(self.shell):
                            replied = replied or m["parent_header"].get("msg_id") == msg["header"]["msg_id"]
                    elif sock is self.iopub:
                        for _ in self.recv_all(self.iopub):
                            published = True
            if replied and published:
                return
        self.die("the kernel did not answer within %d s" % START_TIMEOUT)

    def poll(self, timeout, poller=None):
        try:
            return (poller or self.poller).poll(None if timeout is None else int(timeout * 1000))
        except zmq.ZMQError as e:
            if e.errno == zmq.EINTR:
                return []
            raise

    def recv_all(self, sock):
        while True:
            try:
                _, msg = self.session.recv(sock, mode=zmq.NOBLOCK)
            except zmq.ZMQError as e:
                if e.errno == zmq.EINTR:
                    continue
                raise
            if msg is None:
                return
            yield msg

    def die(self, why):
        code = None
        proc = getattr(self.km.provisioner, "process", None)
        if proc is not None:
            code = proc.poll()
        if code is not None and code < 0:
            why = "%s (killed by signal %d)" % (why, -code)
        elif code is not None:
            why = "%s (exit code %d)" % (why, code)
        emit({"type": "dead", "message": why, "signal": -code if code is not None and code < 0 else 0})
        self.cleanup()
        sys.exit(0)

    def cleanup(self):
        try:
            if self.km.has_kernel:
                self.km.shutdown_kernel(now=True)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        shutil.rmtree(self.rundir, ignore_errors=True)

    # ----- executions -----------------------------------------------------

    def send_execute(self, code, silent):
        content = {"code": code, "silent": silent, "store_history": not silent,
                   "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}
        msg = self.session.msg("execute_request", content)
        self.session.send(self.shell, msg)
        return msg["header"]["msg_id"]

    def next_cell(self):
        if self.cur is not None or not self.queue:
            return
        cell = self.queue.pop(0)
        if not self.km.is_alive():
            self.queue.insert(0, cell)
            self.die("the kernel died")
        cell.msg_id = self.send_execute(cell.code, cell.silent)
        self.cur = cell
        emit({"id": cell.rid, "type": "started"})

    def on_iopub(self, msg):
        cell = self.cur
        if cell is None or msg["parent_header"].get("msg_id") != cell.msg_id:
            return
        t, c = msg["msg_type"], msg["content"]
        if t == "stream":
            emit({"id": cell.rid, "type": "stream", "name": c.get("name", "stdout"), "text": c.get("text", "")})
        elif t in ("execute_result", "display_data", "update_display_data"):
            emit({"id": cell.rid, "type": "result", "data": c.get("data", {}), "main": t == "execute_result"})
        elif t == "error":
            emit({"id": cell.rid, "type": "error", "ename": c.get("ename", ""), "evalue": c.get("evalue", ""),
                  "traceback": c.get("traceback", [])})
        elif t == "status" and c.get("execution_state") == "idle":
            cell.idle = True

    def on_shell(self, msg):
        cell = self.cur
        if cell is None or msg["parent_header"].get("msg_id") != cell.msg_id:
            return
        if msg["msg_type"] == "execute_reply":
            cell.reply = msg["content"]
            cell.reply_at = time.monotonic()

    def finish_cell(self):
        cell = self.cur
        if cell is None or cell.reply is None:
            return
        if not cell.idle and time.monotonic() - cell.reply_at < IDLE_GRACE:
            return
        emit({"id": cell.rid, "type": "end", "status": cell.reply.get("status", "ok"),
              "execution_count": cell.reply.get("execution_count") or 0})
        self.cur = None

    # ----- requests -------------------------------------------------------

    def read_requests(self):
        try:
            chunk = os.read(REQ_FD, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            self.closed = True
            return
        self.inbuf += chunk
        while b"\n" in self.inbuf:
            line, self.inbuf = self.inbuf.split(b"\n", 1)
            if not line.strip():
                continue
            req = json.loads(line)
            op = req.get("op")
            if op == "execute":
                self.queue.append(Cell(req.get("id", 0), req.get("code", ""), bool(req.get("silent"))))
            elif op == "interrupt":
                if self.cur is not None and self.km.is_alive():
                    self.km.interrupt_kernel()

    def run(self):
        while not self.closed:
            self.next_cell()
            # While a cell runs, look at the kernel now and then: a kernel
            # that dies mid-cell sends nothing more.
            timeout = 0.25 if self.cur is not None else None
            if self.cur is not None and self.cur.reply is not None and not self.cur.idle:
                timeout = 0.1
            for sock, _ in self.poll(timeout):
                if sock == REQ_FD:
                    self.read_requests()
                elif sock is self.iopub:
                    for m in self.recv_all(self.iopub):
                        self.on_iopub(m)
                elif sock is self.shell:
                    for m in self.recv_all(self.shell):
                        self.on_shell(m)
                elif sock == self.wake_r:
                    try:
                        os.read(self.wake_r, 512)
                    except BlockingIOError:
                        pass
            self.finish_cell()
            if not self.km.is_alive():
                self.die("the kernel died")
        self.cleanup()


def main():
    bridge = Bridge()
    try:
        bridge.start()
        bridge.run()
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - reported to the agent
        import traceback
        traceback.print_exc()
        try:
            bridge.cleanup()
        finally:
            fatal("internal", "the code context's bridge failed: %s: %s" % (type(e).__name__, e))


main()
