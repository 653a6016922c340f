"""The streaming ASR WebSocket server: audio and resets in, transcripts out.

The I/O around the engine (loading, health, sessions, outboxes) is the shared
``EngineServer``; this module says what the ASR protocol's messages do.
"""

from __future__ import annotations

from collections import deque

from pydantic import BaseModel

from pipecat_nvidia.protocol import AsrReady, AsrTranscript, ErrorCode, ProtocolError, parse_asr_client_message
from servers.asr.config import AsrServerSettings
from servers.asr.engine import AudioOverflow, StreamingASREngine
from servers.asr.metrics import AsrMetrics
from servers.asr.model import load_streaming_model
from servers.common.cuda_graphs import graph_max_batch
from servers.common.loading import EXCLUSIVE_GPU_WORK, Driver
from servers.common.ws_server import Connection, EngineServer


def load_engine(settings: AsrServerSettings) -> StreamingASREngine:
    model = load_streaming_model(settings.model, right_context=settings.right_context, device=settings.resolved_device)
    engine = StreamingASREngine(
        model,
        right_context=settings.right_context,
        max_sessions=settings.max_sessions,
        max_buffered_s=settings.max_buffered_s,
        max_utterance_s=settings.max_utterance_s,
        precision=settings.precision,
        graph_max_batch=graph_max_batch(model, settings.cuda_graph_max_batch),
    )
    with EXCLUSIVE_GPU_WORK:
        engine.warm_up()
    return engine


class AsrServer(EngineServer[StreamingASREngine]):
    kind = "ASR"
    settings: AsrServerSettings
    metrics: AsrMetrics

    def __init__(self, settings: AsrServerSettings, driver: Driver | None = None):
        super().__init__(settings, AsrMetrics(), driver)

    def load_engine(self) -> StreamingASREngine:
        return load_engine(self.settings)

    def ready_message(self, engine: StreamingASREngine, session_id: str) -> AsrReady:
        g = engine.geometry
        return AsrReady(
            session_id=session_id,
            model=self.settings.model,
            sample_rate=g.sample_rate,
            chunk_ms=g.chunk_ms,
            right_context=g.right_context,
            finalize_audio_ms=g.finalize_audio_ms,
            first_step_samples=g.first_step_samples,
            step_samples=g.step_samples,
        )

    def handle_message(self, engine: StreamingASREngine, connection: Connection, message: str | bytes) -> None:
        if isinstance(message, bytes):
            if len(message) % 2:
                connection.error(ErrorCode.BAD_AUDIO, "audio must be whole 16-bit samples (even byte count)")
                return
            try:
                engine.push_audio(connection.sid, message)
            except AudioOverflow as e:
                connection.error(ErrorCode.AUDIO_OVERFLOW, f"{e}; this frame was dropped")
                return
            self.metrics.audio_seconds.inc(len(message) / 2 / engine.geometry.sample_rate)
            self.metrics.audio_messages.inc()
            return
        try:
            reset = parse_asr_client_message(message)
        except ProtocolError as e:
            connection.error(e.code, str(e))
            return
        try:
            engine.reset(connection.sid, finalize=reset.finalize, trailing_silence_ms=reset.trailing_silence_ms)
        except AudioOverflow as e:
            connection.error(ErrorCode.AUDIO_OVERFLOW, f"{e}; this reset was dropped")

    def put_policy(self, items: deque, message) -> None:
        """A newer interim replaces an unsent one of the same utterance."""
        last = items[-1] if items else None
        if (
            isinstance(last, AsrTranscript)
            and isinstance(message, AsrTranscript)
            and not last.is_final
            and not message.is_final
            and last.utterance_id == message.utterance_id
        ):
            items[-1] = message
        else:
            items.append(message)

    def observe_sent(self, message: BaseModel) -> None:
        super().observe_sent(message)
        if isinstance(message, AsrTranscript):
            self.metrics.observe_transcript(message)
