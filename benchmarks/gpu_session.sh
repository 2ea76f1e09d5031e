#!/usr/bin/env bash
# Steps of the GPU checks, run on a CUDA machine from the repository root (see
# DEVELOPERS.md, "GPU checks"). Each step fits one 10-minute device call, stops itself in
# time (a deadline / timeout per step, below) so its results always come back, and leaves
# at most a few files in $OUT (a tarball per results folder). Several steps may be given
# to one call: they run in order.
#
#   bash benchmarks/gpu_session.sh cuda-tests   # pytest -m cuda: placement, strict load, parity
#   bash benchmarks/gpu_session.sh bench        # miner benchmark, N=256,1024 (SIZES=, MINERS= to change)
#   bash benchmarks/gpu_session.sh bench-4096   # the N=4096 rows of the slow miners
#   bash benchmarks/gpu_session.sh pipeline     # bank pipeline vs the torch baseline + profile
#
# Time limits (seconds, environment): TEST_TIMEOUT_S (cuda-tests, 480), DEADLINE_S (no
# benchmark row starts after it, and the run ends by it plus one row's cap: bench 420 + 60,
# bench-4096 360 + 120),
# PIPELINE_TIMEOUT_S (300). Benchmark rows share worker processes (ROWS_PER_PROCESS, bench
# 5: one process start per miner and N instead of per row; bench-4096 1, so each N=4096
# row's memory is its own) and time BUDGET_S (1) seconds of calls each; the worker's
# host-memory limit is off (MEM_LIMIT_GB, 0: the CUDA driver's reservations make RLIMIT_*
# a poor fit, and the rows use the GPU).
#
# Needs onnxruntime-gpu importable (PYTHONPATH=/tmp/ortgpu-site, DEVELOPERS.md) and, for the
# PML rows and the test harness, pytorch-metric-learning (carried in .whl/ when missing).
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: gpu_session.sh cuda-tests|bench|bench-4096|pipeline ..." >&2; exit 2; }
for step in "$@"; do
    case "$step" in cuda-tests|bench|bench-4096|pipeline) ;;
        *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
OUT=${OUT:-/tmp/exportminers-gpu}
WORK=/tmp/exportminers-gpu-work
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=/tmp/ortgpu-site:$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
# PML 2.9.0 imports scipy and tqdm: carry their wheels too where the machine lacks them
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import pytorch_metric_learning.miners, xdist" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import onnxruntime as ort, torch, numpy, onnx
print("onnxruntime", ort.__version__, ort.get_available_providers())
print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
print("numpy", numpy.__version__, "onnx", onnx.__version__)
if "CUDAExecutionProvider" not in ort.get_available_providers():
    raise SystemExit("no CUDAExecutionProvider: install onnxruntime-gpu first (DEVELOPERS.md)")
# listed is not loaded: a missing CUDA / cuDNN library makes sessions fall back to the CPU
from onnx import TensorProto, helper
g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
m.ir_version = 8
s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider"])
if s.get_providers()[0] != "CUDAExecutionProvider":
    raise SystemExit(f"the CUDA provider does not load: session providers {s.get_providers()}")
print("a CUDA session loads:", s.run(None, {"x": numpy.array([-1.0, 2.0], numpy.float32)})[0])
PY
[ "${PIPESTATUS[0]}" = 0 ] || exit 2

pack() {  # pack a results folder into one file under $OUT
    tar czf "$OUT/$1.tgz" -C "$WORK" "$1" && echo "results: \$OUT/$1.tgz"
}

MEM=(--mem-limit-gb "${MEM_LIMIT_GB:-0}")
rc=0
for step in "$@"; do
echo "== step $step ($(date -u +%H:%M:%S))"
case "$step" in
cuda-tests)
    # graphs exported ahead here (python tests/onnx_graph_cache.py .graphs, carried) save
    # the exports' minutes; pytest-xdist (carried in .whl/) runs TEST_WORKERS at once
    [ -d .graphs ] && export EXPORTMINERS_TEST_GRAPHS=$PWD/.graphs
    XD=(); python3 -c "import xdist" 2>/dev/null && XD=(-n "${TEST_WORKERS:-4}")
    rm -f "$WORK"/cuda_report.md*
    EXPORTMINERS_CUDA_REPORT="$WORK/cuda_report.md" timeout "${TEST_TIMEOUT_S:-480}" \
        python3 -m pytest -q -m cuda -p no:cacheprovider -o addopts="" -rfE ${XD[@]+"${XD[@]}"} \
        tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log" | grep -v "^$"
    st=${PIPESTATUS[0]}
    # one table from every worker's rows (tests/test_cuda.py writes them)
    python3 -c 'import sys; sys.path[:0] = ["tests"]; from test_cuda import merge_reports
print(f"cuda_report.md: {merge_reports(sys.argv[1], sys.argv[2])} graphs")' \
        "$WORK/cuda_report.md" "$OUT/cuda_report.md"
    ;;
bench)
    python3 -m benchmarks.run --device cuda --out "$WORK/bench" --sizes "${SIZES:-256,1024}" ${MINERS:+--miners "$MINERS"} \
        --cap-s "${CAP_S:-60}" --deadline-s "${DEADLINE_S:-420}" --budget-s "${BUDGET_S:-1}" \
        --rows-per-process "${ROWS_PER_PROCESS:-5}" "${MEM[@]}" 2>&1 | tee "$OUT/bench.log"
    st=${PIPESTATUS[0]}
    pack bench
    ;;
bench-4096)
    python3 -m benchmarks.run --device cuda --out "$WORK/bench4096" --sizes 4096 \
        --miners "${MINERS:-TripletMarginMiner,AngularMiner,DistanceWeightedMiner,UniformHistogramMiner}" \
        --cap-s "${CAP_S:-120}" --deadline-s "${DEADLINE_S:-360}" --budget-s "${BUDGET_S:-1}" \
        --rows-per-process "${ROWS_PER_PROCESS:-1}" "${MEM[@]}" 2>&1 | tee "$OUT/bench4096.log"
    st=${PIPESTATUS[0]}
    pack bench4096
    ;;
pipeline)
    timeout "${PIPELINE_TIMEOUT_S:-300}" python3 benchmarks/bench_pipeline.py \
        --out "$WORK/pipeline" --ort-profile \
        --block-sizes "${BLOCKS:-2048x262144,4096x131072,8192x131072,2048x524288}" \
        2>&1 | tee "$OUT/pipeline.log"
    st=${PIPESTATUS[0]}
    pack pipeline
    ;;
esac
[ "$st" = 0 ] || { echo "== step $step: exit status $st"; rc=1; }
done
exit $rc
