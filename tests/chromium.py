"""A headless Chromium driven over the DevTools protocol on a pipe, with the standard library.

Chromium's ``--remote-debugging-pipe`` reads JSON commands on fd 3 and writes replies and
events on fd 4, each terminated by a NUL byte: no websocket, no port, no extra package.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

import numpy as np

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",  # root in CI containers
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)
CONSOLE_EVENTS = ("Runtime.consoleAPICalled", "Runtime.exceptionThrown", "Log.entryAdded")


class Chromium:
    """One browser process; ``open`` loads a file in a fresh tab."""

    def __init__(self, timeout: float = 60.0) -> None:
        self._profile = tempfile.mkdtemp(prefix="modelcheck-chromium-")
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()

        def wire_fds() -> None:  # runs in the child: its fd 3 reads, fd 4 writes
            read, write = os.dup(to_chrome), os.dup(from_chrome)
            os.dup2(read, 3)
            os.dup2(write, 4)

        self._process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
            preexec_fn=wire_fds,
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        self._timeout = timeout
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError, RuntimeError, TimeoutError):
            self.call("Browser.close")
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        os.close(self._out)
        os.close(self._in)
        shutil.rmtree(self._profile, ignore_errors=True)

    def open(
        self, path: Path, width: int = 1280, media: str = "screen", scripts: bool = True
    ) -> Tab:
        """Load ``path`` in a fresh tab ``width`` CSS pixels wide; wait for its load event."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        sid = session["sessionId"]
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(domain, session=sid)
        self.call("Emulation.setScriptExecutionDisabled", {"value": not scripts}, sid)
        self.call("Emulation.setEmulatedMedia", {"media": media}, sid)
        metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}
        self.call("Emulation.setDeviceMetricsOverride", metrics, sid)
        self._events.clear()
        self.call("Page.navigate", {"url": path.resolve().as_uri()}, sid)
        self._wait_for("Page.loadEventFired", sid)
        console = [
            e
            for e in self._events
            if e.get("method") in CONSOLE_EVENTS and e.get("sessionId") == sid
        ]
        return Tab(self, target, sid, console)

    # -- protocol -------------------------------------------------------------------------

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and return its result, keeping the events that arrive meanwhile."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def _wait_for(self, event: str, session: str) -> None:
        while not any(
            e.get("method") == event and e.get("sessionId") == session for e in self._events
        ):
            self._events.append(self._receive())

    def _receive(self) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._in], [], [], self._timeout)
            if not ready:
                raise TimeoutError(f"chromium sent nothing for {self._timeout:.0f}s")
            chunk = os.read(self._in, 1 << 16)
            if not chunk:
                raise EOFError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)


class Tab:
    """One loaded page: what it logged, its DOM (read through DevTools), screenshots."""

    def __init__(self, browser: Chromium, target: str, session: str, console: list[dict]):
        self._browser, self._target, self._session = browser, target, session
        self.console = console  # console messages, uncaught exceptions, browser log entries

    def evaluate(self, expression: str) -> object:
        """The JSON value of a JavaScript expression, run by DevTools rather than the page
        (so it works with the page's scripts disabled)."""
        params = {"expression": expression, "returnByValue": True}
        reply = self._browser.call("Runtime.evaluate", params, self._session)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails']['text']}")
        return reply["result"].get("value")

    def screenshot(self, height: int | None = None, fast: bool = True) -> bytes:
        """A PNG of the page from its top: all of it, or its first ``height`` CSS pixels.

        ``fast``: Chromium then filters every row the same cheap way ("Up"), which
        png_pixels decodes with numpy (it reads the other filters too, slowly); the file
        is larger.
        """
        width, full = self.evaluate("[innerWidth, document.documentElement.scrollHeight]")
        clip = {"x": 0, "y": 0, "width": width, "height": height or full, "scale": 1}
        params = {"format": "png", "clip": clip, "captureBeyondViewport": True}
        params["optimizeForSpeed"] = fast
        shot = self._browser.call("Page.captureScreenshot", params, self._session)
        return base64.b64decode(shot["data"])

    def close(self) -> None:
        self._browser.call("Target.closeTarget", {"targetId": self._target})


def png_pixels(png: bytes) -> np.ndarray:
    """Decode an 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes) to an array."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, header = 8, b"", b""
    while pos < len(png):
        length = int.from_bytes(png[pos : pos + 4], "big")
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, interlace = header[8], header[9], header[12]
    if depth != 8 or colour not in (2, 6) or interlace:
        raise ValueError("only 8-bit RGB/RGBA non-interlaced PNGs are supported")
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, width * bpp + 1)
    rows = np.zeros((height, width * bpp), dtype=np.uint8)
    previous = np.zeros(width * bpp, dtype=np.uint8)
    for y in range(height):
        rows[y] = previous = _unfilter(int(raw[y, 0]), raw[y, 1:], previous, bpp)
    return rows.reshape(height, width, bpp)


def _unfilter(kind: int, line: np.ndarray, prior: np.ndarray, bpp: int) -> np.ndarray:
    """Undo one row's PNG filter; uint8 arithmetic wraps modulo 256 as the format wants."""
    if kind == 0:
        return line.copy()
    if kind == 1:  # Sub: a running sum along the row, per channel
        return np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
    if kind == 2:  # Up
        return line + prior
    if kind not in (3, 4):
        raise ValueError(f"unknown PNG filter {kind}")
    out = np.zeros_like(line)
    for x in range(line.size):  # Average and Paeth depend on the byte just decoded
        left = int(out[x - bpp]) if x >= bpp else 0
        up = int(prior[x])
        upper_left = int(prior[x - bpp]) if x >= bpp else 0
        guess = (left + up) // 2 if kind == 3 else _paeth(left, up, upper_left)
        out[x] = (int(line[x]) + guess) & 0xFF
    return out


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c
