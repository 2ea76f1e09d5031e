"""Memory bounds of the dense triplet miners and decoding past nonzero's int32 limit."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from exportminers.decode import decode_part
from exportminers.miners import TripletMarginMiner

PROBE = textwrap.dedent("""
    import json, resource, sys, torch
    from exportminers.miners import AngularMiner, TripletMarginMiner
    torch.set_num_threads(1)
    name, n, impl = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) // 8                      # 8 per class: few triplets
    x = torch.randn(n // 8, 16, generator=g)[labels] + 0.3 * torch.randn(n, 16, generator=g)
    if impl == "pml":
        from pytorch_metric_learning import miners as pm
        miner = getattr(pm, name)()
    else:
        miner = {"TripletMarginMiner": TripletMarginMiner, "AngularMiner": AngularMiner}[name]()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = miner(x, labels)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"delta_bytes": (after - before) * 1024, "triplets": len(out[0])}))
""")


def _peak(name, n, impl):
    res = subprocess.run([sys.executable, "-c", PROBE, name, str(n), impl],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["TripletMarginMiner", "AngularMiner"])
def test_dense_triplet_miner_peak_memory_is_one_bool_cube(name):
    # N^3 = 216 MB of bool; float margins over all triplets would be >= 864 MB (float32).
    n = 600
    cube = n * n * n
    ours = _peak(name, n, "ours")
    out_bytes = ours["triplets"] * 3 * 8 * 3  # index tuples, plus decode temporaries
    budget = cube + out_bytes + 256 * 2**20   # one bool cube + outputs + O(N*M) floats
    assert ours["delta_bytes"] < budget, (ours, budget)
    assert ours["delta_bytes"] < 4 * cube  # a float32 cube alone would be 4 * cube


def test_decode_in_pieces_equals_one_nonzero():
    # the chunked path used past 2^31 elements, exercised with a small piece size
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(7, 5, 6, generator=g) < 0.3
    whole = decode_part(mask, [], [-1, -2, -3])
    for limit in (1, 7, 13, 64, 209, 210):
        pieces = decode_part(mask, [], [-1, -2, -3], limit)
        assert all(torch.equal(a, b) for a, b in zip(whole, pieces)), limit
    assert torch.equal(torch.stack(whole, 1), torch.nonzero(mask))


def test_triplet_miner_blocks_match_single_block():
    # the row-blocked margin computation equals the one-shot definition
    g = torch.Generator().manual_seed(2)
    x = torch.randn(70, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (70,), generator=g)
    a, p, n = TripletMarginMiner(margin=0.3)(x, y)
    mat = torch.cdist(torch.nn.functional.normalize(x), torch.nn.functional.normalize(x))
    same = y[:, None] == y[None, :]
    pos = same & ~torch.eye(70, dtype=torch.bool)
    cube = pos[:, :, None] & ~same[:, None, :] & ((mat[:, None, :] - mat[:, :, None]) <= 0.3)
    assert torch.equal(torch.stack([a, p, n], 1), torch.nonzero(cube))


ORT_PROBE = textwrap.dedent("""
    import json, resource, sys, tempfile
    import numpy as np
    import exportminers as em
    name, n = sys.argv[1], int(sys.argv[2])
    path = tempfile.mktemp(suffix=".onnx")
    em.export_onnx(getattr(em.miners, name)(), path)
    om = em.OnnxMiner(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    labels = np.arange(n) // 8
    x = (rng.standard_normal((n // 8, 16))[labels]
         + 0.3 * rng.standard_normal((n, 16))).astype(np.float32)
    om(x[:16], labels[:16])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        out = om(x, labels)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"delta_bytes": (after - before) * 1024, "triplets": len(out[0])}))
""")


@pytest.mark.parametrize("name,n,cube_bytes", [("TripletMarginMiner", 600, 1),
                                                ("AngularMiner", 400, 8)])
def test_onnx_runtime_repeated_calls_stay_at_one_cube(name, n, cube_bytes):
    """Repeated OnnxMiner calls on the CPU stay near the graph's one [N, N, N] tensor
    (bool for TripletMargin, float64 for Angular): ONNX Runtime's default arena and memory
    pattern need about twice a call's memory from the second call on, and Angular's
    former graph held several float64 cubes at once (exportminers.runtime.arena). The
    Angular case fails with ONNX Runtime's defaults; at this size the TripletMargin case
    bounds its one bool cube either way."""
    cube = cube_bytes * n ** 3
    res = subprocess.run([sys.executable, "-c", ORT_PROBE, name, str(n)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    budget = cube + n ** 3 + 128 * 2**20   # the cube, the bool output, O(N^2) terms
    assert got["delta_bytes"] < budget, (got, budget)


def test_lean_cpu_options_only_when_not_given(tmp_path):
    import onnxruntime as ort

    import exportminers as em

    path = str(tmp_path / "bh.onnx")
    em.export_onnx(em.miners.BatchHardMiner(), path)
    lean = em.OnnxMiner(path, providers=["CPUExecutionProvider"]).session.get_session_options()
    assert lean.enable_mem_pattern is False
    assert lean.get_session_config_entry("session.use_env_allocators") == "1"
    mine = ort.SessionOptions()
    given = em.OnnxMiner(path, providers="CPUExecutionProvider", session_options=mine)
    assert given.session.get_session_options().enable_mem_pattern is True


def test_shared_arena_can_be_turned_off(tmp_path):
    import exportminers as em
    from exportminers.runtime import arena

    path = str(tmp_path / "bh.onnx")
    em.export_onnx(em.miners.BatchHardMiner(), path)
    with pytest.raises(ValueError, match="enabled must be True or False"):
        arena.use_shared_arena("no")
    arena.use_shared_arena(False)
    try:
        opts = em.OnnxMiner(path, providers=["CPUExecutionProvider"]).session.get_session_options()
        assert opts.enable_mem_pattern is True
    finally:
        arena.use_shared_arena(True)


def test_cat_release_equals_cat_and_lets_go_of_pieces():
    """Decoded blocks are joined by cat_release: torch.cat's result, each piece released
    once copied (the caller's list is emptied), eager and inside TorchScript alike."""
    import gc
    import weakref
    from typing import List, Tuple

    from exportminers.decode import cat_release

    g = torch.Generator().manual_seed(2)
    for sizes in ([5], [3, 0, 4], [0, 0], [1, 7, 2, 9]):
        pieces = [torch.randint(0, 100, (k,), generator=g) for k in sizes]
        want = torch.cat(pieces)
        refs = [weakref.ref(p) for p in pieces]
        got = cat_release(pieces)
        assert torch.equal(got, want) and got.dtype == torch.int64
        if len(sizes) > 1:
            gc.collect()
            assert all(r() is None for r in refs) and all(p.numel() == 0 for p in pieces)

    @torch.jit.script
    def scripted(sizes: List[int]) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        pieces: List[torch.Tensor] = []
        for k in sizes:
            pieces.append(torch.arange(k) * 10 + len(pieces))
        want = torch.cat(pieces)
        return cat_release(pieces), want, pieces   # the script's own list is emptied

    got, want, left = scripted([3, 0, 4, 2])
    assert torch.equal(got, want) and [p.numel() for p in left] == [0, 0, 0, 0]
