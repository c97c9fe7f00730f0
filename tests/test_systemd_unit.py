"""systemd/edgeproxy.service: hardening keys present, `systemd-analyze verify` clean, and
edgeproxy really runs under its MemoryDenyWriteExecute= seccomp filter.

`systemd-analyze verify` checks that ExecStart's binary exists. The shipped unit names
/usr/local/bin/edgeproxy (the install's symlink), which a dev box or CI container lacks, so the
test verifies a copy whose ExecStart points at this venv's real `edgeproxy`; everything else is
byte for byte the shipped unit. Without systemd-analyze (apt-get install systemd) it skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes.util
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import free_port
from tests.fakes.origin import FakeOrigin

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "edgeproxy.service"
SHIPPED_EXEC = "/usr/local/bin/edgeproxy"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value in order (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {raw!r}"
        assert "=" in line, f"not a key=value line: {raw!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


def venv_edgeproxy() -> Path:
    exe = Path(sys.executable).parent / "edgeproxy"
    if not exe.exists():
        found = shutil.which("edgeproxy")
        if found is None:
            pytest.skip("no edgeproxy executable next to this python or on PATH")
        exe = Path(found)
    return exe.resolve()


# -- static checks -------------------------------------------------------------------------------

EXPECTED = {
    "Type": "notify",
    "NotifyAccess": "main",
    "ExecStart": f"{SHIPPED_EXEC} run -c /etc/edgeproxy/edgeproxy.yaml",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "Restart": "on-failure",
    "RestartSec": "1s",
    "TimeoutStopSec": "45s",
    "WatchdogSec": "30s",
    "LimitNOFILE": "65536",
    "DynamicUser": "yes",
    "ConfigurationDirectory": "edgeproxy",
    "RuntimeDirectory": "edgeproxy",
    "EnvironmentFile": "-/etc/edgeproxy/env",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_hardening_key(key: str) -> None:
    values = service().get(key)
    assert values is not None, f"[Service] {key}= missing"
    assert values == [EXPECTED[key]], f"[Service] {key}={values}"


def test_no_capabilities_granted() -> None:
    svc = service()
    assert "AmbientCapabilities" not in svc  # only in a comment, for ports below 1024
    assert "User" not in svc  # DynamicUser, not root
    assert svc["ExecStart"][0].split()[0] == SHIPPED_EXEC


def test_stop_timeout_covers_default_drain() -> None:
    from edgeproxy.config import default_config

    drain = default_config().drain_timeout
    stop = float(service()["TimeoutStopSec"][0].removesuffix("s"))
    assert stop >= drain + 10, f"TimeoutStopSec={stop}s leaves no margin over drain_timeout={drain}s"


def test_commented_examples_present() -> None:
    text = UNIT.read_text()
    assert "#LoadCredential=" in text
    assert "#AmbientCapabilities=CAP_NET_BIND_SERVICE" in text
    assert "#CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in text


# -- systemd-analyze verify ------------------------------------------------------------------

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian: apt-get install -y systemd)"
)


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, env={**os.environ, "SYSTEMD_PAGER": ""}
    )


@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """The unit, with only ExecStart's binary swapped for this venv's, verifies without a word."""
    text = UNIT.read_text()
    assert text.count(f"ExecStart={SHIPPED_EXEC} ") == 1
    copy = tmp_path / "edgeproxy.service"
    copy.write_text(text.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={venv_edgeproxy()} "))
    r = analyze("verify", "--man=no", str(copy))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (r.stdout + r.stderr).strip() == "", r.stdout + r.stderr  # no warnings either


@needs_analyze
def test_systemd_analyze_verify_shipped_unit() -> None:
    """The shipped unit as is: the only complaint allowed is the binary this box has not installed."""
    r = analyze("verify", "--man=no", str(UNIT))
    out = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    if Path(SHIPPED_EXEC).exists():
        assert r.returncode == 0 and not out, out
    else:
        assert out, "expected systemd-analyze to report the missing ExecStart binary"
        assert all(SHIPPED_EXEC in line for line in out), out


# -- MemoryDenyWriteExecute=yes, for real -------------------------------------------------------

# The seccomp filter systemd installs for MemoryDenyWriteExecute=yes (src/shared/seccomp-util.c):
# mmap with PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect adding PROT_EXEC and shmat with SHM_EXEC
# fail with EPERM. Installed before edgeproxy's extension modules are loaded, as under systemd.
MDWE_RUNNER = r"""
import ctypes, mmap, sys

lib = ctypes.CDLL(sys.argv[1], use_errno=True)

class ArgCmp(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [
        ("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)
    ]

lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_rule_add_array.argtypes = [
    ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(ArgCmp)
]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
lib.seccomp_release.argtypes = [ctypes.c_void_p]
SCMP_ACT_ALLOW, SCMP_ACT_EPERM, SCMP_CMP_MASKED_EQ = 0x7FFF0000, 0x00050000 | 1, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000

ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
RULES = (("mmap", PROT_WRITE | PROT_EXEC), ("mprotect", PROT_EXEC), ("pkey_mprotect", PROT_EXEC), ("shmat", SHM_EXEC))
for name, mask in RULES:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    cmp = ArgCmp(2, SCMP_CMP_MASKED_EQ, mask, mask)
    if lib.seccomp_rule_add_array(ctx, SCMP_ACT_EPERM, nr, 1, ctypes.byref(cmp)) != 0:
        sys.exit(f"seccomp_rule_add {name} failed")
if lib.seccomp_load(ctx) != 0:
    sys.exit("seccomp_load failed")
lib.seccomp_release(ctx)

try:  # the filter must be in force, or this test proves nothing
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except PermissionError:
    pass
else:
    sys.exit("writable+executable mmap allowed: filter not in force")

import brotli
assert brotli.decompress(brotli.compress(b"edgeproxy" * 100)) == b"edgeproxy" * 100

from edgeproxy.cli import main
sys.exit(main(sys.argv[2:]))
"""


LIBSECCOMP = ctypes.util.find_library("seccomp")


@pytest.mark.skipif(sys.platform != "linux", reason="seccomp is Linux-only")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="filter written for x86_64/aarch64")
@pytest.mark.skipif(LIBSECCOMP is None, reason="libseccomp not installed (Debian: libseccomp2)")
async def test_runs_under_memory_deny_write_execute(tmp_path: Path, origin: FakeOrigin) -> None:
    """Start-up, DNS (pycares), a request and an SSE stream (httptools, orjson, uvloop) and a
    graceful stop, all under MemoryDenyWriteExecute=yes's filter: no JIT, no W+X pages."""
    assert LIBSECCOMP is not None
    port, admin = free_port(), free_port()
    cfg = tmp_path / "edgeproxy.yaml"
    cfg.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"admin: {{listen: 127.0.0.1:{admin}}}\n"
        "log: {access: json, level: info}\n"
        "upstreams:\n"
        "  openai:\n"
        "    prefix: /v1\n"
        # a host name, so the resolver (c-ares through pycares' callbacks) runs too
        f"    endpoints: [{{url: 'http://localhost:{origin.port}/v1'}}]\n"
    )
    runner = tmp_path / "mdwe_runner.py"
    runner.write_text(MDWE_RUNNER)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(runner),
        LIBSECCOMP,
        "run",
        "-c",
        str(cfg),
        cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                if proc.returncode is not None:
                    break
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(f"http://127.0.0.1:{admin}/-/healthy") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("edgeproxy did not come up under the filter")
            assert proc.returncode is None, "edgeproxy exited under the filter"

            chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["choices"][0]["message"]["content"]
            async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**chat, "stream": True}) as r:
                assert r.status == 200
                body = await r.text()
            assert "data: [DONE]" in body
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=20)
        assert proc.returncode == 0, err.decode()
        assert b"Traceback" not in err, err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
