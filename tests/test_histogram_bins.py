"""UniformHistogramMiner's arithmetic binning equals counting edges (PML's bin rule)."""
import pytest
import torch

from exportminers.miners.uniform_histogram_miner import bin_index, histogram_edges


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_bins", [1, 2, 3, 10, 100, 1000])
def test_bin_equals_number_of_interior_edges_at_or_below(dtype, num_bins):
    g = torch.Generator().manual_seed(num_bins)
    for trial in range(20):
        scale = float(torch.rand(1, generator=g)) * 3
        v = torch.rand(4000, generator=g, dtype=torch.float64) * scale + float(torch.randn(1, generator=g))
        if trial % 4 == 0:
            v = v.round(decimals=1)  # ties, and values sitting exactly on edges
        v = v.to(dtype)
        low, high = v.min(), v.max()
        edges = histogram_edges(low, high, num_bins)
        want = torch.searchsorted(edges[1:num_bins].contiguous(), v, right=True)
        assert torch.equal(bin_index(v, edges, low, high, num_bins), want)


def test_single_point_goes_to_the_last_bin():
    v = torch.full((7,), 0.3)
    low, high = v.min(), v.max()
    assert bin_index(v, histogram_edges(low, high, 5), low, high, 5).tolist() == [4] * 7


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_edges_are_torch_linspace(monkeypatch, dtype):
    """Eager edges are torch.linspace's, bit for bit (PML's bins; its CPU kernel rounds by
    vector lanes, so a formula differs at thousands of edges); the export path's formula
    stays within a few ulps of them and keeps both ends exact."""
    from exportminers import _ops
    g = torch.Generator().manual_seed(5)
    for trial in range(50):
        v = (torch.randn(64, generator=g, dtype=torch.float64) * 3).to(dtype)
        low, high = v.min(), v.max()
        num_bins = [1, 2, 7, 30, 100, 1000][trial % 6]
        want = torch.linspace(low, high, num_bins + 1, dtype=dtype)
        assert torch.equal(histogram_edges(low, high, num_bins), want), trial
        with monkeypatch.context() as m:
            m.setattr(_ops, "is_exporting", lambda: True)
            formula = histogram_edges(low, high, num_bins)
        assert formula[0] == low and formula[-1] == high
        ulp = torch.finfo(dtype).eps * float(max(abs(low), abs(high)))
        assert float((formula - want).abs().max()) <= 4 * ulp, trial


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_on_edges_fall_in_pmls_bins(dtype):
    """Integer-valued dot products sit exactly on many edges: each non-empty PML bin
    (torch.linspace edges, PML's [s, e) rule) gets exactly pos_per_bin / neg_per_bin
    pairs, and no pair comes from any other bin."""
    from collections import Counter

    import pytorch_metric_learning.utils.loss_and_miner_utils as pml_lmu

    import exportminers.distances as ed
    import exportminers.miners as em
    g = torch.Generator().manual_seed(7)
    for trial in range(12):
        n = 7 + trial
        x = torch.randint(-4, 5, (n, 2), generator=g).to(dtype) / 2
        y = torch.randint(0, 3, (n,), generator=g)
        num_bins = [30, 10, 7, 100][trial % 4]
        miner = em.UniformHistogramMiner(
            num_bins=num_bins, pos_per_bin=2, neg_per_bin=3,
            distance=ed.DotProductSimilarity(normalize_embeddings=False))
        torch.manual_seed(trial)
        a1, p, a2, an = miner(x, y)
        mat = x @ x.T
        pa1, pp, pa2, pn = pml_lmu.get_all_pairs_indices(y)
        for (ca, co), (oa, oo), per in (((pa1, pp), (a1, p), 2), ((pa2, pn), (a2, an), 3)):
            if not len(ca):
                continue
            vals = mat[ca, co]
            edges = torch.linspace(vals.min(), vals.max(), num_bins + 1, dtype=dtype)
            want = {b: per for b in set(_pml_bin(vals, edges).tolist())}
            assert Counter(_pml_bin(mat[oa, oo], edges).tolist()) == want, trial


def _pml_bin(vals, edges):
    """PML's bin of each value: the first i with edges[i] <= v < edges[i + 1] (the last
    bin closed); -1 for none."""
    out = torch.full(vals.shape, -1, dtype=torch.int64)
    last = len(edges) - 2
    for i in range(len(edges) - 1):
        cond = (edges[i] <= vals) & ((vals < edges[i + 1]) if i != last else (vals <= edges[i + 1]))
        out[cond & (out < 0)] = i
    return out


# ------------------------------------------------- the kernel's draws, exactly

def _brute_force_draws(mat, pos, neg, num_bins, noise_pos, noise_neg):
    """Each pair's bin by PML's rule (searchsorted over each pool's edges); a draw ``u``
    from a bin with ``c`` members is its member number ``floor(u * c)`` in row-major
    order. Returns, per pool, {(bin, draw): (row, column)} for the non-empty bins."""
    m = mat.size(1)
    flat = mat.reshape(-1)
    out = []
    for pool, u in ((pos.reshape(-1), noise_pos), (neg.reshape(-1), noise_neg)):
        got = {}
        if pool.any():
            vals = flat[pool]
            edges = histogram_edges(vals.min(), vals.max(), num_bins)
            bins = torch.searchsorted(edges[1:num_bins].contiguous(), flat, right=True)
            members = [torch.nonzero(pool & (bins == j)).flatten().tolist()
                       for j in range(num_bins)]
            for j, mem in enumerate(members):
                for k in range(u.size(1)):
                    if mem:
                        r = min(int(u[j, k] * len(mem)), len(mem) - 1)
                        got[(j, k)] = (mem[r] // m, mem[r] % m)
        out.append(got)
    return out


def _kernel_draws(outputs):
    out = []
    for valid, rows, cols in (outputs[:3], outputs[3:]):
        valid = valid.expand_as(rows)
        out.append({(j, k): (int(rows[j, k]), int(cols[j, k]))
                    for j in range(rows.size(0)) for k in range(rows.size(1)) if valid[j, k]})
    return out


@pytest.mark.parametrize("exporting", [False, True], ids=["eager", "export-path"])
def test_kernel_draws_equal_brute_force(monkeypatch, exporting):
    from exportminers import _ops
    from exportminers.miners.uniform_histogram_miner import uniform_histogram_miner
    if exporting:
        monkeypatch.setattr(_ops, "is_exporting", lambda: True)
    g = torch.Generator().manual_seed(11)
    for trial in range(40):
        n, m = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
        num_bins = int(torch.randint(1, 12, (1,), generator=g))
        mat = torch.rand(n, m, generator=g)
        if trial % 2:
            mat = mat.round(decimals=1)            # ties and values on bin edges
        labels = torch.randint(0, 4, (n,), generator=g)
        ref_labels = torch.randint(0, 4, (m,), generator=g)
        pos = labels[:, None] == ref_labels[None]
        neg = ~pos
        if trial % 5 == 0:
            neg = neg & (torch.rand(n, m, generator=g) < 0.3)  # pairs in neither pool
        if trial % 7 == 0:
            pos = torch.zeros_like(pos)                         # an empty pool
        noise = torch.rand(2, num_bins, 3, generator=g, dtype=torch.float64)
        got = _kernel_draws(uniform_histogram_miner(
            mat, pos, neg, num_bins, noise[0], noise[1]))
        assert got == _brute_force_draws(mat, pos, neg, num_bins, noise[0], noise[1]), trial


def test_kernel_key_blocks_do_not_change_keys():
    from exportminers.miners.uniform_histogram_miner import pair_keys
    g = torch.Generator().manual_seed(12)
    mat = torch.rand(37, 23, generator=g)
    labels = torch.randint(0, 3, (37,), generator=g)
    ref_labels = torch.randint(0, 3, (23,), generator=g)
    pos = labels[:, None] == ref_labels[None]
    whole = pair_keys(mat, pos, ~pos, 7, block_elements=37 * 23)
    for block in (1, 22, 23, 24, 100):
        assert torch.equal(pair_keys(mat, pos, ~pos, 7, block_elements=block), whole)


def test_draw_chunks_do_not_change_draws():
    import importlib
    uh = importlib.import_module("exportminers.miners.uniform_histogram_miner")
    g = torch.Generator().manual_seed(13)
    mat = torch.rand(50, 60, generator=g)
    labels = torch.randint(0, 3, (50,), generator=g)
    ref_labels = torch.randint(0, 3, (60,), generator=g)
    pos = labels[:, None] == ref_labels[None]
    key = uh.pair_keys(mat, pos, ~pos, 9)
    counts = torch.zeros(50, 19, dtype=torch.int64).scatter_add(1, key, torch.ones_like(key))
    u = torch.rand(9, 4, generator=g, dtype=torch.float64)
    whole = uh._sample_bins(key, counts[:, 9:18], 9, u, block_elements=9 * 4 * 60)
    for block in (1, 60, 239, 240, 241):
        got = uh._sample_bins(key, counts[:, 9:18], 9, u, block_elements=block)
        assert all(torch.equal(a, b) for a, b in zip(got, whole)), block
