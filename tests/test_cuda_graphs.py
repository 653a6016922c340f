import weakref

import pytest
import torch

from servers.common.cuda_graphs import FixedCall, graph_pool


def test_a_call_on_a_cpu_overwrites_the_outputs_an_earlier_call_returned_as_a_replay_does():
    x = torch.ones(3)
    call = FixedCall(lambda x: (x * 2, None), (x,), pool=None)
    earlier, _ = call()
    x.fill_(3.0)
    later, _ = call()
    assert later is earlier
    assert earlier.tolist() == [6.0, 6.0, 6.0]


def test_a_value_read_from_python_at_capture_stays_fixed_as_in_a_graph():
    """A graph holds the number it was captured with: the CPU stand-in must show that."""
    scale = {"now": 2.0}
    x = torch.ones(2)
    call = FixedCall(lambda x: x * scale["now"], (x,), pool=None)
    scale["now"] = 5.0
    assert call().tolist() == [2.0, 2.0]


def test_a_replay_follows_the_inputs_through_intermediates_and_in_place_writes():
    x, total = torch.tensor([1.0, 2.0]), torch.zeros(2)

    def accumulate(x, total):
        doubled = x * 2
        doubled.add_(1)
        total.add_(doubled)
        return doubled.view(2, 1)

    call = FixedCall(accumulate, (x, total), pool=None)
    x.copy_(torch.tensor([10.0, 20.0]))
    assert call().flatten().tolist() == [21.0, 41.0]
    assert total.tolist() == [3.0 + 3.0 + 21.0, 5.0 + 5.0 + 41.0]  # the capture's two runs, then the replay


@pytest.mark.parametrize(
    ("call", "read"),
    [
        (lambda x: x * x.sum().item(), "_local_scalar_dense"),
        (lambda x: x * torch.equal(x, x), "equal"),
        (lambda x: x[x > 0], "index.Tensor"),
        (lambda x: x.index_put_((x > 0,), x * 2), "index_put_"),
        (lambda x: torch.unique(x), "_unique2"),
        (lambda x: torch.where(x > 0)[0], "nonzero"),
        (lambda x: x.repeat_interleave(x.long()), "repeat_interleave.Tensor"),
        (lambda x: x.narrow(0, x.long()[0], 1), "_local_scalar_dense"),
        (lambda x: torch.nn.functional.one_hot(x.long()), "(one_hot|_local_scalar_dense)"),
        (lambda x: torch.bincount(x.long()), "bincount"),
        (lambda x: torch.nonzero(x, as_tuple=True)[0], "nonzero"),
        (lambda x: torch.combinations(x), "masked_select"),
    ],
    ids=[
        "item",
        "equal",
        "boolean-index",
        "boolean-index-write",
        "unique",
        "where-condition",
        "repeat-by-tensor",
        "narrow-at-a-tensor",
        "one-hot-of-any-size",
        "bincount",
        "nonzero-as-tuple",
        "made-of-a-read",
    ],
)
@pytest.mark.parametrize("inference", [False, True], ids=["autograd", "inference-mode"])
def test_a_read_back_from_the_device_fails_the_capture_as_on_a_gpu(call, read, inference):
    """Inference mode (every step's) skips autograd, which runs an operation made of others
    (``item``, ``nonzero(as_tuple=True)``, ``combinations``) as its parts."""
    with torch.inference_mode(inference), pytest.raises(RuntimeError, match=f"{read} reads a value back"):
        FixedCall(call, (torch.ones(2),), pool=None)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: x.masked_fill(x > 0, 0.0),
        lambda x: torch.where(x > 0, x, 0.0),
        lambda x: x.repeat_interleave(x.long(), output_size=2),
        lambda x: x[x.long() - 1],
        lambda x: torch.nn.functional.one_hot(x.long(), 3),
    ],
    ids=["masked-fill", "where-select", "repeat-with-size", "integer-index", "one-hot-of-a-given-size"],
)
def test_work_whose_sizes_do_not_depend_on_values_is_held_as_captured(call):
    with torch.inference_mode():
        FixedCall(call, (torch.ones(2),), pool=None)


def test_python_data_made_into_a_tensor_in_the_call_fails_the_capture_as_on_a_gpu():
    x = torch.ones(3)
    with pytest.raises(RuntimeError, match="copies host data"):
        FixedCall(lambda x: x[[0, 2]], (x,), pool=None)


def test_a_recording_keeps_none_of_the_tensors_the_call_made_but_its_outputs():
    """Held for every bucket of every engine a test run builds, they ran a CI run out of memory."""
    made = []

    def total(x):
        doubled = x * 2
        made.append(weakref.ref(doubled))
        return doubled.sum(0)

    call = FixedCall(total, (torch.ones(3, 3),), pool=None)
    assert made[-1]() is None
    assert call().tolist() == [6.0, 6.0, 6.0]


def test_on_a_device_a_host_tensor_the_call_would_copy_over_fails_the_capture():
    """The meta device stands in for a GPU: what lies on the host is now told apart."""
    x, index = torch.ones(3, device="meta"), torch.tensor([0, 2])
    with pytest.raises(RuntimeError, match="index.Tensor copies host data"):
        FixedCall(lambda x: x[index], (x,), pool=None)


def test_on_a_device_host_scalars_and_work_on_the_host_alone_are_held_as_captured():
    x, counts = torch.ones(3, device="meta"), torch.tensor([1, 2])
    call = FixedCall(lambda x: x * torch.tensor(2.0) + counts.sum(), (x,), pool=None)
    assert call().shape == (3,)


def test_on_a_device_a_mask_filled_with_a_host_scalar_is_held_as_captured():
    """``x[mask] = value`` is ``masked_fill_`` when the value is one number on the host;
    with values on the device it finds the mask's positions, a read back."""
    x, fill = torch.ones(3, device="meta"), torch.tensor(0.0)
    FixedCall(lambda x: x.index_put_((x > 0,), fill), (x,), pool=None)
    with pytest.raises(RuntimeError, match="index_put_ reads a value back"):
        FixedCall(lambda x: x.index_put_((x > 0,), x[:1]), (x,), pool=None)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")


@needs_gpu
@pytest.mark.parametrize(
    ("call", "failure"),
    [(lambda x: x[torch.arange(2)], "copies host data"), (lambda x: x * x.cpu()[0], "reads a value back")],
    ids=["host-index", "copy-to-host"],
)
def test_a_call_that_would_fail_its_capture_fails_before_the_capture_begins(call, failure):
    """A capture that fails leaves PyTorch's generator in capture mode on some versions:
    random draws after it would fail too."""
    x = torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError, match=failure):
        FixedCall(call, (x,), graph_pool(x.device))
    assert torch.rand(4, device="cuda").shape == (4,)


@needs_gpu
def test_graphs_outlive_another_familys_graphs_being_dropped():
    """Every graph captured on one stream uses that stream's cuBLAS workspace, allocated in
    the first one's pool when it was first used in a capture, and freed by some PyTorch
    versions when any of them is dropped."""
    weights = torch.randn(256, 256, device="cuda")

    def project(x):
        return x @ weights

    dropped = FixedCall(project, (torch.randn(32, 256, device="cuda"),), graph_pool(weights.device))
    kept = FixedCall(project, (torch.randn(64, 256, device="cuda"),), graph_pool(weights.device))
    dropped()
    del dropped
    torch.cuda.empty_cache()
    kept.inputs[0].copy_(torch.randn(64, 256, device="cuda"))
    assert torch.allclose(kept(), kept.inputs[0] @ weights)
    assert torch.rand(4, device="cuda").shape == (4,)
