"""The Smart Turn thread-count benchmark, on this CPU with the real bundled model."""

import json

from bench.smart_turn import main


def test_each_thread_count_is_timed_over_every_turn(tmp_path):
    out = tmp_path / "smart_turn.json"
    main(["--cpus", "1", "2", "--turns", "3", "--json", str(out)])
    results = json.loads(out.read_text())
    assert sorted(results) == ["1", "2"]
    assert all(r["turns"] == 3 and 0 < r["p50_ms"] <= r["p90_ms"] for r in results.values())
