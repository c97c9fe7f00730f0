"""The Dockerfile, checked without a Docker engine: its instructions, its install line against
the README's, its build context (.dockerignore), its config, and its HEALTHCHECK run for real."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgeproxy.config import ConfigError, load_file
from tests.conftest import free_port
from tests.fakes.origin import FakeOrigin

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKER_CONFIG = ROOT / "docker" / "edgeproxy.yaml"
IMAGE_CONFIG = "/etc/edgeproxy/edgeproxy.yaml"
TOKEN = "t0k3n-" + "a" * 26


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = (pending + line).strip()
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continuation line"
    return out


def args_of(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def one(name: str) -> str:
    found = args_of(name)
    assert len(found) == 1, f"expected one {name}, found {found}"
    return found[0]


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), value
    return parsed


# -- instructions -----------------------------------------------------------------------------


def test_base_image() -> None:
    assert instructions()[0] == ("FROM", "python:3.11-slim")


def test_runs_as_non_root() -> None:
    users = args_of("USER")
    assert users, "no USER: the image would run as root"
    assert users[-1] not in ("root", "0", "0:0")
    useradd = [shlex.split(r) for r in args_of("RUN") if r.startswith("useradd ")]
    assert len(useradd) == 1, "expected one `RUN useradd ...`"
    argv = useradd[0]
    assert "--system" in argv and argv[argv.index("--uid") + 1] == "10001"
    assert argv[-1] == users[-1]
    # The user exists before USER switches to it, and nothing runs as root after.
    words = [w for w, _ in instructions()]
    assert words.index("USER") == len(words) - 1 - words[::-1].index("USER")  # one USER only
    assert "RUN" not in words[words.index("USER") :]


def test_healthcheck() -> None:
    hc = one("HEALTHCHECK")
    assert "CMD" in hc
    cmd = exec_form(hc.split("CMD", 1)[1].strip())
    assert cmd[0] in ("python3", "python", "/opt/edgeproxy/bin/python")  # no curl in -slim
    assert "http://127.0.0.1:8788/-/healthy" in cmd[-1]
    assert "--timeout=" in hc and "--interval=" in hc


def test_stop_signal_entrypoint_cmd_expose() -> None:
    assert one("STOPSIGNAL") == "SIGTERM"
    assert exec_form(one("ENTRYPOINT")) == ["/opt/edgeproxy/bin/edgeproxy"]
    assert exec_form(one("CMD")) == ["run", "-c", IMAGE_CONFIG]
    assert one("EXPOSE").split() == ["8787", "8788"]


def test_config_copied_to_its_path() -> None:
    copies = [c.split() for c in args_of("COPY")]
    assert ["docker/edgeproxy.yaml", IMAGE_CONFIG] in copies
    assert not any(c[0].startswith("conf/") for c in copies), "conf/ examples listen on 127.0.0.1"


# -- the install is the README's --------------------------------------------------------------


def _install_steps(line: str) -> tuple[list[str], list[str]]:
    """(venv command, pip install command) from `python3 -m venv D && D/bin/pip install ...`,
    the venv directory replaced by VENV."""
    steps = [shlex.split(s) for s in line.split("&&")]
    venv = next(s for s in steps if s[:3] == ["python3", "-m", "venv"])
    vdir = venv[-1]
    pip = next(s for s in steps if s[:1] == [f"{vdir}/bin/pip"] and s[1:2] == ["install"])
    return [*venv[:-1], "VENV"], ["VENV/bin/pip", *pip[1:]]


def readme_install_line() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## The two commands", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "no ```sh block under 'The two commands'"
    return next(line for line in block.group(1).splitlines() if "-m venv" in line)


def test_pip_install_matches_readme() -> None:
    readme_venv, readme_pip = _install_steps(readme_install_line())
    runs = [r for r in args_of("RUN") if "pip install" in r]
    assert len(runs) == 1, runs
    docker_venv, docker_pip = _install_steps(runs[0])
    assert docker_venv == readme_venv
    # Same command and flags, except -e: the image installs the package, not a link to /src.
    assert docker_pip == [a for a in readme_pip if a not in ("-e", "--editable")]
    assert "/opt/edgeproxy/bin/pip install" in runs[0]


def _dockerignore_regexes() -> list[tuple[bool, re.Pattern[str]]]:
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pat = line.lstrip("!").strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx += "(?:.*/)?"
                i += 3
            elif pat.startswith("**", i):
                rx += ".*"
                i += 2
            elif pat[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pat[i] == "?":
                rx += "[^/]"
                i += 1
            elif pat[i] == "[":
                j = pat.index("]", i)
                rx += pat[i : j + 1]
                i = j + 1
            else:
                rx += re.escape(pat[i])
                i += 1
        rules.append((keep, re.compile(rx)))
    return rules


def in_build_context(rel: str) -> bool:
    """Docker's rule: the last pattern matching the path (or a parent directory) wins."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for keep, rx in _dockerignore_regexes():
        if any(rx.fullmatch(p) for p in prefixes):
            included = keep
    return included


def test_build_context_holds_what_pip_needs_and_no_more() -> None:
    for copy in args_of("COPY"):
        *sources, _dest = copy.split()
        for src in sources:
            path = ROOT / src
            assert path.exists(), f"COPY {src}: missing"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                if "__pycache__" in rel:
                    assert not in_build_context(rel), rel
                else:
                    assert in_build_context(rel), f"{rel} is COPY'd but excluded by .dockerignore"
    for secret_or_bulk in (".venv/bin/python", ".git/config", "conf/sidecar.yaml", "tests/conftest.py", "env"):
        assert not in_build_context(secret_or_bulk), secret_or_bulk
    for module in (ROOT / "edgeproxy").glob("*.py"):
        assert in_build_context(module.relative_to(ROOT).as_posix())


# -- docker/edgeproxy.yaml --------------------------------------------------------------------


def test_docker_config_needs_the_token() -> None:
    with pytest.raises(ConfigError) as exc:
        load_file(str(DOCKER_CONFIG), env={})
    assert "EDGEPROXY_TOKEN" in str(exc.value)
    cfg = load_file(str(DOCKER_CONFIG), env={"EDGEPROXY_TOKEN": TOKEN})
    ports = {lc.port for lc in cfg.listen}
    assert cfg.admin.listen is not None
    ports.add(cfg.admin.listen.port)
    assert ports == {int(p) for p in one("EXPOSE").split()}
    for lc in [*cfg.listen, cfg.admin.listen]:
        assert lc.host == "0.0.0.0", "inside a container 127.0.0.1 is unreachable from outside"
        assert lc.tokens == (TOKEN,) or list(lc.tokens) == [TOKEN]


def test_docker_config_is_not_under_conf() -> None:
    # .ci/run checks every conf/*.yaml with no secrets in the environment; this one needs one.
    assert not (ROOT / "conf" / "docker.yaml").exists()


async def test_image_command_and_healthcheck_for_real(tmp_path: Path, origin: FakeOrigin) -> None:
    """ENTRYPOINT + CMD on docker/edgeproxy.yaml (ports and origins moved to this test's), then
    the HEALTHCHECK command: exit 0 while serving, non-zero once stopped."""
    port, admin = free_port("0.0.0.0"), free_port("0.0.0.0")
    text = DOCKER_CONFIG.read_text().replace(":8787", f":{port}").replace(":8788", f":{admin}")
    for real in ("https://api.openai.com", "https://api.anthropic.com", "https://generativelanguage.googleapis.com"):
        text = text.replace(real, origin.url)  # never probe the real APIs from a test
    cfg = tmp_path / "edgeproxy.yaml"
    cfg.write_text(text)

    entry = exec_form(one("ENTRYPOINT"))
    assert entry[0].endswith("/bin/edgeproxy")
    cmd = [str(cfg) if a == IMAGE_CONFIG else a for a in exec_form(one("CMD"))]
    hc = exec_form(one("HEALTHCHECK").split("CMD", 1)[1].strip())
    hc = [sys.executable, *(a.replace("127.0.0.1:8788", f"127.0.0.1:{admin}") for a in hc[1:])]
    env = {**os.environ, "EDGEPROXY_TOKEN": TOKEN}

    def healthcheck() -> int:
        return subprocess.run(hc, env=env, capture_output=True, timeout=10).returncode

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgeproxy",
        *cmd,
        env=env,
        cwd=str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(100):
            if proc.returncode is not None or await asyncio.to_thread(healthcheck) == 0:
                break
            await asyncio.sleep(0.1)
        assert proc.returncode is None, "edgeproxy exited"
        assert await asyncio.to_thread(healthcheck) == 0
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=20)
        assert proc.returncode == 0, err.decode()
        assert TOKEN.encode() not in out + err
        assert await asyncio.to_thread(healthcheck) != 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_healthcheck_command_compiles() -> None:
    hc = exec_form(one("HEALTHCHECK").split("CMD", 1)[1].strip())
    assert hc[1] == "-c"
    compile(hc[2], "<HEALTHCHECK>", "exec")
