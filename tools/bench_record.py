"""Keep the benchmarks' light results under version control, so that runs add up across checkouts.

bench-out/ is git-ignored: the accuracy runs' weights and per-epoch checkpoints are too large for git (1-3 MB
per epoch per run). What BENCHMARKS.md is written from is small, and `save` copies it into bench-record/
(tracked):

- every result JSON the benchmark scripts and studies write (train, export, runtime, int8, accuracy.json,
  splits, selection and posthoc with their caches);
- each finished accuracy run's config.json, metrics.json and bench-storage.json (its bytes per task and
  stored bits, as bench_accuracy.py measured them), and those of its BN-lr candidates; never checkpoints,
  and nothing of a run that has not finished;
- each bundle's `pbexport info` (without the per-layer tables), as BUNDLE.info.json, keeping the recorded tasks
  a bundle packed in a newer checkout lacks (merge_recorded_tasks).

bench-record/index.json keeps each file's sha256 and modification time: the report dates results and times
runs by them, and git does not keep them. `restore` copies into bench-out/ what it lacks (a file bench-out
already has is never overwritten) with its recorded time. A restored run has no weights: bench_accuracy.py
reuses its row and its recorded storage figures, and the studies their cached evaluations.

    python tools/bench_record.py save       # bench-out/ -> bench-record/ (then commit bench-record/)
    python tools/bench_record.py restore    # bench-record/ -> bench-out/ (what bench-out/ lacks)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from benchlib import merge_recorded_tasks
from pbexport.fileio import atomic_write_bytes, atomic_write_json

INDEX = "index.json"
INFO_SUFFIX = ".info.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_bundle(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def _unfinished_run(path: Path, results: Path) -> bool:
    """Is ``path`` inside a run directory (it has config.json) that has no metrics.json yet?"""
    for parent in [path.parent, *path.parent.parents]:
        if parent == results or results not in parent.parents:
            return False
        if (parent / "config.json").is_file() and not (parent / "metrics.json").is_file():
            return True
    return False


def light_files(results: Path) -> list[Path]:
    """The JSON files under ``results`` the record keeps: no checkpoint, nothing inside a bundle (its info is
    kept instead), nothing of an unfinished run."""
    bundles = [b for b in results.rglob("*") if b.is_dir() and _is_bundle(b)]
    kept = []
    for path in sorted(results.rglob("*.json")):
        if "checkpoints" in path.relative_to(results).parts or any(b in path.parents for b in bundles):
            continue
        if not _unfinished_run(path, results):
            kept.append(path)
    return kept


def bundle_infos(results: Path, record: Path | None = None) -> dict[Path, tuple[bytes, float]]:
    """{BUNDLE.info.json path relative to results: (its JSON, the manifest's time)} for every bundle, with the
    tasks of its info in ``record`` that it lacks (merge_recorded_tasks)."""
    from pbexport import PbexportError, load_bundle

    out = {}
    for bundle in sorted(b for b in results.rglob("*") if b.is_dir() and _is_bundle(b)):
        try:
            info = load_bundle(bundle).info()
        except PbexportError as exc:  # a damaged bundle is not recorded; say so and go on
            print(f"warning: {exc}; its info is not recorded", file=sys.stderr)
            continue
        for task in info["tasks"].values():
            task.pop("layers", None)  # per-layer tables: `pbexport info BUNDLE` on a live bundle has them
        rel = bundle.relative_to(results).with_name(bundle.name + INFO_SUFFIX)
        if record is not None and (record / rel).is_file():
            info = merge_recorded_tasks(info, json.loads((record / rel).read_text()))
        out[rel] = ((json.dumps(info, indent=2) + "\n").encode(), (bundle / "manifest.json").stat().st_mtime)
    return out


def read_index(record: Path) -> dict:
    path = record / INDEX
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"error: {path}: not a bench record index ({exc})") from None


def save(results: Path, record: Path) -> dict[str, int]:
    """Copy the light results into ``record`` (new and changed files; the record keeps files results lacks)."""
    if not results.is_dir():
        raise SystemExit(f"error: {results}: no results to save")
    index = read_index(record)
    found = {p.relative_to(results): (p.read_bytes(), p.stat().st_mtime) for p in light_files(results)}
    found.update(bundle_infos(results, record))  # a live bundle's info replaces one restored beside it
    counts = {"new": 0, "changed": 0, "unchanged": 0}
    for rel, (data, mtime) in sorted(found.items()):
        key = rel.as_posix()
        entry = {"sha256": _sha256(data), "mtime": mtime}
        old = index.get(key)
        if old and old["sha256"] == entry["sha256"]:
            counts["unchanged"] += 1
            continue
        counts["changed" if old else "new"] += 1
        (record / rel).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(record / rel, data)
        index[key] = entry
    record.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record / INDEX, {"files": dict(sorted(index.items()))})
    return counts


def _run_root(key: str, index: dict) -> str | None:
    """The outermost recorded run directory ``key`` lies in (one with a config.json), if any."""
    parts = key.split("/")
    return next(("/".join(parts[:i]) for i in range(1, len(parts)) if "/".join([*parts[:i], "config.json"]) in index),
                None)


def restore(record: Path, results: Path) -> dict[str, int]:
    """Copy into ``results`` the recorded files it lacks, with their recorded times; keep what it has. A run
    is restored whole or not at all: never into a run directory results already has (finished or training)."""
    index = read_index(record)
    local_runs = {run for run in (_run_root(key, index) for key in index) if run and (results / run).exists()}
    recorded = {}
    for key, entry in index.items():  # every file checked before any is written
        source = record / key
        recorded[key] = source.read_bytes() if source.is_file() else None
        if recorded[key] is None or _sha256(recorded[key]) != entry["sha256"]:
            raise SystemExit(f"error: {source}: missing or not the file the record's index lists")
    counts = {"restored": 0, "present": 0, "kept local": 0}
    for key, entry in index.items():
        target, data = results / key, recorded[key]
        if target.exists():
            counts["present" if _sha256(target.read_bytes()) == entry["sha256"] else "kept local"] += 1
            continue
        if _run_root(key, index) in local_runs:
            counts["kept local"] += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
        os.utime(target, (entry["mtime"], entry["mtime"]))
        counts["restored"] += 1
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["save", "restore"])
    ap.add_argument("--results", type=Path, default=Path("bench-out"))
    ap.add_argument("--record", type=Path, default=Path("bench-record"))
    args = ap.parse_args(argv)
    if args.action == "save":
        counts = save(args.results, args.record)
        where = f"{args.results} -> {args.record}"
    else:
        counts = restore(args.record, args.results)
        where = f"{args.record} -> {args.results}"
    print(f"{args.action} {where}: " + ", ".join(f"{n} {what}" for what, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
