"""The TTS load generator measures what it says (it is how speed claims are made)."""

import asyncio

import pytest

from bench.tts_load import run_load
from tests.asr.client import server_url


@pytest.mark.slow
async def test_a_short_load_run_against_a_real_server(start_tts_server):
    server = await start_tts_server(max_frames_per_token=1.5)
    result = await asyncio.to_thread(run_load, server_url(server), 2, 2.0, 1)
    assert result["turns"] >= 2 and result["error_count"] == 0
    assert sum(result["first_audio_turns_stream_batch"]) == result["turns"]
    assert result["first_audio_stream_ms_p50_p90"] and result["first_audio_batch_ms_p50_p90"]
    assert result["first_audio_stream_ms_p50_p90"][0] < result["first_audio_batch_ms_p50_p90"][0]
    assert result["realtime_factor_p50_p90"][0] > 0
