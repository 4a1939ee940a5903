"""The one place where every jupyter-dua-guard setting lives.

``DUAGuard`` is a plain traitlets ``Configurable`` so that the server extension, the
``jupyter dua-guard`` command line and the kernel-side guard read the same ``c.DUAGuard.*``
settings from ``jupyter_server_config.py/json`` or ``--DUAGuard.x=...`` without importing
the Jupyter server.
"""

import os
from typing import Any

from traitlets import Bool, Dict, Enum, Int, List, TraitError, Unicode, default, validate
from traitlets.config import Configurable

from .policy import DEFAULT_MODEL_ARTIFACT_PATTERNS, HostSet, Policy, PolicyError, build_policy


class SettingsError(ValueError):
    """A ``DUAGuard`` setting that cannot be used; the message names it and the fix."""


class DUAGuard(Configurable):
    """Settings of the NCCR / SEER Data Use Agreement guard."""

    enabled = Bool(
        True,
        help=(
            "Whether the guard is active. Turning it off stops the guard and is reported as "
            "'DUA guard: off' in JupyterLab; the Data Use Agreement still applies."
        ),
    ).tag(config=True)

    min_cell_count = Int(
        16,
        help=(
            "Smallest count an aggregate table may show (NIH/NCI small-cell rule: counts from 1 "
            "to min_cell_count - 1 are flagged). 16 follows the NCI/CDC cancer-statistics "
            "suppression rule; set it to what your DUA requires (e.g. 11)."
        ),
    ).tag(config=True)

    allow_zero_cells = Bool(
        True,
        help="Whether a count of 0 is acceptable in aggregate tables (NIH policy allows zeros).",
    ).tag(config=True)

    k_anonymity = Int(
        0,
        help=(
            "Smallest equivalence class on quasi-identifiers (age, sex, race/origin, year, "
            "county/registry, site/histology) a row-level table may show. 0 means: use "
            "min_cell_count."
        ),
    ).tag(config=True)

    vocabulary_files = List(
        Unicode(),
        help=(
            "Extra case-level vocabulary files merged with the built-in SEER/NCCR list "
            "(same format as jupyter_dua_guard/data/seer_vocabulary.txt: labels grouped in "
            "[identifier], [direct], [date], [per_person], [qi:<group>], [case] sections)."
        ),
    ).tag(config=True)

    extra_case_variables = List(
        Unicode(),
        help=(
            "Additional case-level column labels (your own extract's variable names); "
            "treated like the [case] section of the vocabulary."
        ),
    ).tag(config=True)

    @validate("min_cell_count")
    def _check_min_cell_count(self, proposal: dict) -> int:
        value = proposal["value"]
        if value < 1:
            raise TraitError(
                f"DUAGuard.min_cell_count must be at least 1, got {value}; set it to the "
                "smallest count your DUA allows (default 16)."
            )
        return value

    @validate("k_anonymity")
    def _check_k(self, proposal: dict) -> int:
        value = proposal["value"]
        if value < 0:
            raise TraitError(
                f"DUAGuard.k_anonymity must be 0 (use min_cell_count) or positive, got {value}."
            )
        return value

    ledger_url = Unicode(
        help=(
            "Where the usage ledger (DUA sec. 22 records of AI/ML use) is kept: "
            "sqlite:////absolute/path/ledger.sqlite, or a central PostgreSQL ledger for a hub: "
            "postgresql://writer@dbhost/ledger (password from the URL, ~/.pgpass, PGPASSWORD or "
            "a libpq service file via ?service=NAME; never logged; set it up with `jupyter "
            "dua-guard db init`; ?spool=DIR is where events wait while the database is "
            "unreachable). Defaults to $JUPYTER_DUA_GUARD_LEDGER, else "
            "dua_guard/ledger.sqlite under the Jupyter data dir. `jupyter dua-guard` commands "
            "take --ledger URL to override it."
        ),
    ).tag(config=True)

    ledger_relay = Bool(
        True,
        help=(
            "With a PostgreSQL ledger, run an append relay in the server process: kernels "
            "send their events to it over a Unix socket in the runtime directory (same user "
            "only), and it chains whatever has queued with one database call, so that a busy "
            "server's kernels share transactions and a hub needs a couple of connections per "
            "server instead of one per kernel. Kernels append directly when the relay is off "
            "or gone. No effect on SQLite ledgers."
        ),
    ).tag(config=True)

    ledger_relay_connections = Int(
        1,
        help=(
            "Database connections of the append relay (DUAGuard.ledger_relay). One makes "
            "the largest batches and used the least database CPU per event in our "
            "measurements; more let a batch be chained while the previous one waits for "
            "its disk flush, which can help where the database's disk is slow to sync."
        ),
    ).tag(config=True)

    @validate("ledger_relay_connections")
    def _check_relay_connections(self, proposal: dict[str, Any]) -> int:
        value = proposal["value"]
        if not 1 <= value <= 16:
            raise TraitError(
                f"DUAGuard.ledger_relay_connections must be between 1 and 16, got {value}."
            )
        return value

    @default("ledger_url")
    def _default_ledger_url(self) -> str:
        from .events import ENV_LEDGER
        from .ledger import default_ledger_url

        return os.environ.get(ENV_LEDGER) or default_ledger_url()

    @classmethod
    def load(cls, parent: Configurable) -> "DUAGuard":
        """Read the settings from ``parent``'s configuration, or raise ``SettingsError``."""
        try:
            return cls(parent=parent)
        except TraitError as error:
            raise SettingsError(
                f"jupyter-dua-guard: invalid DUAGuard setting: {error} Fix it in "
                "jupyter_server_config.py/json or on the command line "
                "(`jupyter dua-guard --help-all` lists every setting)."
            ) from None

    def egress_policy(self) -> Policy:
        """The host rules these settings give (for command-line tools that check hosts)."""
        return Policy(
            build_policy(
                blocked_hosts=self.blocked_hosts,
                allowed_hosts=self.allowed_hosts,
                model_servers=self.model_servers,
                mode=self.mode,
            )
        )

    mode = Enum(
        ["block", "record"],
        default_value="block",
        help=(
            "What kernels do about connections to external AI services (NCCR DUA sec. 22): "
            "'block' refuses them with an error and records the refusal; 'record' lets them "
            "through and only records them (for a supervised pilot)."
        ),
    ).tag(config=True)

    blocked_hosts = List(
        Unicode(),
        help=(
            "Extra AI service hosts to refuse, on top of the built-in catalogue "
            "(jupyter_dua_guard/data/ai_endpoints.json). Host names (case-insensitive), "
            "'*.example.com' for sub-domains, IP addresses or CIDR ranges."
        ),
    ).tag(config=True)

    allowed_hosts = List(
        Unicode(),
        help=(
            "Hosts that are always allowed, even when the block-list names them - e.g. the "
            "site's approved on-premises model server. Connections to allowed AI hosts are "
            "recorded as AI tool use. Same pattern syntax as blocked_hosts."
        ),
    ).tag(config=True)

    model_servers = List(
        Unicode(),
        help=(
            "Approved AI model servers inside the secure environment (host patterns): "
            "connections are allowed and recorded as AI tool use. Loopback ports of common "
            "local model servers (Ollama 11434, LM Studio 1234, llama.cpp 8080, ...) are "
            "recognised without configuration."
        ),
    ).tag(config=True)

    ai_packages = Dict(
        help=(
            "Extra AI/ML packages to record when a kernel imports them, on top of the "
            "built-in catalogue (jupyter_dua_guard/data/ai_ml_packages.json): import name -> "
            "distribution name, or -> {'distributions': [...], 'category': '...'}."
        ),
    ).tag(config=True)

    data_paths = List(
        Unicode(),
        help=(
            "Where the DUA Data lives: path globs ('/data/seer/**', '~/nccr/*.csv'; relative "
            "paths are taken from the server's root directory; a plain directory covers "
            "everything under it). Kernels record each such file they read (path and size, "
            "never content) once, so the records show which AI/ML tools ran alongside the Data."
        ),
    ).tag(config=True)

    model_artifact_patterns = List(
        Unicode(),
        default_value=list(DEFAULT_MODEL_ARTIFACT_PATTERNS),
        help=(
            "File-name globs of model weights and trained models; writing one from a kernel "
            "is recorded (models must be destroyed at close-out, DUA sec. 22)."
        ),
    ).tag(config=True)

    @validate("blocked_hosts", "allowed_hosts", "model_servers")
    def _check_hosts(self, proposal: Any) -> list[str]:
        try:
            HostSet(proposal["value"])
        except PolicyError as e:
            raise TraitError(f"DUAGuard.{proposal['trait'].name}: {e}") from None
        return proposal["value"]

    @validate("ai_packages")
    def _check_packages(self, proposal: Any) -> dict[str, Any]:
        for name, value in proposal["value"].items():
            if not isinstance(value, (str, dict)):
                raise TraitError(
                    f"DUAGuard.ai_packages[{name!r}]: give a distribution name or "
                    "{'distributions': [...], 'category': '...'}"
                )
        return proposal["value"]

    # ------------------------------------------------------------ defence in depth (issue 7)
    proxy_enabled = Bool(
        True,
        help=(
            "Start the egress proxy on loopback and give every kernel (any language) "
            "HTTP_PROXY/HTTPS_PROXY/ALL_PROXY with per-kernel credentials, so `!curl`, R and "
            "compiled HTTP clients are refused AI hosts too (DUA sec. 22)."
        ),
    ).tag(config=True)

    proxy_port = Int(
        0, help="Loopback port of the egress proxy the server starts (0 = any free port)."
    ).tag(config=True)

    proxy_url = Unicode(
        "",
        help=(
            "Use this site-wide proxy (e.g. `jupyter dua-guard proxy` run as a service for a "
            "hub) instead of starting one: http://host:port. Kernels get it with per-kernel "
            "credentials when proxy_secret_file is set."
        ),
    ).tag(config=True)

    proxy_secret_file = Unicode(
        "",
        help=(
            "File holding the secret shared with a site-wide proxy; kernel credentials are "
            "derived from it. Empty: the server's own proxy uses a fresh random secret."
        ),
    ).tag(config=True)

    egress_mode = Enum(
        ["blocklist", "allowlist"],
        default_value="blocklist",
        help=(
            "What the egress proxy lets through: 'blocklist' refuses the AI catalogue and "
            "passes other hosts; 'allowlist' passes only egress_allowed_hosts and allowed_hosts."
        ),
    ).tag(config=True)

    egress_allowed_hosts = List(
        Unicode(),
        help=(
            "Hosts the proxy passes in egress_mode='allowlist' (package mirrors, data portals). "
            "Same pattern syntax as blocked_hosts."
        ),
    ).tag(config=True)

    proxy_resolve = Dict(
        Unicode(),
        help=(
            "Fixed addresses for host names the proxy connects to (like curl --resolve): "
            "{'mirror.example.org': '10.0.0.5'}."
        ),
    ).tag(config=True)

    allow_ai_extensions = List(
        Unicode(),
        help=(
            "Approved AI assistant extensions to keep enabled (names or distributions from "
            "jupyter_dua_guard/data/ai_extensions.json, e.g. 'jupyter-ai'). Every other "
            "detected AI server or lab extension is disabled at start."
        ),
    ).tag(config=True)

    csp_enabled = Bool(
        True,
        help=(
            "Serve Jupyter pages with a Content-Security-Policy whose connect-src is the "
            "server itself, so page scripts and browser-side assistants cannot send data "
            "to AI services; violations are recorded in the ledger."
        ),
    ).tag(config=True)

    csp_connect_src = List(
        Unicode(),
        help="Extra connect-src sources the pages may reach (e.g. an approved tile server).",
    ).tag(config=True)

    kernelspec_provisioners = Enum(
        ["guard", "refuse"],
        default_value="guard",
        help=(
            "Kernelspecs that name another provisioner: 'guard' starts them with the guard "
            "provisioner anyway (logged); 'refuse' refuses to start them with a clear message."
        ),
    ).tag(config=True)

    refused_packages = Dict(
        help=(
            "Packages refused at import in guarded kernels, import name -> reason. Defaults "
            "to the gRPC-based cloud AI SDKs of the package catalogue (their traffic escapes "
            "the socket checks). Set to {} to only record them."
        ),
    ).tag(config=True)

    @default("refused_packages")
    def _default_refused(self) -> dict[str, str]:
        from .policy import default_refused_packages

        return default_refused_packages()

    @validate("egress_allowed_hosts")
    def _check_egress_hosts(self, proposal: Any) -> list[str]:
        try:
            HostSet(proposal["value"])
        except PolicyError as e:
            raise TraitError(f"DUAGuard.egress_allowed_hosts: {e}") from None
        return proposal["value"]
