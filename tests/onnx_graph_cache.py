"""One export per graph per test session, shared by the ONNX test modules.

Exporting is the slow part of the ONNX tests (about a second per graph), so
test_export_onnx.py and test_runtime.py ask this cache instead of exporting themselves.
A failed export is cached too and re-raised on every request.
"""
import atexit
import os
import shutil
import tempfile
from typing import Any, Dict, Optional, Tuple

import torch

from exportminers import export, registry

D = 8
_ROOT: Optional[str] = None
_CACHE: Dict[Tuple[Any, ...], Tuple[Any, Optional[str], Optional[BaseException]]] = {}


def _source_digest() -> str:
    """sha256 of the exportminers package's Python sources (what the graphs come from)."""
    import hashlib

    pkg = os.path.dirname(os.path.abspath(export.__file__))
    h = hashlib.sha256()
    for dirpath, dirnames, files in sorted(os.walk(pkg)):
        dirnames.sort()
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                h.update(os.path.relpath(path, pkg).encode())
                with open(path, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


def _root() -> str:
    """A temporary folder removed at exit, or ``$EXPORTMINERS_TEST_GRAPHS`` when set: a
    folder kept between runs whose graphs are used as they are (exported ahead on another
    machine by ``python tests/onnx_graph_cache.py FOLDER``, e.g. for the GPU machine, where
    device time is scarce). Only for graphs exported from the same source tree."""
    global _ROOT
    if _ROOT is None:
        keep = os.environ.get("EXPORTMINERS_TEST_GRAPHS")
        if keep:
            os.makedirs(keep, exist_ok=True)
            _ROOT = os.path.abspath(keep)
            # graphs of another source tree are stale: drop them (the tag file says whose)
            tag, stamp = os.path.join(_ROOT, "SOURCE"), _source_digest()
            old = None
            if os.path.isfile(tag):
                with open(tag) as fh:
                    old = fh.read()
            if old != stamp:
                for f in os.listdir(_ROOT):
                    if f.endswith(".onnx"):
                        os.remove(os.path.join(_ROOT, f))
                with open(tag, "w") as f:
                    f.write(stamp)
        else:
            _ROOT = tempfile.mkdtemp(prefix="exportminers-graphs-")
            atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def graph(name: str, cfg: int = 0, with_ref: bool = False, dtype: torch.dtype = torch.float32,
          embedding_dim: Optional[int] = D, compact: bool = False, anchor_blocks: bool = False,
          gather_positives: bool = False):
    """(miner, path) of registry miner ``name`` with its ``cfg``-th registry config."""
    cfg = cfg % len(registry.MINERS[name].configs)
    key = (name, cfg, with_ref, dtype, embedding_dim, compact) + ((True,) if anchor_blocks else ()) \
        + (("gather",) if gather_positives else ())
    if key not in _CACHE:
        miner = export.build_miner(name, registry.MINERS[name].configs[cfg])
        path = (f"{_root()}/{name}_{cfg}_{int(with_ref)}_{str(dtype)[6:]}_{embedding_dim}"
                f"_{int(compact)}{'_anchors' if anchor_blocks else ''}"
                f"{'_gather' if gather_positives else ''}.onnx")
        # a kernel that fixes the batch axis fails every variant: don't export again
        fixed_n = [v[2] for k, v in _CACHE.items() if k[0] == name and v[2] is not None
                   and "embeddings.shape[0]" in str(v[2])]
        if fixed_n:
            _CACHE[key] = (miner, None, fixed_n[0])
        else:
            try:
                if os.path.isfile(path) and os.environ.get("EXPORTMINERS_TEST_GRAPHS"):
                    _CACHE[key] = (miner, path, None)   # exported ahead (see _root)
                    return miner, path
                tmp = f"{path}.{os.getpid()}.tmp"   # written whole, then moved in place
                export.export_onnx(miner, tmp, embedding_dim=embedding_dim, with_ref=with_ref,
                                   dtype=dtype, compact=compact, anchor_blocks=anchor_blocks,
                                   gather_positives=gather_positives)
                os.replace(tmp, path)
                _CACHE[key] = (miner, path, None)
            except Exception as e:
                _CACHE[key] = (miner, None, e)
    miner, path, err = _CACHE[key]
    if err is not None:
        raise err
    return miner, path


def ref_graph(name: str):
    """The with_ref graph of ``name``'s first config with a dynamic embedding width."""
    return graph(name, 0, with_ref=True, embedding_dim=None)


if __name__ == "__main__":   # export test_cuda.py's graphs ahead into a kept folder
    import sys

    os.environ["EXPORTMINERS_TEST_GRAPHS"] = sys.argv[1]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_cuda

    failed = 0
    for case in test_cuda._cases():
        try:
            test_cuda._graph(*case.values)
        except Exception as e:   # the test reports it; keep going
            failed += 1
            print("export failed:", case.id, type(e).__name__, str(e)[:200])
    graph("TripletMarginMiner", anchor_blocks=True)
    print(f"{len(os.listdir(sys.argv[1]))} graphs in {sys.argv[1]}, {failed} failed")
