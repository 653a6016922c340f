"""The interleaving benchmark runs end to end on tiny models (its numbers mean nothing on CPU)."""

import math

import pytest

from bench.interleave import MODES, main, prompt
from servers.llm.engine import ChatRequest
from tests.llm.helpers import make_engine, run

pytestmark = pytest.mark.slow


def test_every_mode_measures_turns_and_asr(tiny_asr_path, tiny_tts_path, tiny_llm_path, tmp_path):
    results = main(
        [
            *("--asr", str(tiny_asr_path), "--tts", str(tiny_tts_path), "--llm", str(tiny_llm_path)),
            *("--device", "cpu", "--llm-gpu-layers", "0", "--asr-streams", "1", "--turns", "2"),
            *("--idle-s", "1", "--max-tokens", "24", "--json", str(tmp_path / "out.json")),
            *("--modes", "free", "scheduled", "scheduled-no-holds"),
        ]
    )
    for mode in ("free", "scheduled", "scheduled-no-holds"):
        assert results[mode]["turns"] == 2
        assert math.isfinite(results[mode]["time_to_first_audio_ms_p90"])
        assert results[mode]["asr_chunks_loaded"] > 0
    assert {"asr", "llm_first", "tts_first"} <= set(results["scheduled"]["units"])
    assert results["scheduled"]["max_asr_wait_units"] <= 1
    assert results["scheduled-no-holds"]["holds_for_asr"] == 0


def test_every_measured_turn_evaluates_its_own_prompt(tiny_llm_path):
    """The same request every turn would find all but one token cached after the first:
    only the first mode's first turn would pay for its prompt."""
    engine = make_engine(tiny_llm_path)
    usages = [run(engine, ChatRequest(prompt(mode, n), max_tokens=4))[1].usage for mode in MODES for n in range(2)]
    assert all(usage.cached_tokens < usage.prompt_tokens / 4 for usage in usages), usages
