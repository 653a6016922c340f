"""The interleaving benchmark runs end to end on tiny models (its numbers mean nothing on CPU)."""

import math

import pytest

from bench.interleave import main

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
