"""AngularMiner: eager and TorchScript results equal PML 2.9.0's multiset of triplets
exactly, also where PML's own float arithmetic decides (duplicates of large magnitude,
angles exactly on the threshold, thresholds set to data angles)."""
import math
import warnings
import zlib
from typing import Dict, Tuple

import pytest
import torch

from exportminers import miners as em

pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

_SCRIPTED: Dict[float, torch.jit.ScriptModule] = {}


def _seed(tag: str) -> int:
    return zlib.crc32(tag.encode()) & 0x7FFFFFFF


def _triplets(out) -> list:
    return sorted(zip(*(t.tolist() for t in out)))


def _pml(x, y, ref, ref_y, angle):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        miner = pml_miners.AngularMiner(angle=angle)
        out = miner(x, y) if ref is None else miner(x, y, ref, ref_y)
    return _triplets(out)


def _scripted(angle: float):
    if angle not in _SCRIPTED:
        _SCRIPTED[angle] = torch.jit.script(em.AngularMiner(angle=angle))
    return _SCRIPTED[angle]


def _check(x, y, ref=None, ref_y=None, angle=20.0, script=True) -> Tuple[bool, str]:
    want = _pml(x, y, ref, ref_y, angle)
    mods = [("eager", em.AngularMiner(angle=angle))]
    if script:
        mods.append(("script", _scripted(angle)))
    for name, mod in mods:
        got = _triplets(mod(x, y) if ref is None else mod(x, y, ref, ref_y))
        if got != want:
            return False, (f"{name}: angle={angle!r} dtype={x.dtype} N={x.size(0)} "
                           f"D={x.size(1)}: PML {len(want)} triplets, ours {len(got)}; "
                           f"only PML {sorted(set(want) - set(got))[:5]}, "
                           f"only ours {sorted(set(got) - set(want))[:5]}")
    return True, ""


def _assert(x, y, ref=None, ref_y=None, angle=20.0, script=True):
    ok, msg = _check(x, y, ref, ref_y, angle, script)
    assert ok, msg


# (a) duplicate embeddings: PML's distance is exactly the eps term, which a Gram
# expansion loses to cancellation

@pytest.mark.parametrize("dtype,scale", [(torch.float32, 10.0 ** k) for k in range(2, 19, 2)]
                         + [(torch.float32, 10.0 ** k) for k in (3, 5)]
                         + [(torch.float64, 10.0 ** k) for k in (3, 3.5, 4)])
@pytest.mark.parametrize("d", [4, 16, 128])
@pytest.mark.parametrize("ref_mode", [False, True])
def test_duplicates_large_magnitude(dtype, scale, d, ref_mode):
    g = torch.Generator().manual_seed(_seed(f"dup-{dtype}-{scale}-{d}-{ref_mode}"))
    for trial in range(4):
        base = (torch.randn(1, d, generator=g, dtype=torch.float64) * scale).to(dtype)
        if trial == 0:
            x, y = base.repeat(3, 1), torch.tensor([0, 0, 1])
        else:
            # several identical groups plus other rows of the same magnitude
            other = (torch.randn(3, d, generator=g, dtype=torch.float64) * scale).to(dtype)
            x = torch.cat([base.repeat(3, 1), other, base.repeat(2, 1), other[:1]])
            y = torch.randint(0, 3, (x.size(0),), generator=g)
        ref, ref_y = (x.clone(), y.clone()) if ref_mode else (None, None)
        for angle in (20.0, 26.0, 27.0, 45.0):
            _assert(x, y, ref, ref_y, angle)


# (b) negatives equal to anchors: the angle is exactly 45 degrees in real arithmetic

@pytest.mark.parametrize("d", [2, 3, 8, 16, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_negative_equals_anchor_45(d, dtype):
    g = torch.Generator().manual_seed(_seed(f"n=a-{d}-{dtype}"))
    fails = []
    for _ in range(60):
        a = torch.randn(1, d, generator=g, dtype=torch.float64).to(dtype)
        p = torch.randn(1, d, generator=g, dtype=torch.float64).to(dtype)
        x, y = torch.cat([a, p, a]), torch.tensor([0, 0, 1])
        ok, msg = _check(x, y, angle=45.0)
        if not ok:
            fails.append(msg)
    assert not fails, f"{len(fails)} of 60 differ; first: {fails[0]}"


def test_audit_repros():
    torch.manual_seed(0)
    x = (torch.randn(1, 16) * 100).repeat(3, 1)
    y = torch.tensor([0, 0, 1])
    _assert(x, y, angle=20.0)
    a = [-1.456490159034729, 0.042097773402929306, -1.5493837594985962, 0.19875285029411316,
         -0.36333391070365906, -1.4124857187271118, -1.5822452306747437, 0.9059010744094849]
    p = [0.10835839062929153, -1.182396650314331, -0.42028695344924927, -0.2569114863872528,
         -1.1398080587387085, -1.23903226852417, -0.31342682242393494, -0.39374104142189026]
    _assert(torch.tensor([a, p, a]), y, angle=45.0)


# (c) thresholds set to the exact angle PML computes for one of the batch's triplets

def _pml_angle_degrees(x, i, j, k) -> float:
    fn = torch.nn.functional.pairwise_distance
    a, p, n = x[i:i + 1], x[j:j + 1], x[k:k + 1]
    ang = torch.atan(fn(a, p, p=2) / (2 * fn(n, (a + p) / 2, p=2)))
    return math.degrees(float(ang[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", range(4))
def test_angle_at_data_angle(dtype, block):
    g = torch.Generator().manual_seed(_seed(f"data-angle-{dtype}-{block}"))
    fails = []
    for _ in range(12):
        n = int(torch.randint(3, 12, (1,), generator=g))
        d = int(torch.randint(2, 20, (1,), generator=g))
        x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
        y = torch.randint(0, 3, (n,), generator=g)
        y[1] = y[0]
        y[2] = (y[0] + 1) % 3
        k = int(torch.randint(2, n, (1,), generator=g))
        if int(y[k]) == int(y[0]):
            k = 2
        deg = _pml_angle_degrees(x, 0, 1, k)
        # the degrees and their neighbours: radians(deg) may land either side of it
        for angle in (deg, math.nextafter(deg, -math.inf), math.nextafter(deg, math.inf)):
            ok, msg = _check(x, y, angle=angle)
            if not ok:
                fails.append(msg)
    assert not fails, f"{len(fails)} differ; first: {fails[0]}"


# (d) random batches across scales, with duplicated rows and negatives equal to anchors

_ANGLES = (20.0, 45.0, 26.56505117707799, 35.0, 60.0)


def _random_case(g: torch.Generator):
    n = int(torch.randint(3, 41, (1,), generator=g))
    d = int(torch.randint(1, 33, (1,), generator=g))
    scale = 10.0 ** float(torch.empty(1).uniform_(-3, 3, generator=g))
    dtype = torch.float64 if float(torch.rand(1, generator=g)) < 0.3 else torch.float32
    kind = int(torch.randint(0, 4, (1,), generator=g))
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    if kind == 1:      # coarse values: many exact ties and exact 45-degree angles
        x = torch.round(x / scale * 2) * scale / 2
    if kind >= 2:      # duplicated rows
        src = torch.randint(0, n, (n,), generator=g)
        keep = torch.rand(n, generator=g) < 0.5
        x = torch.where(keep.unsqueeze(1), x, x[src])
    x = x.to(dtype)
    y = torch.randint(0, int(torch.randint(2, 6, (1,), generator=g)), (n,), generator=g)
    angle = _ANGLES[int(torch.randint(0, len(_ANGLES), (1,), generator=g))]
    ref_mode = float(torch.rand(1, generator=g)) < 0.4
    return x, y, angle, ref_mode


@pytest.mark.parametrize("block", range(40))
def test_random_parity(block):
    g = torch.Generator().manual_seed(_seed(f"random-{block}"))
    fails = []
    for _ in range(100):
        x, y, angle, ref_mode = _random_case(g)
        ref, ref_y = (x.clone(), y.clone()) if ref_mode else (None, None)
        ok, msg = _check(x, y, ref, ref_y, angle)
        if not ok:
            fails.append(msg)
    assert not fails, f"{len(fails)} of 100 differ; first: {fails[0]}"


# float16 / bfloat16: PML runs the same ops in that precision (bfloat16: pairwise_distance
# works there, cdist does not); the float64 shortcut must use its rounding, not float64's

def _reduced_precision_parity(tag: str, dtype, cases: int, d_hi: int, keep: float):
    """``cases`` random batches in ``dtype`` (rows kept with probability ``keep``, the
    others duplicates of random rows) against PML; returns the failure messages."""
    g = torch.Generator().manual_seed(_seed(tag))
    fails = []
    for _ in range(cases):
        n = int(torch.randint(3, 20, (1,), generator=g))
        d = int(torch.randint(2, d_hi, (1,), generator=g))
        scale = 10.0 ** float(torch.empty(1).uniform_(-1, 2, generator=g))
        x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
        if keep < 1.0:
            src = torch.randint(0, n, (n,), generator=g)
            x = torch.where((torch.rand(n, generator=g) < keep).unsqueeze(1), x, x[src])
        x = x.to(dtype)
        y = torch.randint(0, 3, (n,), generator=g)
        angle = _ANGLES[int(torch.randint(0, len(_ANGLES), (1,), generator=g))]
        ok, msg = _check(x, y, angle=angle)
        if not ok:
            fails.append(msg)
    return fails


# (seed tag, dtype, batches, widths below, share of rows kept): float16 with duplicated
# rows in 4 blocks, bfloat16 in 2
REDUCED = [(f"half-{b}", torch.float16, 25, 20, 0.6) for b in range(4)] + \
    [(f"bf16-{b}", torch.bfloat16, 20, 12, 1.0) for b in range(2)]


@pytest.mark.parametrize("tag,dtype,cases,d_hi,keep", REDUCED, ids=[r[0] for r in REDUCED])
def test_reduced_precision_parity(tag, dtype, cases, d_hi, keep):
    fails = _reduced_precision_parity(tag, dtype, cases, d_hi, keep)
    assert not fails, f"{len(fails)} of {cases} differ; first: {fails[0]}"


def test_dense_kernel_agrees_with_mining():
    """The eager dense kernel (``kernel``) applies the same exact recheck."""
    from exportminers.decode import decode
    torch.manual_seed(0)
    x = (torch.randn(1, 16) * 100).repeat(3, 1)
    y = torch.tensor([0, 0, 1])
    m = em.AngularMiner()
    out = decode(m.kernel(x, y, None, None, None), m.layout)
    assert _triplets(out) == _pml(x, y, None, None, 20.0)


def test_bfloat16_audit_repro():
    torch.manual_seed(0)
    x = torch.randn(12, 4).bfloat16()
    y = torch.randint(0, 3, (12,))
    _assert(x, y)
