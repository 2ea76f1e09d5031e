"""Benchmarks of exportminers against pytorch-metric-learning 2.9.0.

* ``python -m benchmarks.run``: time and peak memory of every built-in miner, per
  implementation (PML eager, exportminers eager, TorchScript, ONNX Runtime CPU / CUDA),
  each configuration in its own worker process with a time cap and a memory limit;
  writes JSON, a markdown table and PNG plots.
* ``python -m benchmarks.report``: re-render the table and plots from result JSON files.
* ``python -m benchmarks.profile_ort``: where the time goes (ONNX Runtime per-operator
  profile next to a torch.profiler profile of PML eager) for one miner and batch size.
* ``benchmarks/bench_pipeline.py`` (the pipeline engineer's): the mining pipeline;
  ``python -m benchmarks.run --pipeline`` invokes it.

Results of the latest run on the development machine: ``benchmarks/RESULTS.md``.
"""
