"""The sampling benchmark on a small vocabulary (harness check, not a measurement), and
the check-first grammar against the grammar on every token: greedy, they choose alike."""

from bench.llm_sampling import run, write_model


def test_every_sampler_is_timed_and_the_grammars_choose_the_same_tokens(tmp_path):
    result = run(write_model(tmp_path / "random.gguf", vocab=3000), tokens=40)
    assert result["vocab"] == 3000
    assert len(result["rows"]) == 11
    assert all(row["tokens"] > 0 and row["p50_ms"] > 0 for row in result["rows"].values())
    assert result["same_tokens"] == {"JSON string": True, "fixed-key schema": True, "greedy": True}
