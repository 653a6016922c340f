#!/usr/bin/env bash
# The tests that only a GPU runs (CI skips them): CUDA graph capture and its failure modes,
# graphed ASR steps against eager ones, NeMo's decoder graphs. Run from the repository root
# after bench/gpu/fetch_wheels.sh filled ./.whl, e.g. through the device tool with carry=[".whl"]:
#   bash bench/gpu/gpu_tests.sh
# pytest's output lands in $OUT/gpu_tests.log (default /tmp/out); a skip there means the GPU was not seen.
source bench/gpu/setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/test/*.whl
python3 -m pytest -p no:cacheprovider -q -rs tests/test_cuda_graphs.py tests/asr/test_model.py \
  "tests/asr/test_batch_step.py::test_steps_run_in_fixed_size_buckets_equal_eager_steps" 2>&1 | tee "$OUT/gpu_tests.log"
