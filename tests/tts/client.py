"""A minimal TTS protocol client for tests."""

from __future__ import annotations

import asyncio
import json

import numpy as np

from pipecat_nvidia.protocol import parse_tts_server_message


async def recv_message(ws, timeout: float = 60.0):
    return parse_tts_server_message(await asyncio.wait_for(ws.recv(), timeout))


async def send(ws, **message) -> None:
    await ws.send(json.dumps(message))


async def until(ws, predicate, timeout: float = 120.0) -> list:
    """Messages up to and including the first for which ``predicate`` holds."""
    messages = []
    while True:
        message = await recv_message(ws, timeout)
        messages.append(message)
        if predicate(message):
            return messages


def is_done(context_id: str):
    return lambda m: m.type == "done" and m.context_id == context_id


def audio_of(messages, context_id: str | None = None) -> np.ndarray:
    return np.frombuffer(
        b"".join(m.pcm for m in messages if m.type == "audio" and context_id in (None, m.context_id)), "<i2"
    )
