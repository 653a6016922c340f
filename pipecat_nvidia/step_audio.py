"""Client-side coalescing of ASR audio at the server's step boundaries.

Pipecat transports deliver 20 ms frames; each WebSocket message costs the ASR server about
30 µs of CPU on the thread that also runs its engine, so a thousand streams sending every
frame would keep more than a core busy with I/O alone. The server can only step once a
whole chunk has arrived, at points its ``ready`` announces: holding audio until the next
point and sending it as one message costs no latency and sends about eight times fewer
messages at 160 ms chunks.
"""

from __future__ import annotations

from pipecat_nvidia.protocol import AsrReady

_BYTES_PER_SAMPLE = 2


class StepAlignedAudio:
    """16-bit PCM held back until the utterance reaches the server's next step boundary."""

    def __init__(self, first_step_samples: int, step_samples: int):
        if first_step_samples <= 0 or step_samples <= 0:
            raise ValueError("step boundaries must be positive sample counts")
        self._first = first_step_samples
        self._step = step_samples
        self._held = bytearray()
        self._samples = 0
        self._boundary = first_step_samples

    @classmethod
    def for_server(cls, ready: AsrReady) -> StepAlignedAudio:
        return cls(ready.first_step_samples, ready.step_samples)

    def add(self, pcm: bytes) -> bytes:
        """Take a frame; return what to send now (empty until a step boundary is reached)."""
        self._held += pcm
        self._samples += len(pcm) // _BYTES_PER_SAMPLE
        if self._samples < self._boundary:
            return b""
        while self._boundary <= self._samples:
            self._boundary += self._step
        return self._take()

    def end_utterance(self) -> bytes:
        """Return everything held, to send before a reset; the next utterance counts from zero."""
        self._samples = 0
        self._boundary = self._first
        return self._take()

    def _take(self) -> bytes:
        out = bytes(self._held)
        self._held.clear()
        return out
