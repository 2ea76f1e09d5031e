"""Ray engine: GPU actors are accepted by Ray Data, and a run that could never start
(more resources than the local instance it starts) fails fast. No GPU needed: the GPU
is a resource Ray is told about."""
import logging

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from exportminers.pipeline import mine  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
KW = dict(progress=False, plot=False, block_size=(7, 11), max_retries=0)


def _data(n=30):
    rng = np.random.default_rng()
    return rng.standard_normal((n, 4)).astype(np.float32), rng.integers(0, 3, n)


def test_self_started_local_instance_too_small_for_the_actors_fails_fast(tmp_path, monkeypatch):
    assert not ray.is_initialized()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    x, y = _data()
    with pytest.raises(ValueError, match=r"num_cpus_per_actor \(--num-cpus-per-actor\).*could never start"):
        mine(x, y, out_dir=tmp_path / "o", engine="ray", num_cpus_per_actor=10 ** 5, **KW)
    assert not ray.is_initialized()  # the instance it started is shut down again


def test_gpu_actors_are_accepted_by_ray_data(tmp_path, monkeypatch):
    """With a (declared) GPU, the pipeline with num_gpus_per_actor=1 is built and its
    actors are scheduled on the GPU: here they stop at ONNX Runtime's missing CUDA EP
    (this machine has none), not at Ray Data's checks of the map_batches arguments."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a CUDA EP is present: the real GPU path is tested elsewhere")
    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False,
             object_store_memory=100 * 1024 ** 2, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        calls = []
        import exportminers.pipeline.ray_engine as re_mod

        real = re_mod._map_batches

        def spy(ds, fn, remote_args, **kw):
            calls.append((getattr(fn, "__name__", ""), kw))
            return real(ds, fn, remote_args, **kw)

        monkeypatch.setattr(re_mod, "_map_batches", spy)
        x, y = _data()
        with pytest.raises(Exception) as ei:
            mine(x, y, out_dir=tmp_path / "o", engine="ray", num_gpus_per_actor=1, **KW)
        msg = str(ei.value)
        assert "batch_size" not in msg
        assert "CUDAExecutionProvider" in msg
        gpu = [kw for name, kw in calls if name == "_ShardWorker"]
        assert gpu and all(kw["num_gpus"] == 1 and kw["batch_size"] >= 1 for kw in gpu)
    finally:
        ray.shutdown()
