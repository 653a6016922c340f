"""The bookkeeping benchmark times both implementations over the same steps (harness check,
not a measurement)."""

from nemo.collections.tts.modules.magpietts_modules import EOSDetectionMethod

from bench.tts_bookkeeping import METHOD, nemo_functions, random_steps, time_nemo, time_ours


def test_both_implementations_are_timed_on_every_step():
    inputs = random_steps(batch=4, text_len=30, steps=12)
    method = EOSDetectionMethod(METHOD)
    nemo, ours = time_nemo(nemo_functions(), method, inputs, 30), time_ours(method, inputs, 30)
    assert len(nemo) == len(ours) == 12
    assert all(t > 0 for t in nemo + ours)
