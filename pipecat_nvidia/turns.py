"""The recommended turn-taking for NemotronSTTService: Silero VAD + Smart Turn v3 on the CPU.

Silero VAD (200 ms stop) marks the end of speech; at that moment NemotronSTTService asks
the server to finalize, and Smart Turn v3 (bundled ONNX, on the CPU so the GPU stays with
ASR) decides in parallel whether the user has finished the turn. If Smart Turn says no,
the turn stays open and the next segment's transcript is appended to it.
"""

from __future__ import annotations

from typing import Any

from pipecat.audio.turn.smart_turn.base_smart_turn import SmartTurnParams
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.processors.aggregators.llm_response_universal import LLMUserAggregatorParams
from pipecat.turns.user_stop import TurnAnalyzerUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies

VAD_STOP_SECS = 0.2
"""Silence after speech before the VAD reports the end of speech. The server is told this
much trailing silence was streamed, so it pads only (R + 1) x 160 ms minus this."""


def user_turn_params(
    *,
    vad_stop_secs: float = VAD_STOP_SECS,
    smart_turn_cpus: int = 1,
    smart_turn_params: SmartTurnParams | None = None,
    **kwargs: Any,
) -> LLMUserAggregatorParams:
    """Parameters for the user context aggregator: VAD and turn strategies in one line.

    Build a fresh value for every pipeline (the strategies keep per-conversation state)::

        user, assistant = LLMContextAggregatorPair(context, user_params=user_turn_params())

    Args:
        vad_stop_secs: Silero VAD stop window.
        smart_turn_cpus: Threads for Smart Turn's inference, which every reply waits for
            at the end of speech (``bench/smart_turn.py`` measures what more buy on a
            machine; on a two-core one, none).
        smart_turn_params: Smart Turn settings (e.g. the silence after which a turn it
            judged incomplete ends anyway; 3 s by default).
        **kwargs: Other ``LLMUserAggregatorParams`` fields.
    """
    smart_turn = LocalSmartTurnAnalyzerV3(cpu_count=smart_turn_cpus, params=smart_turn_params)
    return LLMUserAggregatorParams(
        vad_analyzer=SileroVADAnalyzer(params=VADParams(stop_secs=vad_stop_secs)),
        user_turn_strategies=UserTurnStrategies(stop=[TurnAnalyzerUserTurnStopStrategy(turn_analyzer=smart_turn)]),
        **kwargs,
    )
