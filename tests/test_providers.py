"""exact_providers: the CUDA EP is asked for exact float32 matmuls (no TF32) unless the
caller says otherwise; names, (name, options) pairs and provider_options combine."""
import pytest

from exportminers.runtime.providers import exact_providers

C, P = "CUDAExecutionProvider", "CPUExecutionProvider"


def test_cuda_gets_use_tf32_off_and_cpu_is_untouched():
    assert exact_providers([C, P]) == [(C, {"use_tf32": "0"}), (P, {})]
    assert exact_providers([P]) == [(P, {})]


def test_the_callers_choice_wins():
    assert exact_providers([(C, {"use_tf32": "1", "device_id": 1})]) == \
        [(C, {"use_tf32": "1", "device_id": 1})]
    assert exact_providers([C, P], [{"use_tf32": 1}, {}]) == [(C, {"use_tf32": 1}), (P, {})]
    assert exact_providers([C], allow_tf32=True) == [(C, {})]
    assert exact_providers([(C, {"device_id": 0})], [{"gpu_mem_limit": 5}]) == \
        [(C, {"device_id": 0, "gpu_mem_limit": 5, "use_tf32": "0"})]


@pytest.mark.parametrize("providers, options, message", [
    ([C, P], [{}], "provider_options: 1 entries for 2 providers"),
    ([("CUDAExecutionProvider",)], None, "providers[0]"),
    ([3], None, "providers[0] = 3"),
])
def test_bad_provider_lists_name_the_argument(providers, options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        exact_providers(providers, options)


def test_onnx_miner_sessions_take_the_pairs(tmp_path):
    # the CPU EP accepts the (name, options) pairs; OnnxMiner still reports plain names
    pytest.importorskip("onnxruntime")
    import onnx_graph_cache
    from exportminers.runtime import OnnxMiner

    _, path = onnx_graph_cache.graph("BatchHardMiner")
    om = OnnxMiner(path, providers=[P], provider_options=[{}])
    assert om.providers == [P]
    with pytest.raises(ValueError, match="provider_options"):
        OnnxMiner(path, providers=[P], provider_options=[{}, {}])
