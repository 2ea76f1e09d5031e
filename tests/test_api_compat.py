"""PML API corners an audit found: the older custom-miner API, statistics on empty
batches and with infinite distances, the distances' min/max helpers, load_torchscript's
errors, and mirrored ties in a self-mined pair graph's verification."""
import numpy as np
import pytest
import torch

import exportminers
import pytorch_metric_learning.distances as pml_distances
import pytorch_metric_learning.miners as pml_miners
from exportminers import distances, miners
from exportminers.utils import loss_and_miner_utils as lmu
from exportminers.verify import compare


def test_angular_stats_on_empty_batches(tmp_path):
    x, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    e, el = torch.randn(0, 4), torch.zeros(0, dtype=torch.long)
    exportminers.export_torchscript(miners.AngularMiner(collect_stats=True), tmp_path / "a.pt")
    for m in (miners.AngularMiner(collect_stats=True),
              exportminers.load_torchscript(tmp_path / "a.pt")):
        for args in ((e, el), (x, y, e, el), (e, el, x, y)):
            out = m(*args)
            assert [t.numel() for t in out] == [0, 0, 0]
            assert all(t.dtype == torch.int64 for t in out)
            assert m.average_angle == 0 and m.min_angle == 0
    p = pml_miners.AngularMiner(collect_stats=True)
    p(e, el)
    assert p.average_angle == 0


def test_older_api_mine_with_two_arguments():
    class OldPre(miners.BasePreGradientMiner):
        def mine(self, embeddings, labels):
            return torch.argsort(embeddings[:, 0])[:self.output_batch_size]

    class OldPost(miners.BasePostGradientMiner):
        def mine(self, embeddings, labels):
            return lmu.get_all_triplets_indices(labels)

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    assert torch.equal(OldPre(output_batch_size=4)(x, y), torch.argsort(x[:, 0])[:4])
    a, p, n = OldPost()(x, y)
    assert [t.tolist() for t in (a, p, n)] == [t.tolist() for t in
                                                lmu.get_all_triplets_indices(y)]


def test_older_api_normalize_embeddings_reaches_mine():
    seen = {}

    class C(miners.BaseMiner):
        def mine(self, e, labels, r, rl):
            seen["norms"] = (e.norm(dim=1), r.norm(dim=1))
            return lmu.get_all_pairs_indices(labels, rl)

    x, y = 5 * torch.randn(8, 4), torch.randint(0, 2, (8,))
    C(normalize_embeddings=True)(x, y, 3 * torch.randn(5, 4), torch.randint(0, 2, (5,)))
    for norms in seen["norms"]:
        assert torch.allclose(norms, torch.ones_like(norms))
    C(normalize_embeddings=False)(x, y)
    assert not torch.allclose(seen["norms"][0], torch.ones(8))
    C()(x, y)   # PML 2.x default: the embeddings as given
    assert torch.allclose(seen["norms"][0], x.norm(dim=1))


def test_triplet_stats_with_infinite_distances_match_pml():
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    x[0] = 0.0                                  # SNR of a zero row: inf / NaN
    y = torch.tensor([9, 0, 0, 1, 1, 2, 2, 0])  # row 0 is in no triplet
    ours = miners.TripletMarginMiner(collect_stats=True, distance=distances.SNRDistance())
    pml = pml_miners.TripletMarginMiner(collect_stats=True, distance=pml_distances.SNRDistance())
    ours(x, y)
    pml(x, y)
    for name in ("pos_pair_dist", "neg_pair_dist", "avg_triplet_margin"):
        assert np.isfinite(getattr(ours, name))
        assert getattr(ours, name) == pytest.approx(float(getattr(pml, name)), rel=1e-5), name


@pytest.mark.parametrize("ours, theirs", [
    (distances.CosineSimilarity(), pml_distances.CosineSimilarity()),
    (distances.LpDistance(), pml_distances.LpDistance())])
def test_smallest_and_largest_dist_take_torch_min_max_signatures(ours, theirs):
    a, b, m = torch.randn(5), torch.randn(5), torch.randn(3, 4)
    for call in (lambda d: d.smallest_dist(a, b), lambda d: d.largest_dist(a, b),
                 lambda d: d.largest_dist(m), lambda d: d.smallest_dist(m, dim=1)[0],
                 lambda d: d.largest_dist(m, 1)[1]):
        assert torch.equal(call(ours), call(theirs))
    torch.jit.script(miners.TripletMarginMiner(distance=ours))   # still scriptable


def test_load_torchscript_argument_errors_are_value_errors(tmp_path):
    exportminers.export_torchscript(miners.TripletMarginMiner(), tmp_path / "t.pt")
    w = exportminers.load_torchscript(tmp_path / "t.pt")
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    with pytest.raises(ValueError, match="embeddings must be a torch.Tensor, got ndarray"):
        w(x.numpy(), y)
    with pytest.raises(ValueError, match="labels must be a torch.Tensor, got list"):
        w(x, y.tolist())
    with pytest.raises(ValueError, match="ref_emb must be a torch.Tensor"):
        w(x, y, ref_emb=x.numpy(), ref_labels=y)
    exportminers.export_torchscript(miners.HDCMiner(), tmp_path / "h.pt")
    h = exportminers.load_torchscript(tmp_path / "h.pt")
    with pytest.raises(ValueError):
        h.set_idx_externally([y.float(), y, y], y)
    h.set_idx_externally([torch.arange(3), torch.arange(3) + 1, torch.arange(3) + 2], y)
    h.reset_idx()


def test_load_torchscript_bad_paths_are_value_errors_naming_path(tmp_path):
    import io
    (tmp_path / "junk.pt").write_bytes(b"not a zip archive")
    exportminers.export_onnx(miners.BatchHardMiner(), tmp_path / "g.onnx")
    torch.save(miners.BatchHardMiner().state_dict(), tmp_path / "state.pt")
    np.savez(tmp_path / "arr.npz", x=np.zeros(3))
    good = tmp_path / "ok.pt"
    exportminers.export_torchscript(miners.BatchHardMiner(), good)
    raw = bytearray(open(good, "rb").read())
    raw[len(raw) // 3: len(raw) // 3 + 64] = b"\0" * 64      # damaged inside the archive
    (tmp_path / "damaged.pt").write_bytes(bytes(raw))
    (tmp_path / "half.pt").write_bytes(bytes(raw[: len(raw) // 2]))
    for bad, why in ((tmp_path / "junk.pt", "not a TorchScript archive"),
                     (tmp_path / "g.onnx", "ONNX file"),
                     (tmp_path / "state.pt", "torch.save checkpoint"),
                     (tmp_path / "arr.npz", "not a TorchScript archive"),
                     (tmp_path / "damaged.pt", "damaged"),
                     (tmp_path / "half.pt", "damaged"),
                     (tmp_path / "missing.pt", "does not exist"),
                     (tmp_path, "is a folder")):
        with pytest.raises(ValueError, match=f"path .*{why}"):
            exportminers.load_torchscript(bad)
    with pytest.raises(ValueError, match="path must be a file path"):
        exportminers.load_torchscript(3)
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))       # a file object loads as is
    with open(good, "rb") as f:
        from_file = exportminers.load_torchscript(io.BytesIO(f.read()))
    assert [t.tolist() for t in from_file(x, y)] == \
        [t.tolist() for t in miners.BatchHardMiner()(x, y)]


def test_verify_accepts_mirrored_ties_only():
    eager = [np.array([2, 5]), np.array([8, 6]), np.array([1]), np.array([3])]
    graph = [np.array([8, 5]), np.array([2, 6]), np.array([1]), np.array([3])]
    assert not compare(graph, eager, "pairs")[0]
    ok, info = compare(graph, eager, "pairs", mirrored_ties=True)
    assert ok and info["borderline"] == 2
    other = [np.array([8, 5]), np.array([3, 6]), np.array([1]), np.array([3])]   # not (8, 2)
    assert not compare(other, eager, "pairs", mirrored_ties=True)[0]


def test_hdc_graph_at_width_16_verifies(tmp_path):
    from exportminers.verify import verify_graph
    m = miners.HDCMiner()
    path = exportminers.export_onnx(m, tmp_path / "hdc.onnx", embedding_dim=16)
    report = verify_graph(m, str(path))
    assert report["ok"], report["runs"]


def test_custom_distance_overriding_normalize_still_works(tmp_path):
    from torch import Tensor

    class MyDist(distances.LpDistance):
        def normalize(self, embeddings: Tensor, dim: int = 1) -> Tensor:
            return embeddings / torch.linalg.vector_norm(
                embeddings, 2.0, dim=dim, keepdim=True).clamp_min(1e-6)

    class MyMaybe(distances.LpDistance):
        def maybe_normalize(self, embeddings: Tensor, dim: int = 1) -> Tensor:
            return embeddings * 2.0

    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    for dist in (MyDist(), MyMaybe()):
        want = miners.TripletMarginMiner(distance=dist)(x, y)
        got = torch.jit.script(miners.TripletMarginMiner(distance=dist))(x, y)
        assert all(torch.equal(u, v) for u, v in zip(got, want))
        path = exportminers.export_onnx(miners.TripletMarginMiner(distance=dist),
                                        tmp_path / "tm16.onnx", dtype=torch.float16)
        out = exportminers.OnnxMiner(path)(x.half().numpy(), y.numpy())
        assert len(out) == 3


def test_older_api_mine_refuses_a_reference_set():
    class Old(miners.BaseMiner):
        def mine(self, embeddings, labels):
            return lmu.get_all_triplets_indices(labels)

    x, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"Old.mine\(embeddings, labels\) takes no reference"):
        Old()(x, y, torch.randn(3, 4), torch.tensor([0, 1, 2]))
    assert len(Old()(x, y, x, y)[0]) == len(Old()(x, y)[0])   # the batch itself: self-mining


def test_mine_arity_is_answered_per_function():
    """The two- or four-argument form of a custom ``mine`` is looked up once per function
    (a subclass overriding it gets its own answer); a ``mine`` set on the instance is
    inspected each call."""
    from exportminers.miners import base_miner

    class Four(miners.BaseMiner):
        def mine(self, embeddings, labels, ref_emb, ref_labels):
            return lmu.get_all_triplets_indices(labels, ref_labels)

    class Two(Four):
        def mine(self, embeddings, labels):
            return lmu.get_all_triplets_indices(labels)

    x, y = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    r, ry = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    for _ in range(2):
        assert len(Four()(x, y, r, ry)[0]) == len(lmu.get_all_triplets_indices(y, ry)[0])
        with pytest.raises(ValueError, match="takes no reference set"):
            Two()(x, y, r, ry)
    assert base_miner._TAKES_TWO[Four.mine] is False and base_miner._TAKES_TWO[Two.mine] is True
    import gc
    import weakref
    fn = weakref.ref(Two.mine)
    del Two
    gc.collect()
    assert fn() is None    # the cache does not keep a class made on the fly alive

    class Slotted:         # a method whose function cannot be weakly referenced
        __slots__ = ()

        def __call__(self, owner, embeddings, labels):
            return None

    import types
    assert base_miner._takes_two(types.MethodType(Slotted(), object())) is True
    m = Four()
    m.mine = lambda embeddings, labels: lmu.get_all_triplets_indices(labels)
    with pytest.raises(ValueError, match="takes no reference set"):
        m(x, y, r, ry)
    m.mine = lambda e, la, re, rl: lmu.get_all_triplets_indices(la, rl)
    assert len(m(x, y, r, ry)[0]) == len(lmu.get_all_triplets_indices(y, ry)[0])


def test_verify_mirrored_ties_only_for_symmetric_pair_miners(tmp_path):
    from exportminers import verify
    assert set(verify.SYMMETRIC_PAIR_MINERS) == {"PairMarginMiner", "HDCMiner"}
    m = miners.BatchEasyHardMiner()
    b = verify.random_batch(12, 8, seed=0)
    want = verify.eager_tuples(m, b)
    transposed = [want[1], want[0], want[3], want[2]]
    path = exportminers.export_onnx(m, tmp_path / "beh.onnx", embedding_dim=8)
    om = exportminers.OnnxMiner(path)
    assert om.miner_name not in verify.SYMMETRIC_PAIR_MINERS
    assert not verify.compare(transposed, want, "pairs")[0]
