"""The guard's policy: which hosts are AI services, which packages are AI/ML tools.

Stdlib only and free of Jupyter imports: every guarded Python process (kernels and
their children) loads this module at start-up through the ``.pth`` file, so it must be
cheap. The server turns ``DUAGuard`` settings into a JSON policy file
(:func:`build_policy` + :func:`write_policy`); kernels read it back with
:func:`load_policy`, falling back to the built-in catalogues when the file is missing or
unreadable (fail closed).

Host patterns:
- ``api.openai.com`` — that host only (case-insensitive, trailing dot ignored);
- ``*.openai.azure.com`` — any sub-domain, one or more labels deep;
- ``bedrock-runtime.*.amazonaws.com`` / ``*-aiplatform.googleapis.com`` — ``*`` elsewhere
  matches characters inside one label;
- ``203.0.113.7``, ``2001:db8::1``, ``198.51.100.0/24`` — IP literals and CIDR ranges.
"""

from __future__ import annotations

import _socket
import json
import os

# Annotation-only imports: this module loads in every guarded process at start-up, and
# ``typing`` / ``collections.abc`` / ``re`` would cost more than the rest of the guard.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import re
    from collections.abc import Iterable, Mapping
    from typing import Any

_Mapping = dict  # runtime checks: JSON and traitlets only ever give plain dicts

POLICY_VERSION = 1
MODES = ("block", "record")
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

#: File names of model weights / trained models; writing one is recorded (DUA sec. 22:
#: models are destroyed at close-out, so the institution must know where they are).
DEFAULT_MODEL_ARTIFACT_PATTERNS = (
    "*.safetensors",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.onnx",
    "*.gguf",
    "*.ggml",
    "*.h5",
    "*.hdf5",
    "*.keras",
    "*.joblib",
    "*.skops",
    "*.tflite",
    "*.mlmodel",
    "*.pdparams",
    "*.cbm",
    "*.lgb",
    "*.xgb",
    "*.ubj",
    "pytorch_model*.bin",
    "tf_model*.h5",
    "model*.bin",
    "adapter_model*.bin",
    "flax_model*.msgpack",
    "*.mar",
    "*.model",
    "saved_model.pb",
    # Pickles hold trained scikit-learn models as often as anything else; recording them
    # errs on the side of the close-out inventory.
    "*.pkl",
    "*.pickle",
)

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class PolicyError(ValueError):
    """A policy file or setting that cannot be used; the message names the fix."""


# ---------------------------------------------------------------- catalogues


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_endpoint_catalogue() -> dict[str, Any]:
    """The built-in AI endpoint catalogue (``data/ai_endpoints.json``)."""
    return _read_json(os.path.join(DATA_DIR, "ai_endpoints.json"))


def load_package_catalogue() -> dict[str, dict[str, Any]]:
    """The built-in AI/ML package catalogue: import name -> distributions, category."""
    return _read_json(os.path.join(DATA_DIR, "ai_ml_packages.json"))["packages"]


# ---------------------------------------------------------------- host matching


def normalize_host(host: Any) -> str | None:
    """Lower-case host name without trailing dot or IPv6 brackets; None if not a host."""
    if isinstance(host, (bytes, bytearray)):
        try:
            host = bytes(host).decode("idna")
        except UnicodeError:
            host = bytes(host).decode("latin-1")
    if not isinstance(host, str):
        return None
    host = str.__str__(host).strip()  # a str subclass must not run its own methods here
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.rstrip(".").lower()
    if "%" in host and ":" in host:  # IPv6 zone id: fe80::1%eth0
        host = host.split("%", 1)[0]
    if host and not host.isascii():
        try:  # noqa: SIM105 - contextlib costs start-up time in every guarded process
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return host or None


def parse_ip(host: str) -> tuple[int, int] | None:
    """``(bits, integer)`` of an IPv4/IPv6 literal (IPv4-mapped IPv6 -> IPv4), else None."""
    if ":" in host:
        try:
            packed = _socket.inet_pton(_socket.AF_INET6, host)
        except (OSError, ValueError):
            return None
        value = int.from_bytes(packed, "big")
        if value >> 32 == 0xFFFF:
            return 32, value & 0xFFFFFFFF
        return 128, value
    if not host[:1].isdigit():
        return None
    try:
        packed = _socket.inet_pton(_socket.AF_INET, host)
    except (OSError, ValueError):
        return None
    return 32, int.from_bytes(packed, "big")


def _parse_network(text: str) -> tuple[int, int, int] | None:
    """``(bits, network, prefix)`` of an IP literal or CIDR range, else None."""
    addr, sep, prefix_text = text.partition("/")
    ip = parse_ip(addr)
    if ip is None:
        return None
    bits, value = ip
    if sep:
        if not prefix_text.isdigit():
            raise PolicyError(f"bad CIDR range {text!r}: use address/prefix, e.g. 198.51.100.0/24")
        prefix = int(prefix_text)
        if bits == 32 and ":" in addr:
            prefix -= 96  # ::ffff:a.b.c.d/120 style
        if not 0 <= prefix <= bits:
            raise PolicyError(f"bad CIDR prefix in {text!r}: it must be between 0 and {bits}")
    else:
        prefix = bits
    mask = ((1 << prefix) - 1) << (bits - prefix) if prefix else 0
    return bits, value & mask, prefix


def wildcard_match(pattern: str, text: str) -> bool:
    """``*`` (any run) and ``?`` (one character) matching without ``re``."""
    p = t = 0
    star = -1
    mark = 0
    while t < len(text):
        if p < len(pattern) and (pattern[p] == "?" or pattern[p] == text[t]):
            p += 1
            t += 1
        elif p < len(pattern) and pattern[p] == "*":
            star = p
            mark = t
            p += 1
        elif star != -1:
            p = star + 1
            mark += 1
            t = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


class HostSet:
    """A compiled set of host patterns: exact names, wildcard patterns, IPs and CIDRs.

    Label-wise matching without regular expressions (cheap to build at start-up): a
    leading ``*.`` stands for one or more labels, any other ``*`` stays inside its label.
    """

    __slots__ = ("_exact", "_globs", "_networks", "_suffixes")

    def __init__(self, patterns: Mapping[str, str] | Iterable[str]) -> None:
        # patterns: pattern -> label (e.g. provider name) or plain iterable of patterns
        items = patterns.items() if isinstance(patterns, _Mapping) else ((p, "") for p in patterns)
        exact: dict[str, str] = {}
        suffixes: dict[str, str] = {}
        globs: list[tuple[tuple[str, ...], bool, str]] = []
        networks: list[tuple[int, int, int, str]] = []
        for raw, label in items:
            pattern = normalize_host(raw)
            if pattern is None:
                raise PolicyError(f"bad host pattern {raw!r}: give a host name, IP or CIDR range")
            net = _parse_network(pattern)
            if net is None and ("/" in pattern or ":" in pattern):
                raise PolicyError(
                    f"bad address pattern {raw!r}: give an IPv4/IPv6 address or CIDR range"
                )
            if net is not None:
                networks.append((*net, label))
                continue
            any_prefix = pattern.startswith("*.")
            rest = pattern[2:] if any_prefix else pattern
            if not rest or "*" not in rest:
                if any_prefix:
                    suffixes.setdefault(rest, label)
                else:
                    exact.setdefault(pattern, label)
            else:
                globs.append((tuple(reversed(rest.split("."))), any_prefix, label))
        self._exact = exact
        self._suffixes = suffixes
        self._globs = tuple(globs)
        self._networks = tuple(networks)

    def match(self, host: str) -> str | None:
        """Label of the first pattern matching the normalized ``host``, else None."""
        label = self._exact.get(host)
        if label is not None:
            return label
        ip = parse_ip(host)
        if ip is not None:
            bits, value = ip
            for net_bits, network, prefix, net_label in self._networks:
                if net_bits == bits and (value >> (bits - prefix)) == (network >> (bits - prefix)):
                    return net_label
            return None
        if self._suffixes:
            dot = host.find(".")
            while dot != -1:
                label = self._suffixes.get(host[dot + 1 :])
                if label is not None:
                    return label
                dot = host.find(".", dot + 1)
        if self._globs:
            labels = host.split(".")
            labels.reverse()
            for pattern, any_prefix, glob_label in self._globs:
                n = len(pattern)
                if len(labels) < n + any_prefix or (not any_prefix and len(labels) != n):
                    continue
                for i in range(n):
                    part = pattern[i]
                    if part != labels[i] and (
                        "*" not in part or not wildcard_match(part, labels[i])
                    ):
                        break
                else:
                    return glob_label
        return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (normalized) names this machine's loopback interface."""
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    ip = parse_ip(host)
    if ip is None:
        return False
    bits, value = ip
    return (value >> 24) == 127 if bits == 32 else value == 1


# ---------------------------------------------------------------- the policy


class Decision:
    """What to do about one network destination."""

    ALLOW = "allow"  # not an AI service: nothing to do
    ALLOW_AI = "allow-ai"  # allowed AI use (allow-listed or local model server): record it
    BLOCK = "block"  # external AI service: refuse (or only record in mode "record")


class Policy:
    """A loaded, compiled policy; immutable after construction."""

    __slots__ = (
        "allowed",
        "blocked",
        "data_patterns",
        "data_regex",
        "defaults_reason",
        "local_model_ports",
        "mode",
        "model_artifact_patterns",
        "model_regex",
        "model_servers",
        "packages",
        "raw",
        "refused",
    )

    def __init__(self, raw: Mapping[str, Any], defaults_reason: str | None = None) -> None:
        self.raw = dict(raw)
        self.defaults_reason = defaults_reason
        mode = raw.get("mode", "block")
        if mode not in MODES:
            raise PolicyError(f"unknown guard mode {mode!r}: use one of {', '.join(MODES)}")
        self.mode = mode
        self.blocked = HostSet(_as_pattern_map(raw.get("blocked_hosts", {}), "blocked_hosts"))
        self.allowed = HostSet(_as_pattern_map(raw.get("allowed_hosts", []), "allowed_hosts"))
        self.model_servers = HostSet(_as_pattern_map(raw.get("model_servers", []), "model_servers"))
        ports = raw.get("local_model_ports", {})
        if not isinstance(ports, _Mapping):
            raise PolicyError("local_model_ports must map port numbers to provider names")
        self.local_model_ports = {int(p): str(v) for p, v in ports.items()}
        packages = raw.get("packages", {})
        if not isinstance(packages, _Mapping):
            raise PolicyError("packages must map import names to {distributions, category}")
        self.packages = {str(k): _package_entry(k, v) for k, v in packages.items()}
        refused = raw.get("refused_packages", None)
        if refused is None:
            refused = default_refused_packages()
        if not isinstance(refused, _Mapping):
            raise PolicyError("refused_packages must map import names to reasons")
        self.refused = {str(k): str(v) for k, v in refused.items()}
        self.data_patterns = tuple(str(p) for p in raw.get("data_paths", ()))
        self.data_regex = compile_path_globs(self.data_patterns)
        self.model_artifact_patterns = tuple(
            str(p) for p in raw.get("model_artifact_patterns", DEFAULT_MODEL_ARTIFACT_PATTERNS)
        )
        self.model_regex = NameGlobs(self.model_artifact_patterns)

    def decide(self, host: Any, port: Any = None) -> tuple[str, str, str]:
        """``(decision, normalized host, provider/reason)`` for a destination."""
        name = normalize_host(host)
        if name is None:
            return Decision.ALLOW, "", ""
        port_number = port if isinstance(port, int) else _port_number(port)
        allowed = self.allowed.match(name)
        if allowed is not None:
            provider = self.blocked.match(name)
            if provider is None:
                provider = self.model_servers.match(name)
            if provider is not None:
                return Decision.ALLOW_AI, name, f"{provider or 'AI host'} (allow-listed)"
            return Decision.ALLOW, name, ""
        provider = self.blocked.match(name)
        if provider is not None:
            return Decision.BLOCK, name, provider or "blocked host"
        server = self.model_servers.match(name)
        if server is not None:
            return Decision.ALLOW_AI, name, server or "approved model server"
        if port_number in self.local_model_ports and is_loopback(name):
            return Decision.ALLOW_AI, name, self.local_model_ports[port_number]
        return Decision.ALLOW, name, ""


def _port_number(port: Any) -> int | None:
    try:
        if isinstance(port, str):
            return int(str.__str__(port))
        if isinstance(port, bytes):
            return int(b"" + port)
    except ValueError:
        return None
    return None


def _as_pattern_map(value: Any, field: str) -> dict[str, str]:
    if isinstance(value, _Mapping):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out: dict[str, str] = {}
        for item in value:
            if isinstance(item, _Mapping):
                out[str(item["host"])] = str(item.get("provider", ""))
            else:
                out[str(item)] = ""
        return out
    raise PolicyError(f"{field} must be a list of host patterns")


def _package_entry(name: Any, value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"distributions": [value], "category": "other"}
    if isinstance(value, _Mapping):
        dists = value.get("distributions", value.get("distribution", name))
        if isinstance(dists, str):
            dists = [dists]
        return {
            "distributions": [str(d) for d in dists],
            "category": str(value.get("category", "other")),
        }
    raise PolicyError(f"package {name!r}: give a distribution name or {{distributions, category}}")


def _glob_to_regex(pattern: str) -> str:
    """Path glob -> regex: ``**`` spans directories, ``*``/``?`` stay inside one."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append(r"(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(r".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^/]*")
        elif c == "?":
            out.append(r"[^/]")
        else:
            out.append("\\" + c if not c.isalnum() and c not in "_/" else c)
        i += 1
    return "".join(out)


def compile_path_globs(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One regex for absolute path globs; a pattern without wildcards also covers its subtree."""
    parts = []
    for p in patterns:
        p = p.rstrip("/") or "/"
        rx = _glob_to_regex(p)
        parts.append(rx + r"(?:/.*)?")
    if not parts:
        return None
    import re

    return re.compile(r"\A(?:" + "|".join(parts) + r")\Z")


class NameGlobs:
    """Case-insensitive file-name globs; ``*.ext`` patterns are a set lookup."""

    __slots__ = ("_extensions", "_others")

    def __init__(self, patterns: Iterable[str]) -> None:
        extensions = set()
        others = []
        for p in patterns:
            p = p.lower()
            ext = p[2:]
            if p.startswith("*.") and "*" not in ext and "?" not in ext and "." not in ext:
                extensions.add(ext)
            else:
                others.append(p)
        self._extensions = frozenset(extensions)
        self._others = tuple(others)

    def match(self, name: str) -> bool:
        """Whether the file name ``name`` matches one of the globs."""
        name = name.lower()
        if name.rpartition(".")[2] in self._extensions and "." in name:
            return True
        return any(wildcard_match(p, name) for p in self._others)


def default_refused_packages() -> dict[str, str]:
    """Catalogued packages marked ``"transport": "grpc"``: their traffic goes through
    gRPC's compiled core, which the kernel's socket checks do not see."""
    out = {}
    for name, entry in load_package_catalogue().items():
        if isinstance(entry, _Mapping) and entry.get("transport") == "grpc":
            out[name] = (
                f"{', '.join(entry.get('distributions', [name]))} talks to a cloud AI "
                "service over gRPC, whose compiled network code escapes the kernel's socket "
                "checks"
            )
    return out


def builtin_policy_dict() -> dict[str, Any]:
    """The policy made of the built-in catalogues only (what a kernel uses on defaults)."""
    return build_policy()


def build_policy(
    *,
    blocked_hosts: Iterable[str] = (),
    allowed_hosts: Iterable[str] = (),
    model_servers: Iterable[str] = (),
    packages: Mapping[str, Any] | None = None,
    data_paths: Iterable[str] = (),
    mode: str = "block",
    model_artifact_patterns: Iterable[str] | None = None,
    base_dir: str | None = None,
    refused_packages: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A self-contained policy document: built-in catalogues plus the site's settings.

    Relative ``data_paths`` are made absolute against ``base_dir`` (the server's root
    directory) and ``~`` is expanded, because kernels match absolute paths.
    """
    endpoints = load_endpoint_catalogue()
    blocked: dict[str, str] = {e["host"]: e["provider"] for e in endpoints["endpoints"]}
    for host in blocked_hosts:
        blocked.setdefault(str(host), "site block-list")
    pkgs = dict(load_package_catalogue())
    for name, value in (packages or {}).items():
        pkgs[str(name)] = _package_entry(name, value)
    absolute = []
    for p in data_paths:
        p = os.path.expanduser(str(p))
        if not os.path.isabs(p):
            p = os.path.join(base_dir or os.getcwd(), p)
        absolute.append(os.path.normpath(p) + ("/" if p.endswith("/") else ""))
    policy = {
        "version": POLICY_VERSION,
        "mode": mode,
        "blocked_hosts": blocked,
        "allowed_hosts": [str(h) for h in allowed_hosts],
        "model_servers": [str(h) for h in model_servers],
        "local_model_ports": {
            str(s["port"]): s["provider"] for s in endpoints.get("local_model_servers", [])
        },
        "packages": pkgs,
        "data_paths": absolute,
        "refused_packages": dict(
            default_refused_packages() if refused_packages is None else refused_packages
        ),
        "model_artifact_patterns": list(
            DEFAULT_MODEL_ARTIFACT_PATTERNS
            if model_artifact_patterns is None
            else model_artifact_patterns
        ),
    }
    Policy(policy)  # validate now, so a bad setting fails at server start, not in a kernel
    return policy


def write_policy(policy: Mapping[str, Any], path: str) -> str:
    """Write ``policy`` atomically (kernels may be reading the old one) and return the path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(policy, f, indent=1, sort_keys=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def load_policy(path: str | None) -> Policy:
    """The policy at ``path``; on any problem the built-in catalogues (fail closed).

    A policy on defaults carries ``defaults_reason`` so the guard can record that it ran
    without the site's settings (``guard_defaults_used``).
    """
    if not path:
        return Policy(builtin_policy_dict(), defaults_reason="no policy file was given")
    try:
        raw = _read_json(path)
        if not isinstance(raw, dict):
            raise PolicyError("the policy file does not hold a JSON object")
        # The built-in catalogues always apply: a policy can only add to them (or
        # allow-list hosts), so a truncated or hand-edited file cannot silently open up.
        endpoints = load_endpoint_catalogue()
        blocked = {e["host"]: e["provider"] for e in endpoints["endpoints"]}
        blocked.update(_as_pattern_map(raw.get("blocked_hosts", {}), "blocked_hosts"))
        raw["blocked_hosts"] = blocked
        raw["packages"] = {**load_package_catalogue(), **(raw.get("packages") or {})}
        return Policy(raw)
    except FileNotFoundError:
        reason = f"policy file {path} is missing"
    except PermissionError:
        reason = f"policy file {path} is not readable"
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = f"policy file {path} is unusable ({type(e).__name__}: {e})"
    return Policy(builtin_policy_dict(), defaults_reason=reason)
