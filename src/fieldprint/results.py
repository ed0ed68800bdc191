"""Results files: how an experiment's numbers are written, and how they are read back checked.

A results file is a tidy CSV ``<experiment>.csv`` (one row per measurement) with a JSON manifest
``<experiment>.manifest.json`` beside it: where, when, from which commit and with which resolved
config the rows were measured. Every experiment declares its columns once, in :data:`SCHEMAS`
(column name -> type, required or optional, the key columns that name a row, and the rows its
config determines). The experiments write through :func:`write_rows`; the report, the figures
and the claims read through :func:`load_results`, which refuses a file that does not match its
declaration with a :class:`ResultsError` naming the file, the line and the column:

* a missing, unknown or repeated column; a row with more or fewer fields than the header, or a
  last line without its newline (a truncated file);
* a cell that does not parse as its column's type, a NaN or infinity where a number is expected,
  an empty cell where the column is required (always, or in rows of one kind);
* two rows with the same key (a duplicate placed first would otherwise win);
* no rows at all, or a row the config in the manifest asks for that is not there;
* a CSV whose bytes differ from the SHA-256 its run recorded in the manifest (any later edit);
* a manifest field that is missing or of the wrong type.

Rows come back typed: ``int``, ``float``, ``bool`` or ``str`` per column, ``None`` for an empty
optional cell. Every write is atomic (a temporary file renamed over the target).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any


class ResultsError(ValueError):
    """A results file or manifest that does not match its declaration."""


# ---------------------------------------------------------------- atomic writes


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# ---------------------------------------------------------------- declarations


@dataclass(frozen=True)
class When:
    """A column required only in rows whose ``column`` text matches ``pattern`` (a full regex
    match), e.g. ``When("kind", "timing")``; ``When("skipped", "")``: rows not skipped."""

    column: str
    pattern: str

    def holds(self, cells: Mapping[str, str]) -> bool:
        return re.fullmatch(self.pattern, cells.get(self.column, "")) is not None

    def __str__(self) -> str:
        return f"where {self.column} matches {self.pattern!r}"


@dataclass(frozen=True)
class Column:
    """One declared column. ``type``: int, float, bool or str. ``required``: True (never
    empty), False (may be empty: read back as None) or a :class:`When` condition.
    ``absent_ok``: a column added after results were committed; files written before lack it
    (read back as None in every row)."""

    name: str
    type: type
    required: bool | When = True
    absent_ok: bool = False

    def required_in(self, cells: Mapping[str, str]) -> bool:
        return self.required.holds(cells) if isinstance(self.required, When) else self.required


Expected = Callable[[Mapping[str, Any]], list[dict[str, Any]]]


@dataclass(frozen=True)
class Schema:
    """The declared shape of one experiment's results file.

    ``key``: the columns that name a row (no two rows may share them). ``expected(manifest)``:
    partial rows ({column: value}) that the run's resolved config (``manifest["config"]``) and
    machine ask for; each must match at least one row. ``exact``: they determine every row, so
    the file has exactly ``len(expected(manifest))`` rows."""

    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    expected: Expected | None = None
    exact: bool = False

    def __post_init__(self) -> None:
        names = set(self.names)
        if len(names) != len(self.columns):
            raise ValueError(f"schema {self.name}: repeated column names")
        conditions = {c.required.column for c in self.columns if isinstance(c.required, When)}
        unknown = (set(self.key) | conditions) - names
        if unknown:
            raise ValueError(f"schema {self.name}: key or condition names undeclared columns {unknown}")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


# ---------------------------------------------------------------- cells

_INT = re.compile(r"[+-]?\d+")
_BOOL = {"true": True, "false": False}


def _parse(text: str, kind: type) -> Any:
    """The value of one non-empty cell; ValueError (with the reason) when it is not a ``kind``."""
    if kind is str:
        return text
    if kind is int:
        if not _INT.fullmatch(text):
            raise ValueError(f"{text!r} is not an integer")
        return int(text)
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{text!r} is not a finite number")
        return value
    if kind is bool:
        if text.lower() not in _BOOL:
            raise ValueError(f"{text!r} is not True or False")
        return _BOOL[text.lower()]
    raise TypeError(f"unsupported column type {kind!r}")


def _text(value: Any) -> str:
    """How a row value is written: text as given (an experiment may format its numbers),
    None as an empty cell, everything else as ``str`` (``repr`` digits for floats)."""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _check_cells(cells: dict[str, str], schema: Schema, where: Callable[[str], str]) -> dict[str, Any]:
    """Typed values of one row's cells (every declared column present in ``cells``)."""
    row: dict[str, Any] = {}
    for col in schema.columns:
        text = cells[col.name]
        if text == "":
            if col.required_in(cells):
                cond = f" {col.required}" if isinstance(col.required, When) else ""
                raise ResultsError(f"{where(col.name)}: empty, but the column is required{cond}")
            row[col.name] = None
            continue
        try:
            row[col.name] = _parse(text, col.type)
        except ValueError as err:
            raise ResultsError(f"{where(col.name)}: {err} (declared {col.type.__name__})") from None
    return row


def _check_keys(rows: Sequence[dict[str, Any]], lines: Iterable[int], schema: Schema, path: Path) -> None:
    seen: dict[tuple, int] = {}
    for row, line in zip(rows, lines, strict=True):
        key = tuple(row[k] for k in schema.key)
        if key in seen:
            named = ", ".join(f"{k}={v!r}" for k, v in zip(schema.key, key, strict=True) if v is not None)
            raise ResultsError(f"{path}, line {line}: duplicate row: line {seen[key]} has the same "
                               f"key ({named})")
        seen[key] = line


# ---------------------------------------------------------------- CSV


def write_rows(path: str | Path, rows: Sequence[Mapping[str, Any]], schema: Schema) -> str:
    """Write ``rows`` (dicts of declared columns; a missing optional column is left empty) as a
    CSV with the schema's columns in their declared order; returns the SHA-256 of the bytes
    written (for the manifest). A row that its schema would reject when read is an error here,
    before anything is written."""
    path = Path(path)
    if not rows:
        raise ResultsError(f"{path}: no rows to write")
    names = schema.names
    body, typed = [], []
    for i, row in enumerate(rows):
        where = f"{path}: row {i} (line {i + 2})"
        unknown = [k for k in row if k not in names]
        if unknown:
            raise ResultsError(f"{where} has columns {unknown} that the {schema.name} schema "
                               f"(fieldprint.results.SCHEMAS) does not declare")
        cells = {name: _text(row.get(name)) for name in names}
        typed.append(_check_cells(cells, schema, lambda col, where=where: f"{where}, column {col!r}"))
        body.append(cells)
    _check_keys(typed, range(2, len(typed) + 2), schema, path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(body)
    data = buf.getvalue().encode()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def read_rows(path: str | Path, schema: Schema) -> list[dict[str, Any]]:
    """The typed rows of a results CSV, checked against ``schema`` (see the module docstring);
    :class:`ResultsError` naming the file, line and column otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ResultsError(f"{path}: cannot read the results file: {err}") from None
    if not text.strip():
        raise ResultsError(f"{path}: the results file is empty")
    if not text.endswith("\n"):
        raise ResultsError(f"{path}, line {text.count(chr(10)) + 1}: the last line has no newline: "
                           "the file is truncated")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    repeated = sorted({h for h in header if header.count(h) > 1})
    missing = [c.name for c in schema.columns if c.name not in header and not c.absent_ok]
    unknown = [h for h in header if h not in schema.names]
    for problem, names in (("repeated", repeated), ("missing", missing), ("undeclared", unknown)):
        if names:
            raise ResultsError(f"{path}, line 1: {problem} column(s) {names} (the {schema.name} "
                               f"schema declares {schema.names})")
    rows, lines = [], []
    for fields in reader:
        line = reader.line_num
        if len(fields) != len(header):
            raise ResultsError(f"{path}, line {line}: {len(fields)} fields, the header has "
                               f"{len(header)}: a truncated or malformed row")
        cells = {c.name: "" for c in schema.columns} | dict(zip(header, fields, strict=True))
        rows.append(_check_cells(cells, schema, lambda col, line=line: f"{path}, line {line}, column {col!r}"))
        lines.append(line)
    if not rows:
        raise ResultsError(f"{path}: a header but no rows")
    _check_keys(rows, lines, schema, path)
    return rows


# ---------------------------------------------------------------- manifests

# Every manifest field the report, figures and claims read: name -> accepted JSON types.
MANIFEST_FIELDS: dict[str, tuple[type, ...]] = {
    "date": (str,), "seconds": (int, float), "commit": (str,), "dirty": (bool,),
    "python": (str,), "torch": (str,), "triton": (str,), "host": (str,), "cpu": (str,),
    "cpu_count": (int,), "gpu": (str, type(None)), "driver": (str, type(None)),
    "cuda": (str, type(None)), "config": (dict,),
}
# What a run records about the CSV it wrote (absent from manifests written before): its row
# count and SHA-256, so that any later change to the file (a truncation, an edit) is refused.
CSV_FIELDS: dict[str, tuple[type, ...]] = {"rows": (int,), "csv_sha256": (str,)}


def manifest_path(csv_path: str | Path) -> Path:
    """``<dir>/<name>.csv`` -> ``<dir>/<name>.manifest.json``."""
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.name.removesuffix(".csv") + ".manifest.json")


def _check_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    if not isinstance(manifest, dict):
        raise ResultsError(f"{path}: a manifest must be a JSON object, got {type(manifest).__name__}")
    for name, types in (MANIFEST_FIELDS | CSV_FIELDS).items():
        if name not in manifest:
            if name in CSV_FIELDS:
                continue
            raise ResultsError(f"{path}: manifest field {name!r} is missing")
        value = manifest[name]
        # bool is an int in Python, never a count or a duration here
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ResultsError(f"{path}: manifest field {name!r} must be {want}, got {value!r}")
    return manifest


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    path = Path(path)
    _check_manifest(manifest, path)
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultsError(f"{path}: cannot read the manifest: {err}") from None
    return _check_manifest(manifest, path)


# ---------------------------------------------------------------- results = rows + manifest


@dataclass(frozen=True)
class Results:
    """One experiment's checked results: typed ``rows`` and the ``manifest`` beside them."""

    experiment: str
    path: Path
    rows: list[dict[str, Any]]
    manifest: dict[str, Any]


def schema_of(experiment: str) -> Schema:
    if experiment not in SCHEMAS:
        raise ResultsError(f"no results schema for experiment {experiment!r}; known: {sorted(SCHEMAS)}")
    return SCHEMAS[experiment]


def load_results(experiment: str, csv_path: str | Path) -> Results:
    """Rows and manifest of ``experiment`` at ``csv_path``, checked: the rows against the
    schema, the manifest's fields, and the rows the manifest's config asks for."""
    csv_path = Path(csv_path)
    schema = schema_of(experiment)
    rows = read_rows(csv_path, schema)
    mpath = manifest_path(csv_path)
    manifest = read_manifest(mpath)
    if "csv_sha256" in manifest and hashlib.sha256(csv_path.read_bytes()).hexdigest() != manifest["csv_sha256"]:
        raise ResultsError(f"{csv_path}: the file is not the one its run wrote ({len(rows)} rows now, "
                           f"{manifest.get('rows', '?')} written; SHA-256 differs from {mpath}): "
                           "edited or truncated after the run")
    if schema.expected is not None:
        try:
            wanted = schema.expected(manifest)
        except (KeyError, TypeError, ValueError) as err:
            raise ResultsError(f"{mpath}: the config lacks or mistypes a field the {experiment} rows "
                               f"depend on: {err!r}") from None
        for want in wanted:
            if not any(all(r[k] == v for k, v in want.items()) for r in rows):
                named = ", ".join(f"{k}={v!r}" for k, v in want.items())
                raise ResultsError(f"{csv_path}: no row with {named}, which the config in {mpath} "
                                   "asks for: an incomplete or truncated file")
        if schema.exact and len(rows) != len(wanted):
            raise ResultsError(f"{csv_path}: {len(rows)} rows, but the config in {mpath} "
                               f"determines {len(wanted)}")
    return Results(experiment, csv_path, rows, manifest)


# ---------------------------------------------------------------- the declarations
# Columns in the order the experiments write them. ``When`` names the rows a column is
# required in; the expected-row functions mirror the experiments' loops over their configs
# (tests/test_results.py checks them against the experiment code).


def _expect_e0(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    cfg = manifest["config"]
    forms = ["naive", "two_softmax"] + (["sdpa_fused"] if cfg["batch"] == 1 else [])
    return [{"form": f, "context": c} for c in cfg["contexts"] for f in forms]


def _expect_e1(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    cfg = manifest["config"]
    shapes = [("decode", B, 1, L, A, kv) for kv in cfg["kv_dtypes"] for B, L in cfg["decode_shapes"]
              for A in cfg["anchors"]]
    shapes += [("prefill", 1, cfg["prefill_chunk"] or L, L, A, "bf16") for L in cfg["prefill_contexts"]
               for A in cfg["prefill_anchors"]]
    names = ("mode", "batch", "q_len", "context", "anchors", "kv_dtype", "impl")
    rows = [dict(zip(names, (*shape, impl), strict=True)) for shape in shapes for impl in cfg["impls"]]
    # The shared-prefix regime came later: manifests written before have no shared_shapes.
    return rows + [{"mode": "shared_decode", "batch": B, "q_len": 1, "context": L, "anchors": A,
                    "kv_dtype": kv, "share_group": group, "impl": impl}
                   for kv in cfg["kv_dtypes"] for B, L, A, group in cfg.get("shared_shapes", [])
                   for impl in cfg["impls"]] + [
        {"mode": "shared_prefill", "batch": B, "q_len": q_len, "context": L, "anchors": A, "kv_dtype": kv,
         "share_group": group, "impl": impl}
        for kv in cfg["kv_dtypes"] for B, q_len, L, A, group in cfg.get("shared_prefill_shapes", [])
        for impl in cfg["impls"]]


def e2_sweep_variant(sweep: Sequence[Any], block_size: int, group: int) -> tuple[str, str, int, int, dict[str, int]]:
    """One E2 sweep entry ``[mode, knob, value(, kv dtype)]`` at head_dim 128: one knob changed.

    Returns (mode, kv dtype, block size, group, launch knobs changed); the kv dtype is bf16 unless
    the entry names one, and a knob other than block_size/group is the one launch knob changed.
    """
    mode, knob, value, *kv = sweep
    return (mode, kv[0] if kv else "bf16", int(value) if knob == "block_size" else block_size,
            int(value) if knob == "group" else group,
            {} if knob in ("block_size", "group") else {knob: int(value)})


def e2_varied(over: Mapping[str, int]) -> str | None:
    """An E2 row's ``varied`` cell: the launch knobs changed (``"anchor_groups=1"``), None if none."""
    return ",".join(f"{k}={v}" for k, v in over.items()) or None


def _expect_e2(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The attention variants of the paper's table, the flatness pairs, the HBM sweep."""
    cfg = manifest["config"]
    variant = {"kind": "variant", "kernel": "attention"}
    out = [{**variant, "mode": m, "head_dim": d, "kv_dtype": kv, "block_size": cfg["block_size"],
            "group": cfg["group"], "varied": None}
           for m, d, kv in product(cfg["modes"], cfg["head_dims"], cfg["kv_dtypes"])]
    for sweep in cfg["sweeps"]:
        mode, kv, bs, group, over = e2_sweep_variant(sweep, cfg["block_size"], cfg["group"])
        out.append({**variant, "mode": mode, "head_dim": 128, "kv_dtype": kv, "block_size": bs,
                    "group": group, "varied": e2_varied(over)})
    out += [{"kind": "flat", "anchors": a, "context": c} for a, c in cfg["flat_pairs"]]
    out += [{"kind": "hbm", "form": f, "mode": m, "context": c}
            for f, c, m in product(("naive", "two_softmax"), cfg["hbm_contexts"], ("prefill", "decode"))]
    return out


def _expect_e3(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    cfg = manifest["config"]
    # Without CUDA the fused kernel is not run (minutes per page in the interpreter).
    on_cpu = cfg["device"] == "cpu" or manifest["gpu"] is None
    return [{"impl": impl} for impl in cfg["impls"] if not (on_cpu and impl == "fused_quant_blake3_gpu")]


def _expect_e3_sass(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The launches of experiments/e3_sass.py: one message of total_bytes, and its pages."""
    cfg = manifest["config"]
    return [{"impl": "blake3_gpu", "n_rows": 1, "row_bytes": cfg["total_bytes"]},
            {"impl": "blake3_many_gpu", "n_rows": cfg["total_bytes"] // cfg["page_bytes"],
             "row_bytes": cfg["page_bytes"]}]


def _expect_e4(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    cfg = manifest["config"]
    # Without CUDA, the CUDA-only variants and (without the interpreter) the Triton ones are one
    # skip row each; every other variant has rows for each stored dtype and case (bf16-only
    # variants: bfloat16 only).
    on_cpu = cfg["device"] == "cpu" or manifest["gpu"] is None
    may_skip = ("tf32", "cpu", "triton_mm", "attention") if on_cpu else ()
    bf16_only = ("bf16_gemm", "attention")
    out = []
    for v in cfg["variants"]:
        if v in may_skip:
            out.append({"variant": v})
            continue
        dtypes = [d for d in cfg["out_dtypes"] if d == "bfloat16" or v not in bf16_only]
        out += [{"variant": v, "out_dtype": d, "fmt": case.split("/")[0], "rounding": case.split("/")[1]}
                for d in dtypes for case in cfg["cases"]]
    return out


def _expect_e4r(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    cfg = manifest["config"]
    on_gpu = manifest["gpu"] is not None and cfg["device"] != "cpu"
    out = []
    for mode in cfg["modes"]:
        # the cpu scenario needs a GPU prover and the default mode (see the experiment)
        scenarios = [s for s in cfg["scenarios"] if s != "cpu" or (on_gpu and mode == "default")]
        out += [{"measure": "recompute", "mode": mode, "scenario": s, "fmt": f.split(":")[0],
                 "rounding": f.split(":")[1]} for s in scenarios for f in cfg["formats"]]
        if on_gpu:
            out += [{"measure": "cost", "mode": mode, "what": w} for w in ("prefill", "decode")]
    return out


def _expect_e5_accuracy(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    cfg = manifest["config"]
    def runs(formats: Iterable[str]):
        for item in formats:
            fmt, rounding = item.split(":")
            for aq in cfg["anchors_quantized"]:
                for seed in (cfg["seeds"] if rounding == "stochastic" else [cfg["seed"]]):
                    yield fmt, rounding, aq, seed

    names = ("kind", "fmt", "rounding", "anchors_quantized", "seed", "attention")
    out = [("lm", "reference", "none", False, cfg["seed"], cfg["attention"])]
    out += [("lm", *run, cfg["attention"]) for run in runs(cfg["formats"])]
    out += [("lm", *run, "kernel") for run in runs(cfg["kernel_formats"])]
    out += [("attention", *run, "reference") for run in runs(cfg["formats"])]
    return [dict(zip(names, row, strict=True)) for row in out]


def _expect_e5_train(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"final": True}]  # the last evaluation, after training stopped


def _expect_e6(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    cfg = manifest["config"]
    commit_modes = ("commit_sync", "commit_async")
    timing = [(m, 1) for m in cfg["modes"] if m not in commit_modes]
    timing += [(m, i) for m in cfg["modes"] if m in commit_modes for i in cfg["intervals"]]
    # the first reference ran one batch size ("batch"), later runs a list ("batches")
    batches = cfg["batches"] if "batches" in cfg else [cfg["batch"]]
    out = [{"kind": "timing", "mode": m, "interval": i, "batch": b} for b in batches for m, i in timing]
    if cfg["tamper_trials"]:
        out.append({"kind": "tamper", "batch": batches[0]})
    return out


def _expect_e6_live(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    cfg = manifest["config"]
    out = []
    for item in cfg["formats"]:
        fmt, rounding = item.split(":")
        out += [{"kind": "flip", "fmt": fmt, "rounding": rounding, "target": t, "bit": b}
                for t in ("anchor", "context") for b in range(16)]
        out += [{"kind": k, "fmt": fmt, "rounding": rounding, "target": t}
                for k, t in (("swap", "anchor"), ("remap", "context"), ("honest", "all"))]
    return out


def _columns(spec: str, required: bool | When = True, absent_ok: bool = False) -> list[Column]:
    """``"a:int b:float c:str"`` -> Columns with one requirement."""
    types = {"int": int, "float": float, "bool": bool, "str": str}
    return [Column(name, types[kind], required, absent_ok)
            for name, kind in (s.split(":") for s in spec.split())]


_E1_TIMED = When("skipped", "")  # every implementation that ran
_E1_SHARED = When("mode", "shared_(decode|prefill)")  # the shared-prefix regime
_E3_MEASURED = When("status", "ok(: .*)?")
_E4_OK = When("status", "ok")
_E4R_RECOMPUTE, _E4R_COST = When("measure", "recompute"), When("measure", "cost")
_E6_TIMING, _E6_TAMPER = When("kind", "timing"), When("kind", "tamper")
_E6L_FLIP, _E6L_TAMPER = When("kind", "flip"), When("kind", "flip|swap|remap")
_E5_LM, _E5_ATTN = When("kind", "lm"), When("kind", "attention")
_E2_VARIANT, _E2_FLAT, _E2_HBM = When("kind", "variant"), When("kind", "flat"), When("kind", "hbm")
_E2_KERNEL = When("kind", "variant|flat")
_E2_ATTENTION = When("kernel", "attention")

SCHEMAS: dict[str, Schema] = {s.name: s for s in (
    Schema("e0_unfused", tuple(_columns(
        "form:str context:int anchors:int batch:int q_len:int heads_q:int head_dim:int "
        "intermediate_bytes:int ms:float device:str")),
        key=("form", "context"), expected=_expect_e0, exact=True),
    Schema("e1_throughput", tuple(
        _columns("mode:str batch:int q_len:int context:int anchors:int kv_dtype:str heads_q:int "
                 "heads_kv:int head_dim:int block_size:int")
        # sequences per anchor set and bytes with each anchor page once came with the
        # shared-prefix regime: absent from files written before, so required only in its rows
        + _columns("share_group:int", _E1_SHARED, absent_ok=True) + _columns("bytes:int")
        + _columns("unique_bytes:int", _E1_SHARED, absent_ok=True) + _columns("flops:int impl:str")
        + _columns("ms:float tbps:float", _E1_TIMED)
        # the quartiles of the repetitions came later: absent from older files, optional in newer
        + _columns("ms_q1:float ms_q3:float", False, absent_ok=True)
        + _columns("unique_tbps:float", False, absent_ok=True)
        + _columns("tflops:float tokens_per_s:float rel_err:float", _E1_TIMED)
        + _columns("rel_err_fused:float", False) + _columns("timing:str", _E1_TIMED)
        + _columns("note:str skipped:str ratio_to_cudnn:float ratio_to_flash:float "
                   "ratio_to_gather:float", False)),
        key=("mode", "batch", "q_len", "context", "anchors", "kv_dtype", "share_group", "impl"),
        expected=_expect_e1, exact=True),
    Schema("e2_sram", tuple(
        _columns("kind:str mode:str")
        + _columns("kernel:str head_dim:int kv_dtype:str block_size:int group:int", _E2_KERNEL)
        + _columns("varied:str", False)
        + _columns("tile_n:int block_m:int num_warps:int num_stages:int", _E2_VARIANT)
        + _columns("shared_bytes:int registers:int spill_stores:int spill_loads:int local_bytes:int",
                   _E2_KERNEL)
        + _columns("stack_bytes:int", _E2_VARIANT) + _columns("hash:str", _E2_KERNEL)
        + _columns("model_bytes:int acc_regs:int model_ratio:float", False)
        + _columns("anchors:int context:int", When("kind", "flat|hbm"))
        + _columns("grid:str kv_tiles:int tiles_per_program:int", _E2_FLAT)
        + _columns("form:str batch:int q_len:int hbm_bytes:int exceeds_h200:int", _E2_HBM)),
        key=("kind", "mode", "kernel", "head_dim", "kv_dtype", "block_size", "group", "varied",
             "anchors", "context", "form"),
        expected=_expect_e2),
    Schema("e3_hash", tuple(
        _columns("impl:str") + _columns("fmt:str rounding:str", False) + _columns("bytes:int")
        + _columns("ms:float gbps:float", _E3_MEASURED) + _columns("threads:int", False)
        + _columns("device:str") + _columns("backend:str", False) + _columns("counted:str")
        + _columns("page_elems:int peak_gpu_gib:float", False) + _columns("status:str")),
        key=("impl", "fmt", "rounding", "bytes", "device", "backend"), expected=_expect_e3),
    # per (launch, mnemonic): instructions per iteration of the compression loop (64 bytes per lane)
    Schema("e3_sass", tuple(_columns("impl:str n_rows:int row_bytes:int mnemonic:str count:int "
                                     "cubin_sha256:str")),
           key=("impl", "mnemonic"), expected=_expect_e3_sass),
    Schema("e4_stability", tuple(
        _columns("variant:str")
        + _columns("out_dtype:str fmt:str rounding:str page_elems:int pages:int elements:int "
                   "code_flips:int match_rate:float p_flip:float theory_match:float "
                   "raw_diff_rate:float raw_page_match:float max_rel_perturbation:float "
                   "frac_over_bound:float", _E4_OK)
        + _columns("device:str status:str")),
        key=("variant", "out_dtype", "fmt", "rounding", "page_elems"), expected=_expect_e4),
    Schema("e4_recompute", tuple(
        _columns("measure:str model:str mode:str")
        + _columns("scenario:str fmt:str rounding:str layer:int kind:str pages:int bitwise:int matched:int "
                   "max_over_bound:float verifier_device:str", _E4R_RECOMPUTE)
        + _columns("what:str batch:int tokens:int reps:int ms:float ms_q1:float ms_q3:float", _E4R_COST)
        + _columns("device:str")),
        key=("measure", "mode", "scenario", "fmt", "rounding", "layer", "kind", "what"), expected=_expect_e4r),
    Schema("e5_train", tuple(_columns(
        "step:int tokens:int seconds:float lr:float train_loss:float val_loss:float val_bpb:float "
        "final:bool")),
        key=("step",), expected=_expect_e5_train),
    Schema("e5_accuracy", tuple(
        _columns("kind:str fmt:str rounding:str anchors_quantized:bool seed:int attention:str "
                 "kv_scale:str bits:int")
        + _columns("n_bytes:int nats:float bpb:float", _E5_LM) + _columns("rel_err:float", _E5_ATTN)
        + _columns("checkpoint_sha256:str params:int", _E5_LM)
        + _columns("train_steps:int train_val_bpb:float", False)),
        key=("kind", "fmt", "rounding", "anchors_quantized", "seed", "attention"),
        expected=_expect_e5_accuracy, exact=True),
    Schema("e6_commit", tuple(
        _columns("kind:str mode:str") + _columns("interval:int", _E6_TIMING)
        + _columns("batch:int context:int") + _columns("anchors:int", _E6_TIMING)
        + _columns("layers:int")
        + _columns("steps:int reps:int dtype:str attention:str", _E6_TIMING)
        # graphs and sync came after the committed H200 reference (which ran neither)
        + _columns("graphs:bool sync:bool", False, absent_ok=True)
        + _columns("device:str ms_per_step:float ms_min:float tokens_per_s:float overhead:float "
                   "commits:int d2h_bytes_per_step:float", _E6_TIMING)
        # spread and per-commit costs came with the graph-captured baseline (not in the first reference)
        + _columns("ms_q1:float ms_q3:float ms_max:float overhead_q1:float overhead_q3:float", False,
                   absent_ok=True)
        + _columns("commit_host_ms:float launches_per_commit:int", False, absent_ok=True)
        + _columns("commit_gpu_ms:float path:str", False, absent_ok=True)  # came with the fused commit
        + _columns("target:str field:str flips:int detected:int localized:int leaves:int "
                   "false_positive:int", _E6_TAMPER)),
        key=("kind", "mode", "interval", "batch", "target", "field"), expected=_expect_e6),
    Schema("e6_live", tuple(
        _columns("kind:str fmt:str rounding:str target:str") + _columns("bit:int part:str", _E6L_FLIP)
        # honest rows: trials = verifications of the untouched cache, detected = false alarms
        + _columns("trials:int detected:int") + _columns("localized:int", _E6L_TAMPER)
        + _columns("leaves:int device:str")),
        key=("kind", "fmt", "rounding", "target", "bit"), expected=_expect_e6_live, exact=True),
)}
