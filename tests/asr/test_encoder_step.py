"""The conformer call moves session caches through the state pool itself: in the
autocast dtype, by slot, padding rows confined to the scratch slot."""

from __future__ import annotations

import copy

import pytest
import torch

from servers.asr.batch_step import BatchedStreamingStep, StepRow
from servers.asr.encoder_graphs import ENCODER_CACHES, encoder_step
from servers.asr.features import UtteranceAudio
from servers.asr.model import load_streaming_model, read_geometry
from servers.asr.state_pool import PooledTensor, StatePool
from servers.common.precision import autocast, store_weights_for_autocast
from tests.host_reads import HOST_READS, operations
from tests.weight_casts import weight_casts


@pytest.fixture(scope="module")
def model(tiny_asr_path):
    return load_streaming_model(str(tiny_asr_path), right_context=1, device="cpu")


def _cache_pool(encoder, dtype: torch.dtype, sessions: int) -> StatePool:
    channel, time_, length = encoder.get_initial_cache_state(batch_size=1)
    layout = {
        "cache_last_channel": PooledTensor(channel.to(dtype), 1),
        "cache_last_time": PooledTensor(time_.to(dtype), 1),
        "cache_last_channel_len": PooledTensor(length, 0),
    }
    return StatePool(layout, sessions, sessions)


def test_caches_kept_in_the_autocast_dtype_change_no_result(model):
    """Under bf16 autocast the conformer reads its caches only through bf16 casts, so a
    pool holding them in bf16 gives bit for bit what float32 caches give."""
    encoder, geometry = model.encoder, read_geometry(model, 1)
    pools = {dtype: _cache_pool(encoder, dtype, 2) for dtype in (torch.float32, torch.bfloat16)}
    slots = {dtype: torch.tensor([pool.acquire(), pool.acquire()]) for dtype, pool in pools.items()}
    generator = torch.Generator().manual_seed(0)
    lengths = torch.full((2,), geometry.out_frames)
    with torch.inference_mode():
        for _ in range(5):
            x = torch.randn(2, geometry.out_frames, encoder.d_model, generator=generator)
            encoded = {
                dtype: encoder_step(encoder, torch.bfloat16, pool, x, lengths, slots[dtype])[0]
                for dtype, pool in pools.items()
            }
            torch.testing.assert_close(encoded[torch.bfloat16], encoded[torch.float32], rtol=0, atol=0)
    kept = {
        dtype: pool.gather(slots[dtype], ["cache_last_channel"])["cache_last_channel"] for dtype, pool in pools.items()
    }
    assert not torch.equal(kept[torch.bfloat16].float(), kept[torch.float32]), "the caches were rounded"
    assert pools[torch.bfloat16].nbytes < 0.6 * pools[torch.float32].nbytes


def test_encoder_weights_stored_in_bf16_change_no_result(model):
    """Subsampling and conformer under bf16 autocast give bit for bit the same with the
    layers' weights stored in bf16 as with the float32 weights autocast casts each step."""
    geometry = read_geometry(model, 1)
    encoders = {"float32": model.encoder, "stored": copy.deepcopy(model.encoder)}
    weights = sum(p.nbytes for p in model.encoder.parameters())
    assert store_weights_for_autocast(encoders["stored"], torch.bfloat16) > 0.4 * weights
    pools = {name: _cache_pool(model.encoder, torch.bfloat16, 2) for name in encoders}
    slots = {name: torch.tensor([pool.acquire(), pool.acquire()]) for name, pool in pools.items()}
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for _ in range(5):
            features = torch.randn(2, geometry.chunk_frames, geometry.n_mels, generator=generator)
            frames = torch.full((2,), geometry.chunk_frames)
            encoded = {}
            for name, encoder in encoders.items():
                with autocast("cpu", torch.bfloat16):
                    x, lengths = encoder.pre_encode(x=features, lengths=frames)
                encoded[name] = encoder_step(encoder, torch.bfloat16, pools[name], x, lengths, slots[name])[0]
            torch.testing.assert_close(encoded["stored"], encoded["float32"], rtol=0, atol=0)


def test_a_bf16_step_casts_none_of_the_encoders_weights(tiny_asr_path, speech):
    """Autocast would cast every float32 weight on every step: inside a CUDA graph about
    3.6 GB of memory traffic per step for the 0.6B encoder."""
    model = load_streaming_model(str(tiny_asr_path), right_context=1, device="cpu")
    step = BatchedStreamingStep(
        model, read_geometry(model, 1), max_sessions=4, graph_max_batch=4, autocast_dtype=torch.bfloat16
    )
    slots = [step.pool.acquire() for _ in range(2)]
    assert weight_casts(model.encoder, lambda: step.run(_first_chunk_rows(step, speech, slots))) == 0
    graphs = step.encoder_graphs
    [key] = graphs.captured
    bucket = graphs._buckets.get(key)
    assert weight_casts(model.encoder, bucket) == 0


def _first_chunk_rows(step: BatchedStreamingStep, speech, slots: list[int]) -> list[StepRow]:
    g = step.geometry
    rows = []
    for i, slot in enumerate(slots):
        audio = UtteranceAudio(g)
        audio.append(speech[16000 * i : 16000 * (i + 2)])
        rows.append(StepRow(slot, audio.take(g.first_chunk_frames), first=True, final=False))
    return rows


def test_a_bucket_padding_rows_leave_other_sessions_state_alone(model, speech):
    """A step of 3 rows after one of 4 replays the same 4-row bucket: its spare row must
    not run the session that held it last (it would overwrite that session's caches)."""
    step = BatchedStreamingStep(model, read_geometry(model, 1), max_sessions=4, graph_max_batch=4)
    slots = [step.pool.acquire() for _ in range(4)]
    step.run(_first_chunk_rows(step, speech, slots))
    idle = torch.tensor(slots[3:])
    before = step.pool.gather(idle, ENCODER_CACHES)
    step.run(_first_chunk_rows(step, speech, slots[:3]))
    assert step.encoder_graphs.captured == [(4, step.geometry.out_frames)]
    for name, value in step.pool.gather(idle, ENCODER_CACHES).items():
        assert torch.equal(value, before[name]), name


def test_graph_buckets_need_a_pool_that_never_moves(model):
    """A graph holds the pool's addresses, so with graphs the pool is made at full size."""
    step = BatchedStreamingStep(model, read_geometry(model, 1), max_sessions=64, initial_slots=2, graph_max_batch=4)
    assert step.pool.fixed and step.pool.capacity == 64
    assert not BatchedStreamingStep(model, read_geometry(model, 1), max_sessions=64, initial_slots=2).pool.fixed


def test_a_bucketed_step_copies_no_cache_into_or_out_of_graph_buffers(model, speech):
    """Caches are read from the pool and written back to it, once each, by slot: moving
    them through a graph's own buffers was most of an H100's time at 512 rows."""
    step = BatchedStreamingStep(model, read_geometry(model, 1), max_sessions=4, graph_max_batch=4)
    slots = [step.pool.acquire() for _ in range(3)]
    step.run(_first_chunk_rows(step, speech, slots))
    channel = step.pool.gather(torch.tensor(slots), ["cache_last_channel"])["cache_last_channel"]
    layers, _, *per_row = channel.shape

    def is_cache(shape: list[int]) -> bool:
        return len(shape) == 4 and shape[0] == layers and shape[2:] == per_row

    with torch.profiler.profile(record_shapes=True) as profile:
        step.run(_first_chunk_rows(step, speech, slots))
    moves = [e.name for e in profile.events() if any(is_cache(shape) for shape in e.input_shapes)]
    assert moves.count("aten::index_select") == 1 and moves.count("aten::index_copy_") == 1, moves
    assert not {"aten::copy_", "aten::_to_copy"} & set(moves), moves


def test_a_bucketed_step_reads_nothing_back_from_the_device(model, speech):
    """Checked here, on the fixed-shape step itself, before a GPU captures it."""
    step = BatchedStreamingStep(model, read_geometry(model, 1), max_sessions=4, graph_max_batch=4)
    slots = [step.pool.acquire() for _ in range(4)]
    step.run(_first_chunk_rows(step, speech, slots))
    graphs = step.encoder_graphs
    [key] = graphs.captured
    bucket = graphs._buckets.get(key)
    called = operations(bucket)
    assert "aten::linear" in called and not called & HOST_READS


@pytest.mark.parametrize(("max_batch", "finals"), [(16, 8), (512, 64)])
def test_final_buckets_grow_with_the_steady_ones(model, max_batch, finals):
    """About one stream in twenty finishes in a given step: at hundreds of streams more than
    8 finals share a step, and an eager call for them would stall every stream."""
    step = BatchedStreamingStep(model, read_geometry(model, 1), max_sessions=max_batch, graph_max_batch=max_batch)
    widest = step._longest_final_out_frames()
    assert step.encoder_graphs.bucket_for(finals, widest) is not None
    assert step.encoder_graphs.bucket_for(finals + 1, widest) is None
