"""Networks and exposed ports against a real PandaStack server.

Skipped unless PANDASTACK_URL is set (see test_integration.py), and skipped
with the reason when the server reports that sandboxes cannot have a network
(``network: false`` in GET /v1/health: serve --network=false, or the host
refused it). No sandbox here gets any egress: they have the network "none"
or allow-lists they never use, so nothing leaves the machine. A server in a
sandbox is reached through the daemon (ingress is not egress).
"""

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar

import pytest

from pandastack import ConflictError, InvalidArgumentError, NotFoundError, Sandbox

# PATIENCE bounds every wait for something that must happen (see test_integration.py).
PATIENCE = 600

# A page served from the sandbox, and a server for it started in the background.
START_SERVER = ("mkdir -p /tmp/www && echo served-from-$(hostname)-port-8000 > /tmp/www/index.html && "
                "cd /tmp/www && nohup python3 -m http.server 8000 >/tmp/www.log 2>&1 &")


@pytest.fixture(scope="module", autouse=True)
def server_url():
    url = os.environ.get("PANDASTACK_URL")
    if not url:
        if os.environ.get("PANDASTACK_REQUIRE_SERVER") == "1":
            pytest.fail("PANDASTACK_REQUIRE_SERVER=1 but PANDASTACK_URL is not set", pytrace=False)
        pytest.skip("PANDASTACK_URL is not set: no PandaStack server to test against")
    with urllib.request.urlopen(url.rstrip("/") + "/v1/health", timeout=60) as resp:
        health = json.loads(resp.read().decode())
    if not health.get("network"):
        pytest.skip("the server at %s has sandbox networking off (GET /v1/health says network: false)" % url)
    return url


def _kill_quietly(sb):
    try:
        sb.kill()
    except NotFoundError:
        pass


@pytest.fixture(scope="module")
def web(server_url):
    """A code-interpreter sandbox with network "none" serving /tmp/www on port 8000."""
    sb = Sandbox.create(template="code-interpreter", ttl_seconds=1800, network="none", request_timeout=PATIENCE)
    try:
        res = sb.exec(START_SERVER, timeout_seconds=60)
        assert res.exit_code == 0, res.stderr
        yield sb
    finally:
        _kill_quietly(sb)


def fetch(url, headers=None, opener=None):
    """GET url with no credentials but ``headers``; (status, body)."""
    req = urllib.request.Request(url, headers=headers or {})
    opener = opener or urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=60) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def wait_for(what, check):
    """Call check() until it returns (True, _) or PATIENCE passes; fail with its last detail."""
    deadline = time.monotonic() + PATIENCE
    detail = None
    while time.monotonic() < deadline:
        ok, detail = check()
        if ok:
            return detail
        time.sleep(0.2)
    pytest.fail("%s: not within %d s; last: %s" % (what, PATIENCE, detail))


def test_get_url_reaches_a_server_in_a_sandbox_without_egress(web):
    assert web.network is not None and web.network.allow == [] and not web.network.internet
    assert web.access_token
    url = web.get_url(8000, "/index.html")
    assert web.access_token in url

    def served():
        status, body = fetch(url)
        return status == 200 and "served-from-" in body, (status, body[:200])

    status, body = wait_for("the server in the sandbox answers through get_url", served)
    assert body.strip().endswith("port-8000")

    bare = web.get_url(8000, "/index.html", with_token=False)
    assert "access_token" not in bare
    assert fetch(bare)[0] == 401
    assert fetch(bare, {"X-Access-Token": "not-the-token"})[0] == 401
    assert fetch(bare, {"X-Access-Token": web.access_token})[0] == 200
    assert fetch(bare, {"Authorization": "Bearer " + web._client.api_key})[0] == 200
    # A port nothing listens on: the daemon answers, it does not hang.
    status, body = fetch(web.get_url(8999))
    assert status == 503, (status, body)


def test_the_token_in_the_url_becomes_a_cookie_for_the_page(web):
    """As a browser: the first request carries the token, the page's next ones only the cookie."""
    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor(jar))
    first = web.get_url(8000, "/")
    wait_for("the page through get_url", lambda: (fetch(first, opener=opener)[0] == 200, None))
    assert [c.name for c in jar] == ["pandastack_access_token"]
    status, body = fetch(web.get_url(8000, "/index.html", with_token=False), opener=opener)
    assert status == 200 and "served-from-" in body


def test_set_network_round_trip_and_public_ports(web):
    rules = {"allow": ["198.51.100.10/32:80", "*.example.com:443"], "deny": ["evil.example.com"]}
    info = web.set_network(rules)
    assert info.allow == rules["allow"] and info.deny == rules["deny"]
    assert not info.internet and not info.public_ports
    token = info.access_token
    assert token and token == web.access_token
    assert web.refresh().network == info

    # Public ports: the URL needs no token, and anyone can use it.
    info = web.set_network(rules, public_ports=True)
    assert info.public_ports and info.access_token == token
    url = web.get_url(8000, "/index.html")
    assert "access_token" not in url
    wait_for("the public port", lambda: (fetch(url)[0] == 200, fetch(url)))

    # Back to none: private again.
    info = web.set_network("none")
    assert info.allow == [] and info.deny == [] and not info.public_ports
    assert fetch(url)[0] == 401
    assert fetch(web.get_url(8000, "/index.html"))[0] == 200


def test_bad_rules_are_refused_with_the_rule_named(web, server_url):
    with pytest.raises(InvalidArgumentError) as e:
        Sandbox.create(network={"allow": ["bad_host!"]}, request_timeout=PATIENCE)
    assert e.value.status == 400 and "bad_host!" in e.value.message
    before = web.refresh().network
    for rule in ("host:99999", "host/tcp"):
        with pytest.raises(InvalidArgumentError) as e:
            web.set_network({"deny": [rule]})
        assert rule in e.value.message
    with pytest.raises(InvalidArgumentError, match="alow"):
        web.set_network({"alow": ["example.com"]})
    assert web.refresh().network == before


def test_a_sandbox_without_network_has_no_ports(server_url):
    sb = Sandbox.create(template="base", ttl_seconds=600, request_timeout=PATIENCE)
    try:
        assert sb.network is None and sb.access_token is None
        with pytest.raises(ConflictError):
            sb.get_url(8000)
        with pytest.raises(ConflictError) as e:
            sb.set_network("none")
        assert e.value.status == 409
    finally:
        _kill_quietly(sb)
