"""Weights stored in the autocast dtype: which layers, and what autocast then computes."""

from __future__ import annotations

import pytest
import torch

from servers.common.precision import AUTOCAST_DTYPES, autocast, autocast_dtype, store_weights_for_autocast
from servers.common.settings import PRECISIONS
from tests.weight_casts import weight_casts


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.conv = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.norm = torch.nn.LayerNorm(8)
        self.hidden = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as language models tie them
        self.outside = torch.nn.Linear(8, 8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.embed(tokens).transpose(1, 2)).transpose(1, 2)
        return self.head(self.hidden(self.norm(x)))


def _model() -> _Tiny:
    torch.manual_seed(0)
    return _Tiny().eval()


def test_linear_and_convolution_weights_are_stored_in_the_dtype():
    model = _model()
    freed = store_weights_for_autocast(model, torch.bfloat16)
    assert {n for n, p in model.named_parameters() if p.dtype == torch.bfloat16} == {
        "conv.weight",
        "conv.bias",
        "hidden.weight",
        "hidden.bias",
        "outside.weight",
        "outside.bias",
    }
    assert freed == 2 * (8 * 8 * 3 + 8 + 2 * (8 * 8 + 8))


@pytest.mark.parametrize("autocast", [None, torch.float16])
def test_weights_stay_in_float32_unless_autocast_is_bf16(autocast):
    """NeMo's attention nests a bf16 autocast in an fp16 one: fp16 weights would reach it
    rounded twice."""
    model = _model()
    assert store_weights_for_autocast(model, autocast) == 0
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_weight_tied_to_another_kind_of_layer_keeps_its_dtype():
    """The embedding reads the tied weight outside autocast: rounding it would change its output."""
    model = _model()
    store_weights_for_autocast(model, torch.bfloat16)
    assert model.embed.weight.dtype == torch.float32
    assert model.head.weight is model.embed.weight


def test_skipped_submodules_keep_their_weights():
    model = _model()
    store_weights_for_autocast(model, torch.bfloat16, skip=(model.outside,))
    assert model.outside.weight.dtype == model.outside.bias.dtype == torch.float32
    assert model.hidden.weight.dtype == torch.bfloat16


def test_stored_weights_give_what_autocast_gave_without_casting_them():
    model, tokens = _model(), torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), autocast("cpu", torch.bfloat16):
        before = model(tokens)
        assert weight_casts(model, lambda: model(tokens)) == 5, "autocast casts each float32 weight"
        store_weights_for_autocast(model, torch.bfloat16)
        after = model(tokens)
        assert weight_casts(model, lambda: model(tokens)) == 1, "only the tied head weight is still cast"
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_autocast_keeps_no_weight_casts_across_calls():
    """A CUDA graph captured in the region must hold each cast, not one cached by an earlier call."""
    model, tokens = _model(), torch.zeros((1, 3), dtype=torch.long)
    with autocast("cpu", torch.bfloat16):
        assert weight_casts(model, lambda: (model(tokens), model(tokens)), inference=False) == 10
        assert model(tokens).dtype == torch.bfloat16


def test_autocast_to_none_runs_in_float32():
    model, tokens = _model(), torch.zeros((1, 3), dtype=torch.long)
    with autocast("cpu", None):
        assert model(tokens).dtype == torch.float32
        assert weight_casts(model, lambda: model(tokens)) == 0


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_precision_flag_choice_names_an_autocast_dtype(device):
    resolved = {name: autocast_dtype(name, torch.device(device)) for name in PRECISIONS}
    assert resolved["auto"] == (torch.bfloat16 if device == "cuda" else None)
    assert set(PRECISIONS) == {"auto", *AUTOCAST_DTYPES}


def test_an_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        autocast_dtype("int8", torch.device("cpu"))
