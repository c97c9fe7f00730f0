"""The reference: a bare ~30-line aiohttp + uvloop reverse proxy (no routing, retries, logs or metrics).
Usage: python bench/bare_proxy.py --port 9300 --upstream http://127.0.0.1:9100
"""

import argparse
import asyncio

import aiohttp
import uvloop
from aiohttp import web

HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade", "proxy-connection"}


async def main(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None)
    )

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        body = await request.read()
        async with session.request(request.method, upstream + request.path_qs, headers=headers, data=body) as up:
            out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
            if up.headers.get("Content-Length") is not None:  # keep it: no chunking for fixed-size bodies
                out["Content-Length"] = up.headers["Content-Length"]
            resp = web.StreamResponse(status=up.status, headers=out)
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    server = web.Server(handler)
    await asyncio.get_running_loop().create_server(server, "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="origin base URL, e.g. http://127.0.0.1:9100")
    a = ap.parse_args()
    uvloop.run(main(a.port, a.upstream.rstrip("/")))
