"""Row sources: embeddings + labels (+ ids) read a block of rows at a time.

- numpy arrays (in memory or ``np.load(..., mmap_mode="r")``): ``ArraySource``
- ``.npy`` files: memory-mapped, never loaded whole
- Parquet: one file, a list of files or a folder of ``*.parquet`` shards, with an
  embedding column of (fixed-size) lists of floats, an integer label column and an
  optional integer id column; read a row group at a time
- a folder holding ``embeddings.npy`` + ``labels.npy`` (+ ``ids.npy``)

``read(start, stop)`` returns ``RowBlock`` with float32 embeddings, int64 labels, a
``label_ok`` mask (False = missing label) and int64 ids (row numbers when the source
has none).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

SENTINEL = np.iinfo(np.int64).min  # reserved: padding / excluded rows


@dataclass
class RowBlock:
    emb: np.ndarray  # float32 [n, d]
    labels: np.ndarray  # int64 [n]
    label_ok: np.ndarray  # bool [n]
    ids: np.ndarray  # int64 [n]


class Source:
    n: int
    dim: int
    has_ids: bool
    name: str

    def read(self, start: int, stop: int) -> RowBlock:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "rows": self.n, "dim": self.dim, "ids": self.has_ids}


def _int_labels(labels: np.ndarray, name: str):
    """int64 labels + ok mask; float labels may use NaN for 'missing'."""
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu":
        return labels.astype(np.int64, copy=False), np.ones(len(labels), dtype=bool)
    if labels.dtype.kind == "f":
        ok = np.isfinite(labels)
        if np.any(labels[ok] != np.round(labels[ok])):
            raise ValueError(f"{name} must hold integers (NaN marks a missing label), "
                             f"got non-integer floats")
        out = np.zeros(len(labels), dtype=np.int64)
        out[ok] = labels[ok].astype(np.int64)
        return out, ok
    raise ValueError(f"{name} must be an integer array, got dtype {labels.dtype}")


def _column(values, what: str, rows: int, kinds: str) -> np.ndarray:
    """A 1-D per-row array (labels or ids) of ``rows`` entries and a dtype kind in ``kinds``."""
    values = values if isinstance(values, np.ndarray) else np.asarray(values)
    if values.ndim != 1 or len(values) != rows:
        raise ValueError(f"{what} must be 1-D with {rows} entries, got shape {values.shape}")
    if values.dtype.kind not in kinds:
        raise ValueError(f"{what} must be integers, got dtype {values.dtype}")
    return values


class ArraySource(Source):
    """Embeddings / labels / ids as numpy arrays (memory-mapped ones stay on disk)."""

    def __init__(self, emb, labels, ids=None, name: str = "embeddings"):
        if isinstance(emb, (str, os.PathLike)):
            emb = np.load(emb, mmap_mode="r")
        if isinstance(labels, (str, os.PathLike)):
            labels = np.load(labels, mmap_mode="r")
        if isinstance(ids, (str, os.PathLike)):
            ids = np.load(ids, mmap_mode="r")
        if not isinstance(emb, np.ndarray):
            emb = np.asarray(emb)
        if emb.ndim != 2:
            raise ValueError(f"{name} must be 2-D (rows, dim), got shape {emb.shape}")
        if emb.dtype.kind != "f":
            raise ValueError(f"{name} must be floating point, got dtype {emb.dtype}")
        # labels may be float (integer-valued, NaN for missing: checked per block)
        labels = _column(labels, f"labels for {name}", len(emb), "iuf")
        ids = None if ids is None else _column(ids, f"ids for {name}", len(emb), "iu")
        self.emb, self.labels, self.ids = emb, labels, ids
        self.n, self.dim = int(emb.shape[0]), int(emb.shape[1])
        self.has_ids = ids is not None
        self.name = name

    def read(self, start, stop):
        emb = np.asarray(self.emb[start:stop], dtype=np.float32)
        labels, ok = _int_labels(self.labels[start:stop], f"labels for {self.name}")
        if self.ids is not None:
            ids = np.asarray(self.ids[start:stop], dtype=np.int64)
        else:
            ids = np.arange(start, stop, dtype=np.int64)
        return RowBlock(emb, labels, ok, ids)


class ParquetSource(Source):
    """Rows of one or more Parquet files, read a row group at a time."""

    def __init__(self, files: Sequence[Union[str, Path]], embedding_column="embedding",
                 label_column="label", id_column: Optional[str] = "id", name=None):
        import pyarrow.parquet as pq

        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError(f"no Parquet files given for {name or 'input'}")
        self.name = name or str(self.files[0] if len(self.files) == 1 else self.files[0].parent)
        self.ecol, self.lcol = embedding_column, label_column
        self._pf = []
        self._groups = []  # (file index, row group, first row, rows)
        start = 0
        has_ids = None
        for fi, f in enumerate(self.files):
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            for col in (embedding_column, label_column):
                if col not in names:
                    raise ValueError(f"{f}: no column {col!r} (columns: {names})")
            this_has = id_column is not None and id_column in names
            if has_ids is None:
                has_ids = this_has
            elif has_ids != this_has:
                raise ValueError(f"{f}: id column {id_column!r} present in some shards only")
            self._pf.append(pf)
            md = pf.metadata
            for g in range(md.num_row_groups):
                rows = md.row_group(g).num_rows
                if rows:
                    self._groups.append((fi, g, start, rows))
                    start += rows
        self.n = start
        self.has_ids = bool(has_ids)
        self.icol = id_column if self.has_ids else None
        self._starts = np.array([g[2] for g in self._groups] + [self.n], dtype=np.int64)
        self._cache = (None, None)
        self.dim = self._probe_dim()

    def _probe_dim(self) -> int:
        import pyarrow as pa

        t = self._pf[0].schema_arrow.field(self.ecol).type
        if pa.types.is_fixed_size_list(t):
            return int(t.list_size)
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
            raise ValueError(f"{self.name}: column {self.ecol!r} must be a list of floats, got {t}")
        if self.n == 0:
            return 0
        blk = self._group(0)
        return blk.emb.shape[1]

    def _group(self, gi: int) -> RowBlock:
        if self._cache[0] == gi:
            return self._cache[1]
        import pyarrow as pa

        fi, g, first, rows = self._groups[gi]
        cols = [self.ecol, self.lcol] + ([self.icol] if self.icol else [])
        t = self._pf[fi].read_row_group(g, columns=cols)
        e = t.column(self.ecol).combine_chunks()
        if isinstance(e, pa.ChunkedArray):
            e = e.chunk(0) if e.num_chunks else pa.array([], type=e.type)
        valid = ~np.asarray(e.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        if pa.types.is_fixed_size_list(e.type):
            width = e.type.list_size
        else:
            lens = np.asarray(e.value_lengths().fill_null(0).to_numpy(zero_copy_only=False))
            width = int(lens[valid][0]) if valid.any() else getattr(self, "dim", 0)
            if np.any(lens[valid] != width):
                bad = int(first + np.flatnonzero(valid & (lens != width))[0])
                raise ValueError(f"{self.name}: embedding lists have different lengths "
                                 f"(row {bad} has {int(lens[bad - first])}, expected {width})")
        emb = np.full((rows, width), np.nan, dtype=np.float32)
        if valid.any():
            flat = e.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
            emb[valid] = np.asarray(flat, dtype=np.float32).reshape(-1, width)
        lab = t.column(self.lcol)
        if not (pa.types.is_integer(lab.type) or pa.types.is_floating(lab.type)):
            raise ValueError(f"{self.name}: label column {self.lcol!r} must be integers, got {lab.type}")
        lab_np = lab.to_numpy().astype(np.float64) if lab.null_count else lab.to_numpy()
        labels, ok = _int_labels(lab_np, f"{self.name}: label column {self.lcol!r}")
        if self.icol:
            idc = t.column(self.icol)
            if not pa.types.is_integer(idc.type) or idc.null_count:
                raise ValueError(f"{self.name}: id column {self.icol!r} must be non-null "
                                 f"integers, got {idc.type} with {idc.null_count} nulls")
            ids = idc.to_numpy().astype(np.int64)
        else:
            ids = np.arange(first, first + rows, dtype=np.int64)
        blk = RowBlock(emb, labels, ok, ids)
        self._cache = (gi, blk)
        return blk

    def read(self, start, stop):
        if stop <= start:
            return RowBlock(np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64),
                            np.zeros(0, bool), np.zeros(0, np.int64))
        g0 = int(np.searchsorted(self._starts, start, side="right") - 1)
        parts = []
        gi = g0
        while gi < len(self._groups) and self._starts[gi] < stop:
            blk = self._group(gi)
            a = max(start - self._starts[gi], 0)
            b = min(stop, self._starts[gi + 1]) - self._starts[gi]
            parts.append(RowBlock(blk.emb[a:b], blk.labels[a:b], blk.label_ok[a:b], blk.ids[a:b]))
            gi += 1
        if len(parts) == 1:
            return parts[0]
        for p in parts:
            if p.emb.shape[1] != self.dim:
                raise ValueError(f"{self.name}: embedding width {p.emb.shape[1]} differs from "
                                 f"{self.dim} in another shard")
        return RowBlock(*(np.concatenate([getattr(p, f) for p in parts])
                          for f in ("emb", "labels", "label_ok", "ids")))


def open_source(data, labels=None, ids=None, *, embedding_column="embedding",
                label_column="label", id_column="id", name="queries") -> Source:
    """Build a :class:`Source` from arrays, a ``.npy`` path, a Parquet path/folder, or a
    folder holding ``embeddings.npy`` + ``labels.npy`` (+ ``ids.npy``)."""
    if isinstance(data, Source):
        return data
    if isinstance(data, np.ndarray):
        if labels is None:
            raise ValueError(f"{name}: labels are required with an embedding array")
        return ArraySource(data, labels, ids, name=name)
    if isinstance(data, (list, tuple)) and data and all(
            isinstance(p, (str, os.PathLike)) and str(p).endswith(".parquet") for p in data):
        return ParquetSource(data, embedding_column, label_column, id_column, name=name)
    if not isinstance(data, (str, os.PathLike)):
        raise ValueError(f"{name}: expected an array or a path, got {type(data).__name__}")
    p = Path(data)
    if not p.exists():
        raise ValueError(f"{name}: {p} does not exist")
    if p.is_dir():
        shards = sorted(p.glob("*.parquet"))
        if shards:
            return ParquetSource(shards, embedding_column, label_column, id_column, name=str(p))
        if (p / "embeddings.npy").is_file():
            lab = labels if labels is not None else p / "labels.npy"
            if not Path(lab).is_file():
                raise ValueError(f"{name}: {p} has embeddings.npy but no labels.npy")
            idp = ids if ids is not None else (p / "ids.npy" if (p / "ids.npy").is_file() else None)
            return ArraySource(p / "embeddings.npy", lab, idp, name=str(p))
        raise ValueError(f"{name}: folder {p} holds no *.parquet shards and no embeddings.npy")
    if p.suffix == ".npy":
        if labels is None:
            raise ValueError(f"{name}: a .npy embedding file needs a labels .npy (--labels)")
        return ArraySource(p, labels, ids, name=str(p))
    if p.suffix in (".parquet", ".pq"):
        return ParquetSource([p], embedding_column, label_column, id_column, name=str(p))
    raise ValueError(f"{name}: unsupported input {p} (expected .npy, .parquet or a folder)")
