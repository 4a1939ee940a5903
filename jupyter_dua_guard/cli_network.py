"""``jupyter dua-guard proxy`` and ``jupyter dua-guard rules``: the network layers.

``proxy`` runs the egress proxy as a service (for a whole hub); ``rules`` prints block
rules for DNS servers, forward proxies, firewalls and Kubernetes from the same AI
endpoint catalogue, so an admin can make the proxy the only way out.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import sys
from collections.abc import Callable, Iterable

from jupyter_core.application import JupyterApp
from traitlets import Bool, Enum, Int, Unicode

from ._version import __version__
from .config import DUAGuard
from .policy import PolicyError, load_endpoint_catalogue

FORMATS = ("hosts", "dnsmasq", "unbound", "rpz", "squid", "nftables", "cilium")
STALE_WARNING = (
    "addresses resolved at {when}; AI services change addresses often, so these sets go "
    "stale: regenerate them regularly, and prefer DNS or proxy rules"
)


def catalogue_hosts(extra: Iterable[str] = ()) -> list[str]:
    """Host patterns of the AI endpoint catalogue plus the site's blocked_hosts (sorted)."""
    hosts = {e["host"].lower().rstrip(".") for e in load_endpoint_catalogue()["endpoints"]}
    hosts.update(h.lower().rstrip(".") for h in extra)
    return sorted(hosts)


def _domain(pattern: str) -> tuple[str, bool]:
    """(domain, covers sub-domains) for a pattern; '*' inside a label is widened."""
    if pattern.startswith("*."):
        return pattern[2:], True
    if "*" in pattern:
        labels = pattern.split(".")
        while labels and "*" in labels[0]:
            labels.pop(0)
        return ".".join(labels), True
    return pattern, False


def _names(hosts: Iterable[str]) -> list[tuple[str, bool]]:
    out = []
    for h in hosts:
        try:
            ipaddress.ip_network(h, strict=False)
            continue  # addresses only go to address-based formats
        except ValueError:
            pass
        d, sub = _domain(h)
        if d and "." in d:
            out.append((d, sub))
    return sorted(set(out))


def _addresses(hosts: Iterable[str]) -> list[str]:
    out = []
    for h in hosts:
        with contextlib.suppress(ValueError):
            out.append(str(ipaddress.ip_network(h, strict=False)))
    return out


def render(
    fmt: str,
    hosts: list[str],
    resolver: Callable[[str], list[str]] | None = None,
    when: str = "",
) -> str:
    """Rules text in format ``fmt``; ``resolver`` (host -> addresses) only for nftables."""
    names = _names(hosts)
    header = "jupyter-dua-guard: AI services refused under NCCR DUA sec. 22"
    lines: list[str] = []
    if fmt == "hosts":
        lines.append(f"# {header} (hosts files cannot match sub-domains: use DNS rules)")
        lines += [f"0.0.0.0 {d}" for d, _ in names]
    elif fmt == "dnsmasq":
        lines.append(f"# {header}")
        lines += [f"address=/{d}/" for d, _ in names]  # covers sub-domains, answers NXDOMAIN
    elif fmt == "unbound":
        lines += [f"# {header}", "server:"]
        # a local-zone covers the name and every sub-domain
        lines += [f'  local-zone: "{d}." always_nxdomain' for d, _ in names]
    elif fmt == "rpz":
        lines += [
            f"; {header}",
            "$TTL 300",
            "@ SOA localhost. root.localhost. 1 3600 600 86400 300",
            "@ NS localhost.",
        ]
        for d, sub in names:
            lines.append(f"{d} CNAME .")
            if sub:
                lines.append(f"*.{d} CNAME .")
    elif fmt == "squid":
        lines.append(f"# {header}")
        for d, sub in names:
            lines.append(f"acl dua_guard_ai dstdomain {'.' if sub else ''}{d}")
        lines += ["http_access deny dua_guard_ai", "deny_info ERR_ACCESS_DENIED dua_guard_ai"]
    elif fmt == "nftables":
        v4, v6 = [], []
        for a in _addresses(hosts):
            (v6 if ":" in a else v4).append(a)
        if resolver is not None:
            for d, _ in names:
                for a in resolver(d):
                    (v6 if ":" in a else v4).append(a)
        lines += [f"# {header}", "# WARNING: " + STALE_WARNING.format(when=when or "generation")]
        lines += ["table inet dua_guard {"]
        for fam, addrs in (("ipv4_addr", v4), ("ipv6_addr", v6)):
            name = "ai4" if fam == "ipv4_addr" else "ai6"
            elems = ", ".join(sorted(set(addrs)))
            lines.append(f"  set {name} {{ type {fam}; flags interval;")
            if elems:
                lines.append(f"    elements = {{ {elems} }}")
            lines.append("  }")
        lines += [
            "  chain output { type filter hook output priority 0;",
            "    ip daddr @ai4 reject",
            "    ip6 daddr @ai6 reject",
            "  }",
            "}",
        ]
    elif fmt == "cilium":
        policy = {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "dua-guard-deny-ai-services"},
            "spec": {
                "description": header,
                "endpointSelector": {"matchLabels": {"component": "singleuser-server"}},
                "egressDeny": [
                    {
                        "toFQDNs": [
                            ({"matchPattern": f"*.{d}"} if sub else {"matchName": d})
                            for d, sub in names
                        ]
                        + [{"matchName": d} for d, sub in names if sub]
                    }
                ],
                "egress": [
                    {
                        "toEndpoints": [{"matchLabels": {"k8s-app": "kube-dns"}}],
                        "toPorts": [
                            {
                                "ports": [{"port": "53", "protocol": "ANY"}],
                                "rules": {"dns": [{"matchPattern": "*"}]},
                            }
                        ],
                    }
                ],
            },
        }
        return json.dumps(policy, indent=1) + "\n"
    else:
        raise ValueError(f"unknown rules format {fmt!r}: use one of {', '.join(FORMATS)}")
    return "\n".join(lines) + "\n"


def system_resolver(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, 443, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return sorted({i[4][0] for i in infos})


class RulesApp(JupyterApp):
    """Print network block rules for the AI endpoint catalogue."""

    name = "jupyter-dua-guard-rules"
    version = __version__
    description = (
        "Print block rules for the catalogued AI services: --format hosts|dnsmasq|unbound|rpz|"
        "squid|nftables|cilium. nftables resolves host names now (use --no-resolve to skip)."
    )
    config_file_name = "jupyter_server_config"
    classes = [DUAGuard]
    format = Enum(list(FORMATS), default_value="dnsmasq", help="Rules format.").tag(config=True)
    resolve = Bool(True, help="Resolve host names for nftables.").tag(config=True)
    aliases = {"format": "RulesApp.format"}
    flags = {"no-resolve": ({"RulesApp": {"resolve": False}}, "Do not resolve host names.")}
    resolver: Callable[[str], list[str]] | None = None

    def start(self) -> None:
        import datetime

        g = DUAGuard(parent=self)
        resolver = (self.resolver or system_resolver) if self.resolve else None
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
        text = render(self.format, catalogue_hosts(g.blocked_hosts), resolver, when)
        if self.format == "nftables":
            print("jupyter dua-guard rules: " + STALE_WARNING.format(when=when), file=sys.stderr)
        sys.stdout.write(text)


class ProxyApp(JupyterApp):
    """Run the egress proxy as a service (for a whole hub)."""

    name = "jupyter-dua-guard-proxy"
    version = __version__
    description = (
        "Run the DUA guard's egress proxy: refuses catalogued AI hosts with 403 and records "
        "each refusal in the ledger. Point kernels at it with DUAGuard.proxy_url (and "
        "DUAGuard.proxy_secret_file for per-kernel credentials)."
    )
    config_file_name = "jupyter_server_config"
    classes = [DUAGuard]
    ip = Unicode("127.0.0.1", help="Address to listen on.").tag(config=True)
    port = Int(3128, help="Port to listen on (0 = any free port).").tag(config=True)
    secret_file = Unicode(
        "", help="Shared secret file: require per-kernel credentials derived from it."
    ).tag(config=True)
    aliases = {"ip": "ProxyApp.ip", "port": "ProxyApp.port", "secret-file": "ProxyApp.secret_file"}

    def start(self) -> None:
        from .proxy import EgressProxy, ledger_recorder, serve

        g = DUAGuard(parent=self)
        try:
            policy = g.egress_policy()
        except PolicyError as e:
            print(f"jupyter dua-guard proxy: error: {e}", file=sys.stderr)
            self.exit(2)
        secret = None
        path = self.secret_file or g.proxy_secret_file
        if path:
            try:
                with open(path, "rb") as f:
                    secret = f.read().strip()
            except OSError as e:
                print(f"jupyter dua-guard proxy: cannot read secret file: {e}", file=sys.stderr)
                self.exit(2)

        proxy = EgressProxy(
            policy,
            record=ledger_recorder(g.ledger_url or None),
            secret=secret,
            require_auth=bool(secret),
            egress_mode=g.egress_mode,
            egress_allowed_hosts=g.egress_allowed_hosts,
            resolve=g.proxy_resolve,
        )

        def ready(port: int) -> None:
            print(f"jupyter-dua-guard proxy listening on http://{self.ip}:{port}", flush=True)

        try:
            serve(proxy, self.port, self.ip, ready=ready)
        except OSError as e:
            print(
                f"jupyter dua-guard proxy: cannot listen on {self.ip}:{self.port} ({e}); "
                "choose another --port.",
                file=sys.stderr,
            )
            self.exit(2)
        except KeyboardInterrupt:
            pass


SUBCOMMANDS = {
    "proxy": ("jupyter_dua_guard.cli_network.ProxyApp", ProxyApp.description.split(":")[0]),
    "rules": ("jupyter_dua_guard.cli_network.RulesApp", "Print network block rules."),
}
