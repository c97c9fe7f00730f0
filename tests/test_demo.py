"""`edgeproxy demo`: the whole script, shortened, with its plain output checked; and Ctrl-C.

The demo runs its own (uv)loop, so these tests are plain functions.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
from io import StringIO

import pytest

from edgeproxy import demo


def ports_in(output: str) -> dict[str, int]:
    """The addresses the demo announced: origin, line A, line B, edgeproxy."""
    found = {}
    for name in ("origin", "line A", "line B", "edgeproxy"):
        m = re.search(rf"^  {name} +(?:http://)?127\.0\.0\.1:(\d+)", output, re.MULTILINE)
        assert m, f"{name} address not in the output"
        found[name] = int(m.group(1))
    return found


def assert_closed(ports: dict[str, int]) -> None:
    for name, port in ports.items():
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
            pytest.fail(f"{name} (127.0.0.1:{port}) still accepts connections")


def blocks(output: str) -> list[str]:
    return [b for b in output.split("\n\n") if re.match(r"\[[1-4]/5\] ", b)]


def test_demo_shows_traffic_moving_and_failover_without_client_errors() -> None:
    out = StringIO()
    rc = demo.main(duration_scale=0.25, out=out, color=False)
    text = out.getvalue()
    print(text)  # pytest shows it when an assertion below fails
    assert rc == 0
    assert "\x1b[" not in text  # plain text when not a terminal
    ports = ports_in(text)

    # Both lines, each with its measured RTT, in every refresh (a new block each time).
    shown = blocks(text)
    assert len(shown) >= 10
    for block in shown:
        assert re.search(r"^  A  ", block, re.MULTILINE) and re.search(r"^  B  ", block, re.MULTILINE)

    def traffic_on(block: str) -> str | None:
        m = re.search(r"^  ([AB]) .*<= traffic$", block, re.MULTILINE)
        return m.group(1) if m else None

    def phase(n: int) -> list[str]:
        return [b for b in shown if b.startswith(f"[{n}/5]")]

    # 1: traffic on A; 2: A degraded, traffic moves to B; 3: back to A; 4: A dies, B takes it.
    assert traffic_on(phase(1)[-1]) == "A"
    assert [traffic_on(b) for b in phase(2)][-1] == "B"
    assert traffic_on(phase(3)[-1]) == "A"
    assert traffic_on(shown[-1]) == "B"
    assert re.search(r"^  A +dead +.* down ", shown[-1], re.MULTILINE)

    events = text.index("phase 2:"), text.index("traffic moves: line A -> line B"), text.index("phase 3:")
    assert events == tuple(sorted(events)), "traffic moved to B during phase 2"
    death = text.index("line A dies (black hole) with")
    assert "edgeproxy failed over" in text[death:]
    assert "path_down" in text[death:]

    summary = text[text.index("[5/5] summary") :]
    m = re.search(r"client requests +(\d+) \(\d+ streams\): (\d+) answered, 0 errors", summary)
    assert m and int(m.group(1)) == int(m.group(2)) > 30, summary
    m = re.search(r"A died with (\d+) requests in flight: (\d+) answered \((\d+) via B\)", summary)
    assert m and int(m.group(1)) == int(m.group(2)) == int(m.group(3)) > 0, summary
    assert re.search(r"A degraded: moved to B after \d+\.\d+ s", summary)
    assert re.search(r"A recovered: back to A after \d+\.\d+ s", summary)
    assert "result: OK" in summary
    assert "client error" not in text

    assert_closed(ports)


def test_ctrl_c_stops_the_demo_and_closes_everything() -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGINT reaches only the main thread")
    out = StringIO()
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        rc = demo.main(duration_scale=1.0, out=out, color=False)
    finally:
        timer.cancel()
    text = out.getvalue()
    assert rc == 130, text
    assert "interrupted" in text
    assert_closed(ports_in(text))


def test_colour_on_request() -> None:
    screen_out = StringIO()
    screen = demo.Screen(screen_out, color=True, live=False)
    screen.draw([[("up", "g"), (" plain", "")]])
    assert screen_out.getvalue() == "\x1b[32mup\x1b[0m plain\n\n"
