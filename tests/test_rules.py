"""``jupyter dua-guard rules``: block rules for each network layer from the catalogue."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

import pytest

from jupyter_dua_guard.cli_network import FORMATS, catalogue_hosts, render

HOSTS = catalogue_hosts(["blocked.example.test", "*.ai.site.test", "203.0.113.0/24"])


def fake_resolver(host: str) -> list[str]:
    """Deterministic 'resolution' (documentation ranges): no network in tests."""
    n = sum(map(ord, host)) % 250 + 1
    return [f"198.51.100.{n}", f"2001:db8::{n:x}"]


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "cilium"])
def test_text_formats_name_catalogue_hosts(fmt):
    text = render(fmt, HOSTS, fake_resolver, "2026-11-26T00:00Z")
    if fmt == "nftables":
        assert "198.51.100." in text and "2001:db8::" in text and "203.0.113.0/24" in text
        assert "stale" in text
    else:
        assert "api.openai.com" in text
        assert "blocked.example.test" in text
        assert "ai.site.test" in text
        assert "203.0.113" not in text  # addresses only in address formats


def test_formats_cover_subdomains_where_they_can():
    assert "address=/openai.com/" in render("dnsmasq", HOSTS)
    assert '"openai.azure.com." always_nxdomain' in render("unbound", HOSTS)
    rpz = render("rpz", HOSTS)
    assert "*.openai.azure.com CNAME ." in rpz and "api.openai.com CNAME ." in rpz
    squid = render("squid", HOSTS)
    assert "acl dua_guard_ai dstdomain .openai.azure.com" in squid
    assert "http_access deny dua_guard_ai" in squid
    hosts = render("hosts", HOSTS)
    assert "0.0.0.0 api.openai.com" in hosts


def test_cilium_policy_uses_to_fqdns():
    policy = json.loads(render("cilium", HOSTS))
    assert policy["kind"] == "CiliumNetworkPolicy"
    fqdns = policy["spec"]["egressDeny"][0]["toFQDNs"]
    assert {"matchName": "api.openai.com"} in fqdns
    assert {"matchPattern": "*.openai.azure.com"} in fqdns


def test_nftables_elements_are_valid_addresses():
    text = render("nftables", HOSTS, fake_resolver)
    for line in text.splitlines():
        if "elements" in line:
            for item in line.split("{", 1)[1].rstrip(" }").split(","):
                ipaddress.ip_network(item.strip(), strict=False)


def test_cli_prints_rules_and_warns_about_staleness(tmp_path):
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path)}
    run = [sys.executable, "-m", "jupyter_dua_guard.cli", "rules"]
    done = subprocess.run(
        [*run, "--format", "nftables", "--no-resolve"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "table inet dua_guard" in done.stdout and "stale" in done.stderr
    done = subprocess.run(
        [*run, "--format", "squid", "--DUAGuard.blocked_hosts=['llm.site.test']"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "dstdomain llm.site.test" in done.stdout
    bad = subprocess.run(
        [*run, "--format", "iptables"], capture_output=True, text=True, env=env, timeout=60
    )
    assert bad.returncode != 0
    assert "iptables" in bad.stderr
