"""The Magpie TTS WebSocket server: segments of text in, audio out, per bot turn.

The I/O around the engine (loading, health, sessions, outboxes) is the shared
``EngineServer``; this module says what the TTS protocol's messages do.
"""

from __future__ import annotations

from collections import deque

from pipecat_nvidia.protocol import (
    ErrorCode,
    ProtocolError,
    TtsAudio,
    TtsCancel,
    TtsCancelled,
    TtsFlush,
    TtsReady,
    TtsSegmentDone,
    parse_tts_client_message,
)
from servers.common.cuda_graphs import graph_max_batch
from servers.common.loading import EXCLUSIVE_GPU_WORK, Driver
from servers.common.ws_server import Connection, EngineServer
from servers.tts.config import TtsServerSettings
from servers.tts.engine import DEFAULT_PRESET, SegmentRejected, TTSEngine
from servers.tts.metrics import TtsMetrics
from servers.tts.model import SamplingSettings, load_magpie


def load_engine(settings: TtsServerSettings) -> TTSEngine:
    sampling = SamplingSettings(temperature=settings.temperature, topk=settings.topk, cfg_scale=settings.cfg_scale)
    model = load_magpie(settings.model, device=settings.resolved_device, codec=settings.codec, sampling=sampling)
    engine = TTSEngine(
        model,
        voice_names=list(settings.voice_names) or None,
        max_sessions=settings.max_sessions,
        max_batch=settings.max_batch,
        max_text_chars=settings.max_text_chars,
        max_queued_chars=settings.max_queued_chars,
        max_frames_per_token=settings.max_frames_per_token,
        precision=settings.precision,
        graph_max_batch=graph_max_batch(model, settings.cuda_graph_max_batch),
    )
    with EXCLUSIVE_GPU_WORK:
        engine.warm_up()
    return engine


class TtsServer(EngineServer[TTSEngine]):
    kind = "TTS"
    settings: TtsServerSettings
    metrics: TtsMetrics

    def __init__(self, settings: TtsServerSettings, driver: Driver | None = None):
        super().__init__(settings, TtsMetrics(), driver)

    def load_engine(self) -> TTSEngine:
        return load_engine(self.settings)

    def ready_message(self, engine: TTSEngine, session_id: str) -> TtsReady:
        return TtsReady(
            session_id=session_id,
            model=self.settings.model,
            sample_rate=engine.sample_rate,
            frame_ms=engine.frame_ms,
            voices=engine.voices,
            default_voice=engine.voices[0],
            languages=engine.languages,
            presets=engine.presets,
            default_preset=DEFAULT_PRESET,
        )

    def handle_message(self, engine: TTSEngine, connection: Connection, message: str | bytes) -> None:
        if isinstance(message, bytes):
            connection.error(ErrorCode.INVALID_MESSAGE, "the TTS protocol has no binary client messages")
            return
        try:
            request = parse_tts_client_message(message)
        except ProtocolError as e:
            connection.error(e.code, str(e))
            return
        if isinstance(request, TtsCancel):
            engine.cancel(connection.sid, request.context_id)
        elif isinstance(request, TtsFlush):
            engine.flush(connection.sid, request.context_id)
        else:
            try:
                engine.speak(connection.sid, request)
            except SegmentRejected as e:
                connection.error(e.code, str(e), context_id=request.context_id, segment_id=request.segment_id)

    def put_policy(self, items: deque, message) -> None:
        """A cancelled turn's audio that has not left yet is dropped, not sent stale, and so
        is the ``segment_done`` that would count it."""
        if isinstance(message, TtsCancelled):
            stale = (TtsAudio, TtsSegmentDone)
            kept = [m for m in items if not (isinstance(m, stale) and m.context_id == message.context_id)]
            items.clear()
            items.extend(kept)
        items.append(message)
