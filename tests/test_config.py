"""Config loading and validation: defaults, examples, every class of error, units, secrets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trustme

from edgeproxy.config import (
    ConfigError,
    FailoverConfig,
    default_config,
    dump_redacted,
    load_dict,
    load_file,
    parse_duration,
    parse_size,
)

CONF = Path(__file__).resolve().parent.parent / "conf"
TOKEN = "tok-0123456789abcdef"  # 20 characters: long enough for a listener
SECRET_KEY = "sk-very-secret-key-1234"


def errors(data: object, env: dict[str, str] | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        load_dict(data, env=env or {})
    return info.value.errors


def one_upstream(**endpoint: Any) -> dict[str, Any]:
    return {"upstreams": {"openai": {"prefix": "/v1", "endpoints": [{"url": "https://api.openai.com/v1", **endpoint}]}}}


# -- defaults and examples -----------------------------------------------------------------


def test_default_config() -> None:
    cfg = default_config()
    assert [lc.address for lc in cfg.listen] == ["127.0.0.1:8787"]
    assert cfg.listen[0].tokens == () and cfg.listen[0].is_loopback()
    assert cfg.admin.listen is not None and cfg.admin.listen.address == "127.0.0.1:8788"
    assert [(ln.name, ln.kind) for ln in cfg.lines] == [("direct", "direct")]
    got = {u.name: (u.prefix, u.provider, u.endpoints[0].url) for u in cfg.upstreams}
    assert got == {
        "openai": ("/v1", "openai", "https://api.openai.com/v1"),
        "anthropic": ("/anthropic", "anthropic", "https://api.anthropic.com"),
        "gemini": ("/gemini", "gemini", "https://generativelanguage.googleapis.com"),
    }
    for u in cfg.upstreams:
        assert u.endpoints[0].keys == () and u.endpoints[0].lines == ("direct",)
        assert u.failover == FailoverConfig()
    assert cfg.limits.max_body == 32 << 20 and cfg.limits.replay_body == 16 << 20
    assert cfg.probe.interval == 5.0 and cfg.route.tolerance == 0.010 and cfg.drain_timeout == 30.0
    assert cfg.source is None
    assert load_dict(None, env={}) == cfg == load_dict({}, env={})


@pytest.mark.parametrize("name", ["sidecar.yaml", "multiline.yaml"])
def test_examples_load(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for f in ("tls.crt", "tls.key"):
        (tmp_path / f).write_text("x")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    for var in ("OPENAI_API_KEY", "RELAY_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.setenv(var, f"{var.lower()}-value")
    monkeypatch.setenv("EDGE_TOKEN", TOKEN)
    monkeypatch.delenv("CORP_PROXY", raising=False)
    cfg = load_file(str(CONF / name))
    assert cfg.source == str(CONF / name)
    assert cfg.upstreams and cfg.lines


def test_multiline_example_details(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OPENAI_API_KEY", "RELAY_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.setenv(var, f"{var.lower()}-value")
    monkeypatch.setenv("EDGE_TOKEN", TOKEN)
    monkeypatch.delenv("CORP_PROXY", raising=False)
    cfg = load_file(str(CONF / "multiline.yaml"))
    assert [(ln.name, ln.kind) for ln in cfg.lines] == [
        ("direct", "direct"),
        ("isp2", "direct"),
        ("corp", "proxy"),
    ]
    assert cfg.line("isp2").bind == "192.0.2.10"
    assert cfg.line("corp").proxy == "socks5://127.0.0.1:1080"
    openai = cfg.upstreams[0]
    assert openai.endpoints[0].lines == ("isp2", "direct")
    assert openai.endpoints[0].keys == ()  # as shipped, client keys pass through
    assert openai.endpoints[1].lines == ("direct", "isp2", "corp")  # omitted -> all, config order
    assert openai.endpoints[1].priority == 2
    assert openai.endpoints[1].model_map() == {"gpt-4o": "gpt-4o-2024-08-06"}
    assert openai.failover.first_event_timeout == 20.0
    assert cfg.listen[1].unix == "/run/edgeproxy/edgeproxy.sock" and cfg.listen[1].is_loopback()
    with pytest.raises(KeyError):
        cfg.line("nope")


# -- errors --------------------------------------------------------------------------------


def test_unknown_key_with_suggestion() -> None:
    assert errors({"probe": {"intervall": "5s"}}) == ("probe.intervall: unknown key (did you mean 'interval'?)",)
    (msg,) = errors({"probe": {"zzz": 1}})
    assert msg == "probe.zzz: unknown key (allowed: interval, timeout)"
    (msg,) = errors({"upstream": {}})
    assert msg.startswith("upstream: unknown key (did you mean 'upstreams'?)")


def test_wrong_types_name_the_expected_type() -> None:
    assert errors({"pool": {"max_per_path": "many"}}) == ("pool.max_per_path: expected an integer, got a string",)
    assert errors({"probe": [1]}) == ("probe: expected a mapping with keys interval, timeout, got a list",)
    (msg,) = errors({"upstreams": {"x": {"prefix": "/x", "endpoints": "https://x.com"}}})
    assert msg.startswith("upstreams.x.endpoints: expected a non-empty list of endpoints")
    (msg,) = errors(one_upstream(models=["a"]))
    assert msg.startswith("upstreams.openai.endpoints[0].models: expected a mapping")


def test_top_level_must_be_a_mapping() -> None:
    (msg,) = errors(["listen"])
    assert msg.startswith("(top level): expected a mapping of sections") and msg.endswith("got a list")


def test_missing_env_var() -> None:
    assert errors(one_upstream(keys=["${OPENAI_API_KEY}"])) == (
        "upstreams.openai.endpoints[0].keys[0]: environment variable OPENAI_API_KEY is not set"
        " (export it or use ${OPENAI_API_KEY:-default})",
    )


def test_empty_key_is_an_error() -> None:
    (msg,) = errors(one_upstream(keys=["${OPENAI_API_KEY}"]), env={"OPENAI_API_KEY": ""})
    assert msg.startswith("upstreams.openai.endpoints[0].keys[0]: empty key")


def test_unknown_line() -> None:
    data = {"lines": {"direct": {}, "isp2": {"bind": "192.0.2.10"}}, **one_upstream(lines=["direct", "tokio"])}
    assert errors(data) == (
        "upstreams.openai.endpoints[0].lines[1]: unknown line 'tokio' (configured lines: direct, isp2)",
    )


def test_bad_duration_and_size() -> None:
    errs = errors({"failover": {"first_byte_timeout": "5 sec"}, "limits": {"max_body": "lots"}})
    assert errs[0].startswith("failover.first_byte_timeout: invalid duration '5 sec' (")
    assert errs[1].startswith("limits.max_body: invalid size 'lots' (")
    assert errors({"probe": {"interval": 0}}) == ("probe.interval: must be greater than 0",)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://api.openai.com", "scheme must be one of https://, http://"),
        ("api.openai.com/v1", "has no scheme (write https://api.openai.com/v1)"),
        ("https:///v1", "has no host"),
        ("https://api.openai.com/v1?x=1", "a query or fragment is not allowed"),
        ("https://api.openai.com:99999", "port must be a number 1-65535"),
    ],
)
def test_bad_endpoint_url(url: str, fragment: str) -> None:
    (msg,) = errors(one_upstream(url=url))
    assert msg.startswith("upstreams.openai.endpoints[0].url: ") and fragment in msg


def test_off_loopback_listener_needs_tokens() -> None:
    assert errors({"listen": ["127.0.0.1:8787", "0.0.0.0:9000"]}) == (
        "listen[1]: 0.0.0.0:9000 is reachable from other hosts; set listen[1].tokens"
        " (clients send x-edgeproxy-token) or listen on 127.0.0.1",
    )
    cfg = load_dict({"listen": {"address": "0.0.0.0:8787", "tokens": [TOKEN]}}, env={})
    assert cfg.listen[0].tokens == (TOKEN,) and not cfg.listen[0].is_loopback()


def test_short_token() -> None:
    (msg,) = errors({"listen": {"address": "127.0.0.1:8787", "tokens": ["abc123"]}})
    assert msg.startswith("listen.tokens[0]: token too short (6 characters; use at least 16")
    assert "guessable" in msg and "abc123" not in msg


def test_replay_body_over_max_body() -> None:
    assert errors({"limits": {"max_body": "1MiB", "replay_body": "2MiB"}}) == (
        "limits.replay_body: 2MiB is larger than limits.max_body (1MiB); lower replay_body or raise max_body",
    )


def test_duplicate_prefix() -> None:
    ups = {
        "a": {"prefix": "/v1", "endpoints": ["https://a.example.com/v1"]},
        "b": {"prefix": "/v1/", "endpoints": ["https://b.example.com/v1"]},
    }
    assert errors({"upstreams": ups}) == (
        "upstreams.b.prefix: /v1 is already the prefix of upstream 'a' (prefixes must be unique)",
    )


def test_unknown_provider() -> None:
    data = {"upstreams": {"x": {"prefix": "/x", "provider": "mistral", "endpoints": ["https://x.example.com"]}}}
    assert errors(data) == ("upstreams.x.provider: 'mistral' is not one of openai, anthropic, gemini",)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listen: 127.0.0.1:8787\nprobe:\n  interval: 5s\n   timeout: [1s\n")
    with pytest.raises(ConfigError) as info:
        load_file(str(path))
    (msg,) = info.value.errors
    assert msg.startswith(f"{path}:4:") and "YAML syntax error" in msg


def test_yaml_duplicate_key(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("probe:\n  interval: 5s\n  interval: 2s\n")
    with pytest.raises(ConfigError) as info:
        load_file(str(path))
    assert info.value.errors == (f"{path}:3:3: YAML syntax error: duplicate key 'interval' (first on line 2)",)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(str(tmp_path / "missing.yaml"))
    assert info.value.errors[0].startswith(f"{tmp_path / 'missing.yaml'}: cannot read the config file")


def test_multiple_errors_reported_together() -> None:
    data = {
        "listen": "0.0.0.0:80",
        "probe": {"intervall": 1},
        "pool": {"warm": -1},
        "failover": {"retries": 11, "retry_on": ["connect", "5xx"]},
        **one_upstream(lines=["nope"], priority=0),
    }
    with pytest.raises(ConfigError) as info:
        load_dict(data, env={})
    paths = [e.split(":", 1)[0] for e in info.value.errors]
    assert sorted(paths) == sorted(
        [
            "listen",
            "probe.intervall",
            "pool.warm",
            "failover.retries",
            "failover.retry_on[1]",
            "upstreams.openai.endpoints[0].lines[0]",
            "upstreams.openai.endpoints[0].priority",
        ]
    )
    assert str(info.value) == "\n".join(info.value.errors)


def test_listen_address_forms() -> None:
    cfg = load_dict({"listen": ["[::1]:9000", "localhost:9001", "unix:/tmp/e.sock", {"address": "127.0.0.2:9002"}]})
    assert [lc.address for lc in cfg.listen] == ["[::1]:9000", "localhost:9001", "unix:/tmp/e.sock", "127.0.0.2:9002"]
    assert [(lc.host, lc.port) for lc in cfg.listen[:2]] == [("::1", 9000), ("localhost", 9001)]
    assert all(lc.is_loopback() for lc in cfg.listen)
    assert errors({"listen": ":8787"})[0].startswith("listen: ':8787' has no host")
    assert errors({"listen": "::1:8787"})[0].startswith("listen: '::1:8787': put an IPv6 address in brackets")
    assert errors({"listen": "127.0.0.1:0"})[0].endswith("port must be a number 1-65535")
    assert errors({"listen": 8787}) == (
        "listen: expected 'host:port' or 'unix:/path', got an integer (write 127.0.0.1:8787)",
    )
    assert errors({"listen": ["127.0.0.1:9000", "127.0.0.1:9000"]}) == (
        "listen[1]: 127.0.0.1:9000 clashes with listen[0] (each listener needs its own address)",
    )


def test_admin_listen(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("admin: {listen: off}\n")  # YAML 1.1 reads off as false
    assert load_file(str(path)).admin.listen is None
    assert load_dict({"admin": {"listen": None}}).admin.listen is None
    assert load_dict({"admin": {"listen": "127.0.0.1:9999"}}).admin.listen.address == "127.0.0.1:9999"  # type: ignore[union-attr]
    (msg,) = errors({"admin": {"listen": "0.0.0.0:8788"}})
    assert msg.startswith("admin.listen: 0.0.0.0:8788 is reachable from other hosts")
    (msg,) = errors({"listen": "127.0.0.1:8788"})
    assert msg.startswith("admin.listen: 127.0.0.1:8788 clashes with listen")


def test_tls_files(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    tls = {"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem")}
    assert errors({"listen": {"address": "127.0.0.1:8443", "tls": tls}}) == (
        f"listen.tls.key: {tmp_path / 'k.pem'} does not exist or is not readable",
    )
    assert errors({"listen": {"address": "127.0.0.1:8443", "tls": {"cert": tls["cert"]}}}) == (
        "listen.tls.key: missing (tls needs both cert and key)",
    )


def test_lines() -> None:
    cfg = load_dict(
        {
            "lines": {
                "direct": None,
                "v6": {"bind": "2001:db8::0001"},
                "http": {"proxy": "http://proxy.example.com:3128/"},
                "edge": {"via": "https://edge.example.com:8443/", "token": TOKEN, "compress": False},
            }
        },
        env={},
    )
    assert [(ln.name, ln.kind) for ln in cfg.lines] == [
        ("direct", "direct"),
        ("v6", "direct"),
        ("http", "proxy"),
        ("edge", "via"),
    ]
    assert cfg.line("v6").bind == "2001:db8::1"
    assert cfg.line("http").proxy == "http://proxy.example.com:3128"
    assert cfg.line("edge").via == "https://edge.example.com:8443" and cfg.line("edge").compress == "off"
    errs = errors(
        {
            "lines": {
                "a": {"bind": "192.0.2.1", "proxy": "http://p:1"},
                "b": {"via": "https://edge.example.com"},
                "c": {"proxy": "socks5://user:hunter2-pass@proxy"},
                "d": {"bind": "eth0"},
                "e": {"token": TOKEN},
            }
        }
    )
    assert errs[0].startswith("lines.a: bind and proxy cannot be combined")
    assert errs[1] == "lines.b.token: missing: a peer edge requires a token (one of the edge listener's tokens)"
    assert errs[2].startswith("lines.c.proxy: 'socks5://***@proxy' has no port")
    assert errs[3].startswith("lines.d.bind: 'eth0' is not an IP address")
    assert errs[4].startswith("lines.e.token: only applies to via lines")
    assert "hunter2" not in "\n".join(errs)


def test_zstd_requires_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    import edgeproxy.config.lines as config

    monkeypatch.setattr(config, "_zstd_available", lambda: False)
    (msg,) = errors({"lines": {"edge": {"via": "https://edge.example.com", "token": TOKEN, "compress": "zstd"}}})
    assert msg == "lines.edge.compress: zstd needs the zstandard package (pip install zstandard), or pick br"
    monkeypatch.setattr(config, "_zstd_available", lambda: True)
    cfg = load_dict({"lines": {"edge": {"via": "https://edge.example.com", "token": TOKEN, "compress": "zstd"}}})
    assert cfg.line("edge").compress == "zstd"


def test_via_ca_needs_an_https_edge(tmp_path: Any) -> None:
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    (msg,) = errors({"lines": {"edge": {"via": "http://edge.example.com:8080", "token": TOKEN, "ca": str(ca)}}})
    assert msg == "lines.edge.ca: only applies to an https:// via URL (the hop is plain http)"
    cfg = load_dict({"lines": {"edge": {"via": "https://edge.example.com", "token": TOKEN, "ca": str(ca)}}})
    assert cfg.line("edge").ca == str(ca)


def test_prefix_rules() -> None:
    (msg,) = errors({"upstreams": {"x": {"prefix": "/-/admin", "endpoints": ["https://x.example.com"]}}})
    assert msg.startswith("upstreams.x.prefix: '/-/admin': paths under /-/ are reserved")
    (msg,) = errors({"upstreams": {"x": {"prefix": "v1", "endpoints": ["https://x.example.com"]}}})
    assert msg.startswith("upstreams.x.prefix: 'v1' must be a path starting with /")
    cfg = load_dict({"upstreams": {"x": {"prefix": "/", "endpoints": ["https://x.example.com"]}}})
    assert cfg.upstreams[0].prefix == "/"
    (msg,) = errors({"upstreams": {"Bad.Name": {"prefix": "/x", "endpoints": ["https://x.example.com"]}}})
    assert msg.startswith("upstreams.Bad.Name: an upstream name uses only")


# -- units ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (5, 5.0),
        (1.5, 1.5),
        ("5", 5.0),
        ("250ms", 0.25),
        ("5s", 5.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("100us", 0.0001),
        (" 10 ms ", 0.01),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5 sec", "1d", "-1s", "s", True, None, [1], float("inf"), "1.2.3s"])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (512, 512),
        ("512", 512),
        ("512B", 512),
        ("64KiB", 64 * 1024),
        ("32MiB", 32 * 1024**2),
        ("1GiB", 1024**3),
        ("10KB", 10_000),
        ("2MB", 2_000_000),
        ("1k", 1024),
        ("1M", 1024**2),
        ("1.5KiB", 1536),
        (2048.0, 2048),
    ],
)
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "lots", "-1", "1XB", -5, 1.5, True, None])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


# -- interpolation -------------------------------------------------------------------------


def test_interpolation_default_escape_and_embedding() -> None:
    env = {"PROXY_HOST": "proxy.internal", "KEY": SECRET_KEY, "EMPTY": ""}
    data = {
        "lines": {
            "corp": {"proxy": "http://${PROXY_HOST}:${PROXY_PORT:-3128}"},
            "other": {"proxy": "http://${EMPTY:-fallback.internal}:1"},
        },
        **one_upstream(keys="${KEY}", models={"a": "$${NOT_A_VAR}"}),
    }
    cfg = load_dict(data, env=env)
    assert cfg.line("corp").proxy == "http://proxy.internal:3128"
    assert cfg.line("other").proxy == "http://fallback.internal:1"  # :- also covers a set-but-empty variable
    ep = cfg.upstreams[0].endpoints[0]
    assert ep.keys == (SECRET_KEY,)
    assert ep.model_map() == {"a": "${NOT_A_VAR}"}


def test_interpolated_integers_are_accepted() -> None:
    cfg = load_dict({"failover": {"retries": "${RETRIES}"}}, env={"RETRIES": "4"})
    assert cfg.failover.retries == 4
    assert errors({"failover": {"retries": "4"}}) == ("failover.retries: expected an integer, got a string",)


def test_malformed_reference() -> None:
    (msg,) = errors(one_upstream(keys=["${KEY:-sk-secret-default"]))
    assert msg.startswith("upstreams.openai.endpoints[0].keys[0]: unterminated ${")
    (msg,) = errors(one_upstream(keys=["${1BAD:-sk-secret-default}"]))
    assert msg.startswith("upstreams.openai.endpoints[0].keys[0]: malformed ${...}")
    assert "sk-secret-default" not in msg


# -- secrets -------------------------------------------------------------------------------


def test_dump_redacted_hides_secrets() -> None:
    env = {"KEY": SECRET_KEY, "EDGE": "edge-token-abcdefghijkl", "LISTEN": "listen-token-abcdefghijkl"}
    data = {
        "listen": {"address": "0.0.0.0:8787", "tokens": ["${LISTEN}"]},
        "lines": {
            "corp": {"proxy": "socks5://alice:proxy-password-xyz@127.0.0.1:1080"},
            "tokyo": {"via": "https://edge.example.com:8443", "token": "${EDGE}"},
        },
        **one_upstream(keys=["${KEY}"]),
    }
    cfg = load_dict(data, env=env)
    dump = json.dumps(dump_redacted(cfg))
    for secret in (SECRET_KEY, "edge-token-abcdefghijkl", "listen-token-abcdefghijkl", "proxy-password-xyz"):
        assert secret not in dump
    view = dump_redacted(cfg)
    assert view["lines"]["corp"]["proxy"] == "socks5://alice:***@127.0.0.1:1080"
    assert view["lines"]["tokyo"]["token"] == "***"
    assert view["upstreams"]["openai"]["endpoints"][0]["keys"] == ["***"]
    assert view["listen"][0]["tokens"] == ["***"]
    json.dumps(dump_redacted(default_config()))  # the default is JSON-able too


def test_secrets_absent_from_errors() -> None:
    data = {
        "lines": {"corp": {"proxy": "ftp://bob:proxy-password-xyz@host:1"}},
        **one_upstream(url=f"https://user:{SECRET_KEY}@api.openai.com/v1", keys=[123]),
    }
    text = "\n".join(errors(data))
    assert "proxy-password-xyz" not in text and SECRET_KEY not in text
    assert "upstreams.openai.endpoints[0].keys[0]: expected a string, got an integer" in text
    # an unencoded / or @ in a password, and a key pasted as the URL's user name
    data = {
        "lines": {"p": {"proxy": "http://bob:pass/word@word@proxy"}},
        **one_upstream(url=f"ftp://{SECRET_KEY}@api.openai.com/v1"),
    }
    text = "\n".join(errors(data))
    assert "pass/word" not in text and "word@word" not in text and SECRET_KEY not in text


# -- upstreams -----------------------------------------------------------------------------


def test_provider_inference() -> None:
    ups = {
        "anthropic": {"prefix": "/a", "endpoints": ["https://relay.example.com"]},
        "claude": {"prefix": "/c", "endpoints": ["https://api.anthropic.com"]},
        "vertex": {"prefix": "/g", "endpoints": ["https://europe-west4-aiplatform.googleapis.com"]},
        "relay": {"prefix": "/r", "endpoints": ["https://relay.example.com/v1"]},
        "forced": {"prefix": "/f", "provider": "Gemini", "endpoints": ["https://relay.example.com"]},
    }
    cfg = load_dict({"upstreams": ups}, env={})
    assert {u.name: u.provider for u in cfg.upstreams} == {
        "anthropic": "anthropic",
        "claude": "anthropic",
        "vertex": "gemini",
        "relay": "openai",
        "forced": "gemini",
    }


def test_endpoint_url_parsing() -> None:
    ups = {
        "x": {
            "prefix": "/x/",
            "endpoints": [
                "HTTPS://API.Example.com/v1/",
                {"url": "http://relay.example.com:8080"},
                {"url": "https://api.example.com:443/"},
                {"url": "http://[2001:db8::1]:8000/openai/v1"},
            ],
        }
    }
    cfg = load_dict({"upstreams": ups}, env={})
    up = cfg.upstreams[0]
    assert up.prefix == "/x"
    got = [(e.url, e.scheme, e.host, e.port, e.base_path) for e in up.endpoints]
    assert got == [
        ("https://api.example.com/v1", "https", "api.example.com", 443, "/v1"),
        ("http://relay.example.com:8080", "http", "relay.example.com", 8080, ""),
        ("https://api.example.com", "https", "api.example.com", 443, ""),
        ("http://[2001:db8::1]:8000/openai/v1", "http", "2001:db8::1", 8000, "/openai/v1"),
    ]
    assert up.endpoints[0].origin == "https://api.example.com:443"


def test_per_upstream_failover_overlay() -> None:
    data = {
        "failover": {"retries": 3, "first_event_timeout": "10s", "hedge": "250ms"},
        "upstreams": {
            "a": {"prefix": "/a", "endpoints": ["https://a.example.com"], "failover": {"retries": 0, "hedge": "off"}},
            "b": {"prefix": "/b", "endpoints": ["https://b.example.com"]},
        },
    }
    cfg = load_dict(data, env={})
    a, b = cfg.upstreams
    assert cfg.failover.retries == 3 and cfg.failover.hedge == 0.25
    assert (a.failover.retries, a.failover.first_event_timeout, a.failover.hedge) == (0, 10.0, None)
    assert b.failover == cfg.failover
    (msg,) = errors(
        {"upstreams": {"a": {"prefix": "/a", "endpoints": ["https://a.example.com"], "failover": {"retires": 1}}}}
    )
    assert msg == "upstreams.a.failover.retires: unknown key (did you mean 'retries'?)"


def test_retry_on_parsing() -> None:
    cfg = load_dict({"failover": {"retry_on": ["connect", 429, "503"]}}, env={})
    assert cfg.failover.retry_on == frozenset({"connect", "429", "503"})
    assert load_dict({"failover": {"retry_on": []}}, env={}).failover.retry_on == frozenset()


def test_errors_come_in_document_order() -> None:
    data = {
        "probe": {"intervall": 1},
        **one_upstream(keys=["${MISSING}"]),
        "limits": {"replay_body": "64MiB"},
        "zzz": 1,
    }
    paths = [e.split(":", 1)[0] for e in errors(data)]
    assert paths == ["probe.intervall", "upstreams.openai.endpoints[0].keys[0]", "limits.replay_body", "zzz"]


def test_hedge_values() -> None:
    assert load_dict({"failover": {"hedge": "2s"}}, env={}).failover.hedge == 2.0
    assert load_dict({"failover": {"hedge": False}}, env={}).failover.hedge is None
    assert errors({"failover": {"hedge": 0}}) == (
        "failover.hedge: must be greater than 0 (use off to disable hedging)",
    )


def test_log_buffer() -> None:
    assert default_config().log.buffer == 4 << 20
    assert load_dict({"log": {"buffer": "1MiB"}}, env={}).log.buffer == 1 << 20
    assert errors({"log": {"buffer": "1KiB"}}) == ("log.buffer: 1KiB is too small (at least 64KiB)",)


def test_docs_default_block_is_the_default() -> None:
    """docs/config.md shows the built-in default as YAML; keep the two in step."""
    yaml = pytest.importorskip("yaml")
    text = (CONF.parent / "docs" / "config.md").read_text()
    block = text.split("## The built-in default", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    assert load_dict(yaml.safe_load(block), env={}) == default_config()


def test_duplicate_endpoint_url_is_an_error() -> None:
    raw = {"upstreams": {"openai": {"prefix": "/v1", "endpoints": ["https://a.example/v1", "https://a.example/v1/"]}}}
    with pytest.raises(ConfigError) as err:
        load_dict(raw, env={})
    assert "upstreams.openai.endpoints[1].url" in str(err.value)
    assert "already endpoints[0]" in str(err.value)
