"""Voice-to-voice latency as the user hears it, measured from the audio itself.

A scripted client talks to the agent over Pipecat's WebSocket transport (protobuf
frames): it plays real speech turn by turn in real time, as a microphone would (silence
between turns), and records the bot's audio on the same timeline. The gaps come from
the waveforms alone: from the end of each user utterance to the start of the bot's
answer, and for a barge-in, from the user starting to speak to the bot's audio stopping.

    python -m bench.conversation --serve 8765 &          # the agent on a WebSocket transport
    python -m bench.conversation --url ws://127.0.0.1:8765 --turns 6 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass

import numpy as np
import soundfile as sf
from pipecat.frames.frames import OutputAudioRawFrame
from pipecat.serializers.protobuf import ProtobufFrameSerializer
from websockets.asyncio.client import connect

from bench.common import SPEECH, percentiles_ms

RATE = 16000
FRAME = 320
"""20 ms of 16 kHz audio per message, as a WebRTC microphone sends."""
WINDOW = 160
"""10 ms energy windows for finding speech in either channel."""


@dataclass(frozen=True)
class Turn:
    speech: np.ndarray
    """int16 at 16 kHz."""
    pause_s: float
    """Silence after it before the next turn starts (shorter than the answer: a barge-in)."""


@dataclass
class Recording:
    user: np.ndarray
    bot: np.ndarray
    """Both int16 at 16 kHz on one timeline (the bot's audio where it arrived)."""


async def converse(url: str, turns: list[Turn], lead_in_s: float = 1.0, tail_s: float = 4.0) -> Recording:
    """Play the turns in real time and record what comes back."""
    serializer = ProtobufFrameSerializer()
    timeline = [np.zeros(int(lead_in_s * RATE), np.int16)]
    for turn in turns:
        timeline += [turn.speech, np.zeros(int(turn.pause_s * RATE), np.int16)]
    timeline.append(np.zeros(int(tail_s * RATE), np.int16))
    user = np.concatenate(timeline)
    bot = np.zeros(len(user) + RATE, np.int16)
    async with connect(url, max_size=None) as ws:
        started = time.monotonic()

        async def receive():
            cursor = 0
            async for message in ws:
                frame = await serializer.deserialize(message)
                if frame is None or not hasattr(frame, "audio"):
                    continue
                pcm = _to_16k(np.frombuffer(frame.audio, np.int16), frame.sample_rate, frame.num_channels)
                # Pipecat sends each piece as it starts to play: it plays from its arrival,
                # or after the piece before it.
                at = max(cursor, int((time.monotonic() - started) * RATE))
                end = min(len(bot), at + len(pcm))
                bot[at:end] = pcm[: end - at]
                cursor = end

        receiver = asyncio.create_task(receive())
        for i in range(0, len(user), FRAME):
            # A microphone delivers a frame once its last sample is heard.
            await asyncio.sleep(max(0.0, started + (i + FRAME) / RATE - time.monotonic()))
            frame = OutputAudioRawFrame(audio=user[i : i + FRAME].tobytes(), sample_rate=RATE, num_channels=1)
            await ws.send(await serializer.serialize(frame))
        receiver.cancel()
    return Recording(user=user, bot=bot[: len(user)])


def _to_16k(pcm: np.ndarray, rate: int, channels: int) -> np.ndarray:
    if channels > 1:
        pcm = pcm.reshape(-1, channels)[:, 0]
    if rate == RATE:
        return pcm
    import soxr

    return soxr.resample(pcm, rate, RATE).astype(np.int16)


def speech_regions(audio: np.ndarray, threshold_db: float = -45.0, hang_s: float = 0.3) -> list[tuple[float, float]]:
    """(start, end) seconds of sound, bridging gaps shorter than ``hang_s``."""
    n = len(audio) // WINDOW
    frames = audio[: n * WINDOW].astype(np.float32).reshape(n, WINDOW) / 32768.0
    loud = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12) > threshold_db
    regions: list[list[float]] = []
    for i in np.flatnonzero(loud):
        t = i * WINDOW / RATE
        if regions and t - regions[-1][1] <= hang_s:
            regions[-1][1] = t + WINDOW / RATE
        else:
            regions.append([t, t + WINDOW / RATE])
    return [(a, b) for a, b in regions]


@dataclass(frozen=True)
class Gaps:
    response_s: list[float]
    """Per user utterance the bot answered: its end to the bot's first sound after it."""
    barge_in_stop_s: list[float]
    """Per utterance that began while the bot spoke: its start to the bot falling silent."""


def measure(recording: Recording) -> Gaps:
    user = speech_regions(recording.user)
    bot = speech_regions(recording.bot)
    responses, stops = [], []
    for i, (start, end) in enumerate(user):
        talking = [b for b in bot if b[0] < start < b[1]]
        if talking:
            stops.append(talking[0][1] - start)
        next_start = user[i + 1][0] if i + 1 < len(user) else float("inf")
        answer = [b for b in bot if end <= b[0] < next_start]
        if answer:
            responses.append(answer[0][0] - end)
    return Gaps(responses, stops)


def sentences(speech: np.ndarray, pad_s: float = 0.05) -> list[np.ndarray]:
    """The read sentences of a recording: real utterances, each one whole turn."""
    pad = int(pad_s * RATE)
    return [speech[max(0, int(a * RATE) - pad) : int(b * RATE) + pad] for a, b in speech_regions(speech)]


def speech_turns(count: int, pause_s: float, barge_in_every: int = 0) -> list[Turn]:
    """``count`` sentences of real read speech, each followed by ``pause_s`` of silence
    (1 s when the next one is to interrupt the bot's answer)."""
    speech, _ = sf.read(SPEECH, dtype="int16")
    said = sentences(speech)
    turns = []
    for i in range(count):
        barge = barge_in_every and (i + 2) % barge_in_every == 0
        turns.append(Turn(said[i % len(said)], 1.0 if barge else pause_s))
    return turns


def agent_transport(port: int):
    """Pipecat's WebSocket server transport, as this client speaks to it (protobuf frames)."""
    from pipecat.transports.websocket.server import (
        SingleClientWebsocketServerParams,
        SingleClientWebsocketServerTransport,
    )

    params = SingleClientWebsocketServerParams(
        audio_in_enabled=True,
        audio_out_enabled=True,
        audio_in_sample_rate=RATE,
        serializer=ProtobufFrameSerializer(),
    )
    return SingleClientWebsocketServerTransport(params=params, host="127.0.0.1", port=port)


async def serve_agent(port: int) -> None:
    """The agent of ``bot.py`` for this client, one session after another (servers from the environment)."""
    from pipecat.workers.runner import WorkerRunner

    from pipecat_nvidia.agent import AgentSettings, build_agent

    while True:
        agent = build_agent(agent_transport(port), AgentSettings.from_env())
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(agent.worker)
        await runner.run()


def percentiles(values: list[float]) -> dict:
    p50, p90 = percentiles_ms(values, (50, 90)) or (None, None)
    return {"n": len(values), "p50_ms": p50, "p90_ms": p90}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="ws://127.0.0.1:8765")
    p.add_argument("--serve", type=int, default=None, help="run the agent on this WebSocket port instead")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--pause-s", type=float, default=6.0, help="silence after each turn for the bot to answer")
    p.add_argument("--barge-in-every", type=int, default=0, help="every Nth turn interrupts the answer")
    p.add_argument("--json", default=None)
    p.add_argument("--wav", default=None, help="write the conversation as stereo WAV (user left, bot right)")
    a = p.parse_args()
    if a.serve is not None:
        asyncio.run(serve_agent(a.serve))
        return
    recording = asyncio.run(converse(a.url, speech_turns(a.turns, a.pause_s, a.barge_in_every)))
    gaps = measure(recording)
    result = {"response": percentiles(gaps.response_s), "barge_in_stop": percentiles(gaps.barge_in_stop_s)}
    print(json.dumps(result, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**result, "response_s": gaps.response_s, "barge_in_stop_s": gaps.barge_in_stop_s}, f, indent=2)
    if a.wav:
        sf.write(a.wav, np.stack([recording.user, recording.bot], axis=1), RATE)


if __name__ == "__main__":
    main()
