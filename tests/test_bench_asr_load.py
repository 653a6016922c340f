"""The ASR load generator measures what it says (it is how speed claims are made)."""

import asyncio

import pytest

from bench.asr_load import ClientShape, _client_process, _within_budget, run_load
from bench.common import histogram_quantiles, largest_load_kept
from tests.asr.client import server_url


def _histogram(counts):
    return {"h_bucket": {str(le): c for le, c in counts}}


def test_quantiles_interpolate_within_buckets_of_the_difference_between_scrapes():
    before = _histogram([(0.01, 5), (0.02, 5), (float("inf"), 5)])
    after = _histogram([(0.01, 55), (0.02, 105), (float("inf"), 105)])
    p50, p90, p99 = histogram_quantiles(before, after, "h")
    assert p50 == pytest.approx(0.01)
    assert p90 == pytest.approx(0.018)
    assert p99 == pytest.approx(0.0198)


def test_no_observations_give_no_quantiles():
    assert histogram_quantiles({}, {}, "h") == [None, None, None]


def test_the_largest_load_kept_is_below_the_first_that_failed():
    """A noisy pass above a failure is not a load the server sustains."""
    runs = [{"sessions": n, "ok": ok} for n, ok in ((1, True), (64, True), (256, False), (384, True))]
    assert largest_load_kept(runs, lambda r: r["ok"]) == 64
    assert largest_load_kept(runs[:2], lambda r: r["ok"]) == 64
    assert largest_load_kept(runs[2:], lambda r: r["ok"]) is None


def test_a_load_whose_clients_fell_behind_real_time_is_not_within_budget():
    kept = {"chunk_ms_p50_p90_p99": [20, 40, 80], "sessions": 8, "sessions_ready": 8, "error_count": 0}
    assert _within_budget({**kept, "client_send_late_ms_max": 5.0}, 160)
    assert not _within_budget({**kept, "client_send_late_ms_max": 250.0}, 160)


@pytest.mark.slow
async def test_a_session_whose_server_goes_away_is_an_error_and_the_load_is_still_reported(start_asr_server):
    server = await start_asr_server()
    shape = ClientShape(4.0, utterance_s=1.0)
    clients = asyncio.create_task(asyncio.to_thread(_client_process, 2, 0, server_url(server), shape))
    await asyncio.sleep(2.0)
    await server.stop()
    result = await clients
    assert result["sessions_ready"] == 2
    assert sum(e.startswith("connection lost") for e in result["errors"]) == 2


@pytest.mark.slow
async def test_a_short_load_run_against_a_real_server(start_asr_server):
    server = await start_asr_server()
    result = await asyncio.to_thread(run_load, server_url(server), 3, ClientShape(1.5, utterance_s=1.0), 1)
    assert result["sessions_ready"] == 3 and result["error_count"] == 0
    # Whole utterances of 1.2 s with the VAD's silence, sent in eight 160 ms frames, go on
    # past the 1.5 s asked for.
    assert result["streamed_s"] == pytest.approx(2 * 8 * 0.16)
    # Step-aligned 160 ms messages: about 6 a second per session, over the seconds streamed.
    assert result["audio_messages_per_s"] == pytest.approx(3 * 1000 / 160, rel=0.15)
    assert result["server_cpu_cores"] > 0 and result["client_send_late_ms_max"] < 100
    assert result["finals"] >= 3
    assert result["chunks"] >= 3 * 10
    assert all(v is not None and v > 0 for v in result["chunk_ms_p50_p90_p99"])
