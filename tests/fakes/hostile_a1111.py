"""A hostile A1111 stand-in: a real HTTP server on 127.0.0.1 that speaks enough of the WebUI's
API (models, options, samplers, schedulers, loras, progress, interrupt, txt2img) for charforge
to send it a job, and whose txt2img answers the way an attacker's would.

Modes of ``txt2img`` (``HostileA1111.mode``):
- ``normal``: a correct answer, one PNG of the size asked (hires included);
- ``bomb``: a PNG of a few hundred bytes whose header claims 50000x50000;
- ``oversized``: a real 4096x4096 PNG, whatever was asked;
- ``huge``: a 90 MB body, streamed without Content-Length (never complete JSON);
- ``huge_declared``: the same, announced with Content-Length;
- ``gzip_bomb``: 1 MB of gzip that inflates to 512 MB;
- ``near_cap``: well-formed JSON of 60 MB (just under the default cap) whose one "image"
  is 45 MB of zero bytes: the whole parsing path runs, to measure its peak;
- ``drip``: headers at once, then one byte of body every ``drip_seconds``;
- ``drip_headers``: the status line itself, one byte every ``drip_seconds``.
A drip stops when the WebUI is told to interrupt (or after a minute). Nothing large is held in
memory here: bodies are written in chunks, so the server's memory can be measured in-process.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

CHECKPOINTS = ["diving.safetensors", "cyberrealistic.safetensors"]
HASH = "0123456789"
HUGE_BYTES = 90 * 2**20
NEAR_CAP_BYTES = 60 * 2**20
_CHUNK = b"A" * 2**16


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


@cache
def bomb_png() -> bytes:
    """A few hundred bytes claiming 50000x50000 (7.5 GB of RGB once decoded)."""
    return png_header_only(50_000, 50_000, zlib.compress(b"\0" * 4096))


@cache
def oversized_png(side: int = 4096) -> bytes:
    """A valid side x side black PNG, compressed row by row (never held decoded here)."""
    compressor = zlib.compressobj(9)
    row = b"\0" + b"\0" * (side * 3)  # filter byte + pixels
    parts = [compressor.compress(row) for _ in range(side)]
    parts.append(compressor.flush())
    return png_header_only(side, side, b"".join(parts))


@cache
def gzip_bomb() -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"\0" * 2**20
    parts = [compressor.compress(block) for _ in range(512)]
    parts.append(compressor.flush())
    return b"".join(parts)


def png_of(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 200)).save(out, format="PNG")
    return out.getvalue()


class HostileA1111:
    def __init__(self, mode: str = "normal", *, drip_seconds: float = 2.0) -> None:
        self.mode = mode
        self.drip_seconds = drip_seconds
        self.txt2img_calls = 0
        self.interrupts = 0
        self.current_task: str | None = None
        self.stopped = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> HostileA1111:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self._server.shutdown()
        self._server.server_close()

    def reset(self, mode: str) -> None:
        self.mode = mode
        self.txt2img_calls = 0
        self.interrupts = 0
        self.current_task = None
        self.stopped.clear()


def _handler_for(fake: HostileA1111) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _json(self, value: Any, status: int = 200) -> None:
            data = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length)) if length else None

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/sdapi/v1/sd-models":
                self._json(
                    [
                        {"title": f"{name} [{HASH}]", "model_name": name[:-12], "hash": HASH}
                        for name in CHECKPOINTS
                    ]
                )
            elif path == "/sdapi/v1/options":
                self._json({"sd_model_checkpoint": f"{CHECKPOINTS[0]} [{HASH}]"})
            elif path == "/sdapi/v1/samplers":
                self._json([{"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"]}])
            elif path == "/sdapi/v1/schedulers":
                self._json([{"name": "karras", "label": "Karras", "aliases": []}])
            elif path == "/sdapi/v1/loras":
                self._json([])
            elif path == "/sdapi/v1/progress":
                state = {"interrupted": False, "skipped": False, "job_count": 0}
                self._json({"progress": 0, "state": state, "current_task": fake.current_task})
            else:
                self._json({"detail": "Not Found"}, 404)

        def do_POST(self) -> None:
            body = self._body()
            if self.path == "/internal/progress":
                active = isinstance(body, dict) and body.get("id_task") == fake.current_task
                self._json({"active": active, "queued": False, "completed": not active})
            elif self.path == "/sdapi/v1/interrupt":
                fake.interrupts += 1
                fake.stopped.set()
                self._json({})
            elif self.path == "/sdapi/v1/txt2img":
                fake.txt2img_calls += 1
                fake.current_task = body.get("force_task_id")
                try:
                    self._txt2img(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # charforge hung up: that is what is expected of it
                finally:
                    fake.current_task = None
            else:
                self._json({"detail": "Not Found"}, 404)

        def _txt2img(self, body: dict[str, Any]) -> None:
            mode = fake.mode
            if mode in ("normal", "bomb", "oversized"):
                scale = float(body.get("hr_scale") or 1) if body.get("enable_hr") else 1.0
                size = (int(body["width"] * scale), int(body["height"] * scale))
                image = {"normal": lambda: png_of(*size), "bomb": bomb_png}.get(
                    mode, oversized_png
                )()
                self._json(_answer(body, image))
            elif mode in ("huge", "huge_declared"):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if mode == "huge_declared":
                    self.send_header("Content-Length", str(HUGE_BYTES))
                self.end_headers()
                self.wfile.write(b'{"images": ["')
                for _ in range(HUGE_BYTES // len(_CHUNK)):
                    self.wfile.write(_CHUNK)
            elif mode == "near_cap":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"images": ["')
                for _ in range(NEAR_CAP_BYTES // len(_CHUNK)):
                    self.wfile.write(_CHUNK)  # "AAAA" is base64 for zero bytes
                tail = _answer(body, b"")
                self.wfile.write(b'"], "info": ' + json.dumps(tail["info"]).encode() + b"}")
            elif mode == "gzip_bomb":
                data = gzip_bomb()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif mode == "drip":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self._drip(b" " * 1000)
            elif mode == "drip_headers":
                self._drip(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n" * 50)
            else:
                raise ValueError(mode)

        def _drip(self, data: bytes) -> None:
            until = time.monotonic() + 60
            for byte in data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                if fake.stopped.wait(fake.drip_seconds) or time.monotonic() > until:
                    return

    return Handler


def _answer(body: dict[str, Any], image: bytes) -> dict[str, Any]:
    seed = body.get("seed") if isinstance(body.get("seed"), int) and body["seed"] >= 0 else 7
    title = str(body.get("override_settings", {}).get("sd_model_checkpoint") or CHECKPOINTS[0])
    info = {
        "seed": seed,
        "all_seeds": [seed],
        "infotexts": [""],
        "index_of_first_image": 0,
        "sd_model_name": title.split(" [")[0].removesuffix(".safetensors"),
        "sd_model_hash": HASH,
        "sampler_name": "DPM++ 2M",
        "job_timestamp": "20260101000000",
    }
    return {
        "images": [base64.b64encode(image).decode()],
        "parameters": {},
        "info": json.dumps(info),
    }
