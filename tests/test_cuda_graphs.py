import pytest
import torch

from servers.common.cuda_graphs import FixedCall


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


def test_a_read_back_from_the_device_fails_the_capture_as_on_a_gpu():
    x = torch.ones(2)
    with pytest.raises(RuntimeError, match="_local_scalar_dense"):
        FixedCall(lambda x: x * x.sum().item(), (x,), pool=None)


def test_python_data_made_into_a_tensor_in_the_call_fails_the_capture_as_on_a_gpu():
    x = torch.ones(3)
    with pytest.raises(RuntimeError, match="copies Python data"):
        FixedCall(lambda x: x[[0, 2]], (x,), pool=None)
