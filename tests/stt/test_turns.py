"""Smart Turn v3 on the CPU beside streaming ASR: real model, real speech."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.frames.frames import TranscriptionFrame
from pipecat.processors.frame_processor import FrameDirection

from pipecat_nvidia.stt import NemotronSTTService
from pipecat_nvidia.turns import VAD_STOP_SECS, user_turn_params
from tests.asr.client import server_url
from tests.slow_link import slow_link
from tests.stt.harness import run_pipeline

SENTENCE = (9.5, 12.2)
"""The fourth sentence of tests/data/harvard_16k.wav (speech 10.2-12.2 s)."""
NEXT_SENTENCE = (12.94, 14.6)
MID_SENTENCE = 10.4
"""A cut that Smart Turn v3 calls incomplete (p <= 0.14 under onnxruntime 1.26 and 1.32)
whatever 150-300 ms of pause follows it; read speech sounds finished after most of its
phrases (a cut at 10.7 s scored up to 0.70, and 0.34 at 200 ms from onnxruntime 1.27 on)."""
VAD_TAIL_S = 0.2


def _room_tone(speech: np.ndarray, seconds: float) -> np.ndarray:
    """The recording's own background (its first second), not digital silence."""
    return speech[: int(seconds * 16000)]


def _span(audio: np.ndarray, begin: float, end: float) -> np.ndarray:
    return audio[int(begin * 16000) : int(end * 16000)]


def _smart_turn(params) -> LocalSmartTurnAnalyzerV3:
    return params.user_turn_strategies.stop[0]._turn_analyzer


def test_the_helper_sets_up_silero_vad_at_200_ms_and_smart_turn_v3():
    params = user_turn_params()
    assert params.vad_analyzer.params.stop_secs == VAD_STOP_SECS == 0.2
    assert isinstance(_smart_turn(params), LocalSmartTurnAnalyzerV3)
    assert _smart_turn(user_turn_params()) is not _smart_turn(params), "fresh state per pipeline"


def test_smart_turn_runs_on_the_threads_it_is_given():
    analyzer = _smart_turn(user_turn_params(smart_turn_cpus=3))
    assert analyzer._session.get_session_options().intra_op_num_threads == 3


def test_smart_turn_tells_a_finished_sentence_from_one_cut_mid_way(speech):
    """What Smart Turn sees at the VAD's stop: the speech, then the stop window's pause."""
    analyzer = _smart_turn(user_turn_params())
    analyzer.set_sample_rate(16000)
    tail = _room_tone(speech, VAD_TAIL_S)
    whole = analyzer._predict_endpoint(np.concatenate([_span(speech, *SENTENCE), tail]))
    cut = analyzer._predict_endpoint(np.concatenate([_span(speech, SENTENCE[0], MID_SENTENCE), tail]))
    assert whole["prediction"] == 1 and whole["probability"] > 0.9
    assert cut["prediction"] == 0 and cut["probability"] < 0.2


@pytest.mark.slow
async def test_a_turn_judged_incomplete_continues_with_the_next_segment(start_asr_server, speech_int16):
    """The user pauses mid-sentence: the VAD stops and the ASR finalizes the first part,
    Smart Turn keeps the turn open, the user goes on, and the turn's text is both parts,
    no word lost or repeated."""
    server = await start_asr_server()
    run = await run_pipeline(NemotronSTTService(url=server_url(server)), _paused_sentence(speech_int16))
    _assert_one_turn_of_two_finals(run)


@pytest.mark.slow
async def test_a_paused_turn_waits_for_its_last_final_over_a_slow_link(start_asr_server, speech_int16):
    """A remote server's finals come half a second after the end of speech: the first
    part's text, already in the turn, must not close it before the second part's final."""
    server = await start_asr_server()
    async with slow_link(server.port, 0.45) as port:
        run = await run_pipeline(NemotronSTTService(url=f"ws://127.0.0.1:{port}"), _paused_sentence(speech_int16))
    last_final = run.near.of(TranscriptionFrame, FrameDirection.DOWNSTREAM)[-1]
    assert last_final.t - run.vad_stops()[-1] > 0.45, "the link did not delay the final"
    _assert_one_turn_of_two_finals(run)


def _paused_sentence(speech: np.ndarray) -> np.ndarray:
    """A sentence with a pause where Smart Turn calls it incomplete, then the next (long
    enough for the tiny model to emit text whatever the exact utterance boundary)."""
    begin, end = SENTENCE
    room = _room_tone(speech, 1.0)
    return np.concatenate(
        [
            _span(speech, begin, MID_SENTENCE),
            room[:8000],
            _span(speech, MID_SENTENCE, end),
            _span(speech, *NEXT_SENTENCE),
            room,
        ]
    )


def _assert_one_turn_of_two_finals(run) -> None:
    finals = [f.text for f in run.finals()]
    assert len(run.vad_stops()) == 2 and len(finals) == 2 and all(finals)
    assert len(run.user_stops()) == 1, "one turn across the pause"
    assert run.user_messages() == [" ".join(finals)]


def test_the_client_side_imports_neither_torch_nor_nemo():
    code = (
        "import sys, pipecat_nvidia.stt, pipecat_nvidia.turns, pipecat_nvidia.protocol; "
        "print(sorted(m for m in ('torch', 'nemo') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
