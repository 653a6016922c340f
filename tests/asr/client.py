"""A minimal ASR protocol client for tests: stream PCM, collect what the server says."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pipecat_nvidia.protocol import AsrReady, AsrTranscript, ErrorMessage, parse_asr_server_message


def server_url(server, path: str = "", scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{server.port}{path}"


async def recv_message(ws, timeout: float = 30.0):
    return parse_asr_server_message(await asyncio.wait_for(ws.recv(), timeout))


async def expect_fatal(ws, code) -> int:
    """Read a fatal error with ``code``, then the close; returns the close code."""
    error = await recv_message(ws)
    assert isinstance(error, ErrorMessage) and error.code == code and error.fatal, error
    try:
        await ws.recv()
    except ConnectionClosed as closed:
        return closed.rcvd.code
    raise AssertionError("the connection stayed open after a fatal error")


async def until_final(ws, timeout: float = 30.0) -> list:
    """Messages up to and including the next final transcript."""
    messages = []
    while True:
        message = await recv_message(ws, timeout)
        messages.append(message)
        if isinstance(message, AsrTranscript) and message.is_final:
            return messages


async def send_utterance(
    ws, pcm16: np.ndarray, frame: int = 320, realtime: bool = False, trailing_silence_ms: float = 200.0
) -> None:
    for i in range(0, len(pcm16), frame):
        await ws.send(pcm16[i : i + frame].tobytes())
        if realtime:
            await asyncio.sleep(frame / 16000)
    await ws.send(json.dumps({"type": "reset", "finalize": True, "trailing_silence_ms": trailing_silence_ms}))


async def transcribe_over_ws(url: str, pcm16: np.ndarray, **kwargs) -> list:
    """Connect, stream one utterance, and return every message after ``ready``."""
    async with connect(url) as ws:
        ready = await recv_message(ws)
        assert isinstance(ready, AsrReady), ready
        sender = asyncio.create_task(send_utterance(ws, pcm16, **kwargs))
        messages = await until_final(ws, timeout=60)
        await sender
        return messages


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
