"""Row sources: embeddings + labels (+ ids) read a block of rows at a time.

- numpy arrays (in memory or ``np.load(..., mmap_mode="r")``): ``ArraySource``
- ``.npy`` files: memory-mapped, never loaded whole
- Parquet: one file, a list of files or a folder of ``*.parquet`` / ``*.pq`` shards
  (subfolders included, linked ones too, in sorted path order; names starting with ``.``
  or ``_`` are skipped, as pyarrow does), with an embedding column of (fixed-size) lists of floats,
  an integer label column and an optional integer id column; read a row group at a time
- a folder holding ``embeddings.npy`` + ``labels.npy`` (+ ``ids.npy``)

A folder mixing Parquet and ``.npy`` data, or holding ``.npy`` files beyond those three,
is refused; other files in it are reported with a warning.

``read(start, stop)`` returns ``RowBlock`` with float32 embeddings, int64 labels, a
``label_ok`` mask (False = missing label) and int64 ids (row numbers when the source
has none).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

SENTINEL = np.iinfo(np.int64).min  # reserved: padding / excluded rows
I64_MAX = np.iinfo(np.int64).max
PARQUET_SUFFIXES = (".parquet", ".pq")
DEFAULT_ID_COLUMN = "id"  # read when present, unless another id column is named
NPY_NAMES = ("embeddings.npy", "labels.npy", "ids.npy")

# how the error messages name each argument: (Python argument, command-line option)
ARG_NAMES = {
    "queries": {"data": "queries (input)", "labels": "labels (--labels)", "ids": "ids (--ids)"},
    "bank": {"data": "bank (--bank)", "labels": "bank_labels (--bank-labels)",
             "ids": "bank_ids (--bank-ids)"},
}


def arg_name(side: str, what: str) -> str:
    return ARG_NAMES.get(side, {}).get(what, f"{side} {what}")


def _load_npy(path, what: str) -> np.ndarray:
    """``np.load(path, mmap_mode="r")`` with errors that name the file and the argument."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what}: {p} does not exist")
    if p.is_dir():
        raise ValueError(f"{what}: {p} is a folder, not a .npy file")
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{what}: cannot read {p} as a .npy array ({e}); object / pickled "
                         "arrays are not supported, save a numeric array") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise ValueError(f"{what}: {p} is not a single .npy array")
    return arr


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
    paths: Sequence[Path] = ()  # the files it reads
    root: Optional[Path] = None  # the folder it was found in (folder inputs)
    folders: frozenset = frozenset()  # real paths of the folders the scan walked

    def read(self, start: int, stop: int) -> RowBlock:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "rows": self.n, "dim": self.dim, "ids": self.has_ids}


def _int_labels(labels: np.ndarray, name: str):
    """int64 labels + ok mask; float labels may use NaN for 'missing'."""
    labels = np.asarray(labels)
    if labels.dtype.kind == "u":
        if len(labels) and labels.max() > I64_MAX:
            raise ValueError(f"{name}: label {int(labels.max())} does not fit int64 (labels must "
                             f"be below 2**63)")
        return labels.astype(np.int64), np.ones(len(labels), dtype=bool)
    if labels.dtype.kind == "i":
        return labels.astype(np.int64, copy=False), np.ones(len(labels), dtype=bool)
    if labels.dtype.kind == "f":
        ok = np.isfinite(labels)
        if np.any(labels[ok] != np.round(labels[ok])):
            raise ValueError(f"{name} must hold integers (NaN marks a missing label), "
                             f"got non-integer floats")
        big = ok & (np.abs(labels.astype(np.float64)) >= 2.0 ** 53)
        if big.any():
            raise ValueError(f"{name}: float label {float(labels[big][0]):g} is too large to be an "
                             "exact integer (float labels must be below 2**53 in magnitude; "
                             "store labels as int64)")
        out = np.zeros(len(labels), dtype=np.int64)
        out[ok] = labels[ok].astype(np.int64)
        return out, ok
    raise ValueError(f"{name} must be an integer array, got dtype {labels.dtype}")


def _int_ids(ids: np.ndarray, name: str) -> np.ndarray:
    """int64 ids; uint64 ids at or above 2**63 are refused (they would wrap)."""
    ids = np.asarray(ids)
    if ids.dtype.kind == "u" and len(ids) and ids.max() > I64_MAX:
        raise ValueError(f"{name}: id {int(ids.max())} does not fit int64 (ids must be below "
                         "2**63; uint64 ids are not wrapped)")
    return ids.astype(np.int64, copy=False)


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

    def __init__(self, emb, labels, ids=None, name: str = "embeddings",
                 side: Optional[str] = None):
        side = side or name
        self.paths = [Path(v) for v in (emb, labels, ids) if isinstance(v, (str, os.PathLike))]
        if isinstance(emb, (str, os.PathLike)):
            emb = _load_npy(emb, arg_name(side, "data"))
        if isinstance(labels, (str, os.PathLike)):
            labels = _load_npy(labels, arg_name(side, "labels"))
        if isinstance(ids, (str, os.PathLike)):
            ids = _load_npy(ids, arg_name(side, "ids"))
        if not isinstance(emb, np.ndarray):
            emb = np.asarray(emb)
        if emb.ndim != 2:
            raise ValueError(f"{name} must be 2-D (rows, dim), got shape {emb.shape}")
        if emb.dtype.kind != "f":
            raise ValueError(f"{name} must be floating point, got dtype {emb.dtype}")
        # labels may be float (integer-valued, NaN for missing: checked per block)
        labels = _column(labels, arg_name(side, "labels"), len(emb), "iuf")
        ids = None if ids is None else _column(ids, arg_name(side, "ids"), len(emb), "iu")
        self.emb, self.labels, self.ids = emb, labels, ids
        self.n, self.dim = int(emb.shape[0]), int(emb.shape[1])
        self.has_ids = ids is not None
        self.name = name
        self.side = side

    def read(self, start, stop):
        with np.errstate(over="ignore"):  # beyond float32's range: inf, excluded like inf
            emb = np.asarray(self.emb[start:stop], dtype=np.float32)
        labels, ok = _int_labels(self.labels[start:stop], arg_name(self.side, "labels"))
        if self.ids is not None:
            ids = _int_ids(self.ids[start:stop], arg_name(self.side, "ids"))
        else:
            ids = np.arange(start, stop, dtype=np.int64)
        return RowBlock(emb, labels, ok, ids)


class ParquetSource(Source):
    """Rows of one or more Parquet files, read a row group at a time."""

    def __init__(self, files: Sequence[Union[str, Path]], embedding_column="embedding",
                 label_column="label", id_column: Optional[str] = None, name=None,
                 side: str = "queries"):
        """``id_column=None`` reads the column ``id`` where the files have it (else the
        ids are row numbers; in some files only: an error); a column named explicitly
        must be in every file; ``""`` ignores any id column (row numbers)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.side = side
        id_required = bool(id_column)
        no_ids = id_column == ""
        id_column = DEFAULT_ID_COLUMN if id_column is None else id_column

        self.files = [Path(f) for f in files]
        self.paths = self.files
        if not self.files:
            raise ValueError(f"no Parquet files given for {name or 'input'}")
        self.name = name or str(self.files[0] if len(self.files) == 1 else self.files[0].parent)
        self.ecol, self.lcol = embedding_column, label_column
        self._pf = []
        self._groups = []  # (file index, row group, first row, rows)
        start = 0
        has_ids = None
        what = arg_name(side, "data")
        for fi, f in enumerate(self.files):
            try:
                pf = pq.ParquetFile(f)
            except (OSError, ValueError, pa.ArrowException) as e:
                raise ValueError(f"{what}: cannot read {f} as Parquet ({e})") from None
            names = pf.schema_arrow.names
            for col in (embedding_column, label_column):
                if col not in names:
                    opt = "--embedding-column" if col == embedding_column else "--label-column"
                    hive = any("=" in part for part in Path(f).parts)
                    raise ValueError(
                        f"{what}: {f} has no column {col!r} ({opt}; columns: {names})"
                        + ("; Hive-style partition folders (key=value) are not read as "
                           "columns" if hive else ""))
            self._check_embedding_type(f, pf.schema_arrow.field(embedding_column).type)
            this_has = not no_ids and id_column in names
            if id_required and not this_has:
                raise ValueError(f"{what}: {f} has no id column {id_column!r} (--id-column; "
                                 f"columns: {names})")
            if has_ids is None:
                has_ids = this_has
            elif has_ids != this_has:
                raise ValueError(f"{what}: {f}: id column {id_column!r} present in some shards "
                                 "only")
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

    def _check_embedding_type(self, f: Path, t) -> None:
        """The embedding column must be a (fixed-size / large) list of integers or floats."""
        import pyarrow as pa

        what = arg_name(self.side, "data")
        if not (pa.types.is_fixed_size_list(t) or pa.types.is_list(t)
                or pa.types.is_large_list(t)):
            raise ValueError(f"{what}: {f}: column {self.ecol!r} (--embedding-column) must be a "
                             f"list of floats, got {t}")
        vt = t.value_type
        if not (pa.types.is_floating(vt) or pa.types.is_integer(vt)):
            raise ValueError(f"{what}: {f}: column {self.ecol!r} (--embedding-column) must be "
                             f"a list of floats (or integers), got a list of {vt}")

    def _read_group(self, fi: int, g: int, cols):
        """Row group ``g`` of file ``fi``; a file that turns out damaged (truncated,
        corrupt pages) is a ValueError naming it, the row group and the rows."""
        import pyarrow as pa

        try:
            return self._pf[fi].read_row_group(g, columns=cols)
        except (OSError, ValueError, pa.ArrowException) as e:
            first = next(r[2] for r in self._groups if r[0] == fi and r[1] == g)
            raise ValueError(
                f"{arg_name(self.side, 'data')}: cannot read row group {g} of {self.files[fi]} "
                f"(rows {first}..) as Parquet: {str(e).strip()[:300]}") from None

    def _probe_dim(self) -> int:
        """Embedding width: the fixed list size, else the length of the first non-null
        list (row groups whose embeddings are all null are skipped)."""
        import pyarrow as pa

        t = self._pf[0].schema_arrow.field(self.ecol).type
        if pa.types.is_fixed_size_list(t):
            return int(t.list_size)
        for fi, g, _, _ in self._groups:
            e = self._read_group(fi, g, [self.ecol]).column(self.ecol)
            for chunk in e.chunks:
                lens = chunk.value_lengths().drop_null()
                if len(lens):
                    return int(lens[0].as_py())
        return 0

    def _group(self, gi: int) -> RowBlock:
        if self._cache[0] == gi:
            return self._cache[1]
        import pyarrow as pa

        fi, g, first, rows = self._groups[gi]
        fname = f"{arg_name(self.side, 'data')}: {self.files[fi]}"  # errors name the file
        cols = [self.ecol, self.lcol] + ([self.icol] if self.icol else [])
        t = self._read_group(fi, g, cols)
        e = t.column(self.ecol).combine_chunks()
        if isinstance(e, pa.ChunkedArray):
            e = e.chunk(0) if e.num_chunks else pa.array([], type=e.type)
        valid = ~np.asarray(e.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        if pa.types.is_fixed_size_list(e.type):
            width = e.type.list_size
        else:
            lens = np.asarray(e.value_lengths().fill_null(0).to_numpy(zero_copy_only=False))
            width = int(lens[valid][0]) if valid.any() else self.dim
            if np.any(lens[valid] != width):
                bad = int(first + np.flatnonzero(valid & (lens != width))[0])
                raise ValueError(f"{fname}: embedding lists have different lengths "
                                 f"(row {bad} has {int(lens[bad - first])}, expected {width})")
        if valid.any() and width != self.dim:
            raise ValueError(f"{fname}: embedding width {width} differs from {self.dim} (the "
                             f"width of {self.files[0]})")
        emb = np.full((rows, width), np.nan, dtype=np.float32)
        if valid.any():
            flat = e.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
            emb[valid] = np.asarray(flat, dtype=np.float32).reshape(-1, width)
        lab = t.column(self.lcol)
        if not (pa.types.is_integer(lab.type) or pa.types.is_floating(lab.type)):
            raise ValueError(f"{fname}: label column {self.lcol!r} (--label-column) must be "
                             f"integers, got {lab.type}")
        # nulls mark missing labels; the values keep their own type (int64 stays exact)
        lab_ok = ~np.asarray(lab.is_null().to_numpy(), dtype=bool)
        fill = 0.0 if pa.types.is_floating(lab.type) else 0
        lab_np = np.asarray(lab.fill_null(fill).to_numpy())
        labels, ok = _int_labels(lab_np, f"{fname}: label column {self.lcol!r}")
        ok &= lab_ok
        labels = np.where(ok, labels, 0)
        if self.icol:
            idc = t.column(self.icol)
            if not pa.types.is_integer(idc.type) or idc.null_count:
                raise ValueError(f"{fname}: id column {self.icol!r} must be non-null "
                                 f"integers, got {idc.type} with {idc.null_count} nulls")
            ids = _int_ids(idc.to_numpy(), f"{fname}: id column {self.icol!r}")
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


def _scan_folder(p: Path, what: str = "input"):
    """Files under a folder (recursive, sorted; names starting with ``.`` or ``_`` skipped,
    as pyarrow datasets do; linked folders followed): (parquet files, .npy files, other
    files, the real paths of the folders walked)."""
    parquet, npy, other = [], [], []
    seen = {os.path.realpath(p)}
    for root, dirs, files in os.walk(p, followlinks=True):  # linked folders are read too
        keep = []
        for d in sorted(dirs):
            if d.startswith((".", "_")):
                continue
            sub = os.path.join(root, d)
            real = os.path.realpath(sub)
            if real in seen:  # a link cycle, or two links to one folder
                raise ValueError(f"{what}: folder {p}: {sub} leads (through links) to {real}, which is "
                                 "read already: its files would be read twice (or forever)")
            seen.add(real)
            keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            if f.startswith((".", "_")):
                continue
            fp = Path(root) / f
            suffix = fp.suffix.lower()
            (parquet if suffix in PARQUET_SUFFIXES else npy if suffix == ".npy" else other).append(fp)
    return parquet, npy, other, frozenset(seen)


def _listing(paths, root: Path, most: int = 8) -> str:
    names = [str(q.relative_to(root)) for q in paths]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def open_source(data, labels=None, ids=None, *, embedding_column="embedding",
                label_column="label", id_column=None, name="queries") -> Source:
    """Build a :class:`Source` from arrays, a ``.npy`` path, a Parquet path/folder, or a
    folder holding ``embeddings.npy`` + ``labels.npy`` (+ ``ids.npy``).

    ``name`` is ``"queries"`` or ``"bank"``: errors name that side's arguments."""
    what = arg_name(name, "data")
    if isinstance(data, Source):
        return data
    if isinstance(data, np.ndarray):
        if labels is None:
            raise ValueError(f"{arg_name(name, 'labels')} is required with an embedding array")
        return ArraySource(data, labels, ids, name=name, side=name)

    def parquet(files, label):
        for arg, v in (("labels", labels), ("ids", ids)):
            if v is not None:
                raise ValueError(
                    f"{arg_name(name, arg)} applies to .npy input only; {what} is Parquet, "
                    f"whose {arg} come from its columns (--label-column / --id-column)")
        return ParquetSource(files, embedding_column, label_column, id_column, name=label,
                             side=name)

    if isinstance(data, (list, tuple)) and data and all(
            isinstance(p, (str, os.PathLike)) and Path(p).suffix.lower() in PARQUET_SUFFIXES
            for p in data):
        return parquet([Path(p) for p in data], None)
    if not isinstance(data, (str, os.PathLike)):
        raise ValueError(f"{what}: expected an array or a path, got {type(data).__name__}")
    p = Path(data)
    if not p.exists():
        raise ValueError(f"{what}: {p} does not exist")
    if p.is_dir():
        pq_files, npy_files, other, folders = _scan_folder(p, what)
        if pq_files and npy_files:
            raise ValueError(
                f"{what}: folder {p} mixes Parquet files ({_listing(pq_files, p)}) and .npy "
                f"files ({_listing(npy_files, p)}); give a folder holding one kind only")
        if other:
            warnings.warn(f"{what}: folder {p}: ignoring {len(other)} file(s) that are neither "
                          f"Parquet nor .npy: {_listing(other, p)}", RuntimeWarning, stacklevel=3)
        if pq_files:
            src = parquet(pq_files, str(p))
            src.root, src.folders = p, folders
            return src
        if npy_files:
            extra = [f for f in npy_files if f.parent != p or f.name not in NPY_NAMES]
            if extra:
                raise ValueError(
                    f"{what}: folder {p} holds .npy files other than {', '.join(NPY_NAMES)}: "
                    f"{_listing(extra, p)}; a .npy folder holds exactly those")
            if not (p / "embeddings.npy").is_file():
                raise ValueError(f"{what}: folder {p} has .npy files but no embeddings.npy")
            lab = labels if labels is not None else p / "labels.npy"
            if not Path(lab).is_file():
                raise ValueError(f"{what}: {p} has embeddings.npy but no labels.npy")
            idp = ids if ids is not None else (p / "ids.npy" if (p / "ids.npy").is_file() else None)
            src = ArraySource(p / "embeddings.npy", lab, idp, name=str(p), side=name)
            src.root, src.folders = p, folders
            return src
        raise ValueError(f"{what}: folder {p} holds no Parquet files (*.parquet, *.pq) and no "
                         "embeddings.npy")
    if p.suffix.lower() == ".npy":
        if labels is None:
            raise ValueError(f"{what}: a .npy embedding file needs a labels .npy "
                             f"({arg_name(name, 'labels')})")
        return ArraySource(p, labels, ids, name=str(p), side=name)
    if p.suffix.lower() in PARQUET_SUFFIXES:
        return parquet([p], str(p))
    raise ValueError(f"{what}: unsupported input {p} (expected .npy, .parquet / .pq or a folder)")
