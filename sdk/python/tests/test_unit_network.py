"""Unit tests of the network methods (create's network, set_network, get_url, access_token)
against a fake server that follows docs/API.md."""

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request

import pytest

from pandastack import ConflictError, InvalidArgumentError, NetworkInfo, Sandbox

from test_unit import API_KEY, FakeServer, isolated_env, last  # noqa: F401 - fixtures

TOKEN = "tok-secret-1"


class NetFakeServer(FakeServer):
    """FakeServer plus networks: create's ``network``, PUT .../network, the
    ports route (path and host-name forms) and a health that reports a domain."""

    def __init__(self, domain=""):
        super().__init__()
        self.domain = domain
        self.port_hits = []

    @staticmethod
    def check_network(net):
        if net in ("none",):
            return {}, None
        if net == "internet":
            return {"internet": True}, None
        if not isinstance(net, dict):
            return None, "network must be \"none\", \"internet\" or an object with allow and deny, got %r" % (net,)
        for k in net:
            if k not in ("internet", "allow", "deny", "public_ports"):
                return None, "network: json: unknown field %r" % k
        for k in ("allow", "deny"):
            for r in net.get(k) or []:
                if r.startswith("bad.") or "999.0" in r:
                    return None, "network %s: rule %r: not an address, prefix or host name" % (k, r)
        return dict(net), None

    def route(self, h, rec):
        parts = rec.path.split("?")[0].strip("/").split("/")
        if rec.path == "/v1/health":
            doc = {"status": "ok", "version": "test", "runtime": "gvisor", "network": True}
            if self.domain:
                doc["domain"] = self.domain
            return self.send(h, 200, doc)
        host = rec.headers.get("Host", "")
        if self.domain and host.split(":")[0].endswith("." + self.domain):
            label = host.split(":")[0][:-len(self.domain) - 1]
            port, sid = label.split("-", 1)
            return self.serve_port(h, rec, sid, int(port), rec.path)
        if parts[:2] == ["v1", "sandboxes"] and len(parts) >= 5 and parts[3] == "ports":
            rest = "/" + rec.path.split("/ports/" + parts[4], 1)[1].lstrip("/")
            return self.serve_port(h, rec, parts[2], int(parts[4]), rest)
        if rec.headers.get("Authorization") == "Bearer " + self.api_key and parts[:2] == ["v1", "sandboxes"]:
            if len(parts) == 2 and rec.method == "POST" and "network" in (rec.json or {}):
                net, err = self.check_network(rec.json["network"])
                if err:
                    return self.error(h, 400, "invalid_argument", err)
                req = dict(rec.json)
                del req["network"]
                sb = self.new_sandbox(req.get("template", "base"))
                sb["network"] = dict(net, access_token=TOKEN)
                return self.send(h, 201, self.public(sb))
            if len(parts) == 4 and parts[3] == "network" and rec.method == "PUT":
                sb = self.sandboxes.get(parts[2])
                if sb is None:
                    return self.error(h, 404, "not_found", "sandbox %r not found" % parts[2])
                if "network" not in sb:
                    return self.error(h, 409, "conflict", "sandbox %r was created without a network" % parts[2])
                net, err = self.check_network(rec.json)
                if err:
                    return self.error(h, 400, "invalid_argument", err)
                sb["network"] = dict(net, access_token=sb["network"]["access_token"])
                return self.send(h, 200, self.public(sb))
        return super().route(h, rec)

    def serve_port(self, h, rec, sid, port, path):
        sb = self.sandboxes.get(sid)
        if sb is None or "network" not in sb:
            return self.error(h, 404, "not_found", "sandbox %r not found" % sid)
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        ok = (rec.headers.get("Authorization") == "Bearer " + self.api_key
              or rec.headers.get("X-Access-Token") == TOKEN
              or q.get("access_token") == [TOKEN]
              or sb["network"].get("public_ports"))
        if not ok:
            return self.error(h, 401, "unauthenticated", "the sandbox's ports need its access token or an API key")
        self.port_hits.append((sid, port, path))
        return self.send(h, 200, b"served by port %d" % port, "text/plain")


@pytest.fixture
def server():
    s = NetFakeServer().start()
    yield s
    s.stop()


@pytest.fixture
def kw(server):
    return {"url": server.url, "api_key": API_KEY}


def fetch(url, host=None):
    """GET url without credentials; (status, body). host overrides the Host header (and the address)."""
    if host is not None:
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection("127.0.0.1", u.port, timeout=10)
        conn.request("GET", urllib.parse.urlunsplit(("", "", u.path, u.query, "")), headers={"Host": host})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        return resp.status, body.decode()
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ----- create -------------------------------------------------------------------

@pytest.mark.parametrize("network,sent", [
    ("internet", {"internet": True}),
    ("none", {}),
    ({"allow": ["10.1.2.3/32", "*.pypi.org:443"], "deny": ("pypi.org",)},
     {"allow": ["10.1.2.3/32", "*.pypi.org:443"], "deny": ["pypi.org"]}),
    (NetworkInfo(allow=["198.51.100.10:80/tcp"], access_token="ignored"), {"allow": ["198.51.100.10:80/tcp"]}),
])
def test_create_sends_the_network(server, kw, network, sent):
    sb = Sandbox.create(network=network, **kw)
    assert last(server, "POST").json["network"] == sent
    assert sb.network is not None
    assert sb.access_token == TOKEN
    assert sb.network.internet == sent.get("internet", False)
    assert sb.network.allow == sent.get("allow", [])


def test_create_without_network_sends_none(server, kw):
    sb = Sandbox.create(**kw)
    assert "network" not in last(server, "POST").json
    assert sb.network is None and sb.access_token is None


def test_create_public_ports(server, kw):
    sb = Sandbox.create(network="internet", public_ports=True, **kw)
    assert last(server, "POST").json["network"] == {"internet": True, "public_ports": True}
    assert sb.network.public_ports
    # public_ports alone asks for a network with no egress.
    Sandbox.create(public_ports=True, **kw)
    assert last(server, "POST").json["network"] == {"public_ports": True}


def test_bad_network_arguments_fail_before_sending(server, kw):
    with pytest.raises(ValueError, match="internet"):
        Sandbox.create(network="everything", **kw)
    with pytest.raises(TypeError, match="list of rules"):
        Sandbox.create(network={"allow": "10.0.0.0/8"}, **kw)
    with pytest.raises(TypeError, match="only str"):
        Sandbox.create(network={"allow": [3]}, **kw)
    with pytest.raises(TypeError):
        Sandbox.create(network=42, **kw)
    assert not [r for r in server.requests if r.method == "POST"]


def test_bad_rule_is_the_servers_invalid_argument(server, kw):
    with pytest.raises(InvalidArgumentError) as e:
        Sandbox.create(network={"allow": ["bad..host"]}, **kw)
    assert e.value.status == 400 and "bad..host" in e.value.message
    with pytest.raises(InvalidArgumentError, match="unknown field"):
        Sandbox.create(network={"alow": ["x.com"]}, **kw)


# ----- set_network ----------------------------------------------------------------

def test_set_network_round_trip(server, kw):
    sb = Sandbox.create(network="none", **kw)
    info = sb.set_network({"allow": ["*.example.com:443"], "deny": ["evil.example.com"]})
    req = last(server, "PUT")
    assert req.path == "/v1/sandboxes/%s/network" % sb.id
    assert req.json == {"allow": ["*.example.com:443"], "deny": ["evil.example.com"]}
    assert req.headers["Authorization"] == "Bearer " + API_KEY
    assert info.allow == ["*.example.com:443"] and info.deny == ["evil.example.com"]
    assert sb.network == info and sb.access_token == TOKEN
    sb.set_network("internet", public_ports=True)
    assert last(server, "PUT").json == {"internet": True, "public_ports": True}
    assert sb.network.internet and sb.network.public_ports
    sb.set_network(None)
    assert last(server, "PUT").json == {}
    assert not sb.network.internet and not sb.network.public_ports and sb.network.allow == []
    # refresh reads the network too.
    assert sb.refresh().network == sb.network


def test_set_network_errors(server, kw):
    sb = Sandbox.create(network="none", **kw)
    with pytest.raises(InvalidArgumentError, match="999.0.0.1"):
        sb.set_network({"allow": ["999.0.0.1"]})
    assert sb.network.allow == []  # unchanged
    plain = Sandbox.create(**kw)
    with pytest.raises(ConflictError, match="without a network"):
        plain.set_network("internet")


# ----- get_url --------------------------------------------------------------------

def test_get_url_path_form_carries_the_token(server, kw):
    sb = Sandbox.create(network="none", **kw)
    url = sb.get_url(8000)
    assert url == "%s/v1/sandboxes/%s/ports/8000/?access_token=%s" % (server.url, sb.id, TOKEN)
    assert fetch(url) == (200, "served by port 8000")
    assert server.port_hits[-1][:2] == (sb.id, 8000)
    deep = sb.get_url(3000, "app/index.html?x=1#top")
    assert deep == "%s/v1/sandboxes/%s/ports/3000/app/index.html?x=1&access_token=%s#top" % (server.url, sb.id, TOKEN)
    assert fetch(deep)[0] == 200
    assert server.port_hits[-1] == (sb.id, 3000, "/app/index.html?x=1&access_token=" + TOKEN)
    bare = sb.get_url(8000, with_token=False)
    assert "access_token" not in bare
    assert fetch(bare)[0] == 401


def test_get_url_public_ports_has_no_token(server, kw):
    sb = Sandbox.create(network="none", public_ports=True, **kw)
    url = sb.get_url(8000)
    assert "access_token" not in url
    assert fetch(url) == (200, "served by port 8000")


def test_get_url_host_form_with_a_domain(kw):
    s = NetFakeServer(domain="sandbox.test").start()
    try:
        kw = dict(kw, url=s.url)
        sb = Sandbox.create(network="none", **kw)
        port = urllib.parse.urlsplit(s.url).port
        url = sb.get_url(8000, "/index.html")
        assert url == "http://8000-%s.sandbox.test:%d/index.html?access_token=%s" % (sb.id, port, TOKEN)
        host = urllib.parse.urlsplit(url).netloc
        assert fetch(url, host=host) == (200, "served by port 8000")
        assert s.port_hits[-1] == (sb.id, 8000, "/index.html?access_token=" + TOKEN)
        # The domain is asked for once per client.
        sb.get_url(8001)
        assert len([r for r in s.requests if r.path == "/v1/health"]) == 1
    finally:
        s.stop()


def test_get_url_https_default_port_is_left_out(kw, server):
    sb = Sandbox.create(network="none", **kw)
    sb._client.base_url = "https://api.example.com"
    setattr(sb._client, "_pandastack_domain", "sbx.example.com")
    assert sb.get_url(443) == "https://443-%s.sbx.example.com/?access_token=%s" % (sb.id, TOKEN)


def test_get_url_needs_a_network_and_a_port(server, kw):
    sb = Sandbox.create(**kw)
    with pytest.raises(ConflictError, match='network="none"'):
        sb.get_url(8000)
    net = Sandbox.create(network="none", **kw)
    for bad in (0, 65536, "80", True):
        with pytest.raises(ValueError):
            net.get_url(bad)


def test_network_info_from_json():
    info = NetworkInfo.from_json({"internet": True, "allow": ["a.com"], "access_token": "t", "future": 1})
    assert info == NetworkInfo(internet=True, allow=["a.com"], deny=[], public_ports=False, access_token="t")
    assert info.policy() == {"internet": True, "allow": ["a.com"]}
    assert json.dumps(NetworkInfo().policy()) == "{}"
