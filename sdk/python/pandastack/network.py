"""A sandbox's network: its egress policy and the URLs of its exposed ports.

A sandbox created without ``network`` has no network at all. With one it
has its own network namespace; the policy says where it may connect:

* ``"none"``: nowhere (loopback only), but its ports can be reached through
  the server (ingress is not egress);
* ``"internet"``: any public address;
* ``{"allow": [...], "deny": [...]}``: rules ``HOST[:PORTS][/PROTO]``, where
  HOST is an IP address, a CIDR prefix, a host name or ``*.`` and a domain,
  PORTS a comma-separated list of ports and ranges (``443``, ``8000-8100``)
  and PROTO ``tcp`` or ``udp``; deny wins over allow.

Whatever the policy, private, link-local (cloud metadata), CGNAT,
unique-local, multicast and reserved addresses, the host and other sandboxes
stay unreachable.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Dict, Mapping, Optional, Union

from ._http import HTTPClient, path_escape
from .errors import ConflictError, ServerError
from .models import NetworkInfo

#: What ``network`` may be: "none", "internet", a mapping with ``allow``,
#: ``deny``, ``internet`` and ``public_ports``, or a :class:`NetworkInfo`.
NetworkSpec = Union[str, Mapping[str, Any], NetworkInfo]

NETWORK_NONE = "none"
NETWORK_INTERNET = "internet"


def network_body(network: Optional[NetworkSpec], public_ports: Optional[bool] = None) -> Any:
    """The API's ``network`` value for an SDK argument (None: no network at all).

    Rules are not checked here: the server does, and its invalid_argument
    error names the rule it could not read.
    """
    if network is None:
        if not public_ports:
            return None
        network = NETWORK_NONE
    if isinstance(network, NetworkInfo):
        body: Dict[str, Any] = network.policy()
    elif isinstance(network, str):
        if network == NETWORK_NONE:
            body = {}
        elif network == NETWORK_INTERNET:
            body = {"internet": True}
        else:
            raise ValueError("network must be %r, %r or a dict with allow and deny, got %r"
                             % (NETWORK_NONE, NETWORK_INTERNET, network))
    elif isinstance(network, Mapping):
        body = {}
        for key, value in network.items():
            if key in ("allow", "deny"):
                if isinstance(value, (str, bytes)) or value is None:
                    raise TypeError("network[%r] must be a list of rules, not %r" % (key, value))
                rules = list(value)
                for r in rules:
                    if not isinstance(r, str):
                        raise TypeError("network[%r] must hold only str rules, got %r" % (key, r))
                body[key] = rules
            else:
                # Unknown keys go to the server, which names them in its error.
                body[str(key)] = value
    else:
        raise TypeError("network must be a str, a dict or a NetworkInfo, not %s" % type(network).__name__)
    if public_ports is not None:
        if public_ports:
            body["public_ports"] = True
        else:
            body.pop("public_ports", None)
    return body


def server_domain(client: HTTPClient) -> str:
    """The server's ports domain (serve --domain), or "" when it has none; asked once per client."""
    cached = getattr(client, "_pandastack_domain", None)
    if cached is not None:
        return cached
    doc = client.call("GET", "/v1/health")
    if not isinstance(doc, dict):
        raise ServerError("GET %s/v1/health: unexpected answer %r" % (client.base_url, doc))
    domain = str(doc.get("domain") or "").strip(".")
    setattr(client, "_pandastack_domain", domain)
    return domain


class NetworkMixin:
    """Network methods of :class:`pandastack.Sandbox` (which provides ``_info``, ``_client``, ``_path``)."""

    _info: Any
    _client: HTTPClient

    def _path(self, suffix: str = "") -> str:  # pragma: no cover - Sandbox's
        raise NotImplementedError

    @property
    def network(self) -> Optional[NetworkInfo]:
        """The sandbox's network as last reported (None: created without one); :meth:`refresh` asks again."""
        return self._info.network

    @property
    def access_token(self) -> Optional[str]:
        """The token that opens the sandbox's ports to whoever has it (None without a network).

        Send it as the ``X-Access-Token`` header or the ``access_token`` query
        parameter; :meth:`get_url` puts it in the URL.
        """
        net = self._info.network
        return net.access_token if net is not None else None

    def set_network(self, network: Optional[NetworkSpec], public_ports: Optional[bool] = None) -> NetworkInfo:
        """Replace the sandbox's network policy; it applies at once.

        ``network`` is "none" (None reads the same here), "internet", or a
        dict with ``allow`` and ``deny`` rules (see :mod:`pandastack.network`).
        New connections follow the new policy and existing connections to
        what it no longer allows are cut. The whole policy is replaced,
        ``public_ports`` included: it is off unless ``public_ports=True`` or
        the dict says so. Only a sandbox created with a network (``network="none"``
        is enough) can have its policy changed; others raise ConflictError.
        Returns the new :attr:`network`.
        """
        body = network_body(NETWORK_NONE if network is None else network, public_ports)
        doc = self._client.call("PUT", self._path("/network"), body)
        from .sandbox import _sandbox_info  # the Sandbox module imports this one
        self._info = _sandbox_info(doc, self._client)
        if self._info.network is None:
            raise ServerError("set network of %s: the answer has no network: %r" % (self._info.id, doc))
        return self._info.network

    def get_url(self, port: int, path: str = "/", with_token: bool = True) -> str:
        """A URL that reaches ``port`` of the sandbox through the server, for a browser or curl.

        When the server has a ports domain (``serve --domain``) it is the
        host-name form ``{scheme}://{port}-{id}.{domain}[:api port]/path``,
        else the path form ``{server}/v1/sandboxes/{id}/ports/{port}/path``.
        Unless the ports are public or ``with_token=False``, it carries the
        sandbox's access token as ``?access_token=``: the server then sets
        an HttpOnly cookie scoped to the port, so the page's own links and
        scripts need no token. Needs a sandbox created with a network
        (``network="none"`` is enough: ingress is not egress).
        """
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ValueError("port must be an int from 1 to 65535, got %r" % (port,))
        net = self._info.network
        if net is None:
            raise ConflictError("sandbox %s was created without a network, so its ports cannot be reached; "
                                "create it with network=\"none\" (or any other policy)" % self._info.id,
                                code="conflict")
        if not path.startswith("/"):
            path = "/" + path
        split = urllib.parse.urlsplit(path)
        query = split.query
        if with_token and net.access_token and not net.public_ports:
            tok = urllib.parse.urlencode({"access_token": net.access_token})
            query = query + "&" + tok if query else tok
        domain = server_domain(self._client)
        base = urllib.parse.urlsplit(self._client.base_url)
        if domain:
            host = "%d-%s.%s" % (port, self._info.id, domain)
            if base.port is not None:
                host += ":%d" % base.port
            return urllib.parse.urlunsplit((base.scheme, host, split.path, query, split.fragment))
        prefix = self._client.base_url + "/v1/sandboxes/" + path_escape(self._info.id) + "/ports/%d" % port
        url = prefix + split.path
        if query:
            url += "?" + query
        if split.fragment:
            url += "#" + split.fragment
        return url
