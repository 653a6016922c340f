"""The per-turn latency line, from Pipecat's latency breakdown."""

from __future__ import annotations

from pipecat.observers.user_bot_latency_observer import LatencyBreakdown, LatencyContribution, LatencyOwnerKind

from pipecat_nvidia.latency import TurnLatency

# A turn whose first LLM request was a tool call: the LLM is asked twice before speaking.
TOOL_CALL_TURN = [
    ("endpointing_wait", "endpointing wait", "config: VAD stop_secs", LatencyOwnerKind.SETTING, 0.200),
    ("transcription", "transcription", "NemotronSTTService#0", LatencyOwnerKind.SERVICE, 0.040),
    ("llm_inference", "LLM inference", "NemotronLLMService#0", LatencyOwnerKind.SERVICE, 0.090),
    ("llm_tool_call", "LLM tool call", "NemotronLLMService#0", LatencyOwnerKind.SERVICE, 0.030),
    ("function_handler", "function handler", "LLMUserAggregator#0", LatencyOwnerKind.BOT, 0.015),
    ("llm_inference", "LLM inference", "NemotronLLMService#0", LatencyOwnerKind.SERVICE, 0.120),
    ("speech_synthesis", "speech synthesis", "MagpieTTSService#0", LatencyOwnerKind.SERVICE, 0.060),
]


def _breakdown(parts) -> LatencyBreakdown:
    contributions = [
        LatencyContribution(key=k, label=label, owner=owner, owner_kind=kind, start_time=1000.0 + i, duration_secs=s)
        for i, (k, label, owner, kind, s) in enumerate(parts)
    ]
    return LatencyBreakdown(contributions=contributions, total_secs=sum(p[-1] for p in parts))


def test_every_llm_request_of_a_turn_with_a_tool_call_is_counted():
    turn = TurnLatency.of(2, 0.555, _breakdown(TOOL_CALL_TURN))
    llm = [p.seconds for p in turn.parts if p.label == "LLM inference"]
    assert llm == [0.090, 0.120]
    assert turn.line().startswith("turn 2: voice-to-voice 555 ms (endpointing wait 200 ms [config: VAD stop_secs], ")
    assert turn.line().count("LLM inference") == 2
