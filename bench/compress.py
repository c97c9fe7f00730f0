"""Edge hop compression: bytes on the wire, per-event delay, codec CPU, decompression bombs.

Topology of sections 1-3, everything in this one process on one uvloop, on loopback:

    app (aiohttp client) -> sidecar (edgeproxy, one `via` line, compress: MODE)
        -> LineSim (tests.fakes.linesim: counts bytes_up / bytes_down on the hop)
        -> edge (edgeproxy, listener with tokens) -> fake origin (tests.fakes.origin)

One sidecar and one LineSim per mode (off, br, gzip, zstd), one edge and one origin for all.
Probes run once at start, then not again (interval 1 h), so no probe bytes are counted.

  1. Request body: a ~30 KB multi-turn agent conversation (system prompt, tools, English and
     Chinese turns, Python code, tool results: pytest output, JSON logs), generated from word
     lists and sentence templates with a seeded RNG; it is turn k of the conversation. Bytes up on
     the hop for one POST (LineSim, headers included) and the body alone (the sidecar's
     edgeproxy_hop_bytes_total), in two cases: the first request of a conversation (cold: the
     sidecar's delta bases are emptied first), and the next turn (delta: the previous turn's body,
     the same request without the last assistant reply and user message, is sent first and not
     counted; turn k then crosses as a conversation delta). Each 3 times; the fake origin's
     recorded body must equal the app's, byte for byte.
  2. A 500-event stream (--events): the fake origin streams OpenAI chat.completion.chunk
     events, a few tokens of a generated answer each, one every 20 ms. Bytes down on the hop.
  3. Per-event delay of that stream: arrival at the app (time.time()) - x_origin_ts (the
     origin's time.time() when it wrote the event); p50/p99 per mode, and added vs off.
     2 rounds (--rounds), modes alternating in order; the GC is off while a stream runs.
  4. CPU: codec.encoder/decoder directly on the request body and on the stream's events
     (flush per event), in CPU time (time.process_time) per MB (10^6 bytes) of raw data.
  5. Bombs: 10 GiB of zeros compressed with br, gzip and zstd, built streaming (16 MiB of
     zeros per segment, each ending in a flush; the segments after the first are identical, so
     they are repeated instead of recompressed: --verify-bombs decodes each bomb in full once).
     Sent as a hop request (Content-Encoding, token, absolute-form target) to an edge running
     as a subprocess (`python -m edgeproxy run -c FILE`): time to the 413 and the edge's peak
     RSS growth (/proc/PID/clear_refs resets VmHWM before each bomb; VmHWM after - VmRSS
     before). And the same bombs fed straight to codec.decoder here (peak RSS and tracemalloc).

    .venv/bin/python bench/compress.py --quick      # smoke run, ~25 s
    flock /tmp/bench.lock .venv/bin/python bench/compress.py   # full run, ~100 s
"""

# ruff: noqa: RUF001  (the Chinese text uses full-width punctuation, as Chinese does)
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import gettext
import json
import random
import re
import string
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as c
import aiohttp
import brotli
import uvloop

sys.path.insert(0, str(c.ROOT))
from edgeproxy.config import load_dict
from edgeproxy.filters.deltas import Bases
from edgeproxy.filters.hop import ViaHop
from edgeproxy.ops.server import Proxy
from edgeproxy.proto import codec
from tests.fakes.linesim import LineSim
from tests.fakes.origin import FakeOrigin

try:
    import zstandard
except ImportError:  # pragma: no cover - zstd is then left out
    zstandard = None  # type: ignore[assignment]

Res = dict[str, Any]
TOKEN = "bench-compress-token-0123456789abcdef"
MODES = ("off", *codec.ENCODINGS)
# What the app sends: a plain client (no Accept-Encoding of its own, so the sidecar decodes).
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench", "Accept-Encoding": "identity"}
TS = re.compile(rb'"x_origin_ts":([0-9.eE+-]+)')
MAX_BODY = 32 << 20  # edgeproxy's default limits.max_body: the decoders' limit here too
GIB = 1 << 30
SEGMENT = 1 << 24  # bomb segment: 16 MiB of zeros
CHARS_PER_EVENT = 13  # ~3 tokens of English per content chunk


def mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "MISSED")


def kb(n: float) -> str:
    return f"{n / 1000:.1f}"


# =========================================================================== realistic text
#
# Word lists and templates for an agent conversation about a service's code. The RNG picks
# templates and fills slots; nothing is repeated on purpose except what a real agent repeats
# (one function it read is quoted back, edited). `realism` compares each generated kind of text
# with real text of the same size (license text, apt's Chinese messages, stdlib source).

COMP = ["the retry loop", "the connection pool", "the config loader", "the request handler", "the cache layer",
        "the rate limiter", "the SSE parser", "the health checker", "the token bucket", "the DNS resolver",
        "the TLS setup", "the access logger", "the metrics exporter", "the job scheduler", "the upload endpoint",
        "the session store", "the auth middleware", "the migration script", "the CLI entry point",
        "the reload handler", "the webhook receiver", "the billing worker", "the search indexer",
        "the payment client", "the feature-flag client", "the background sync", "the invoice renderer",
        "the email queue", "the audit trail", "the thumbnail service"]  # fmt: skip
PROBLEM = ["leaks a file descriptor on every failed connect", "swallows the original exception",
           "retries POST requests that are not idempotent", "blocks the event loop while it parses the response",
           "reads the whole body into memory before checking its size", "ignores the timeout passed by the caller",
           "races with the shutdown path during a reload", "keeps a reference to every request it has seen",
           "returns stale data for about a minute after a deploy", "double-counts requests that were retried",
           "fails silently when the config file has a typo", "opens a new TLS session for every call",
           "sorts the results as strings instead of numbers", "never releases the lock if the callback raises",
           "logs the API key in plain text at debug level", "computes the backoff with integer division",
           "treats an empty list as a missing value", "assumes the wall clock never goes backwards",
           "drops the last partial line of the stream", "uses the same mutable default for every instance"]  # fmt: skip
FIX = ["wrap the call in asyncio.timeout and surface the error", "move the parsing into a worker thread",
       "put a bounded queue between the producer and the consumer", "check Content-Length before reading",
       "add an idempotency key and retry only on connection errors", "hold the lock in a context manager",
       "build the SSL context once at startup", "redact secrets in the log formatter",
       "measure durations with a monotonic clock", "validate the config against a schema at startup",
       "compare the values as integers after parsing", "reuse one session and close it on shutdown",
       "add jitter to the backoff and cap it at thirty seconds", "make the default explicit instead of None",
       "stream the body in chunks of 64 KiB", "keep the last partial line until the next read"]  # fmt: skip
SYMPTOM = ["a slow climb in memory until the pod is killed", "occasional 502s from the load balancer",
           "requests that hang for exactly thirty seconds", "duplicate rows in the orders table",
           "a burst of timeouts right after every deploy", "one core pinned at a hundred percent",
           "log lines without a request id", "clients that see a truncated JSON body",
           "a retry storm whenever the upstream is slow", "alerts that fire and clear every few minutes"]  # fmt: skip
CAUSE = ["the handler catches BaseException and returns None", "the default timeout is None, so it waits forever",
         "the generator is never closed when the client disconnects", "the cache key is built from an unordered set",
         "the retry decorator wraps the write as well as the read", "the connection goes back to the pool too early",
         "two tasks share one buffer without a lock", "the settings are read once, at import time",
         "the parser treats a blank line as the end of the stream", "the counter is reset on every reload"]  # fmt: skip
BEHAVIOR = ["returns early when the input is empty", "raises ValueError naming the bad field",
            "closes the connection on any error", "logs one line per failure, not one per retry",
            "keeps at most a thousand entries", "waits five seconds at most", "reports the real status code",
            "skips the expensive check for cached entries", "emits a metric for every rejected request"]  # fmt: skip
TEST_DESC = ["sends a body one byte over the limit", "cancels the request halfway through the stream",
             "reloads the config while a request is in flight", "feeds a response without a trailing newline",
             "makes the upstream answer after the deadline", "passes an empty list and expects an empty result",
             "runs two workers against the same key"]  # fmt: skip
CAVEAT = ["the old clients still send the header in lower case", "the staging database is much smaller",
          "this path is also used by the nightly export", "the library changed its default in the last release",
          "some callers rely on the exception type", "the metric name is part of a dashboard"]  # fmt: skip
EN_USER = [
    "Can you look at {comp}? Since yesterday we see {symptom}.",
    "I think {comp} {problem}, but I am not sure. Can you check {file}?",
    "Please run the tests for {file} and tell me what fails.",
    "That makes sense. What happens to {comp} if we {fix}?",
    "We deploy on Thursday, so I would prefer a small change. Is {n} lines realistic?",
    "Good catch. Can you also write a test that {test}?",
    "Before you change {func}(), show me where else it is called.",
    "The on-call engineer says {comp} {problem}. Does that match the logs?",
    "Why does {func}() take a timeout argument if {comp} never uses it?",
    "Ok, go ahead with that, and keep the public interface of {comp} unchanged.",
]
EN_ASSIST = [
    "I looked at {comp} in {file}, and the problem is that it {problem}.",
    "The simplest fix is to {fix}; that keeps the public API the same.",
    "Before changing anything I want to confirm that {comp} is the culprit, because the trace points at {func}().",
    "In production this shows up as {symptom}, which matches what you described.",
    "If we {fix}, the p99 latency should go back to about {n} ms.",
    "Note that {func}() is also called from {func2}(), so the change affects both paths.",
    "I ran the tests: {n} passed and {m} failed, all of them in {test_file}.",
    "The reason {comp} {problem} is that {cause}.",
    "This came in with the refactor that split {comp} out of {comp2}.",
    "Another option is to {fix}, but that needs a migration and I would keep this change small.",
    "Here is the updated {func}(); the only change in behaviour is that it now {behavior}.",
    "We should also add a regression test that {test}.",
    "One thing to keep in mind: {caveat}.",
    "After the change, {comp} {behavior}, and {symptom} should stop.",
    "I could not reproduce it locally, probably because {caveat}.",
    "Looking at the history of {file}, {func}() has not changed in {n} months, so the cause is elsewhere.",
    "The logs show {n} errors between 02:00 and 02:15, all from {comp}.",
    "To be safe I would {fix} first and look at {comp2} in a separate change.",
]
ZH_COMP = ["连接池", "配置加载", "重试逻辑", "请求处理函数", "缓存层", "限流器", "日志模块", "健康检查",
           "数据库迁移脚本", "认证中间件", "任务调度器", "上传接口", "会话存储", "监控指标", "命令行工具",
           "消息队列消费者", "支付回调", "搜索索引", "定时任务", "网关"]  # fmt: skip
ZH_PROB = ["在高并发的时候会卡住", "没有正确关闭文件句柄", "设置的超时时间根本没有生效", "会把整个请求体一次性读进内存",
           "重启以后状态就丢了", "偶尔会返回重复的数据", "报错信息里看不到真正的原因", "在网络抖动时会一直重试",
           "占用的内存一直在涨", "把用户的密钥打印到了日志里", "遇到空列表直接抛异常",
           "用的是本地时区的时间戳"]  # fmt: skip
ZH_SCENE = ["生产环境里", "压测的时候", "网络不稳定的时候", "升级到新版本以后", "晚上跑批处理任务的时候",
            "用户量比较大的时候", "切换机房之后", "灰度发布期间", "凌晨两点左右", "上周五上线以后"]  # fmt: skip
ZH_ACTION = ["加一个超时", "改成异步调用", "把这部分逻辑拆成单独的函数", "补几个单元测试", "给重试次数加一个上限",
             "在启动时校验配置", "在关闭的时候释放连接", "用上下文管理器包起来", "把错误码透传给调用方",
             "加上请求编号方便排查", "把缓存的过期时间调短一点"]  # fmt: skip
ZH_RESULT = ["接口的响应时间明显变长", "有一部分请求直接失败了", "监控上出现了很多超时告警", "数据库连接数被占满",
             "用户那边看到的是空白页面", "账单金额对不上", "服务被容器平台反复重启"]  # fmt: skip
ZH_USER = [
    "我们在{scene}发现{comp}{prob}，结果{result}。",
    "你能帮我看一下{comp}吗？{scene}它{prob}。",
    "我怀疑问题出在{comp}，因为{scene}{result}，而且日志里没有别的异常。",
    "如果我们{action}，是不是就能避免{comp}{prob}？",
    "先别急着改代码，我想确认一下{comp}是不是只在{scene}才会{prob}。",
    "另外，{comp}的文档写得不太清楚，新同事经常不知道要{action}。",
    "之前的做法是直接{action}，但是这样{comp}还是会{prob}。",
    "麻烦把修改后的{func}函数完整地贴出来，我想和原来的版本对比一下。",
    "测试环境里一切正常，只有{scene}才会出现这个问题。",
    "这个改动会不会影响{comp}？它也调用了{func}。",
    "顺便问一下，{comp}现在的超时是{n}秒，这个值合理吗？",
    "上次出问题的时候，我们花了{n}个小时才定位到{comp}。",
    "从监控来看，{scene}错误率大约是百分之{n}，主要集中在{comp}。",
    "我们团队的约定是所有外部调用都要{action}，但{comp}是个例外。",
    "这个问题其实去年就有人报告过，只是当时{comp}的流量还很小。",
]
ZH_ASSIST = [
    "好的，我先看一下{file}里的{func}函数。",
    "原因是{comp}在出错的时候没有释放资源，所以{scene}会{prob}。",
    "我建议分两步：第一步{action}，第二步{action2}。",
    "这样修改以后，{comp}在{scene}也不会{prob}了。",
    "需要注意的是，{func}也被{func2}调用，所以两条路径都要测试。",
    "下面是修改后的代码，主要变化在异常处理和超时这两部分。",
    "如果部署环境不允许{action}，也可以先{action2}，效果差一些但风险更小。",
    "我已经在本地跑过测试，{n}个用例全部通过。",
    "从你贴的日志看，{scene}{result}，和{comp}{prob}的表现是一致的。",
    "总结一下：{comp}{prob}，我们先{action}，然后补充监控。",
    "你说得对，我刚才漏看了{file}里对{func}的第二次调用。",
]
VERBS = ["load", "parse", "fetch", "build", "send", "close", "refresh", "validate", "retry", "flush", "render",
         "resolve", "acquire", "release", "schedule", "encode", "decode", "merge", "split", "normalize"]  # fmt: skip
NOUNS = ["config", "headers", "session", "token", "request", "response", "batch", "record", "entry", "chunk",
         "payload", "user", "invoice", "event", "job", "key", "pool", "window", "quota", "snapshot"]  # fmt: skip
DIRS = ["app/", "src/api/", "services/billing/", "internal/net/", "lib/core/", "workers/"]
ARGS = [("timeout", "float"), ("retries", "int"), ("items", "list[str]"), ("key", "str"), ("data", "bytes"),
        ("limit", "int"), ("client", "httpx.AsyncClient"), ("user_id", "int"), ("path", "Path"),
        ("headers", "dict[str, str]"), ("strict", "bool"), ("deadline", "float | None")]  # fmt: skip
IDENT_HEAD = ["max", "min", "last", "next", "raw", "cached", "pending", "default", "local", "remote", "total"]
IDENT_TAIL = ["id", "ids", "map", "count", "size", "at", "ms", "list", "by_key", "info", "state", "ref"]
ENV_DEFAULTS = ["30", "info", "false", "/var/run/app.sock", "https://api.internal:8443", "utf-8", "64KiB"]
EXC = ["ValueError", "KeyError", "TimeoutError", "OSError", "httpx.HTTPError", "json.JSONDecodeError"]
LEVELS = ["info", "info", "info", "warning", "error"]
SYSTEM = (
    "You are a senior software engineer working as a coding agent inside the user's repository. "
    "You can read files, search the code, run shell commands and edit files through the tools "
    "provided. Work in small, verifiable steps: read the relevant code before proposing a change, "
    "explain the cause of a problem before fixing it, and run the tests after every edit.\n\n"
    "Rules:\n- Never invent file contents or command output; use the tools to look.\n"
    "- Keep changes minimal and keep public interfaces stable unless the user asks otherwise.\n"
    "- When you show code, show complete functions, not fragments with ellipses.\n"
    "- Prefer the standard library; ask before adding a dependency.\n"
    "- Answer in the language the user writes in (English or Chinese).\n"
    "- If a command fails, read its output and say what you think went wrong.\n"
    "- Do not print secrets, tokens or personal data, even if they appear in logs.\n\n"
    "The repository is a Python 3.11 service (aiohttp, asyncpg, pydantic) deployed on Kubernetes. "
    "Tests run with `pytest -q`; the linter is ruff. The current date is 2025-06-12."
)


def _schema(desc: str, props: dict[str, tuple[str, str]], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": {k: {"type": t, "description": d} for k, (t, d) in props.items()},
            "required": required}  # fmt: skip


TOOLS = [
    {"type": "function", "function": {"name": "read_file", "description": "Read a file of the repository.",
     "parameters": _schema("", {"path": ("string", "Path relative to the repository root."),
                                "start_line": ("integer", "First line to read (1-based)."),
                                "end_line": ("integer", "Last line to read, inclusive.")}, ["path"])}},
    {"type": "function", "function": {"name": "run_command", "description": "Run a shell command in the repository "
     "and return its exit status, stdout and stderr (truncated to 20 KB).",
     "parameters": _schema("", {"command": ("string", "The command line, run with bash -lc."),
                                "timeout_s": ("integer", "Kill the command after this many seconds.")},
                           ["command"])}},
    {"type": "function", "function": {"name": "search_code", "description": "Search the repository with a "
     "regular expression; returns matching lines with file and line number.",
     "parameters": _schema("", {"pattern": ("string", "A ripgrep regular expression."),
                                "glob": ("string", "Only files matching this glob, e.g. *.py.")}, ["pattern"])}},
    {"type": "function", "function": {"name": "edit_file", "description": "Replace an exact snippet of a file.",
     "parameters": _schema("", {"path": ("string", "Path relative to the repository root."),
                                "old": ("string", "The exact text to replace; must occur once."),
                                "new": ("string", "The replacement text.")}, ["path", "old", "new"])}},
]  # fmt: skip


class TextGen:
    """Generates the conversation; counts the bytes of each kind of text it produced."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.kinds: dict[str, list[str]] = {"en": [], "zh": [], "code": [], "logs": [], "quoted": []}
        self.files: list[tuple[str, list[str]]] = []  # files read so far: (path, functions)

    def pick(self, xs: list[str]) -> str:
        return self.r.choice(xs)

    def func(self) -> str:
        return f"{self.pick(VERBS)}_{self.pick(NOUNS)}"

    def file(self) -> str:
        return f"{self.pick(DIRS)}{self.pick(NOUNS)}{self.r.choice(['', 's', '_utils', '_client'])}.py"

    def slots(self) -> dict[str, Any]:
        r = self.r
        comp, comp2 = r.sample(COMP, 2)
        zc = r.sample(ZH_COMP, 1)[0]
        za, za2 = r.sample(ZH_ACTION, 2)
        return dict(comp=comp, comp2=comp2, problem=self.pick(PROBLEM), fix=self.pick(FIX), symptom=self.pick(SYMPTOM),
                    cause=self.pick(CAUSE), behavior=self.pick(BEHAVIOR), test=self.pick(TEST_DESC),
                    caveat=self.pick(CAVEAT), file=self.file(), func=self.func(), func2=self.func(),
                    test_file=f"tests/test_{self.pick(NOUNS)}.py", n=r.randint(2, 90), m=r.randint(1, 4),
                    scene=self.pick(ZH_SCENE), prob=self.pick(ZH_PROB), action=za, action2=za2,
                    result=self.pick(ZH_RESULT), zcomp=zc)  # fmt: skip

    def english(self, templates: list[str], sentences: int) -> str:
        out = []
        for t in self.r.sample(templates, min(sentences, len(templates))):  # no template twice in a message
            s = t.format(**self.slots())
            out.append(s[0].upper() + s[1:])
        text = " ".join(out)
        self.kinds["en"].append(text)
        return text

    def chinese(self, templates: list[str], sentences: int) -> str:
        out = []
        for t in self.r.sample(templates, min(sentences, len(templates))):
            sl = self.slots()
            sl["comp"] = sl["zcomp"]
            out.append(t.format(**sl))
        text = "".join(out)
        self.kinds["zh"].append(text)
        return text

    # ---- code

    def ident(self) -> str:
        r = self.r
        return r.choice(
            [
                self.pick(NOUNS),
                f"{self.pick(NOUNS)}_{r.choice(IDENT_TAIL)}",
                f"{r.choice(IDENT_HEAD)}_{self.pick(NOUNS)}",
            ]
        )

    def comment(self) -> str:
        s = self.pick(EN_ASSIST).format(**self.slots())
        return "# " + s[0].lower() + s[1:] if len(s) < 90 else "# " + self.pick(BEHAVIOR)

    def statement(self, args: list[str], var: str) -> list[str]:
        r, a = self.r, self.pick(args) if args else "value"
        f, k, v2 = self.func(), self.ident(), self.ident()
        n = r.choice([2, 3, 5, 8, 10, 16, 30, 50, 64, 100, 128, 500, 1000, 4096, 65536, r.randint(1, 999)])
        msg = self.pick(PROBLEM).replace('"', "")
        env, want = r.choice(ENV_DEFAULTS), r.choice(["str", "bytes", "a mapping", "a list"])
        choices = [
            [f"if {a} is None:", f'    raise ValueError("{a} is required")'],
            [f"{v2} = {f}({a}, timeout={r.choice([0.5, 1.0, 2.5, 5, 10, 30])})"],
            [f"for {k} in {a}:", f"    if not {k}:", "        continue", f"    {var}.append({f}({k}))"],
            [
                "try:",
                f"    {v2} = await {f}({a})",
                f"except {self.pick(EXC)} as exc:",
                f'    log.warning("{f} failed for %s: %s", {a}, exc)',
                "    return None",
            ],
            [f'{v2} = {{"{k}": {a}, "{self.ident()}": {n}}}'],
            [
                f"if len({a}) > {n}:",
                f'    log.info("truncating {a} from %d to %d", len({a}), {n})',
                f"    {a} = {a}[:{n}]",
            ],
            ["async with self._lock:", f"    self._{k}[{a}] = {var}"],
            [f'{v2} = [x.strip() for x in {a}.split("{r.choice([",", ";", "|", ":"])}") if x.strip()]'],
            ["elapsed = time.monotonic() - started", f'metrics.observe("{f}_seconds", elapsed)'],
            [self.comment(), f"{v2} = self._{k} or {f}()"],
            [
                f"while {a} and attempt < {r.randint(2, 8)}:",
                "    attempt += 1",
                f"    await asyncio.sleep(min({r.choice([0.1, 0.25, 0.5])} * 2 ** attempt, {r.choice([5, 10, 30])}))",
            ],
            [f"{v2} = {{{k}.id: {k} for {k} in {a} if {k}.{self.ident()} is not None}}"],
            [
                f"if not isinstance({a}, {r.choice(['str', 'bytes', 'dict', 'list', 'int'])}):",
                f'    raise TypeError(f"expected {want}, got {{type({a}).__name__}}")',
            ],
            [f'{v2} = os.environ.get("{r.choice(IDENT_HEAD).upper()}_{self.pick(NOUNS).upper()}", "{env}")'],
            [f"assert {a} >= 0, {a}"] if r.random() < 0.5 else [f"{var}.sort(key=lambda e: e.{self.ident()})"],
            [f'raise {self.pick(EXC).split(".")[-1]}("{msg}")'] if r.random() < 0.3 else [self.comment()],
            [
                f'with open({a}, "{r.choice(["rb", "r", "w", "ab"])}") as fh:',
                f"    {v2} = fh.{r.choice(['read()', 'readline()', 'write(data)', 'readlines()'])}",
            ],
            [f'{v2} = {a}.get("{k}") or {a}.get("{self.ident()}", {r.choice(["None", "0", "[]", "{}", "False"])})'],
        ]
        return r.choice(choices)

    def function(self, method: bool) -> str:
        r = self.r
        name = self.func()
        args = r.sample(ARGS, r.randint(1, 3))
        sig = ", ".join((["self"] if method else []) + [f"{n}: {t}" for n, t in args])
        ret = r.choice(
            ["dict[str, Any]", "list[str]", "bytes", "None", "int", "Response", "bool", f"{self.pick(NOUNS).title()}"]
        )
        doc = self.pick(EN_ASSIST).format(**self.slots()).split(";")[0].rstrip(".")
        lines = [f"{'async ' if r.random() < 0.5 else ''}def {name}({sig}) -> {ret}:", f'    """{doc}."""']
        var = r.choice(["result", "out", "parts", "entry", "resp", "batch", "found", "pending", "rows"])
        lines.append(f"    {var} = []" if r.random() < 0.5 else "    started = time.monotonic()")
        for _ in range(r.randint(2, 6)):
            lines += ["    " + s for s in self.statement([n for n, _ in args], var)]
        lines.append(f"    return {var}")
        return "\n".join(lines)

    def module(self, funcs: int) -> tuple[str, list[str]]:
        head = ["from __future__ import annotations", "", "import asyncio", "import logging", "import os",
                "import time", "from typing import Any", "", "import httpx", "",
                f"from .{self.pick(NOUNS)} import {self.func()}", "",
                "log = logging.getLogger(__name__)", ""]  # fmt: skip
        fs = [self.function(method=False) for _ in range(funcs)]
        text = "\n".join(head) + "\n\n" + "\n\n\n".join(fs) + "\n"
        self.kinds["code"].append(text)
        return text, fs

    def edited(self, fn: str) -> str:
        """A function the agent read, quoted back with a change (what agents do)."""
        lines = fn.split("\n")
        at = self.r.randint(2, max(2, len(lines) - 1))
        lines[at:at] = ["    " + s for s in self.statement(["timeout", "deadline"], "result")]
        text = "\n".join(lines)
        self.kinds["quoted"].append(text)
        return text

    # ---- tool output

    def pytest_log(self) -> str:
        r = self.r
        files = [f"tests/test_{self.pick(NOUNS)}.py" for _ in range(r.randint(4, 7))]
        lines = ["============================= test session starts ==============================",
                 "platform linux -- Python 3.11.9, pytest-8.2.2, pluggy-1.5.0",
                 f"rootdir: /home/dev/{self.pick(NOUNS)}-service", "configfile: pyproject.toml",
                 "plugins: asyncio-0.23.7, cov-5.0.0", f"collected {r.randint(80, 300)} items", ""]  # fmt: skip
        total, failed = 0, []
        for i, f in enumerate(files):
            res = "".join(r.choice("....................F.s") for _ in range(r.randint(5, 40)))
            total += len(res)
            lines.append(f"{f} {res:<45} [{100 * (i + 1) // len(files):3d}%]")
            failed += [f"{f}::test_{self.func()}" for ch in res if ch == "F"]
        lines += ["", "=================================== FAILURES ==================================="]
        for t in failed[:2]:
            fn, n = self.func(), r.randint(20, 400)
            lines += [f"____________________________ {t.split('::')[1]} ____________________________", "",
                      f"    async def {t.split('::')[1]}(client, {self.pick(NOUNS)}):",
                      f"        resp = await client.post(\"/v1/{self.pick(NOUNS)}s\", json={{\"limit\": {n}}})",
                      f">       assert resp.status == {r.choice([200, 201, 204])}",
                      f"E       AssertionError: assert {r.choice([500, 502, 422, 409])} == 200",
                      f"E        +  where {r.choice([500, 502, 422])} = <ClientResponse(http://127.0.0.1:"
                      f"{r.randint(30000, 60000)}"
                      f"/v1/{self.pick(NOUNS)}s) [500 Internal Server Error]>.status", "",
                      f"{t.split('::')[0]}:{r.randint(20, 300)}: AssertionError",
                      "----------------------------- Captured log call ------------------------------",
                      f"ERROR    app.{self.pick(NOUNS)}:{fn}.py:{r.randint(10, 200)} {fn} failed: "
                      f"{self.pick(PROBLEM)}"]  # fmt: skip
        lines.append(
            f"========== {len(failed)} failed, {total - len(failed)} passed in {r.uniform(2, 40):.2f}s =========="
        )
        text = "\n".join(lines)
        self.kinds["logs"].append(text)
        return text

    def json_logs(self, n: int) -> str:
        r = self.r
        recs = []
        t = 1749690000 + r.randint(0, 80000)
        for _ in range(n):
            t += r.randint(0, 40)
            level = self.pick(LEVELS)
            recs.append({"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{r.randint(0, 999):03d}Z",
                         "level": level, "logger": f"app.{self.pick(NOUNS)}",
                         "msg": f"{self.func()} " + (self.pick(PROBLEM) if level != "info" else "ok"),
                         "request_id": "req_" + "".join(r.choices(string.hexdigits.lower()[:16], k=16)),
                         "status": r.choice([200, 200, 200, 201, 429, 500, 502, 504]),
                         "latency_ms": round(r.lognormvariate(4, 1), 1),
                         "user_id": r.randint(1000, 999999)})  # fmt: skip
        text = json.dumps(recs, ensure_ascii=False, indent=1)
        self.kinds["logs"].append(text)
        return text

    def call_id(self) -> str:
        return "call_" + "".join(self.r.choices(string.ascii_letters + string.digits, k=24))


def conversation(seed: int, target: int) -> tuple[dict[str, Any], TextGen]:
    """A chat.completions request of about ``target`` bytes (compact UTF-8 JSON, as sent by SDKs)."""
    g = TextGen(seed)
    r = g.r
    msgs: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    doc: dict[str, Any] = {"model": "gpt-4o", "messages": msgs, "tools": TOOLS, "temperature": 0.2}

    def size() -> int:
        return len(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode())

    def tool(name: str, args: dict[str, Any], result: str, note: str | None) -> None:
        cid = g.call_id()
        call = {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        msgs.append({"role": "assistant", "content": note, "tool_calls": [call]})
        msgs.append({"role": "tool", "tool_call_id": cid, "content": result})

    zh = False
    while size() < target:
        zh = r.random() < 0.4
        if zh:
            msgs.append({"role": "user", "content": g.chinese(ZH_USER, r.randint(2, 5))})
        else:
            msgs.append({"role": "user", "content": g.english(EN_USER, r.randint(1, 3))})
        step = r.random()
        if step < 0.4:
            path = g.file()
            text, fs = g.module(r.randint(3, 5))
            g.files.append((path, fs))
            tool("read_file", {"path": path}, text, g.english(EN_ASSIST, 1) if not zh else None)
        elif step < 0.6:
            tool("run_command", {"command": "pytest -q -x " + g.file().replace(".py", ""), "timeout_s": 300},
                 g.pytest_log(), None)  # fmt: skip
        elif step < 0.75:
            tool("run_command", {"command": "kubectl logs deploy/api --since=15m | jq -c 'select(.level!=\"info\")'"},
                 g.json_logs(r.randint(4, 9)), None)  # fmt: skip
        answer = g.chinese(ZH_ASSIST, r.randint(3, 6)) if zh else g.english(EN_ASSIST, r.randint(3, 7))
        if g.files and r.random() < 0.5:
            fn = r.choice(g.files[-1][1])
            tail = g.chinese(ZH_ASSIST, 1) if zh else g.english(EN_ASSIST, 1)
            answer += "\n\n```python\n" + g.edited(fn) + "\n```\n\n" + tail
        msgs.append({"role": "assistant", "content": answer})
    msgs.append({"role": "user", "content": g.english(EN_USER, 2)})
    return doc, g


def previous_turn(doc: dict[str, Any]) -> dict[str, Any]:
    """The request an SDK sent the turn before ``doc``: the same request without the last user
    message and the assistant reply before it (the answer to that previous request). Same keys
    in the same order, serialized the same way by the caller."""
    msgs = doc["messages"]
    assert msgs[-1]["role"] == "user" and msgs[-2]["role"] == "assistant" and not msgs[-2].get("tool_calls")
    return doc | {"messages": msgs[:-2]}


def _shared_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def answer_text(seed: int, chars: int) -> str:
    """The assistant's streamed answer: English prose, then a code block, then prose."""
    g = TextGen(seed)
    parts, n = [], 0
    while n < chars:
        p = g.english(EN_ASSIST, g.r.randint(2, 4))
        if len(parts) == 2:
            p += "\n\n```python\n" + g.function(method=False) + "\n```"
        parts.append(p)
        n += len(p) + 2
    return "\n\n".join(parts)[:chars]


def _mo_texts(*domains: str) -> list[str]:
    out = []
    for d in domains:
        with open(f"/usr/share/locale/zh_CN/LC_MESSAGES/{d}.mo", "rb") as f:
            out.append("\n".join(v for k, v in gettext.GNUTranslations(f)._catalog.items() if k))  # type: ignore[attr-defined]
    return out


def _stdlib(*mods: str) -> list[str]:
    base = Path(asyncio.__file__).parent.parent
    return [(base / m).read_text() for m in mods]


REFERENCES: dict[str, tuple[str, Callable[[], list[str]]]] = {
    "en": ("English prose (license texts GPL-3, Apache-2.0)",
           lambda: [Path(f"/usr/share/common-licenses/{n}").read_text() for n in ("GPL-3", "Apache-2.0")]),
    "zh": ("Chinese (apt, dpkg, adduser zh_CN messages)", lambda: _mo_texts("apt", "dpkg", "adduser")),
    "code": ("Python modules (stdlib asyncio/base_events, argparse, logging)",
             lambda: _stdlib("asyncio/base_events.py", "argparse.py", "logging/__init__.py")),
    "logs": ("tool output: pytest, JSON logs (no reference)", lambda: []),
    "quoted": ("functions quoted back, edited (no reference)", lambda: []),
}  # fmt: skip


def br_ratio(data: bytes) -> float:
    return len(data) / len(codec.encode("br", data))


def realism(g: TextGen) -> list[list[Any]]:
    """br ratio of each kind of generated text vs real text cut to the same size (mean over the
    references found): a generator that repeats itself more than real text shows up here."""
    rows = []
    for kind, texts in g.kinds.items():
        gen = "\n".join(texts).encode()
        if not gen:
            continue
        name, refs = REFERENCES[kind]
        ratios = []
        with contextlib.suppress(Exception):
            for ref in refs():
                cut = ref.encode()[: len(gen)]
                if len(cut) >= len(gen) * 0.9:
                    ratios.append(br_ratio(cut))
        rows.append([name, len(gen), round(br_ratio(gen), 2), round(sum(ratios) / len(ratios), 2) if ratios else None])
    return rows


# =========================================================================== proxies in process


def proxy_cfg(origin: FakeOrigin, listen: Any, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "listen": listen,
        "admin": {"listen": "off"},
        "log": {"access": "off"},
        "upstreams": {"openai": {"prefix": "/v1", "endpoints": [{"url": origin.url + "/v1"}]}},
        "probe": {"interval": "1h", "timeout": "2s"},  # one probe at start, then quiet
    }
    cfg.update(extra)
    return cfg


async def start_proxy(cfg: dict[str, Any]) -> Proxy:
    p = Proxy(load_dict(cfg, env={}))
    await p.start()
    return p


async def ready(p: Proxy, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(path.health.last_probe_ok for path in p.state.paths.values()):
            return
        await asyncio.sleep(0.02)
    raise RuntimeError("paths not probed in time")


class Hop:
    """One sidecar with its own LineSim in front of the shared edge."""

    def __init__(self, mode: str, sim: LineSim, side: Proxy) -> None:
        self.mode, self.sim, self.side = mode, sim, side
        lc = side.config.listen[0]
        self.url = f"http://{lc.host}:{lc.port}/v1/chat/completions"


def metric(p: Proxy, *labels: str) -> float:
    return float(p.metrics.hop_bytes.values.get(labels, 0.0))


# =========================================================================== sections 1-3


def forget_bases(side: Proxy) -> None:
    """Empty the sidecar's memory of what it sent over its `via` lines (the bases of deltas):
    the next request is then the first of a conversation on that line, whatever ran before."""
    for chain in side.pipeline.chains.values():
        for hop in chain.all_filters():
            if isinstance(hop, ViaHop):
                b = hop.bases
                hop.bases = Bases(b.max_count, b.max_bytes, b.max_body)


class EdgeBaseLookups:
    """Counts the edge's look-ups of delta bases (Bases.get: only the edge calls it, once per
    request that came as a delta): found or not (a miss makes the sidecar resend whole)."""

    def __init__(self) -> None:
        self.hits = self.misses = 0
        self._saved = Bases.get

    def __enter__(self) -> EdgeBaseLookups:
        me, get = self, self._saved

        def counted(bases: Bases, digest: str) -> bytes | None:
            found = get(bases, digest)
            if found is None:
                me.misses += 1
            else:
                me.hits += 1
            return found

        Bases.get = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        Bases.get = self._saved  # type: ignore[method-assign]


async def post_once(s: aiohttp.ClientSession, hop: Hop, origin: FakeOrigin, body: bytes) -> Res:
    """One POST of ``body`` through the hop: bytes on the line, the body before and after the
    sidecar (its hop_bytes metric: whole body raw, what crossed; none counted = sent as it is),
    whether the edge took it as a delta, and whether the origin got exactly ``body``."""
    up0, down0 = hop.sim.bytes_up, hop.sim.bytes_down
    raw0, wire0 = metric(hop.side, "sidecar", "edge", "up", "raw"), metric(hop.side, "sidecar", "edge", "up", "wire")
    origin.requests.clear()
    origin.record = True
    try:
        with EdgeBaseLookups() as lookups:
            async with s.post(hop.url, data=body, headers=HEADERS) as r:
                got = await r.read()
                status = r.status
            await asyncio.sleep(0.02)
    finally:
        origin.record = False
    raw = metric(hop.side, "sidecar", "edge", "up", "raw") - raw0
    wire = metric(hop.side, "sidecar", "edge", "up", "wire") - wire0
    seen = [x.body for x in origin.requests]
    origin.requests.clear()
    return {"status": status, "bytes_up": hop.sim.bytes_up - up0, "bytes_down": hop.sim.bytes_down - down0,
            "body_raw": raw if raw else len(body), "body_wire": wire if raw else len(body),
            "response_bytes": len(got), "delta_hits": lookups.hits, "delta_misses": lookups.misses,
            "origin_identical": seen == [body]}  # fmt: skip


class CodecTimer:
    """Times the codec calls made in this process while a stream runs (the edge's per-event
    process + flush, the sidecar's per-event feed), by wrapping codec.Encoder/Decoder methods:
    the codec's own share of the added delay, in place (caches as cold as they really are)."""

    def __init__(self) -> None:
        self.enc: list[float] = []  # µs per event: process + flush
        self.dec: list[float] = []  # µs per feed of an event-sized chunk
        self._saved: list[tuple[type, str, Any]] = []

    def __enter__(self) -> CodecTimer:
        timer, clock = self, time.perf_counter
        proc, flush, feed = codec.Encoder.process, codec.Encoder.flush, codec.Decoder.feed
        pending = [0.0]

        def t_process(enc: codec.Encoder, data: bytes) -> bytes:
            t0 = clock()
            out = proc(enc, data)
            pending[0] = clock() - t0
            return out

        def t_flush(enc: codec.Encoder) -> bytes:
            t0 = clock()
            out = flush(enc)
            timer.enc.append((pending[0] + clock() - t0) * 1e6)
            return out

        def t_feed(dec: codec.Decoder, data: bytes) -> bytes:
            t0 = clock()
            out = feed(dec, data)
            if len(data) < 2048:  # not the request body the edge decodes once
                timer.dec.append((clock() - t0) * 1e6)
            return out

        for cls, name, fn in ((codec.Encoder, "process", t_process), (codec.Encoder, "flush", t_flush),
                              (codec.Decoder, "feed", t_feed)):  # fmt: skip
            self._saved.append((cls, name, getattr(cls, name)))
            setattr(cls, name, fn)
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, name, fn in self._saved:
            setattr(cls, name, fn)


async def stream_once(s: aiohttp.ClientSession, hop: Hop, edge: Proxy, body: bytes, expected: int) -> Res:
    sim = hop.sim
    up0, down0 = sim.bytes_up, sim.bytes_down
    e_raw0, e_wire0 = metric(edge, "edge", "", "down", "raw"), metric(edge, "edge", "", "down", "wire")
    lat: list[float] = []
    events: list[bytes] = []
    raw = 0
    done = False
    clock = time.time
    gc.collect()
    gc.disable()
    timer = CodecTimer()
    try:
        with timer:
            async with s.post(hop.url, data=body, headers=HEADERS) as r:
                status = r.status
                buf = b""
                async for chunk in r.content.iter_any():
                    now = clock()
                    raw += len(chunk)
                    parts = (buf + chunk).split(b"\n\n")
                    buf = parts.pop()
                    for ev in parts:
                        events.append(ev + b"\n\n")
                        if ev.startswith(b"data: {"):
                            m = TS.search(ev)
                            if m:
                                lat.append((now - float(m.group(1))) * 1000)
                        elif ev.startswith(b"data: [DONE]"):
                            done = True
    finally:
        gc.enable()
    await asyncio.sleep(0.05)
    return {"status": status, "events": len(lat), "intact": done and len(lat) == expected, "lat_ms": lat,
            "raw_bytes": raw, "bytes_down": sim.bytes_down - down0, "bytes_up": sim.bytes_up - up0,
            "edge_body_raw": metric(edge, "edge", "", "down", "raw") - e_raw0,
            "edge_body_wire": metric(edge, "edge", "", "down", "wire") - e_wire0, "sse": events,
            "enc_us": timer.enc, "dec_us": timer.dec}  # fmt: skip


async def live(a: argparse.Namespace, res: Res, body_doc: dict[str, Any],
               prev_doc: dict[str, Any]) -> tuple[FakeOrigin, list[bytes]]:  # fmt: skip
    """Sections 1-3. Returns the origin (still running, for section 5) and the plain SSE events."""
    origin = FakeOrigin()
    origin.record = False
    origin.events = a.events
    origin.event_interval = a.interval
    origin.reply = answer_text(11, CHARS_PER_EVENT * a.events)
    await origin.start()
    edge = await start_proxy(proxy_cfg(origin, {"address": f"127.0.0.1:{c.free_port()}", "tokens": [TOKEN]}))
    eport = edge.config.listen[0].port
    hops: dict[str, Hop] = {}
    sims: list[LineSim] = []
    try:
        for mode in MODES:
            sim = LineSim("127.0.0.1", eport or 0)
            await sim.start()
            sims.append(sim)
            lines = {"edge": {"via": f"http://{sim.address}", "token": TOKEN, "compress": mode}}
            side = await start_proxy(proxy_cfg(origin, f"127.0.0.1:{c.free_port()}", lines=lines))
            hops[mode] = Hop(mode, sim, side)
        await ready(edge)
        for h in hops.values():
            await ready(h.side)

        body = json.dumps(body_doc, ensure_ascii=False, separators=(",", ":")).encode()
        prev = json.dumps(prev_doc, ensure_ascii=False, separators=(",", ":")).encode()
        sbody = json.dumps(body_doc | {"stream": True}, ensure_ascii=False, separators=(",", ":")).encode()
        timeout = aiohttp.ClientTimeout(total=a.events * a.interval * 5 + 30)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as s:
            # 1: per mode (after a warm-up), 3 times each, the bytes must not vary:
            #  cold: turn k as the first request of a conversation (the sidecar has sent nothing
            #        like it: its bases are emptied first);
            #  next turn: the previous turn's body first (not counted), then turn k: a delta.
            req: Res = {}
            turn: Res = {}
            for mode, h in hops.items():
                forget_bases(h.side)
                await post_once(s, h, origin, body)
                cold, nxt = [], []
                for _ in range(3):
                    forget_bases(h.side)
                    cold.append(await post_once(s, h, origin, body))
                for _ in range(3):
                    forget_bases(h.side)
                    prev_run = await post_once(s, h, origin, prev)
                    nxt.append(await post_once(s, h, origin, body) | {"prev": prev_run})
                for out, runs in ((req, cold), (turn, nxt)):
                    out[mode] = runs[-1] | {"stable": len({(x["bytes_up"], x["body_wire"]) for x in runs}) == 1,
                                            "statuses": [x["status"] for x in runs],
                                            "origin_identical_all": all(x["origin_identical"] for x in runs),
                                            "delta_hits_all": [x["delta_hits"] for x in runs],
                                            "delta_misses_all": [x["delta_misses"] for x in runs]}  # fmt: skip
                sent = cold + nxt + [x["prev"] for x in nxt]
                bad = [x for x in sent if x["status"] != 200 or not x["origin_identical"]]
                if bad:
                    print(f"  !! {mode}: {len(bad)} request(s) not 200 or the origin's body differs from the app's",
                          flush=True)  # fmt: skip
            res["request"] = req
            res["request_next_turn"] = turn
            # 2 + 3: streams, one at a time, modes alternating in order per round
            expected = a.events + 2  # role chunk + content chunks + finish chunk
            runs_by: dict[str, list[Res]] = {m: [] for m in MODES}
            for rnd in range(a.rounds):
                order = list(MODES) if rnd % 2 == 0 else list(reversed(MODES))
                for mode in order:
                    t0 = time.monotonic()
                    r = await stream_once(s, hops[mode], edge, sbody, expected)
                    runs_by[mode].append(r)
                    print(f"  [{rnd + 1}/{a.rounds}] stream {mode:4}: {r['events']}/{expected} events, "
                          f"{r['bytes_down']} B down, {time.monotonic() - t0:.1f} s", flush=True)  # fmt: skip
        sse = runs_by["off"][0]["sse"]
        res["streams"] = runs_by
        res["sse_sample"] = sse[len(sse) // 2] if sse else b""
    finally:
        for h in hops.values():
            with contextlib.suppress(Exception):
                await h.side.stop(1.0)
        with contextlib.suppress(Exception):
            await edge.stop(1.0)
        for sim in sims:
            await sim.stop()
    return origin, sse


# =========================================================================== section 4: CPU


def cpu_per_call(fn: Callable[[], object], min_s: float) -> float:
    """CPU seconds per call of fn: the best of 3 batches, each at least min_s of CPU time."""
    fn()
    n, t = 1, 0.0
    while True:
        t0 = time.process_time()
        for _ in range(n):
            fn()
        t = time.process_time() - t0
        if t >= min_s / 3:
            break
        n *= 2
    best = t / n
    for _ in range(2):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t0) / n)
    return best


def encode_events(name: str, events: list[bytes]) -> list[bytes]:
    e = codec.encoder(name)
    out = [e.process(ev) + e.flush() for ev in events]
    out.append(e.finish())
    return [o for o in out if o]


def decode_all(name: str, parts: list[bytes]) -> int:
    d = codec.decoder(name, MAX_BODY)
    n = sum(len(d.feed(p)) for p in parts)
    d.finish()
    return n


def cpu_section(a: argparse.Namespace, body: bytes, events: list[bytes]) -> list[Res]:
    out = []
    raw_ev = sum(map(len, events))
    for name in codec.ENCODINGS:
        wire_body = codec.encode(name, body)
        assert decode_all(name, [wire_body]) == len(body)
        parts = encode_events(name, events)
        assert decode_all(name, parts) == raw_ev
        t = {
            "body_enc": cpu_per_call(lambda n=name: codec.encode(n, body), a.cpu_s),
            "body_dec": cpu_per_call(lambda n=name, w=wire_body: decode_all(n, [w]), a.cpu_s),
            "ev_enc": cpu_per_call(lambda n=name: encode_events(n, events), a.cpu_s),
            "ev_dec": cpu_per_call(lambda n=name, p=parts: decode_all(n, p), a.cpu_s),
        }
        mb_body, mb_ev = len(body) / 1e6, raw_ev / 1e6
        out.append({"codec": name, "body_raw": len(body), "body_wire": len(wire_body),
                    "body_enc_us_per_mb": round(t["body_enc"] * 1e6 / mb_body),
                    "body_dec_us_per_mb": round(t["body_dec"] * 1e6 / mb_body),
                    "body_enc_us": round(t["body_enc"] * 1e6, 1), "body_dec_us": round(t["body_dec"] * 1e6, 1),
                    "events": len(events), "events_raw": raw_ev, "events_wire": sum(map(len, parts)),
                    "ev_enc_us_per_mb": round(t["ev_enc"] * 1e6 / mb_ev),
                    "ev_dec_us_per_mb": round(t["ev_dec"] * 1e6 / mb_ev),
                    "ev_enc_us_per_event": round(t["ev_enc"] * 1e6 / len(events), 2),
                    "ev_dec_us_per_event": round(t["ev_dec"] * 1e6 / len(events), 2)})  # fmt: skip
    return out


def stream_variants(events: list[bytes]) -> dict[str, list[bytes]]:
    """The measured events; without the origin's x_origin_ts; with OpenAI-style random padding."""
    r = random.Random(5)
    no_ts = [re.sub(rb',"x_origin_ts":[0-9.eE+-]+', b"", ev) for ev in events]
    alnum = (string.ascii_letters + string.digits).encode()

    def pad(ev: bytes) -> bytes:
        if not ev.startswith(b"data: {"):
            return ev
        junk = bytes(r.choice(alnum) for _ in range(r.randint(1, 24)))
        return ev[: ev.rindex(b"}")] + b',"obfuscation":"' + junk + b'"}\n\n'

    return {
        "as measured": events,
        "without x_origin_ts": no_ts,
        "+ obfuscation (OpenAI default)": [pad(e) for e in no_ts],
    }


# =========================================================================== section 5: bombs


def bomb(name: str, gib: int) -> bytes:
    """``gib`` GiB of zeros in coding ``name``, built streaming: 16 MiB segments, each ending in a
    flush (gzip: a full flush, which also resets the window); after the first, every segment is
    the same bytes (checked on the first 4), so it is repeated rather than recompressed."""
    zeros = b"\0" * SEGMENT
    n = gib * GIB // SEGMENT
    if name == "br":
        b = brotli.Compressor(quality=codec.BROTLI_QUALITY, lgwin=codec.BROTLI_WINDOW)
        segs = [b.process(zeros) + b.flush() for _ in range(4)]
        end, head = b.finish(), b""
    elif name == "gzip":
        z = zlib.compressobj(9, zlib.DEFLATED, -15)
        segs = [z.compress(zeros) + z.flush(zlib.Z_FULL_FLUSH) for _ in range(4)]
        crc = crc32_zeros(n * SEGMENT)
        head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
        end = z.flush(zlib.Z_FINISH) + crc.to_bytes(4, "little") + ((n * SEGMENT) & 0xFFFFFFFF).to_bytes(4, "little")
    else:
        assert zstandard is not None
        zc = zstandard.ZstdCompressor(level=3).compressobj()
        segs = [zc.compress(zeros) + zc.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for _ in range(4)]
        end, head = zc.flush(), b""
    if not segs[1] == segs[2] == segs[3]:
        raise RuntimeError(f"{name}: segments differ; cannot build the bomb by repetition")
    return head + segs[0] + segs[1] * (n - 1) + end


def crc32_zeros(n: int) -> int:
    """CRC-32 of n zero bytes, by squaring the 'append zeros' operator (zlib's crc32_combine)."""

    def times(mat: list[int], vec: int) -> int:
        s, i = 0, 0
        while vec:
            if vec & 1:
                s ^= mat[i]
            vec >>= 1
            i += 1
        return s

    def square(mat: list[int]) -> list[int]:
        return [times(mat, mat[i]) for i in range(32)]

    # operator for one zero bit, then squared to one byte, ... ; applied to the crc register
    odd = [0xEDB88320] + [1 << i for i in range(31)]
    even = square(odd)  # 2 bits
    odd = square(even)  # 4 bits
    crc = 0xFFFFFFFF  # CRC-32 starts from all ones (pre-inversion), zeros only shift the register
    length = n
    while True:
        even = square(odd)
        if length & 1:
            crc = times(even, crc)
        length >>= 1
        if not length:
            break
        odd = square(even)
        if length & 1:
            crc = times(odd, crc)
        length >>= 1
        if not length:
            break
    return crc ^ 0xFFFFFFFF


def vm(pid: int | str) -> dict[str, float]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(m.group(1)) / 1024 for k in ("VmRSS", "VmHWM") if (m := re.search(rf"^{k}:\s+(\d+) kB", text, re.M))}


def reset_peak(pid: int | str) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/PID/clear_refs)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def decode_bomb(name: str, path: str, repeat: int = 3) -> Res:
    """In a fresh process (--decode-bomb): feed a bomb whole to codec.decoder(name, 32 MiB)
    ``repeat`` times; time to TooLarge, peak RSS growth (VmHWM reset first), tracemalloc peak."""
    data = Path(path).read_bytes()
    runs = []
    for _ in range(repeat):
        gc.collect()
        reset = reset_peak("self")
        before = vm("self")
        d = codec.decoder(name, MAX_BODY)
        err = None
        t0 = time.perf_counter()
        try:
            d.feed(data)
            d.finish()
        except codec.TooLarge as exc:
            err = str(exc)
        ms = (time.perf_counter() - t0) * 1000
        after = vm("self")
        growth = after["VmHWM"] - before["VmRSS"] if reset else None
        runs.append((ms, growth, err, d.raw, d.wire))
        del d
    tracemalloc.start()
    with contextlib.suppress(codec.TooLarge):
        codec.decoder(name, MAX_BODY).feed(data)
    traced = tracemalloc.get_traced_memory()[1] / (1 << 20)
    tracemalloc.stop()
    growths = [g for _, g, *_ in runs if g is not None]
    return {"codec": name, "wire": len(data), "rejected": all(r[2] is not None for r in runs), "error": runs[0][2],
            "ms": round(max(r[0] for r in runs), 2), "ms_first": round(runs[0][0], 2),
            "output_before_reject": runs[0][3], "input_consumed": runs[0][4],
            "peak_rss_growth_mb": round(max(growths), 1) if growths else None,
            "rss_before_mb": round(before["VmRSS"], 1),
            "tracemalloc_peak_mb": round(traced, 1)}  # fmt: skip


def direct_bombs(bombs: dict[str, bytes], tmp: Path) -> list[Res]:
    out = []
    for name, data in bombs.items():
        f = tmp / f"bomb.{name}"
        f.write_bytes(data)
        p = subprocess.run(
            [c.PY, __file__, "--decode-bomb", name, str(f)], capture_output=True, timeout=120, check=False
        )
        try:
            out.append(json.loads(p.stdout.decode().strip().splitlines()[-1]))
        except (ValueError, IndexError):
            out.append({"codec": name, "wire": len(data), "rejected": False, "error": p.stderr.decode()[-300:],
                        "ms": float("nan"), "output_before_reject": None, "input_consumed": None,
                        "peak_rss_growth_mb": None, "tracemalloc_peak_mb": None})  # fmt: skip
    return out


async def raw_hop(port: int, request: bytes) -> tuple[int, bytes, float]:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return int(lines[0].split()[1]), body, (time.perf_counter() - t0) * 1000
    finally:
        writer.close()


def hop_request(target: str, body: bytes, coding: str) -> bytes:
    head = (f"POST {target} HTTP/1.1\r\nHost: x\r\nx-edgeproxy-token: {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Encoding: {coding}\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


async def edge_bombs(a: argparse.Namespace, origin: FakeOrigin, tmp: Path, procs: c.Procs,
                     bombs: dict[str, bytes], body: bytes) -> Res:  # fmt: skip
    port, admin = c.free_port(), c.free_port()
    cfg = tmp / "edge.yaml"
    cfg.write_text(
        f"listen: [{{address: '127.0.0.1:{port}', tokens: ['{TOKEN}']}}]\n"
        f"admin: {{listen: '127.0.0.1:{admin}'}}\nlog: {{access: 'off'}}\n"
        f"upstreams:\n  openai: {{prefix: /v1, endpoints: [{{url: '{origin.url}/v1'}}]}}\n"
        "probe: {interval: 1h, timeout: 2s}\ndrain_timeout: 1s\n"
    )
    p = procs.start("edge", [c.PY, "-m", "edgeproxy", "run", "-c", str(cfg)], log=tmp / "edge.log")
    await asyncio.to_thread(c.wait_http, f"http://127.0.0.1:{admin}/-/ready", p)
    await asyncio.to_thread(c.wait_port, port, p)
    target = f"{origin.url}/v1/chat/completions"
    # warm-up: real compressed hop requests (decoder, JSON, pool to the origin all used once)
    warm = []
    for name in codec.ENCODINGS:
        for _ in range(3):
            st, _, ms = await raw_hop(port, hop_request(target, codec.encode(name, body), name))
            warm.append(st)
    await asyncio.sleep(0.3)
    out: Res = {"warmup_statuses": warm, "idle": vm(p.pid), "runs": {}}
    for name, data in bombs.items():
        runs = []
        for _ in range(a.bomb_repeat):
            reset = reset_peak(p.pid)
            before = vm(p.pid)
            st, resp, ms = await raw_hop(port, hop_request(target, data, name))
            await asyncio.sleep(0.1)
            after = vm(p.pid)
            runs.append({"status": st, "ms": round(ms, 2), "rss_before_mb": round(before["VmRSS"], 1),
                         "hwm_after_mb": round(after["VmHWM"], 1), "rss_after_mb": round(after["VmRSS"], 1),
                         "peak_growth_mb": round(after["VmHWM"] - before["VmRSS"], 1) if reset else None,
                         "body": resp[:160].decode("utf-8", "replace")})  # fmt: skip
        out["runs"][name] = runs
    out["after"] = vm(p.pid)
    out["alive"] = p.poll() is None  # (then stopped here: its exit is expected)
    out["origin_requests"] = origin.request_count
    procs.stop(p)
    with contextlib.suppress(OSError):
        out["log_problems"] = [ln[:200] for ln in (tmp / "edge.log").read_text(errors="replace").splitlines()
                               if any(w in ln for w in ("ERROR", "Traceback", "CRITICAL"))][:5]  # fmt: skip
    return out


def verify_bombs(bombs: dict[str, bytes]) -> dict[str, int]:
    """Decode each bomb in full with the plain libraries (slow): how many bytes it really holds."""
    out = {}
    for name, data in bombs.items():
        n = 0
        if name == "br":
            d = brotli.Decompressor()
            for i in range(0, len(data), 64):
                n += len(d.process(data[i : i + 64], output_buffer_limit=SEGMENT))
                while not d.is_finished() and (more := d.process(b"", output_buffer_limit=SEGMENT)):
                    n += len(more)
            assert d.is_finished(), "brotli bomb does not end"
        elif name == "gzip":
            z = zlib.decompressobj(31)
            buf = data
            while buf:
                n += len(z.decompress(buf, SEGMENT))
                buf = z.unconsumed_tail
            n += len(z.flush())
            assert z.eof, "gzip bomb does not end (trailer/CRC)"
        else:
            assert zstandard is not None
            zd = zstandard.ZstdDecompressor().decompressobj()
            for i in range(0, len(data), 256):
                n += len(zd.decompress(data[i : i + 256]))
        out[name] = n
        print(f"  verify {name}: {n} bytes ({n / GIB:.2f} GiB)", flush=True)
    return out


# =========================================================================== run + report


async def bench(a: argparse.Namespace, tmp: Path, procs: c.Procs, res: Res) -> None:
    doc, gen = conversation(7, a.body_kb * 1000)
    prev_doc = previous_turn(doc)
    body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    prev = json.dumps(prev_doc, ensure_ascii=False, separators=(",", ":")).encode()
    shared = _shared_prefix(prev, body)
    res["body"] = {"bytes": len(body), "messages": len(doc["messages"]),
                   "turn": sum(m["role"] == "user" for m in doc["messages"]),
                   "prev_bytes": len(prev), "prev_messages": len(prev_doc["messages"]), "shared_prefix": shared,
                   "rest_bytes": len(body) - shared,
                   "rest_br_bytes": len(codec.encode("br", body[shared:])),
                   "kinds_bytes": {k: sum(len(t.encode()) for t in v) for k, v in gen.kinds.items()},
                   "realism": realism(gen)}  # fmt: skip
    print(f"1-3: request body {len(body)} B, {len(doc['messages'])} messages; stream {a.events} events "
          f"every {a.interval * 1000:g} ms, {a.rounds} round(s) x {len(MODES)} modes...", flush=True)  # fmt: skip
    origin, sse = await live(a, res, doc, prev_doc)
    try:
        print("4: codec CPU...", flush=True)
        res["cpu"] = cpu_section(a, body, sse)
        res["stream_variants"] = {
            label: {name: round(sum(map(len, evs)) / sum(map(len, encode_events(name, evs))), 2)
                    for name in codec.ENCODINGS} | {"raw_per_event": round(sum(map(len, evs)) / len(evs), 1)}
            for label, evs in stream_variants(sse).items()
        }  # fmt: skip
        print(f"5: building {a.bomb_gib} GiB bombs...", flush=True)
        t0 = time.perf_counter()
        bombs = {name: bomb(name, a.bomb_gib) for name in codec.ENCODINGS}
        res["bomb_build_s"] = round(time.perf_counter() - t0, 2)
        res["bomb_sizes"] = {k: len(v) for k, v in bombs.items()}
        if a.verify_bombs:
            res["bomb_verified_bytes"] = await asyncio.to_thread(verify_bombs, bombs)
        res["bomb_direct"] = await asyncio.to_thread(direct_bombs, bombs, tmp)
        res["bomb_edge"] = await edge_bombs(a, origin, tmp, procs, bombs, body)
    finally:
        await origin.stop()


def report(a: argparse.Namespace, res: Res, bg: dict[str, float], la0: str) -> None:
    targets: Res = {}
    # ---- 1
    b = res["body"]
    print(f"\n1. Request body: turn {b['turn']} of a conversation, {b['bytes']} B of compact UTF-8 JSON, "
          f"{b['messages']} messages (system prompt, 4 tools, English/Chinese turns, tool calls and results); "
          f"by kind (B): {b['kinds_bytes']}")  # fmt: skip
    print(f"   previous turn (sent first, not counted): {b['prev_bytes']} B, {b['prev_messages']} messages (the same"
          f" without the last assistant reply and user message); shared prefix {b['shared_prefix']} B, so turn"
          f" {b['turn']} adds {b['rest_bytes']} B after it ({b['rest_br_bytes']} B in br): the 2 new messages,"
          f" then the tools and the rest of the request, which the sidecar also finds shared (a suffix) and"
          f" leaves out of the delta")  # fmt: skip
    rows = []
    integrity = []
    for kind, label, key in (("cold", "first request of a conversation (cold)", "request"),
                             ("delta", "next turn (delta)", "request_next_turn")):  # fmt: skip
        req = res[key]
        off = req["off"]
        for mode, r in req.items():
            up_ratio = off["bytes_up"] / r["bytes_up"]
            body_ratio = r["body_raw"] / r["body_wire"]
            br = mode == "br"
            ok = up_ratio >= 5 if br else None
            if br:
                targets["request_br_5x" if kind == "cold" else "request_br_5x_next_turn"] = ok
            hits, misses = r["delta_hits_all"], r["delta_misses_all"]
            if not any(hits) and not any(misses):
                delta = "no"
            elif all(h == 1 for h in hits) and not any(misses):
                delta = "yes x3"
            else:
                delta = f"hits {hits} misses {misses}"
            if not r["origin_identical_all"] or set(r["statuses"]) != {200}:
                integrity.append(f"{label}, {mode}: statuses {r['statuses']}, origin body identical: "
                                 f"{r['origin_identical_all']}")  # fmt: skip
            rows.append([label if mode == "off" else "", mode, int(r["body_raw"]), int(r["body_wire"]),
                         f"{body_ratio:.2f}x", r["bytes_up"], f"{up_ratio:.2f}x", delta,
                         "yes" if r["stable"] else "NO", "yes x3" if r["origin_identical_all"] else "NO",
                         ">= 5x" if br else "", mark(ok) if br else "",
                         mark(body_ratio >= 5) if br else ""])  # fmt: skip
    c.print_table(["request (turn " + str(b["turn"]) + ")", "compress", "body raw B", "body wire B", "body ratio",
                   "bytes up (hop, headers incl.)", "ratio vs off", "sent as delta", "stable x3",
                   "origin got it intact", "target", "result (wire)", "result (body only)"], rows)  # fmt: skip
    print("   A chat app sends the cold row once per conversation and the next-turn (delta) row on every turn after"
          " the first, as long as the turn before crossed the same `via` line to the same edge lately (the sidecar"
          " keeps the last 16 bodies per line, the edge 256 / 64 MiB). off never sends deltas. body wire B: what"
          " crossed for the body (for a delta: the compressed middle; the base hash, prefix and suffix lengths"
          " ride in the x-edgeproxy-base header, counted in bytes up). 'origin got it intact': the fake origin's"
          " recorded body equals the app's, byte for byte, in all 3 runs.")  # fmt: skip
    if integrity:
        print("   !! INTEGRITY PROBLEM (the origin did not get the app's body, or not 200):", *integrity,
              sep="\n      ")  # fmt: skip
    res["request_integrity_ok"] = not integrity
    print("   realism check, br ratio of each kind of generated text vs real text cut to the same size:")
    c.print_table(["   kind (reference)", "generated B", "generated ratio", "reference ratio"], b["realism"])
    # ---- 2 + 3
    st = res["streams"]
    expected = a.events + 2
    s_off = st["off"]
    down_off = sum(r["bytes_down"] for r in s_off) / len(s_off)
    rows = []
    for mode, runs in st.items():
        down = sum(r["bytes_down"] for r in runs) / len(runs)
        ratio = down_off / down
        e_raw = sum(r["edge_body_raw"] for r in runs)
        e_wire = sum(r["edge_body_wire"] for r in runs)
        ok = None if mode == "off" else ratio >= 4
        if mode != "off":
            targets[f"stream_{mode}_4x"] = ok
        rows.append([mode, f"{sum(r['events'] for r in runs)}/{expected * len(runs)}",
                     f"{sum(r['intact'] for r in runs)}/{len(runs)}",
                     round(sum(r["raw_bytes"] for r in runs) / len(runs)),
                     round(down), f"{ratio:.2f}x", f"{e_raw / e_wire:.2f}x" if e_wire else "-",
                     ">= 4x" if mode != "off" else "", mark(ok) if mode != "off" else ""])  # fmt: skip
    print(f"\n2. Stream of {a.events} content events (+ role and finish chunks, [DONE]), one per "
          f"{a.interval * 1000:g} ms; bytes per stream, mean of {a.rounds} run(s):")  # fmt: skip
    c.print_table(["compress", "events", "intact", "SSE bytes to app", "bytes down (hop, headers incl.)",
                   "ratio vs off", "body ratio (edge metric)", "target", "result"], rows)  # fmt: skip
    ev = res["sse_sample"]
    print(f"   an event as the origin sends it ({len(ev)} B): {ev.decode(errors='replace').strip()}")
    print("   offline, body ratio with per-event flush for variants of the same events (codec directly):")
    c.print_table(["   events", "raw B/event", *codec.ENCODINGS],
                  [[k, v["raw_per_event"], *[f"{v[n]:.2f}x" for n in codec.ENCODINGS]]
                   for k, v in res["stream_variants"].items()])  # fmt: skip
    lat = {m: sorted(x for r in runs for x in r["lat_ms"]) for m, runs in st.items()}
    lo = {p: c.pct(lat["off"], p) for p in (50, 99)}
    rows = []
    res["latency_ms"] = {}
    for mode, xs in lat.items():
        s = {p: c.pct(xs, p) for p in (50, 90, 99)}
        per_round = [c.pct(sorted(r["lat_ms"]), 99) for r in st[mode]]
        add50, add99 = s[50] - lo[50], s[99] - lo[99]
        ok = None if mode == "off" else add99 <= 1.0
        if mode != "off":
            targets[f"latency_{mode}_added_p99_1ms"] = ok
        res["latency_ms"][mode] = {"p50": round(s[50], 3), "p90": round(s[90], 3), "p99": round(s[99], 3),
                                   "max": round(xs[-1], 3) if xs else None, "n": len(xs),
                                   "p99_per_round": [round(x, 3) for x in per_round],
                                   "added_p50": round(add50, 3), "added_p99": round(add99, 3)}  # fmt: skip
        enc = sorted(x for r in st[mode] for x in r["enc_us"])
        dec = sorted(x for r in st[mode] for x in r["dec_us"])
        situ = "" if mode == "off" else (f"{c.pct(enc, 50):.0f}/{c.pct(enc, 99):.0f} + {c.pct(dec, 50):.0f}/"
                                          f"{c.pct(dec, 99):.0f}")  # fmt: skip
        res["latency_ms"][mode]["codec_us_in_situ"] = {
            "enc_p50": round(c.pct(enc, 50), 1), "enc_p99": round(c.pct(enc, 99), 1), "enc_n": len(enc),
            "dec_p50": round(c.pct(dec, 50), 1), "dec_p99": round(c.pct(dec, 99), 1), "dec_n": len(dec),
        }  # fmt: skip
        rows.append([mode, len(xs), f"{s[50]:.3f}", f"{s[90]:.3f}", f"{s[99]:.3f}", f"{xs[-1]:.3f}" if xs else "-",
                     " ".join(f"{x:.3f}" for x in per_round), "" if mode == "off" else f"{add50:+.3f}",
                     "" if mode == "off" else f"{add99:+.3f}", situ, "" if mode == "off" else "<= 1 ms",
                     "" if mode == "off" else mark(ok)])  # fmt: skip
    print("\n3. Per-event delay, app arrival - origin write (ms), all events of all runs:")
    c.print_table(["compress", "events", "p50", "p90", "p99", "max", "p99 per round", "added p50", "added p99",
                   "codec us/event p50/p99: enc + dec", "target", "result"], rows)  # fmt: skip
    print("   codec us/event: the edge's process + flush and the sidecar's feed per event, timed in place during"
          " these streams (codec.Encoder/Decoder wrapped with perf_counter).")  # fmt: skip
    # ---- 4
    rows = []
    for x in res["cpu"]:
        rows.append([x["codec"], f"{x['body_raw']} -> {x['body_wire']}", x["body_enc_us_per_mb"],
                     x["body_dec_us_per_mb"], x["body_enc_us"], x["body_dec_us"],
                     f"{x['events_raw']} -> {x['events_wire']}", x["ev_enc_us_per_mb"], x["ev_dec_us_per_mb"],
                     x["ev_enc_us_per_event"], x["ev_dec_us_per_event"]])  # fmt: skip
    print(f"\n4. Codec CPU (process_time, best of 3 batches of >= {a.cpu_s / 3:.2f} s; MB = 10^6 raw bytes). Levels: "
          f"br q{codec.BROTLI_QUALITY}/lgwin {codec.BROTLI_WINDOW}, gzip {codec.GZIP_LEVEL}, zstd {codec.ZSTD_LEVEL}; "
          "events: process + flush per event:")  # fmt: skip
    c.print_table(["codec", "body B", "enc us/MB", "dec us/MB", "enc us/body", "dec us/body", "events B",
                   "enc us/MB", "dec us/MB", "enc us/event", "dec us/event"], rows)  # fmt: skip
    # ---- 5
    e = res["bomb_edge"]
    rows = []
    for name, runs in e["runs"].items():
        ms_sorted = sorted(r["ms"] for r in runs)
        growth = [r["peak_growth_mb"] for r in runs if r["peak_growth_mb"] is not None]
        worst_ms, worst_mb = ms_sorted[-1], max(growth) if growth else None
        ok = all(r["status"] == 413 for r in runs) and worst_ms <= 50 and worst_mb is not None and worst_mb < 50
        targets[f"bomb_edge_{name}"] = ok
        statuses = ",".join(sorted({str(r["status"]) for r in runs}))
        rows.append([name, f"{a.bomb_gib} GiB -> {res['bomb_sizes'][name]} B", statuses,
                     f"{c.pct(ms_sorted, 50):.1f}", f"{worst_ms:.1f}", runs[0]["rss_before_mb"],
                     "-" if worst_mb is None else f"{worst_mb:.1f}", "413, <= 50 ms, < 50 MB", mark(ok)])  # fmt: skip
    print(f"\n5. Bombs (built in {res['bomb_build_s']} s). Sent as hop requests to an edge subprocess, "
          f"{a.bomb_repeat} times each (edge RSS idle {e['idle'].get('VmRSS', 0):.1f} MB, after all "
          f"{e['after'].get('VmRSS', 0):.1f} MB; origin saw {e['origin_requests']} requests in all, "
          f"{len(codec.ENCODINGS) * 3} of them warm-ups):")  # fmt: skip
    c.print_table(["coding", "bomb", "status", "ms p50", "ms max", "edge RSS before MB", "peak growth MB (max)",
                   "target", "result"], rows)  # fmt: skip
    print(f"   answer: {e['runs'][next(iter(e['runs']))][0]['body']!r}")
    rows = []
    for x in res["bomb_direct"]:
        ok = x["rejected"] and x["ms"] <= 50 and (x["peak_rss_growth_mb"] or 0) < 50
        targets[f"bomb_direct_{x['codec']}"] = ok
        rows.append([x["codec"], x["wire"], "TooLarge" if x["rejected"] else "NOT REJECTED", f"{x['ms']:.2f}",
                     x["output_before_reject"], x["input_consumed"], x["peak_rss_growth_mb"], x["tracemalloc_peak_mb"],
                     mark(ok)])  # fmt: skip
    print("   the same bombs fed whole to codec.decoder(name, 32 MiB) in a fresh process, 3 times each (ms: the worst;"
          " output/input: bytes produced and consumed before the guard fired):")  # fmt: skip
    c.print_table(["coding", "bomb B", "outcome", "ms", "output before reject", "input consumed",
                   "peak RSS growth MB", "tracemalloc peak MB", "result"], rows)  # fmt: skip
    if res.get("bomb_verified_bytes"):
        print(f"   verified (decoded in full): {res['bomb_verified_bytes']}")
    if e.get("log_problems"):
        print("   edge stderr:", *e["log_problems"], sep="\n     ")
    if not e.get("alive"):
        print("THE EDGE DIED DURING THE BOMBS")
    la1 = c.loadavg()
    print("\nnoise:", c.noise_note(bg, la0, la1, "Sections 1-3 run in one process (app, sidecars, LineSims, edge, "
                                   "origin on one uvloop); 'off' ran in the same rounds, alternating with the codecs. "
                                   "Shared machine: other work may run beside the benchmark."))  # fmt: skip
    for r in st.values():
        for x in r:
            x.pop("sse", None)
            x["enc_us"], x["dec_us"] = len(x["enc_us"]), len(x["dec_us"])
            x["lat_ms"] = len(x["lat_ms"])
    res.update(targets=targets, background_cpu=bg, loadavg_before=la0, loadavg_after=la1)
    c.final_json(res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 100 events, 1 round, short CPU timing")
    ap.add_argument("--events", type=int, help="content events per stream (default 500; quick 100)")
    ap.add_argument("--interval", type=float, default=0.02, help="seconds between events at the origin")
    ap.add_argument("--rounds", type=int, help="stream rounds over all modes (default 2; quick 1)")
    ap.add_argument("--body-kb", type=int, default=30, help="request body size, KB (default 30)")
    ap.add_argument("--bomb-gib", type=int, default=10, help="bomb size, GiB of zeros (default 10)")
    ap.add_argument("--bomb-repeat", type=int, default=5, help="bombs sent to the edge per coding")
    ap.add_argument("--verify-bombs", action="store_true", help="decode every bomb in full first (slow, ~1 min)")
    ap.add_argument("--decode-bomb", nargs=2, metavar=("CODING", "FILE"), help=argparse.SUPPRESS)  # internal
    a = ap.parse_args()
    if a.decode_bomb:
        print(json.dumps(decode_bomb(*a.decode_bomb)), flush=True)
        return
    a.events = a.events or (100 if a.quick else 500)
    a.rounds = a.rounds or (1 if a.quick else 2)
    a.cpu_s = 0.15 if a.quick else 0.6
    bg = c.background_cpu(1.0)
    la0 = c.loadavg()
    print(f"compress: modes {', '.join(MODES)}; loadavg before {la0}; background CPU {bg['busy_pct']}% busy, "
          f"{bg['steal_pct']}% steal", flush=True)  # fmt: skip
    res: Res = dict(bench="compress", quick=a.quick, events=a.events, interval_s=a.interval, rounds=a.rounds,
                    bomb_gib=a.bomb_gib, modes=list(MODES))  # fmt: skip
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as td, c.Procs() as procs:
        uvloop.run(bench(a, Path(td), procs, res))
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    report(a, res, bg, la0)


if __name__ == "__main__":
    c.run_main(main)
