"""Configuration: YAML in, frozen dataclasses out.

``load_file`` / ``load_dict`` are called at start-up and on every reload (SIGHUP, ``POST
/-/reload``); they either return a complete, validated ``Config`` or raise one ``ConfigError``
listing every problem found, each as ``key.path: message (how to fix)``. Nothing else in
edgeproxy parses config text: the rest of the code reads these dataclasses and may trust them.

Secrets (endpoint keys, listener tokens, via tokens, proxy passwords) never appear in error
messages; ``dump_redacted`` is the only view of a config meant for humans.

What lives where (each module imports only those above it):

- ``units``: ``parse_duration`` / ``parse_size`` and the wording of their errors;
- ``hosts``: ``norm_host`` and loopback checks;
- ``schema``: the frozen dataclasses (``Config``, ``ListenerConfig``, ...) and ``key_id``;
- ``context``: ``ConfigError`` and the ``_Ctx`` that collects errors with their key paths;
- ``interpolate``: ``${VAR}`` / ``${VAR:-default}`` substitution;
- ``redact``: ``dump_redacted`` and URL redaction;
- ``listeners``, ``lines``, ``upstreams``: validation of those sections;
- ``load``: ``load_dict``, ``load_file``, ``default_config`` and the small sections.

Import from ``edgeproxy.config`` itself; the modules are its inside.
"""

from __future__ import annotations

from ..proto.priority import PRIORITIES
from .context import ConfigError
from .hosts import norm_host
from .load import default_config, load_dict, load_file
from .redact import dump_redacted
from .schema import (
    AdminConfig,
    AdmissionConfig,
    CacheConfig,
    Config,
    EjectionConfig,
    EndpointConfig,
    FailoverConfig,
    FallbackConfig,
    KeyConfig,
    LimitsConfig,
    LineConfig,
    ListenerConfig,
    LogConfig,
    PoolConfig,
    ProbeConfig,
    RouteConfig,
    Timeouts,
    TLSConfig,
    TokenClass,
    UpstreamCacheConfig,
    UpstreamConfig,
    key_id,
)
from .units import parse_duration, parse_size

__all__ = [
    "PRIORITIES",
    "AdminConfig",
    "AdmissionConfig",
    "CacheConfig",
    "Config",
    "ConfigError",
    "EjectionConfig",
    "EndpointConfig",
    "FailoverConfig",
    "FallbackConfig",
    "KeyConfig",
    "LimitsConfig",
    "LineConfig",
    "ListenerConfig",
    "LogConfig",
    "PoolConfig",
    "ProbeConfig",
    "RouteConfig",
    "TLSConfig",
    "Timeouts",
    "TokenClass",
    "UpstreamCacheConfig",
    "UpstreamConfig",
    "default_config",
    "dump_redacted",
    "key_id",
    "load_dict",
    "load_file",
    "norm_host",
    "parse_duration",
    "parse_size",
]
