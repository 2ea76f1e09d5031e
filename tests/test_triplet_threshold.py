"""The exact per-pair threshold that replaces per-triplet margins in TripletMarginMiner."""
import numpy as np
import pytest
import torch

from exportminers.miners.triplet_margin_miner import margin_thresholds


def _values(dtype, g):
    # non-negative values (distances) over many magnitudes, plus edge cases
    scales = torch.tensor([1e-30, 1e-8, 1e-3, 0.5, 1.0, 2.0, 3.0, 1e3, 1e8], dtype=torch.float64)
    v = torch.rand(4000, generator=g, dtype=torch.float64) * scales[torch.randint(0, 9, (4000,), generator=g)]
    special = torch.tensor([0.0, 1.0, 2.0, 0.2, 0.1, 0.3, 1e-45, 0.1 + 0.2, 4.0, 0.25],
                           dtype=torch.float64)
    return torch.cat([v, special]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margin", [0.2, 0.0, 1e-9, 0.1 + 0.2, 3.7, 1e6, 0.25, 2.0 ** -20])
def test_threshold_is_the_exact_boundary(dtype, margin):
    g = torch.Generator().manual_seed(7)
    ap = _values(dtype, g)
    t = margin_thresholds(ap, margin)
    up = torch.nextafter(t, torch.full_like(t, float("inf")))
    assert bool(((t - ap) <= margin).all()), "t itself must pass"
    assert bool(((up - ap) > margin).all()), "the next float above t must fail"


def test_threshold_keeps_infinities():
    ap = torch.tensor([float("inf"), float("-inf")])
    t = margin_thresholds(ap, 0.2)
    assert t[0] == float("inf") and t[1] == float("-inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threshold_comparison_equals_subtraction(dtype):
    # the decision an <= t(ap) equals fl(an - ap) <= margin on values near the boundary
    g = torch.Generator().manual_seed(3)
    ap = torch.rand(300, generator=g, dtype=torch.float64).to(dtype) * 2
    margin = 0.2
    t = margin_thresholds(ap, margin)
    inf = torch.full_like(t, float("inf"))
    near = [t, torch.nextafter(t, inf), torch.nextafter(t, -inf),
            ap + margin, torch.nextafter(ap + margin, inf), torch.nextafter(ap + margin, -inf)]
    for an in near:
        assert torch.equal(an <= t, (an - ap) <= margin)


# ------------------------------------------- nextafter in the exported graph (float64 steps)


def _exporting():
    from unittest import mock

    from exportminers import _ops
    return mock.patch.object(_ops, "is_exporting", return_value=True)


def _float32_sweep():
    """Non-negative float32 values by bit pattern: every exponent's first, last and some
    middle significands, a stride through all of them, the subnormals near 0 and the
    powers of two around 1, FLT_MAX, +inf; and -inf."""
    import numpy as np
    bits = [np.arange(0, 0x7F800000, 4099, dtype=np.int64), np.arange(0, 5000),
            np.arange(2 ** 23 - 3000, 2 ** 23 + 3000),
            np.arange(127 << 23, (127 << 23) + 3000), [0x7F7FFFFE, 0x7F7FFFFF, 0x7F800000]]
    for e in range(255):
        bits.append((e << 23) + np.array([0, 1, 2, 3, 12345, 2 ** 22, 2 ** 23 - 2, 2 ** 23 - 1]))
    b = np.unique(np.concatenate(bits)).astype(np.uint32)
    t = torch.from_numpy(b.view(np.float32).copy())
    return torch.cat([t, torch.tensor([float("-inf")])])


@pytest.mark.parametrize("up", [True, False])
def test_exported_next_float_equals_nextafter(up):
    from exportminers import _ops
    t = _float32_sweep()
    want = torch.nextafter(t, torch.full_like(t, float("inf") if up else float("-inf")))
    with _exporting():
        got = _ops.next_float(t, up)
    assert got.dtype == torch.float32
    if up:   # documented exception: -inf stays -inf upwards (no caller can tell)
        want[-1] = float("-inf")
    assert torch.equal(got, want)


def test_exported_next_float_refuses_other_dtypes():
    from exportminers import _ops
    with _exporting(), pytest.raises(ValueError, match="float32"):
        _ops.next_float(torch.ones(3, dtype=torch.float64), True)


@pytest.mark.parametrize("margin", [0.2, 0.0, 1e-9, 0.1 + 0.2, 3.7, 1e6, 2.0 ** -20])
def test_exported_thresholds_equal_eager(margin):
    g = torch.Generator().manual_seed(11)
    ap = torch.cat([_values(torch.float32, g), torch.tensor([float("inf"), float("-inf")]),
                    torch.tensor([3.4028234663852886e38, 1e38])])
    eager = margin_thresholds(ap, margin)
    with _exporting():
        exported = margin_thresholds(ap, margin)
    assert torch.equal(exported, eager)


# ------------------------------------------------------------------ AngularMiner's atan cut


@pytest.mark.parametrize("degrees", [20, 35, 45, 0.0, -10, 60, 89.9, 90, 120, -95])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_atan_cut_equals_the_atan_test(degrees, dtype):
    """``r > atan_cut(angle)`` is exactly ``torch.atan(r) > angle`` in that dtype: on the
    4,001 floats around the cut-off, on random ratios of every magnitude, and at the
    special values (the exported AngularMiner graph has no Atan: ONNX Runtime's CUDA EP
    lacks the kernel)."""
    import math

    from exportminers.miners.angular_miner import atan_cut
    angle = math.radians(degrees)
    cut = atan_cut(angle, dtype)
    g = torch.Generator().manual_seed(int(degrees * 10) % 1000)
    rand = torch.exp(torch.randn(20000, generator=g, dtype=torch.float64) * 4).to(dtype)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-30, -1.0],
                           dtype=torch.float64).to(dtype)
    ratios = [rand, -rand, special]
    if math.isfinite(cut):
        around = torch.full((4001,), cut, dtype=dtype)
        up, down = torch.tensor(float("inf"), dtype=dtype), torch.tensor(float("-inf"), dtype=dtype)
        x = torch.tensor([cut], dtype=dtype)
        steps = [x]
        for _ in range(2000):
            steps.append(torch.nextafter(steps[-1], up))
        x2 = [x]
        for _ in range(2000):
            x2.append(torch.nextafter(x2[-1], down))
        around = torch.cat(x2[::-1] + steps[1:])
        ratios.append(around)
    for r in ratios:
        if cut == float("-inf"):   # the test holds for every number; -inf > -inf is False
            r = r[r != float("-inf")]   # (the kernel's ratios are never negative)
        assert torch.equal(torch.atan(r) > angle, r > cut), (degrees, dtype)


class _Thresholds(torch.nn.Module):
    """The exported threshold path alone: ap -> (thresholds, the four triplet tests)."""

    def __init__(self, margin: float):
        super().__init__()
        self.margin = margin

    def forward(self, ap: torch.Tensor, an: torch.Tensor):
        from exportminers.miners.triplet_margin_miner import _select, triplet_thresholds
        t = margin_thresholds(ap, self.margin)
        a3, n3 = ap.unsqueeze(2), an.unsqueeze(1)
        return [t] + [_select(a3, n3, triplet_thresholds(ap, self.margin, kind).unsqueeze(2), kind)
                      for kind in range(4)]


@pytest.mark.parametrize("margin", [0.2, 0.0, 0.1 + 0.2, 1e6, 2.0 ** -20])
def test_thresholds_run_exactly_in_onnx_runtime(tmp_path, margin):
    """The float64 nextafter steps survive export and ONNX Runtime: thresholds equal
    eager, and the comparisons equal PML's subtraction ``fl(an - ap) <= margin`` (with
    its hard / semihard / easy variants) on anchor-negative values at and around each
    threshold."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from exportminers.export import _quiet_exporter
    from exportminers.miners.triplet_margin_miner import triplet_condition
    g = torch.Generator().manual_seed(5)
    ap = torch.cat([_values(torch.float32, g)[:300],
                    torch.tensor([0.0, 1e-45, 3e38, float("inf")])])[:, None]
    t = margin_thresholds(ap[:, 0], margin)
    inf = torch.full_like(t, float("inf"))
    near = [t, torch.nextafter(t, inf), torch.nextafter(t, -inf), ap[:, 0],
            torch.nextafter(ap[:, 0], inf), torch.nextafter(ap[:, 0], -inf), inf,
            torch.full_like(t, 3.4028234663852886e38)]
    an = torch.stack(near, dim=1)                                     # [R, 8]
    n, m = torch.export.Dim("n"), torch.export.Dim("m")
    path = str(tmp_path / "thr.onnx")
    with _quiet_exporter(), torch.no_grad():
        prog = torch.onnx.export(_Thresholds(margin), (ap, an), dynamo=True,
                                 dynamic_shapes={"ap": {0: n}, "an": {0: n, 1: m}},
                                 input_names=["ap", "an"], opset_version=18, verbose=False)
    prog.save(path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"ap": ap.numpy(), "an": an.numpy()})
    assert np.array_equal(got[0], t[:, None].numpy())
    tm = an[:, None, :] - ap[:, :, None]                             # [R, 1, 8]
    for kind in range(4):
        assert np.array_equal(got[1 + kind], triplet_condition(tm, margin, kind).numpy()), kind


@pytest.mark.parametrize("kind", ["all", "hard", "semihard", "easy"])
def test_overflowed_distances_give_pml_triplets(kind):
    """Embeddings near 1e19 without normalisation overflow some float32 distances to
    inf; the threshold test must still select exactly PML's triplets (a +inf threshold
    once also accepted masked-out negatives, e.g. (0, 1, 0))."""
    pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
    pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
    from exportminers import distances, miners
    g = torch.Generator().manual_seed(2)
    for scale in (1.7e38, 1e19, 3e18):
        x = torch.randn(24, 4, generator=g)
        x[0] *= scale
        x[1] *= 1e19
        x[7] *= scale
        y = torch.arange(24) // 4
        want = pml_miners.TripletMarginMiner(
            margin=0.2, type_of_triplets=kind,
            distance=pml_distances.LpDistance(normalize_embeddings=False))(x, y)
        got = miners.TripletMarginMiner(
            margin=0.2, type_of_triplets=kind,
            distance=distances.LpDistance(normalize_embeddings=False))(x, y)
        assert sorted(zip(*[t.tolist() for t in got])) == sorted(zip(*[t.tolist() for t in want]))


class _Next(torch.nn.Module):
    def forward(self, t: torch.Tensor):
        from exportminers import _ops
        return _ops.next_float(t, True), _ops.next_float(t, False)


def test_next_float_runs_exactly_in_onnx_runtime(tmp_path):
    """ONNX Runtime's float64 arithmetic and its rounding cast to float32 give
    ``nextafter`` over the whole float32 sweep (subnormals, powers of two, FLT_MAX, inf)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from exportminers.export import _quiet_exporter
    t = _float32_sweep()
    path = str(tmp_path / "next.onnx")
    with _quiet_exporter(), torch.no_grad():
        prog = torch.onnx.export(_Next(), (t,), dynamo=True,
                                 dynamic_shapes={"t": {0: torch.export.Dim("n")}},
                                 input_names=["t"], opset_version=18, verbose=False)
    prog.save(path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    up, down = sess.run(None, {"t": t.numpy()})
    want_up = torch.nextafter(t, torch.full_like(t, float("inf")))
    want_up[-1] = float("-inf")   # documented: -inf stays -inf upwards
    assert np.array_equal(up, want_up.numpy())
    assert np.array_equal(down, torch.nextafter(t, torch.full_like(t, float("-inf"))).numpy())
