"""Write BENCHMARKS.md from the results of the benchmark scripts (what `make bench` leaves in bench-out/).

Reads, under --results (default bench-out/):

- train.json (tools/bench_train.py): training step time per method, ratio to fine-tuning;
- export.json and any other export*.json (tools/bench_export.py): latency per export mode against the
  plain backbone, disk for 1/3/10 tasks, session creation, resident memory;
- runtime.json and any other runtime*.json (tools/bench_runtime.py): task switching per mode;
- int8.json (tools/bench_int8.py): int8 size, accuracy and latency;
- accuracy/ (tools/bench_accuracy.py): accuracy.json, or, while a run is still going, its finished run
  directories; the per-backbone bundles it packed;
- accuracy-seeds3-5/ (tools/bench_accuracy.py --seeds 3 4 5): more seeds of some cells' default and
  fine-tunes; quoted beside the goal rows, which stay on the grid's seeds;

and computes the storage figures from bundle files (stored bits vs entropy per task, and a 3-task
cifar_resnet20 bundle packed from the accuracy runs into a temporary directory, kept in three-task.json).
Where the bundles or the runs' weights are gone (results restored from bench-record/ by
tools/bench_record.py), it reads the bundle info and three-task.json that were recorded. Nothing is timed
here. A figure with no result file is reported as not measured, never estimated; missing accuracy
runs come with the training time they still need, estimated from the runs that finished.

Writes --out (BENCHMARKS.md): a header (date, machine, library versions), a Goals table (every goal
figure of the issues: measured value, target, met / MISSED, and for a miss why and what would close
it), then one section per figure with its table and the command that reproduces it; plots go to
--img-dir (docs/img/): the accuracy chart, per-layer mask density (`pbexport info BUNDLE --plot`)
and export latency ratios.

    python tools/write_benchmarks.py                       # bench-out/ -> BENCHMARKS.md, docs/img/
    python tools/write_benchmarks.py --results other-out --out /tmp/B.md --img-dir /tmp/img
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from benchlib import (  # noqa: E402  (tools/, torch-free)
    CARRIED,
    SPLIT_HEADERS,
    has_weights,
    merge_recorded_tasks,
    parse_run_dir_name,
    points_difference,
    split_rows,
)
from pbexport.fileio import atomic_write_json  # noqa: E402  (torch-free)

# the grid `make bench` runs with tools/bench_accuracy.py's defaults
ACC_BACKBONES = ["cifar_resnet20", "cifar_resnet56"]
ACC_DATASETS = ["gtsrb", "mnist"]
ACC_VARIANTS = ["classifier", "piggyback", "piggyback-bn", "finetune"]
ACC_SEEDS = [0, 1, 2]
MORE_SEEDS_DIR = "accuracy-seeds3-5"  # more seeds of a few cells, beside the grid (make bench)
DEFAULT_RECIPE = "piggyback-bn"
FRONTIER_PREFIX = "piggyback-bn-"  # bench_accuracy.py --frontier: the default recipe with other mask settings
FRONTIER_BITS = 0.8
TRAIN_RATIO = 1.3
BITS_SLOPE, BITS_OFFSET, BITS_MAX = 1.05, 0.01, 1.01
EXPORT_TARGETS = {"baked": (1.03, 1.03), "shared": (1.03, 1.03), "multitask (adapter)": (1.5, 1.15),
                  "multitask (inputs)": (1.5, 1.15), "multitask nchwc (adapter)": (1.5, 1.15),
                  "multitask nchwc (inputs)": (1.5, 1.15), "multitask (weights)": (1.5, 1.15),
                  "multitask nchwc (weights)": (1.5, 1.15)}  # nchwc: exported with --nchwc-block
INT8_RATIO, INT8_DROP = 3.0, 1.0
GTSRB_OVER_CLASSIFIER = 20.0
NOISE_FRACTION = 0.05  # a per-run median difference within 5% of the run is "not measurable" on this box


# ----------------------------------------------------------------------------- helpers
@dataclass
class Goal:
    area: str
    goal: str
    target: str
    measured: str
    status: str  # met, MISSED, not measured, reported
    note: str = ""


def f(v, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return format(v, spec)
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(headers: list[str], rows: list[list], spec: str = ".2f") -> str:
    right = [all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) or r[i] is None for r in rows)
             for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(f(v, spec).replace("|", "/") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def status(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "MISSED")


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_result(path: Path, key: str) -> dict | None:
    """The result in ``path`` if it parses and holds ``key``; None otherwise (missing file included)."""
    d = read_json(path)
    return d if d and d.get(key) else None


def result_files(results: Path, stem: str, key: str) -> list[tuple[Path, dict]]:
    """STEM.json first, then the other STEM*.json variants; only those that parse and hold ``key``."""
    others = sorted(q for q in results.glob(f"{stem}*.json") if q.name != f"{stem}.json")
    files = [(p, read_result(p, key)) for p in [results / f"{stem}.json", *others]]
    return [(p, d) for p, d in files if d]


NEEDS_CHECKPOINTS = (" The study evaluates the checkpoints the accuracy runs kept (or reuses what an earlier result "
                     "file cached); bench-record/ keeps the runs' metrics, not their checkpoints, so with neither here "
                     "it needs the runs trained again (`make bench`). docs/TRAINING.md quotes its last results.")


def not_measured(text: list[str], missing: str, why: str = "") -> str:
    """A study section whose result file is missing: its introduction, then what is missing (and why)."""
    return "\n".join(text + [f"Not measured: no `bench-out/{missing}`.{why}", ""]) + "\n"


def mtime(path: Path) -> str:
    return dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")


def rel(path: Path, base: Path) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def code(cmd: str) -> str:
    return f"```bash\n{cmd}\n```"


# ----------------------------------------------------------------------------- machine
def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = None
    try:
        kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
        mem = kb / 2**20
    except (OSError, StopIteration):
        pass
    # what `nproc` prints without OMP_NUM_THREADS (which nproc honours, and the benchmarks may set to 1)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True, env=env).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        nproc = str(len(os.sched_getaffinity(0)))
    versions = {"python": platform.python_version()}
    for pkg in ("pbexport", "torch", "torchvision", "onnx", "onnxscript", "onnxruntime", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {"date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "nproc": nproc, "cpu": cpu,
            "memory_gib": mem, "os": platform.platform(), "versions": versions,
            "loadavg": os.getloadavg()}


# ----------------------------------------------------------------------------- training
def section_train(results: Path) -> tuple[str, list[Goal]]:
    path = results / "train.json"
    d = read_json(path)
    goal = "piggyback step time / fine-tune step time"
    if d is None:
        return ("## Training throughput\n\nNot measured: no `train.json`. Run `python tools/bench_train.py`.\n",
                [Goal("training", goal, f"<= {TRAIN_RATIO}x", "-", "not measured", "run tools/bench_train.py")])
    rows = d["rows"]
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    batch = rows[0]["batch_size"]
    extra = "".join(f" --{k} {d[k]}" for k in ("rounds", "steps") if k in d)
    sizes = sorted({r["input_size"] for r in rows})
    size_arg = f" --input-size {sizes[0]}" if sizes != sorted({32 if "cifar" in b else 112 for b in backbones}) else ""
    cmd = f"python tools/bench_train.py --backbones {' '.join(backbones)} --batch-size {batch}{size_arg}{extra}"
    text = ["## Training throughput",
            "",
            f"One training step (forward, backward, Adam) per method on random images, timed in interleaved rounds "
            f"so machine noise hits every method alike; medians; ratios to fine-tuning from the same run. "
            f"torch {d.get('torch', '?')}, {d.get('threads', '?')} threads; measured {mtime(path)}.",
            "",
            table(["backbone", "input", "batch", "method", "per-task BN", "step ms", "images/s", "step / finetune"],
                  [[r["backbone"], r["input_size"], r["batch_size"], r["method"], r["train_bn"], r["step_ms"],
                    r["images_per_second"], r["step_ratio_to_finetune"]] for r in rows]),
            "", code(cmd), ""]
    goals = []
    for r in rows:
        if r["method"] != "piggyback":
            continue
        ratio = r["step_ratio_to_finetune"]
        ok = ratio <= TRAIN_RATIO
        note = "" if ok else ("the masked forward computes W * mask for every weight and the backward the score "
                              "gradient; a fused mask multiply (torch.compile) or larger batches would amortize it")
        recipe = "default recipe, per-task BN" if r["train_bn"] else "BN frozen"
        goals.append(Goal("training", f"{goal} ({r['backbone']} @{r['input_size']}, {recipe})",
                          f"<= {TRAIN_RATIO}x", f"{ratio:.2f}x ({r['step_ms']:.1f} ms vs fine-tune)", status(ok), note))
    return "\n".join(text), goals


# ----------------------------------------------------------------------------- accuracy: collecting runs
def bn_lr_text(lr_bn) -> str:
    return "chosen per task on validation (auto)" if lr_bn == "auto" else f"{lr_bn:g}"


def _train_seconds(metrics: dict) -> float:
    """As pbexport.training.train_seconds: an lr_bn auto run trained every candidate."""
    if "lr_bn_candidates" in metrics:
        return sum(t["train_seconds"] for t in metrics["lr_bn_candidates"])
    return sum(e.get("seconds", 0.0) for e in metrics.get("epochs", []))


def _run_wall_seconds(run: Path, metrics: dict) -> float:
    if "copied_from" in metrics:  # copied from the default's candidate: what training it took there
        source = run.parent / metrics["copied_from"]
        source_metrics = read_json(source / "metrics.json")
        return _run_wall_seconds(source, source_metrics) if source_metrics else _train_seconds(metrics)
    if "lr_bn_candidates" in metrics:  # the candidates trained in their own run directories
        return sum(_run_wall_seconds(run / t["run"], read_json(run / t["run"] / "metrics.json") or {})
                   for t in metrics["lr_bn_candidates"])
    train_s = _train_seconds(metrics)
    try:
        wall = (run / "metrics.json").stat().st_mtime - (run / "config.json").stat().st_mtime
    except OSError:
        wall = 0.0
    # config.json -> metrics.json includes evaluation; an interrupted-and-resumed run would inflate it
    return wall if 0 < wall < 2 * train_s + 600 else train_s


NOT_RECORDED = "not recorded (trained before pbexport recorded it)"


def _trained_on(run: Path, metrics: dict) -> tuple[str, ...]:
    """The machines (CPU, its kernels' ISA, torch build, threads) a run's epochs were trained on, its BN-lr
    candidates' too: a run is bitwise reproducible on one of them only (docs/TRAINING.md)."""
    found = set()
    for e in metrics.get("epochs", []):
        env = e.get("environment")
        found.add(NOT_RECORDED if not isinstance(env, dict) else  # a damaged record reads "?", not a crash
                  f"{env.get('cpu', '?')} ({env.get('cpu_capability', '?')}), torch {env.get('torch', '?')}, "
                  f"{env.get('threads', '?')} threads")
    for t in metrics.get("lr_bn_candidates", []):
        if "run" in t:
            found.update(_trained_on(run / t["run"], read_json(run / t["run"] / "metrics.json") or {}))
    return tuple(sorted(found))


def trained_on_text(cells: dict) -> str:
    """'A: n runs; B: m runs' (machines, most runs first) over the cells whose run directories are here."""
    count: dict[str, int] = {}
    for r in cells.values():
        if "trained_on" in r:
            label = "; ".join(r["trained_on"]) if len(r["trained_on"]) == 1 else (
                "resumed across machines: " + " + ".join(r["trained_on"]))
            count[label] = count.get(label, 0) + 1
    return "; ".join(f"{label}: {n} run{'s' if n != 1 else ''}"
                     for label, n in sorted(count.items(), key=lambda t: (-t[1], t[0])))


def collect_accuracy(acc_dir: Path) -> tuple[dict, dict | None, dict]:
    """cells[(backbone, dataset, variant, seed)] = row; the accuracy.json (or None); partial runs."""
    data = read_json(acc_dir / "accuracy.json")
    cells: dict = {}
    if data:
        for r in data["rows"]:
            cells[(r["backbone"], r["dataset"], r["variant"], r["seed"])] = dict(r, source="accuracy.json")
    partial = {}
    for run in sorted((acc_dir / "runs").glob("*/*/*")):
        name = parse_run_dir_name(run.name)
        if not name or not run.is_dir():
            continue
        key = (run.parent.parent.name, run.parent.name, *name)
        metrics = read_json(run / "metrics.json")
        config = (read_json(run / "config.json") or {}).get("config", {})
        if metrics is None:
            marks = sorted((run / "checkpoints").glob("epoch-*.json"))
            per_epoch = None
            if marks and (run / "config.json").exists():
                per_epoch = (marks[-1].stat().st_mtime - (run / "config.json").stat().st_mtime) / len(marks)
            partial[key] = {"backbone": key[0], "dataset": key[1], "variant": key[2], "seed": key[3],
                            "epochs_done": len(marks), "epochs": config.get("epochs"),
                            "wall_seconds": per_epoch * config["epochs"] if per_epoch and config.get("epochs")
                            else None}
            continue
        wall = _run_wall_seconds(run, metrics)
        if key in cells:
            cells[key].setdefault("trained_on", _trained_on(run, metrics))
            cells[key].setdefault("wall_seconds", wall)
            cells[key].setdefault("epochs", config.get("epochs"))
            cells[key].setdefault("max_train_samples", config.get("max_train_samples"))
            cells[key].setdefault("method", config.get("method"))
            cells[key].setdefault("copied", "copied_from" in metrics)
            continue
        cells[key] = {"backbone": key[0], "dataset": key[1], "variant": key[2], "seed": key[3], "run": str(run),
                      "test_accuracy": metrics["test_accuracy"], "mask_density": metrics.get("mask_density"),
                      "train_seconds": _train_seconds(metrics), "lr_bn": metrics.get("lr_bn"),
                      "wall_seconds": wall, "epochs": config.get("epochs"),
                      "max_train_samples": config.get("max_train_samples"), "method": config.get("method"),
                      "copied": "copied_from" in metrics, "source": "run directory",
                      "trained_on": _trained_on(run, metrics)}
    return cells, data, partial


def lead(finetune_mean: float, mean: float) -> float:
    """Fine-tuning's lead in points."""
    return points_difference(finetune_mean, mean)


def difference_standard_error(a: list[float], b: list[float]) -> float | None:
    """The standard error of mean(a) - mean(b) from each side's sample spread (Welch); None below 2 seeds a side.
    It says how much of a lead reseeding alone could make (with 3 seeds a side, 95% needs about 2.8 of them)."""
    if len(a) < 2 or len(b) < 2:
        return None
    return (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5 or None


def more_seeds(cells: dict, extra: dict, fine_tunes: set[str]) -> dict:
    """(backbone, dataset) -> what the cell scores over the grid's seeds and the extra ones together, for the cells
    where the default and a fine-tune were trained on more seeds (`extra`, as collect_accuracy reads
    MORE_SEEDS_DIR). A seed the grid has already is not counted twice. Per cell: `variants` {variant: (grid
    accuracies, extra accuracies)} and, over every seed, the strongest fine-tune and the default's lead on it."""
    grid_seeds = {k[3] for k in cells}
    out = {}
    for b, d in dict.fromkeys(k[:2] for k in extra):
        variants, new_seeds = {}, sorted({k[3] for k in extra if k[:2] == (b, d) and k[3] not in grid_seeds})
        for v in sorted({k[2] for k in extra if k[:2] == (b, d)}, key=lambda v: (v != DEFAULT_RECIPE, v)):
            more = [100 * r["test_accuracy"] for k, r in sorted(extra.items())
                    if k[:3] == (b, d, v) and k[3] not in grid_seeds]
            if more:
                variants[v] = ([100 * r["test_accuracy"] for k, r in sorted(cells.items()) if k[:3] == (b, d, v)], more)
        fts = [(v, a + m) for v, (a, m) in variants.items() if v in fine_tunes]
        if DEFAULT_RECIPE not in variants or not fts:
            continue
        pb = sum(variants[DEFAULT_RECIPE], [])
        ft_name, ft = max(fts, key=lambda t: statistics.mean(t[1]))
        out[(b, d)] = {"variants": variants, "new_seeds": new_seeds, "finetune": ft_name, "seeds": len(pb),
                       "lead": lead(statistics.mean(ft), statistics.mean(pb)),
                       "se": difference_standard_error(ft, pb)}
    return out


def more_seeds_commands(extra: dict) -> list[str]:
    """The bench_accuracy.py command that trains the cells in `extra` (more_seeds), one per backbone."""
    by_backbone: dict = {}
    for (b, d), x in extra.items():
        datasets, variants, seeds = by_backbone.setdefault(b, ([], [], set()))
        datasets.append(d)
        variants += [v for v in x["variants"] if v not in variants]
        seeds |= set(x["new_seeds"])
    return [f"python tools/bench_accuracy.py --backbones {b} --datasets {' '.join(ds)} --variants {' '.join(vs)} "
            f"--seeds {' '.join(map(str, sorted(ss)))} --out bench-out/{MORE_SEEDS_DIR}"
            for b, (ds, vs, ss) in by_backbone.items()]


def finetune_variants(cells: dict) -> set[str]:
    """The variants that fine-tune the whole net (the runs say so): the accuracy goals compare with the
    stronger of them, e.g. fine-tuning with and without augmentation."""
    return {k[2] for k, r in cells.items() if r.get("method") == "finetune"} | {"finetune"}


def _depth(backbone: str) -> float | None:
    m = re.fullmatch(r"cifar_resnet(\d+)", backbone)
    return (int(m[1]) - 2) / 6 if m else None  # residual blocks per stage: cost scales with it


def estimate_seconds(cells: dict, backbone: str, dataset: str, variant: str) -> float | None:
    """Wall seconds one run of (backbone, dataset, variant) needs, from the finished runs (and the epochs
    that runs in progress finished)."""
    def cost(r):
        return r.get("wall_seconds") or r.get("train_seconds") or 0.0

    def scaled(r):
        a, b = _depth(backbone), _depth(r["backbone"])
        return cost(r) * a / b if a and b else None

    for match in (lambda r: (r["backbone"], r["dataset"], r["variant"]) == (backbone, dataset, variant),
                  lambda r: (r["backbone"], r["variant"]) == (backbone, variant),
                  # the same method on another depth (scaled) predicts better than another method
                  lambda r: (r["dataset"], r["variant"]) == (dataset, variant),
                  lambda r: r["variant"] == variant,
                  lambda r: r["backbone"] == backbone,
                  lambda r: True):
        vals = [scaled(r) if r["backbone"] != backbone else cost(r) for r in cells.values() if match(r)]
        vals = [v for v in vals if v]
        if vals:
            return statistics.mean(vals)
    return None


def hours(seconds: float | None) -> str:
    if seconds is None:
        return "needs an unknown number of CPU hours (no finished run to estimate from)"
    h = seconds / 3600
    return f"needs ~{h:.1f} more CPU hours" if h >= 1 else f"needs ~{h:.2f} more CPU hours ({seconds / 60:.0f} min)"


# ----------------------------------------------------------------------------- accuracy
def section_accuracy(results: Path, img_dir: Path, out_dir: Path, machine_info: dict) -> tuple[str, list[Goal], dict]:
    acc_dir = results / "accuracy"
    cells, data, partial = collect_accuracy(acc_dir)
    fine_tunes = finetune_variants(cells)
    extra_cells = collect_accuracy(results / MORE_SEEDS_DIR)[0]
    extra = more_seeds(cells, extra_cells, fine_tunes)
    backbones = list(dict.fromkeys(ACC_BACKBONES + [k[0] for k in cells]))
    datasets = list(dict.fromkeys(ACC_DATASETS + [k[1] for k in cells]))
    variants = list(dict.fromkeys(ACC_VARIANTS + [k[2] for k in cells if not k[2].startswith(FRONTIER_PREFIX)]))
    seeds = sorted(set(ACC_SEEDS) | {k[3] for k in cells})
    cores = machine_info["nproc"]
    unit = (f"CPU hours are wall hours of training on this {cores}-core machine, estimated from the finished runs "
            "and the finished epochs of runs in progress")
    known = {**{k: v for k, v in partial.items() if v.get("wall_seconds")}, **cells}

    # what is missing, and what it still costs
    missing, remaining = [], 0.0
    unknown = False
    for b in backbones:
        for d in datasets:
            for v in ACC_VARIANTS:  # the grid; recipes beside it (finetune-none) are run on request
                todo = [s for s in seeds if (b, d, v, s) not in cells]
                if not todo:
                    continue
                per = estimate_seconds(known, b, d, v)
                frac = sum(1 - (partial[(b, d, v, s)]["epochs_done"] / (partial[(b, d, v, s)]["epochs"] or 1))
                           if (b, d, v, s) in partial else 1.0 for s in todo)
                need = None if per is None else per * frac
                unknown |= need is None
                remaining += need or 0.0
                missing.append([b, d, v, ", ".join(map(str, todo)),
                                "; ".join(f"seed {s}: epoch {partial[(b, d, v, s)]['epochs_done']}/"
                                          f"{partial[(b, d, v, s)]['epochs'] or '?'} done"
                                          for s in todo if (b, d, v, s) in partial) or "-",
                                hours(need)])
    done_seconds = sum(r.get("wall_seconds") or r.get("train_seconds") or 0.0
                       for r in cells.values() if not r.get("copied"))  # a copy trained nothing

    # summaries
    def accs(b, d, v):
        return [100 * cells[(b, d, v, s)]["test_accuracy"] for s in seeds if (b, d, v, s) in cells]

    def machines_of(b, d, v) -> str:
        """The machines a recipe's seeds here were trained on, as _trained_on names them (NOT_RECORDED for a run
        from before the record, or whose directory is not here): a lead between two is the lead on neither."""
        return " + ".join(sorted({label for s in seeds if (b, d, v, s) in cells
                                  for label in cells[(b, d, v, s)].get("trained_on") or (NOT_RECORDED,)}))

    def best_finetune(b, d) -> tuple[str | None, list[float]]:
        """The fine-tune variant with the higher mean here (fine-tuning at its better augmentation)."""
        tried = [(v, accs(b, d, v)) for v in sorted(fine_tunes) if accs(b, d, v)]
        return max(tried, key=lambda t: statistics.mean(t[1])) if tried else (None, [])

    summary = []
    for b in backbones:
        for d in datasets:
            _, ft = best_finetune(b, d)
            cl = accs(b, d, "classifier")
            for v in variants:
                a = accs(b, d, v)
                if not a:
                    continue
                rs = [cells[(b, d, v, s)] for s in seeds if (b, d, v, s) in cells]
                bits = [r["stored_bits_per_param"] for r in rs if r.get("stored_bits_per_param") is not None]
                dens = [r["mask_density"] for r in rs if r.get("mask_density") is not None]
                by = [r["bytes_per_task"] for r in rs if r.get("bytes_per_task") is not None]
                summary.append({
                    "backbone": b, "dataset": d, "variant": v, "seeds": len(a), "mean": statistics.mean(a),
                    "std": statistics.pstdev(a) if len(a) > 1 else 0.0,
                    "ft_lead": lead(statistics.mean(ft), statistics.mean(a)) if ft and v not in fine_tunes else None,
                    "over_classifier": statistics.mean(a) - statistics.mean(cl) if cl and v != "classifier" else None,
                    "bytes": int(statistics.mean(by)) if by else None,
                    "bits": statistics.mean(bits) if bits else None, "density": statistics.mean(dens) if dens else None,
                    # the median: a run that shared the cores with other work says little about the recipe
                    "minutes": statistics.median((r.get("wall_seconds") or r.get("train_seconds") or 0) / 60
                                                 for r in rs)})

    # budget actually used by the methods compared here (the frontier recipes name their own settings)
    epochs = sorted({r.get("epochs") for r in cells.values()
                     if r.get("epochs") and not r["variant"].startswith(FRONTIER_PREFIX)} |
                    ({data["epochs"]} if data and data.get("epochs") else set()))
    samples = sorted({str(r.get("max_train_samples") or "all") for r in cells.values()})
    text = ["## Accuracy (real data)",
            "",
            "Every (backbone, dataset, method, seed) trained with `pbexport.training` on the same budget; test top-1 "
            "on the real test sets (GTSRB 3,000 images, MNIST 2,000). `piggyback-bn` is pbexport's default recipe "
            "(mask + head + per-task BN, head lr 1e-2, `pbexport train` with no tuning flags: the per-task BN lr is "
            "chosen per task on the validation split, between 1e-2 and 3e-3, so a task trains twice); "
            "`piggyback` keeps the backbone's BN; "
            "`classifier` trains the head only; "
            "`finetune` trains every weight; all of them with the default augmentation (random shifted crops), "
            "`finetune-none` without (`--augment none`), `finetune-head1e-2` with piggyback's head lr (fine-tuning's "
            "default is 1e-3); a recipe named with `-contig` holds out a contiguous validation split "
            "(`--val-split contiguous`), one with `-avg3` keeps the mean of its last 3 epochs (`--average-epochs 3`). "
            "\"fine-tune lead\" = the strongest fine-tune's mean minus "
            "this method's mean (the goal "
            "wants it <= 0 for piggyback-bn); \"over classifier\" = this mean minus classifier-only's.",
            ""]
    if cells:
        live = any(r["source"] != "accuracy.json" for r in cells.values())
        sources = ([f"`accuracy.json` ({mtime(acc_dir / 'accuracy.json')})"] if data else []) + (
            ["the finished run directories of a run still in progress"] if live else [])
        text.append(f"Budget: {', '.join(map(str, epochs)) or '?'} epochs, train images per task: "
                    f"{', '.join(samples)} (`all` = the whole train split: 12,000 for both datasets), batch 64. "
                    f"Results from {' and '.join(sources)}.")
        machines = trained_on_text(cells)
        if machines:
            text += ["", f"Trained on (runs are bitwise reproducible on one machine only: docs/TRAINING.md): "
                         f"{machines}."]
        text += ["", table(["backbone", "dataset", "method", "seeds", "test top-1 %", "± std", "fine-tune lead",
                            "over classifier", "bytes/task", "stored bits/param", "mask density",
                            "minutes/run (median)"],
                           [[s["backbone"], s["dataset"], s["variant"], f"{s['seeds']}/{len(seeds)}", s["mean"],
                             s["std"], s["ft_lead"], s["over_classifier"], s["bytes"], s["bits"], s["density"],
                             s["minutes"]] for s in summary]), ""]
        picks = {(b, d): [(s, cells.get((b, d, DEFAULT_RECIPE, s), {}).get("lr_bn")) for s in seeds]
                 for b in backbones for d in datasets}
        chosen = [f"{b} / {d}: " + ", ".join(f"seed {s} {bn_lr_text(lr)}" for s, lr in cell if lr is not None)
                  for (b, d), cell in picks.items() if any(lr is not None for _, lr in cell)]
        if chosen:
            text += [f"The per-task BN lr `{DEFAULT_RECIPE}` chose on validation: " + "; ".join(chosen)
                     + ". Its minutes per run count both trainings.", ""]
    else:
        text += ["No accuracy result yet.", ""]
    if missing:
        text += [f"Not measured yet ({unit}; in total {'at least ' if unknown else ''}"
                 f"~{remaining / 3600:.1f} hours more, {done_seconds / 3600:.1f} hours spent so far):", "",
                 table(["backbone", "dataset", "method", "seeds missing", "state", "reason"], missing), ""]
    base = (data or {}).get("base_task", {})
    for b, r in base.items():
        tasks = f"its {r['tasks']} tasks" if "tasks" in r else "every task"
        text.append(f"- Base task (CIFAR-10, 2,000 test images) on {b}: original weights {100 * r['original']:.2f}%, "
                    f"the bundle's backbone after adding {tasks} {100 * r['bundle']:.2f}%, logits bitwise "
                    f"identical: **{r['bitwise_identical']}**"
                    + (" (as recorded: no run of this backbone had its weights when bench_accuracy.py last ran)."
                       if r.get("recorded") else "."))
    if base:
        text.append("")

    # plots
    plots = []
    png = acc_dir / "accuracy.png"
    img_dir.mkdir(parents=True, exist_ok=True)
    target = img_dir / "accuracy.png"
    json_covers = data is not None and all(r["source"] == "accuracy.json" for r in cells.values())
    if png.exists() and json_covers:
        shutil.copyfile(png, target)
        plots.append(target)
    elif any(s["variant"] in ACC_VARIANTS for s in summary):  # the chart shows the grid's methods
        _plot_accuracy(summary, target)
        plots.append(target)
    for t in plots:
        text += [f"![test accuracy per backbone, dataset and method]({rel(t, out_dir)})", ""]
    if (acc_dir / "bundles").exists():
        text += ["Per-layer mask density of these tasks: see the storage section.", ""]
    text.append(code("python tools/bench_accuracy.py --frontier # every backbone, dataset, method and seed "
                     "(hours: see above)\n"
                     "python tools/bench_accuracy.py --backbones cifar_resnet20 --seeds 0   # one backbone, one seed"))

    if extra:
        def spread(a):
            return f"{statistics.mean(a):.2f} ± {statistics.pstdev(a) if len(a) > 1 else 0.0:.2f} ({len(a)})"
        rows = []
        for (b, d), x in extra.items():
            ft_all = sum(x["variants"][x["finetune"]], [])
            for v, (a, m) in x["variants"].items():
                gap = None if v in fine_tunes else lead(statistics.mean(ft_all), statistics.mean(a + m))
                rows.append([b, d, v, spread(a) if a else "-", spread(m), spread(a + m),
                             None if gap is None else f"{gap:+.2f}"])
        machines = trained_on_text({k: r for k, r in extra_cells.items() if k[:2] in extra})
        text += ["", "### More seeds",
                 "",
                 f"The goal rows stay on the grid's {len(seeds)} seeds, as the issue asks. In these cells the default "
                 "and fine-tuning were trained on more seeds too (`bench-out/" + MORE_SEEDS_DIR + "`), which measures "
                 "again, on seeds it was not picked on, the fine-tune a goal row calls the strongest (the best mean of "
                 "several fine-tunes over 3 seeds is biased upward), and a lead of a few tenths on more seeds. "
                 "Test top-1 %, mean ± std (seeds); fine-tune lead = the strongest fine-tune's mean over every seed "
                 "minus this method's." + (f" Trained on: {machines}." if machines else ""),
                 "",
                 table(["backbone", "dataset", "method", "grid seeds", "more seeds", "every seed",
                        "fine-tune lead (every seed)"], rows),
                 ""]
        text += [f"- {b} / {d}: over {x['seeds']} seeds the strongest fine-tune is {x['finetune']}, and the default's "
                 f"lead {x['lead']:+.2f}" + (f", {x['lead'] / x['se']:.1f} standard errors of the difference "
                                             f"(±{x['se']:.2f})" if x["se"] else "") + "."
                 for (b, d), x in extra.items()]
        text += ["", code("\n".join(more_seeds_commands(extra)))]

    def closest_recipe(b, d, ft) -> str:
        """The recipe beside the default that came closest to fine-tuning here, if any was run."""
        tried = {v: accs(b, d, v) for v in dict.fromkeys(k[2] for k in cells if k[:2] == (b, d))
                 if v.startswith(FRONTIER_PREFIX)}
        if not tried:
            return ""
        most = max(len(a) for a in tried.values())  # one seed's score is no mean over three
        v, a = min(((v, a) for v, a in tried.items() if len(a) == most),
                   key=lambda t: lead(statistics.mean(ft), statistics.mean(t[1])))
        gap = lead(statistics.mean(ft), statistics.mean(a))
        # what the recipe does where else it was run: why it is not the default
        elsewhere = [f"{lead(statistics.mean(best_finetune(b2, d2)[1]), statistics.mean(accs(b2, d2, v))):+.2f} on "
                     f"{b2} / {d2} ({len(accs(b2, d2, v))} seed(s))" for b2 in backbones for d2 in datasets
                     if (b2, d2) != (b, d) and accs(b2, d2, v) and best_finetune(b2, d2)[1]]
        return (f"; the closest recipe tried here: {v}, fine-tune lead {gap:+.2f} ({len(a)} seed(s))"
                + (f", elsewhere {', '.join(elsewhere)}" if elsewhere else ""))

    # goals
    goals = []
    cell_leads = {}  # (backbone, dataset) -> lead, where every seed of both sides finished
    for b in backbones:
        for d in datasets:
            pb = accs(b, d, DEFAULT_RECIPE)
            ft_name, ft = best_finetune(b, d)
            name = f"{DEFAULT_RECIPE} vs fine-tune, {b} on {d}: strongest fine-tune's lead (mean over seeds)"
            if not pb or not ft:
                need = sum(estimate_seconds(known, b, d, v) or 0.0
                           for v in (DEFAULT_RECIPE, "finetune") for s in seeds if (b, d, v, s) not in cells)
                goals.append(Goal("accuracy", name, "<= 0 points", "-", "not measured", hours(need or None)))
                continue
            gap = lead(statistics.mean(ft), statistics.mean(pb))
            n = min(len(pb), len(ft))
            measured = (f"{gap:+.2f} ({statistics.mean(pb):.2f}% vs {ft_name} {statistics.mean(ft):.2f}%, "
                        f"{len(pb)} vs {len(ft)} of {len(seeds)} seeds)")
            pb_on, ft_on = machines_of(b, d, DEFAULT_RECIPE), machines_of(b, d, ft_name)
            if pb_on != ft_on:
                measured += (f"; the two sides trained on different machines: {DEFAULT_RECIPE} on {pb_on}, "
                             f"{ft_name} on {ft_on}")
            if (b, d) in extra:
                x = extra[(b, d)]
                measured += (f"; over {x['seeds']} seeds ({MORE_SEEDS_DIR}, beside this row): {x['lead']:+.2f} vs "
                             f"{x['finetune']}" + (f", {x['lead'] / x['se']:.1f} standard errors" if x["se"] else ""))
            spread = max(statistics.pstdev(pb) if len(pb) > 1 else 0.0, statistics.pstdev(ft) if len(ft) > 1 else 0.0)
            se = difference_standard_error(ft, pb)
            note = "" if gap <= 0 else (
                f"fine-tuning ahead by {gap:.2f} points on this budget"
                + (f", less than one seed standard deviation (±{spread:.2f})" if gap < spread else "")
                + (f", {gap / se:.1f} standard errors of the difference (±{se:.2f} from the seeds' spread)"
                   if se else "")
                + closest_recipe(b, d, ft) + " (the recipes tried: docs/TRAINING.md)")
            if n < len(seeds):
                note = (note + "; " if note else "") + f"provisional: {len(seeds) - n} seed(s) missing"
            else:
                cell_leads[(b, d)] = gap
            goals.append(Goal("accuracy", name, "<= 0 points", measured, status(gap <= 0), note))
        pb, cl = accs(b, "gtsrb", DEFAULT_RECIPE), accs(b, "gtsrb", "classifier")
        name = f"{DEFAULT_RECIPE} over classifier-only, {b} on GTSRB"
        if pb and cl:
            gain = statistics.mean(pb) - statistics.mean(cl)
            goals.append(Goal("accuracy", name, f">= {GTSRB_OVER_CLASSIFIER:g} points",
                              f"{gain:+.2f} ({min(len(pb), len(cl))}/{len(seeds)} seeds)",
                              status(gain >= GTSRB_OVER_CLASSIFIER),
                              "" if gain >= GTSRB_OVER_CLASSIFIER else "the mask did not learn enough on this budget"))
        else:
            need = sum(estimate_seconds(known, b, "gtsrb", v) or 0.0
                       for v in (DEFAULT_RECIPE, "classifier") for s in seeds if (b, "gtsrb", v, s) not in cells)
            goals.append(Goal("accuracy", name, f">= {GTSRB_OVER_CLASSIFIER:g} points", "-", "not measured",
                              hours(need or None)))
    # the paper quotes its gap to fine-tuning as an average over tasks: the same figure over the grid's cells
    grid_cells = [(b, d) for b in ACC_BACKBONES for d in ACC_DATASETS]
    name = f"{DEFAULT_RECIPE} vs fine-tune, the strongest fine-tune's lead averaged over the {len(grid_cells)} cells"
    if all(c in cell_leads for c in grid_cells):
        mean_lead = points_difference(statistics.mean(cell_leads[c] for c in grid_cells), 0.0)
        per_backbone = ", ".join(f"{b} {statistics.mean(cell_leads[(b, d)] for d in ACC_DATASETS):+.2f}"
                                 for b in ACC_BACKBONES)
        goals.append(Goal("accuracy", name, "<= 0 points", f"{mean_lead:+.2f} (per backbone: {per_backbone})",
                          status(mean_lead <= 0), "" if mean_lead <= 0 else "fine-tuning leads on " + ", ".join(
                              f"{b} / {d} ({cell_leads[(b, d)]:+.2f})" for b, d in grid_cells if cell_leads[(b, d)] > 0)
                          + ": their rows above say what was tried"))
    else:
        goals.append(Goal("accuracy", name, "<= 0 points", "-", "not measured",
                          "needs every seed of the default recipe and fine-tuning in each cell"))
    full = sum(1 for k in cells if k[0] in ACC_BACKBONES and k[1] in ACC_DATASETS and k[2] in ACC_VARIANTS
               and k[3] in ACC_SEEDS)
    grid = len(ACC_BACKBONES) * len(ACC_DATASETS) * len(ACC_VARIANTS) * len(ACC_SEEDS)
    goals.append(Goal("accuracy", f"{len(ACC_SEEDS)} seeds for every backbone, dataset and method", f"{grid} runs",
                      f"{full}/{grid} runs", "met" if full == grid else "not measured",
                      "" if full == grid else hours(remaining if not unknown else None) + " (`make bench`)"))
    for b in backbones:
        r = base.get(b)
        goals.append(Goal("accuracy", f"base task (CIFAR-10) bitwise unchanged after packing, {b}",
                          "identical logits", "-" if r is None else f"bitwise identical: {r['bitwise_identical']}",
                          status(None if r is None else r["bitwise_identical"]),
                          "" if r else "checked by bench_accuracy.py once every run of the backbone finished"))
    return "\n".join(text) + "\n", goals, cells


def _plot_accuracy(summary: list[dict], path: Path) -> None:
    """The same chart as tools/bench_accuracy.py draws, from partial results."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_accuracy import plot

    plot([{"backbone": s["backbone"], "dataset": s["dataset"], "variant": s["variant"], "accuracy_mean": s["mean"],
           "accuracy_std": s["std"]} for s in summary], path)


def _plot_frontier(summary: list[dict], path: Path) -> bool:
    """The frontier chart tools/bench_accuracy.py draws, from its accuracy.json summary; False when it has none
    of the chart's recipes (it draws the `--frontier` ones)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_accuracy import FRONTIER, plot_frontier

    if not any(s["variant"] in FRONTIER for s in summary):
        return False
    plot_frontier(summary, path)
    return True


def density_plot(bundle: Path, png: Path) -> Path | None:
    """`pbexport info BUNDLE --plot PNG` (the CLI), None when it fails (no masked task, damaged bundle)."""
    if not (bundle / "manifest.json").exists():
        return None
    exe = Path(sys.executable).parent / "pbexport"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pbexport"]
    png.parent.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([*cmd, "info", str(bundle), "--plot", str(png)], capture_output=True, text=True)
    return png if out.returncode == 0 and png.exists() else None


# ----------------------------------------------------------------------------- storage
def bundle_rows(info: dict) -> list[dict]:
    rows = []
    for name, t in info["tasks"].items():
        h = t["entropy_bits_per_param"]
        bound = None if h is None or not t["masked_params"] else BITS_SLOPE * h + BITS_OFFSET
        stored = t["stored_bits_per_param"] if t["masked_params"] else None
        ok = None if stored is None else (stored <= bound and stored <= BITS_MAX)
        rows.append({"task": name, "method": t["method"], "train_bn": t["train_bn"], "density": t["density"],
                     "stored": stored, "entropy": h if t["masked_params"] else None, "bound": bound, "ok": ok,
                     "size": t["size"], "mask_bytes": t["mask_bytes"], "param_bytes": t["param_bytes"],
                     "header": t["size"] - t["mask_bytes"] - t["param_bytes"]})
    return rows


THREE_TASK = "three-task.json"  # the 3-task bundle's measurement, for when the runs' weights are gone


def three_task_bundle(cells: dict, results: Path) -> tuple[dict | None, list[str], str]:
    """Pack 3 finished cifar_resnet20 mask runs into a temporary bundle; (info, task names, why not). The
    measurement is kept in results/three-task.json and read back from there while fewer than 3 runs have
    their weights (runs restored from bench-record/ have none)."""
    order = {DEFAULT_RECIPE: 0, "piggyback": 1}
    runs = sorted((r for k, r in cells.items() if k[0] == "cifar_resnet20" and k[2] in order and r.get("run")
                   and (Path(r["run"]) / "metrics.json").exists() and has_weights(r["run"])),
                  key=lambda r: (order[r["variant"]], r["seed"], r["dataset"]))[:3]
    if len(runs) < 3:
        kept = read_json(results / THREE_TASK)
        if kept:
            return kept["info"], kept["runs"], ""
        return None, [], (f"only {len(runs)} finished cifar_resnet20 mask runs with weights under "
                          "bench-out/accuracy/runs")
    from pbexport import PbexportError, load_bundle, pack_runs

    with tempfile.TemporaryDirectory(prefix="bench-3task-") as tmp:
        try:
            pack_runs([r["run"] for r in runs], Path(tmp) / "bundle")
        except PbexportError as exc:  # a run directory that is not a finished pbexport run: say so, go on
            return None, [], f"packing 3 cifar_resnet20 mask runs failed: {exc}"
        info = load_bundle(Path(tmp) / "bundle").info()
    for task in info["tasks"].values():
        task.pop("layers", None)
    atomic_write_json(results / THREE_TASK, {"info": info, "runs": [r["run"] for r in runs]})
    return info, [r["run"] for r in runs], ""


def _budget(info: dict) -> int:
    """Backbone file + per task: 1 bit per masked parameter (masked tasks) + its dense tensors (head, BN)."""
    masked = info["backbone"]["masked_params"]
    return info["backbone"]["size"] + sum((math.ceil(masked / 8) if t["masked_params"] else 0) + t["param_bytes"]
                                          for t in info["tasks"].values())


def recorded_info(bundle: Path) -> Path:
    """Where tools/bench_record.py keeps a bundle's info (`pbexport info` without the per-layer tables)."""
    return bundle.with_name(bundle.name + ".info.json")


def bundle_sources(results: Path) -> list[Path]:
    """The bundles the storage section reads: those on disk, and those whose info alone was restored from
    bench-record/ (their bundle gone with an old checkout)."""
    places = [sorted((results / "accuracy" / "bundles").glob("*")), sorted(results.glob("int8/bundle-*"))]
    candidates = [p.with_name(p.name.removesuffix(".info.json")) if p.name.endswith(".info.json") else p
                  for paths in places for p in paths]
    return list(dict.fromkeys(b for b in candidates if (b / "manifest.json").exists() or recorded_info(b).is_file()))


def section_storage(results: Path, cells: dict, img_dir: Path, out_dir: Path) -> tuple[str, list[Goal]]:
    bundles = bundle_sources(results)
    text = ["## Storage: stored mask bits vs entropy",
            "",
            "Read from the bundle files with `pbexport.load_bundle(path).info()`: per task, stored mask bits per "
            f"masked parameter against the masks' Shannon entropy H (per tensor, from its density) and the bound "
            f"{BITS_SLOPE} x H + {BITS_OFFSET} (also never above {BITS_MAX} bits); the task file split into masks, "
            "dense tensors (head + per-task BN) and header.",
            ""]
    goals = []
    if not bundles:
        text += [f"Not measured: no bundle under `{results}/accuracy/bundles/` or `{results}/int8/`.", ""]
        goals.append(Goal("storage", f"stored bits/param <= {BITS_SLOPE} x H + {BITS_OFFSET} and <= {BITS_MAX}",
                          "every masked task", "-", "not measured", "run bench_accuracy.py or bench_int8.py"))
    from pbexport import load_bundle

    for b in bundles:
        live = (b / "manifest.json").exists()
        try:
            info = load_bundle(b).info() if live else json.loads(recorded_info(b).read_text())
            if live and recorded_info(b).is_file():  # a newer checkout's bundle lacks the tasks measured before
                info = merge_recorded_tasks(info, json.loads(recorded_info(b).read_text()))
        except Exception as exc:  # a bundle being rewritten, or damaged: report, do not guess
            text += [f"`{b}`: cannot be read ({exc}).", ""]
            continue
        rows = bundle_rows(info)
        origin = "bench_accuracy.py" if "accuracy" in b.parts else "bench_int8.py"
        when = mtime(b / "manifest.json") if live else f"{mtime(recorded_info(b))}, as recorded: the bundle is gone"
        if info.get(CARRIED):
            when += (f"; {len(info[CARRIED])} of its tasks as recorded from an earlier checkout's bundle, whose "
                     "runs have no weights here")
        text += [f"### {info['backbone']['name']}: `{b}` ({origin}, {when})", "",
                 f"Backbone file {info['backbone']['size']:,} B, {info['backbone']['masked_params']:,} masked "
                 f"parameters (1 bit each = {math.ceil(info['backbone']['masked_params'] / 8):,} B); manifest "
                 f"{info['manifest_size']:,} B; bundle total {info['total_size']:,} B against backbone + "
                 f"{len(rows)} x (1 bit per masked parameter + head + BN) = {_budget(info):,} B "
                 f"({'within' if info['total_size'] <= _budget(info) else 'OVER'}).", "",
                 table(["task", "method", "per-task BN", "density", "stored bits/param", "entropy bits/param",
                        f"{BITS_SLOPE}H+{BITS_OFFSET}", "within bound", "file B", "masks B", "head+BN B", "header B"],
                       [[r["task"], r["method"], r["train_bn"], r["density"], r["stored"], r["entropy"], r["bound"],
                         "-" if r["ok"] is None else ("yes" if r["ok"] else "NO"), r["size"], r["mask_bytes"],
                         r["param_bytes"], r["header"]] for r in rows], spec=".4f"), ""]
        place = b.parent.name if origin == "bench_int8.py" else "accuracy"
        png = density_plot(b, img_dir / f"mask-density-{place}-{info['backbone']['name']}.png") if live else None
        if png:
            text += [f"Per-layer mask density (`pbexport info {b} --plot {rel(png, out_dir)}`):", "",
                     f"![per-layer mask density, {info['backbone']['name']}]({rel(png, out_dir)})", ""]
        masked = [r for r in rows if r["ok"] is not None]
        if masked:
            worst = max(masked, key=lambda r: r["stored"] - r["bound"])
            top = max(r["stored"] for r in masked)
            ok = all(r["ok"] for r in masked)
            goals.append(Goal("storage", f"stored bits/param <= {BITS_SLOPE} x H + {BITS_OFFSET} and <= {BITS_MAX}, "
                                         f"{info['backbone']['name']} bundle ({origin}, {len(masked)} masked tasks)",
                              "every masked task",
                              f"closest: {worst['task']} {worst['stored']:.4f} vs bound {worst['bound']:.4f}; "
                              f"max {top:.4f} bits", status(ok),
                              "" if ok else "a mask tensor the per-tensor codecs (raw, Rice, zstd) cannot code "
                                            "near its entropy; see tools/measure_codecs.py"))
    # the 3-task budget
    goal = "3-task cifar_resnet20 bundle <= backbone + 3 x (1 bit/masked param + head + BN)"
    info, runs, why = three_task_bundle(cells, results)
    text += ["### 3-task cifar_resnet20 bundle", ""]
    if info is None:
        text += [f"Not measured: {why}.", ""]
        goals.append(Goal("storage", goal, "total <= budget", "-", "not measured",
                          why + "; comes with bench_accuracy.py's cifar_resnet20 runs"))
    else:
        budget = _budget(info)
        total = info["total_size"]
        text += ["Packed by this script into a temporary bundle from 3 finished accuracy runs "
                 f"({', '.join(f'`{r}`' for r in runs)}); the bundle total includes the manifest.", "",
                 table(["backbone B", "tasks B", "manifest B", "bundle total B", "budget B", "spare B", "met"],
                       [[info["backbone"]["size"], sum(t["size"] for t in info["tasks"].values()),
                         info["manifest_size"], total, budget, budget - total,
                         "yes" if total <= budget else "NO"]]), ""]
        goals.append(Goal("storage", goal, "total <= budget", f"{total:,} B vs {budget:,} B "
                          f"({budget - total:+,} B spare)", status(total <= budget),
                          "" if total <= budget else "task headers or a mask coded above 1 bit/param"))
    text.append(code("python tools/bench_accuracy.py      # writes bench-out/accuracy/bundles/<backbone>\n"
                     "python tools/bench_int8.py          # writes bench-out/int8/bundle-cifar_resnet56\n"
                     "pbexport info BUNDLE                # the same figures per task and per layer\n"
                     "python tools/write_benchmarks.py    # this table and the 3-task bundle"))
    return "\n".join(text) + "\n", goals


# ----------------------------------------------------------------------------- storage frontier
def _recipe(run: str | None) -> str:
    config = (read_json(Path(run) / "config.json") or {}).get("config", {}) if run else {}
    if not config:
        return "?"
    bn_lr = config.get("lr_bn") or config.get("lr_head")  # configs without lr_bn trained BN at the head lr
    bn = f", BN lr {bn_lr_text(bn_lr)}" if bn_lr != config.get("lr_head") else ""
    return (f"mask lr {config.get('lr_mask'):g}, mask decay {config.get('mask_decay', 0.0):g}, "
            f"augment {config.get('augment')}, head lr {config.get('lr_head'):g}{bn}, {config.get('epochs')} epochs, "
            # configs without val_split had the random split
            f"validation {config.get('val_fraction'):g} {config.get('val_split', 'random')}"
            + (f", mean of the last {config['average_epochs']} epochs" if config.get("average_epochs") else "")
            + (f", the mask waits {config['warmup_epochs']} epoch{'s' if config['warmup_epochs'] > 1 else ''}"
               if config.get("warmup_epochs") else "")
            # configs without mask_eps had Adam's default
            + (f", mask eps {config['mask_eps']:g}" if config.get("mask_eps", 1e-8) != 1e-8 else ""))


def _frontier_note(here: list[dict], ft: dict, fine_tunes: set[str]) -> str:
    """Why the frontier goal is missed on one (backbone, dataset): the best recipe tried within the bit budget."""
    within = [s for s in here if s["variant"] not in fine_tunes and s["stored_bits_per_param"] is not None
              and s["stored_bits_per_param"] <= FRONTIER_BITS]
    if not within:
        return (f"no recipe tried here stores in <= {FRONTIER_BITS} bits; the decay recipes "
                "(`--mask-decay`) are the lever (docs/TRAINING.md)")
    # one seed's score is no mean over three: the best among the recipes run on the most seeds
    most = max(s["seeds"] for s in within)
    best = max((s for s in within if s["seeds"] == most), key=lambda s: s["accuracy_mean"])
    gap = lead(ft["accuracy_mean"], best["accuracy_mean"])
    found = (f"{best['variant']}, {best['stored_bits_per_param']:.3f} bits, fine-tune lead {gap:+.2f} "
             f"({best['seeds']} seed(s))")
    if gap <= 0:
        return (f"reached by a recipe beside the default: {found}; the default is chosen on every backbone and "
                "dataset together (docs/TRAINING.md)")
    return (f"best recipe within {FRONTIER_BITS} bits: {found}. Would close it: a recipe that scores higher at "
            "the same storage, made the default once it holds on every backbone and dataset (docs/TRAINING.md)")


def section_frontier(results: Path, cells: dict, img_dir: Path, out_dir: Path) -> tuple[str, list[Goal]]:
    """Accuracy against stored bits per masked parameter, for the default recipe and the recipes beside it."""
    acc = read_json(results / "accuracy" / "accuracy.json") or {}
    fine_tunes = finetune_variants(cells)
    summary = [s for s in acc.get("summary", []) if s["variant"] in (DEFAULT_RECIPE, *fine_tunes)
               or s["variant"].startswith(FRONTIER_PREFIX)]
    text = ["## Accuracy against storage (the frontier)",
            "",
            "`piggyback-bn` is the default recipe; the `piggyback-bn-*` rows are the same recipe with another mask "
            "learning rate, mask decay, head or BN learning rate, augmentation, epoch count or validation split "
            "(`--lr-mask`, `--mask-decay`, `--lr-head`, `--lr-bn`, `--augment`, `--epochs`, `--val-fraction`, "
            "`--val-split`; the settings column says which), trained by `tools/bench_accuracy.py --frontier` and "
            "`--variants`. Stored bits per masked parameter are what the "
            f"bundle's mask codec wrote. Goal: fine-tune accuracy at <= {FRONTIER_BITS} stored bits per parameter "
            "per task.",
            ""]
    goals = []
    # every (backbone, dataset) whose default-recipe masks were packed, once any frontier recipe was run
    tried = any(s["variant"].startswith(FRONTIER_PREFIX) for s in summary)
    keys = sorted({(s["backbone"], s["dataset"]) for s in summary
                   if tried and s["variant"] == DEFAULT_RECIPE and s["stored_bits_per_param"] is not None})
    if not keys:
        text += ["Not measured: no `--frontier` run in `bench-out/accuracy/accuracy.json`.", ""]
        goals.append(Goal("storage frontier", f"fine-tune accuracy at <= {FRONTIER_BITS} stored bits/param",
                          "default recipe", "-", "not measured", "python tools/bench_accuracy.py --frontier"))
        return "\n".join(text) + "\n", goals
    rows = []
    for key in keys:
        here = [s for s in summary if (s["backbone"], s["dataset"]) == key]
        fts = [s for s in here if s["variant"] in fine_tunes]
        ft = max(fts, key=lambda s: s["accuracy_mean"]) if fts else None  # fine-tuning at its better augmentation
        for s in sorted((s for s in here if s["variant"] not in fine_tunes),
                        key=lambda s: s["stored_bits_per_param"] or 0):
            run = next((r["run"] for r in acc["rows"] if (r["backbone"], r["dataset"], r["variant"]) ==
                        (*key, s["variant"])), None)
            rows.append([key[0], key[1], s["variant"], _recipe(run), s["seeds"], s["accuracy_mean"], s["accuracy_std"],
                         lead(ft["accuracy_mean"], s["accuracy_mean"]) if ft else None, s["stored_bits_per_param"],
                         s["mask_density"]])
        default = next((s for s in here if s["variant"] == DEFAULT_RECIPE), None)
        if default and ft and default["stored_bits_per_param"] is not None:
            gap = lead(ft["accuracy_mean"], default["accuracy_mean"])
            bits = default["stored_bits_per_param"]
            ok = gap <= 0 and bits <= FRONTIER_BITS
            goals.append(Goal("storage frontier", f"default recipe at fine-tune accuracy with <= {FRONTIER_BITS} "
                              f"stored bits/param, {key[0]} on {key[1]}", f"lead <= 0 at <= {FRONTIER_BITS} bits",
                              f"{bits:.3f} bits, fine-tune lead {gap:+.2f} ({default['seeds']} vs {ft['seeds']} "
                              "seeds)", status(ok), "" if ok else _frontier_note(here, ft, fine_tunes)))
    text += [table(["backbone", "dataset", "recipe", "settings", "seeds", "test top-1 %", "± std", "fine-tune lead",
                    "stored bits/param", "mask density"], rows), ""]
    copies = sorted({k[2] for k, r in cells.items() if r.get("copied")})
    if copies:
        text += [f"{', '.join(f'`{v}`' for v in copies)}: each run is one of the two candidates `{DEFAULT_RECIPE}` "
                 "trained for the same cell and seed (the same settings; only the task name differs), so "
                 "`tools/bench_accuracy.py` copied it instead of training it again (`copied_from` in its "
                 "`metrics.json`).", ""]
    png = results / "accuracy" / "frontier.png"
    target = img_dir / "frontier.png"
    img_dir.mkdir(parents=True, exist_ok=True)
    if png.exists():
        shutil.copyfile(png, target)
    drawn = png.exists() or (keys and _plot_frontier(acc["summary"], target))  # bench-record/ keeps no charts
    if drawn:
        text += [f"![test accuracy against stored bits per masked parameter]({rel(target, out_dir)})", ""]
    text.append(code("python tools/bench_accuracy.py --backbones cifar_resnet20 --frontier   # adds the frontier "
                     "recipes (seed 0) to the accuracy runs"))
    return "\n".join(text) + "\n", goals


# ----------------------------------------------------------------------------- selection
def section_selection(results: Path) -> str:
    """What choosing otherwise on the validation split would do to the fine-tune leads (no goal of its own)."""
    text = ["## Choices on the validation split",
            "",
            "Each run keeps the epoch with the best validation accuracy (earliest on a tie), and the default "
            "recipe keeps the per-task BN lr whose run scores best on validation (accuracy, then loss). "
            "`tools/selection_study.py` recomputes the fine-tune leads of the accuracy benchmark under other epoch "
            "rules, applied to every method alike (the default's BN lr is chosen again under each), and, with "
            "`--choose`, with a recipe chosen per task and seed on validation, from the checkpoints the runs "
            "kept (their validation loss is evaluated afresh; no training). A lead <= 0 is the accuracy goal.",
            ""]
    files = result_files(results, "selection", "rules")
    if not files:
        return not_measured(text, "selection*.json", NEEDS_CHECKPOINTS)
    for path, d in files:
        choose = d.get("choose") or []
        cmd = f"python tools/selection_study.py --seeds {d['seeds']}" + \
            (f" --choose {' '.join(choose)}" if choose else "") + \
            (f" --out {path}" if path.name != "selection.json" else "")
        text += [f"### `{path.name}` ({mtime(path)})", ""]
        if not choose:
            rows = [[rule, cell, c["accuracy"], f"{c['finetune']} {c['finetune_accuracy']:.2f}", c["lead"]]
                    for rule, r in d["rules"].items() for cell, c in r["cells"].items()]
            rows += [[rule, "mean over the cells", None, "", r["mean_lead"]] for rule, r in d["rules"].items()]
            text += [table(["epoch kept", "backbone/dataset", f"{d['recipe']} %", "strongest fine-tune %",
                            "fine-tune lead"], rows), ""]
        else:
            rows = [[cell, ", ".join(c["chosen"]), c["accuracy"], c["finetune_accuracy"], c["lead"]]
                    for cell, c in d["choice"].items()]
            rows.append(["mean over the cells", "", None, None, d.get("choice_mean_lead")])
            text += [f"A recipe chosen per task and seed among {', '.join(f'`{v}`' for v in choose)}, by the "
                     "validation accuracy of its kept epoch (then its validation loss):", "",
                     table(["backbone/dataset", "chosen (seed 0, 1, ...)", "test top-1 %", "strongest fine-tune %",
                            "fine-tune lead"], rows), ""]
        text += [code(cmd), ""]
    return "\n".join(text)


# ----------------------------------------------------------------------------- validation splits
def section_splits(results: Path) -> str:
    """How many validation images have a near copy among the training images, per split (no goal of its own)."""
    text = ["## Validation splits",
            "",
            "The validation split picks each run's epoch and the default's per-task BN lr, standing in for test. "
            "`tools/split_study.py` counts the validation images, and the test images, with a near copy (same "
            "class, cosine similarity of 16x16 thumbnails above the threshold) among the images the run trains on, "
            "for each `--val-split`: a split stands in for test where its share matches test's. No training.",
            ""]
    path = results / "splits.json"
    d = read_result(path, "datasets")
    if d is None:
        return not_measured(text, path.name)
    cmd = (f"python tools/split_study.py --val-fraction {d['val_fraction']} --seeds {d['seeds']} "
           f"--threshold {d['threshold']}")
    text += [f"`{path.name}` ({mtime(path)}), validation fraction {d['val_fraction']}, threshold {d['threshold']}:", "",
             table(SPLIT_HEADERS, split_rows(d["datasets"]), ".1f"),
             "", code(cmd), ""]
    return "\n".join(text)


# ----------------------------------------------------------------------------- after training
def section_posthoc(results: Path) -> str:
    """What levers applied after training would do to the fine-tune leads (no goal of its own)."""
    text = ["## Levers after training",
            "",
            "`tools/posthoc_study.py` applies each lever alike to the default's BN-lr candidates and to every "
            "fine-tune, chooses the default's BN lr again on validation under it, and recomputes the fine-tune "
            "leads, from the models and checkpoints the accuracy runs kept (no training): BN statistics "
            "recomputed as a plain average over the training split (with and without the training's shifts), the "
            "last epochs' states averaged instead of the best epoch kept, and the BN-lr choice made on the "
            "validation images under a grid of the training's shifts. A lead <= 0 is the accuracy goal.",
            ""]
    path = results / "posthoc.json"
    d = read_result(path, "levers")
    if d is None:
        return not_measured(text, path.name, NEEDS_CHECKPOINTS)
    rows = [[lever, cell, c["accuracy"], f"{c['finetune']} {c['finetune_accuracy']:.2f}", c["lead"]]
            for lever, r in d["levers"].items() for cell, c in r["cells"].items()]
    rows += [[lever, "mean over the cells", None, "", r["mean_lead"]] for lever, r in d["levers"].items()]
    cmd = f"python tools/posthoc_study.py --seeds {d['seeds']}" + \
        (f" --backbones {' '.join(d['backbones'])}" if d.get("backbones") else "")
    text += [f"`{path.name}` ({mtime(path)}):", "",
             table(["lever", "backbone/dataset", f"{d['recipe']} %", "strongest fine-tune %", "fine-tune lead"], rows),
             "", code(cmd), ""]
    return "\n".join(text)


# ----------------------------------------------------------------------------- export
def export_command(path: Path, d: dict) -> str:
    r = d["results"]
    tasks = sorted(int(n) for n in r[0]["by_tasks"])
    return (f"python tools/bench_export.py --backbones {' '.join(x['backbone'] for x in r)} "
            f"--sizes {' '.join(str(x['input_size']) for x in r)} --tasks {' '.join(map(str, tasks))} "
            f"--threads {d['threads']} --clock {d['clock']} --repeats {d['repeats']} --out {path}")


def export_plot(files: list[tuple[Path, dict]], png: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    modes = ["baked", "shared", "multitask (adapter)", "multitask (inputs)", "multitask nchwc (adapter)",
             "multitask nchwc (weights)"]
    grid = [[(p, d, r) for r in d["results"] if r.get("latency")] for p, d in files]
    modes = [m for m in modes if any(m in r["latency"]["1"] for row in grid for _, _, r in row)]
    grid = [row for row in grid if row]
    if not grid:
        return None
    cols = max(len(row) for row in grid)
    fig, axes = plt.subplots(len(grid), cols, figsize=(5.2 * cols, 3.4 * len(grid)), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    panels = [(axes[i][j], *cell) for i, row in enumerate(grid) for j, cell in enumerate(row)]
    for ax, p, d, r in panels:
        ax.set_visible(True)
        lat = r["latency"]
        x = range(len(modes))
        for i, batch in enumerate(sorted(lat, key=int)):
            vals = [lat[batch][m]["x_plain"] if m in lat[batch] else 0 for m in modes]
            ax.bar([j + 0.38 * i for j in x], vals, 0.38, label=f"batch {batch}")
        ax.axhline(1.0, color="black", lw=0.8)
        for j, m in enumerate(modes):
            for i, t in enumerate(EXPORT_TARGETS[m]):
                ax.plot([j + 0.38 * i - 0.19, j + 0.38 * i + 0.19], [t, t], color="red", lw=1.2)
        ax.set_xticks([j + 0.19 for j in x], [m.replace(" (", "\n(").replace(" nchwc", "\nnchwc") for m in modes],
                      fontsize=6)
        ax.set_ylabel("latency / plain backbone")
        ax.set_title(f"{r['backbone']} @{r['input_size']}: {p.name}, {d['clock']} clock, {d['threads']} thread(s)",
                     fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("export latency vs the plain backbone graph (red: goal)", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _multitask_note(lat: dict, t: tuple[float, float]) -> str:
    """Why the portable multitask graph misses its latency goal, from the figures beside it."""
    mode = "multitask (adapter)"
    inp = lat["1"]["multitask (inputs)"]["x_plain"], lat["32"]["multitask (inputs)"]["x_plain"]
    nn = lat["1"][mode]["x_plain_no_nchwc"], lat["32"][mode]["x_plain_no_nchwc"]
    fast = lat["1"]["plain (no NCHWc)"]["x_plain"], lat["32"]["plain (no NCHWc)"]["x_plain"]
    note = (f"onnxruntime's NchwcTransformer moves only convs with constant weights to its NCHWc kernels, and the "
            f"multitask graph's weights are computed from fed tensors; NCHWc makes the plain graph {fast[0]:.2f}x / "
            f"{fast[1]:.2f}x faster here. Against the plain graph without NCHWc (same conv kernels) multitask is "
            f"{nn[0]:.2f} / {nn[1]:.2f}x (tensors fed as inputs: {inp[0]:.2f} / {inp[1]:.2f}x plain). "
            + ("So against the same kernels the in-graph unpack is within the batch-32 target; the miss is the lost "
               "NCHWc kernels. " if nn[1] <= t[1] else ""))
    if "multitask nchwc (adapter)" in lat["1"]:
        b = lat["1"]["multitask nchwc (adapter)"]["x_plain"], lat["32"]["multitask nchwc (adapter)"]["x_plain"]
        return note + (f"`--nchwc-block` does the transformer's work at export (next row): {b[0]:.2f} / {b[1]:.2f}x, "
                       "on x86 CPUs of one block size; the portable graph stays the default, since it runs anywhere "
                       "(GPU, ARM, either block size)")
    return note + ("Would close it: the convs on NCHWc kernels with computed weights (`--nchwc-block`); meanwhile "
                   "shared mode runs at the plain graph's speed (its unpack is folded at load)")


def _nchwc_note(lat: dict, t: tuple[float, float], ops: dict | None, masked: int) -> str:
    """Why the NCHWc multitask graph misses its latency goal: what is left is the per-run unpack."""
    mode = "multitask nchwc (adapter)"
    b1, b32 = lat["1"][mode]["x_plain"], lat["32"][mode]["x_plain"]
    plain_ms, ms = 1e3 * lat["1"]["plain"]["median_s"], 1e3 * lat["1"][mode]["median_s"]
    parts = []
    if b32 <= t[1]:
        parts.append(f"batch 32 is within its target ({b32:.2f}x): on the same kernels as the plain graph, the "
                     "per-run unpack is small next to 32 images' convolutions")
    if b1 > t[0]:
        nodes = f" in {ops['unpack']} nodes (the whole plain graph runs {ops['plain']})" if ops else ""
        weights = lat["1"].get("multitask nchwc (weights)")
        parts.append(f"batch 1 takes {ms - plain_ms:.2f} ms more than the plain graph's {plain_ms:.2f} ms: every run "
                     f"unpacks the task's {masked / 1e6:.1f}M mask bits into weights{nodes}. "
                     + (f"Unpacking once per task switch instead (the runtime's feed=\"weights\", next row) runs at "
                        f"{weights['x_plain']:.2f}x at batch 1" if weights else
                        "Would close it: unpacking once per task switch instead of every run"))
    return "; ".join(parts)


def section_export(results: Path, img_dir: Path, out_dir: Path) -> tuple[str, list[Goal]]:
    files = result_files(results, "export", "results")
    text = ["## Export: latency, disk, session creation and memory per mode",
            "",
            "Per backbone: tiny tasks (1 step on random images) packed and exported in the three modes plus the plain "
            "backbone graph. Latency: onnxruntime on the CPU, every session created up front and run in interleaved "
            "rounds, each in a fresh random order, each graph's turn after a pause (the previous session's "
            "spinning threads go idle; its length per file below) and two untimed runs; median per graph, and "
            "\"x plain\" = median over rounds of (graph time / plain graph time in the same round). \"x no-NCHWc\" "
            "compares with the plain graph run without onnxruntime's NCHWc convolutions (the kernels the portable "
            "multitask graph can use). \"multitask nchwc\": the multitask graph exported with `--nchwc-block` for "
            "the machine's block size (`nchwc_block` below), its convolutions on those kernels "
            "(pbexport/export/nchwc.py). \"(weights)\": the runtime's feed=\"weights\", the task's weights computed "
            "once by the export's unpack.onnx and each run on its body.onnx (the graph after the weights). Disk: "
            "bytes on disk of each mode's files. Memory and session creation: each mode's N tasks loaded at once in a "
            "fresh process.",
            ""]
    goals = []
    if not files:
        text += ["Not measured: no `export.json`.", "", code("python tools/bench_export.py")]
        for mode in ("baked", "shared", "multitask"):
            goals.append(Goal("export", f"{mode} latency vs plain", "-", "-", "not measured", "run bench_export.py"))
        goals.append(Goal("export", "shared-mode disk for 10 tasks", "-", "-", "not measured", "run bench_export.py"))
        return "\n".join(text) + "\n", goals
    primary = files[0]
    secondary = {}  # backbone -> latency of the other files, quoted next to the primary's
    for p, d in files:
        # results written before bench_export recorded its pause used 50 ms
        pause = f"{d.get('settle_s', 0.05) * 1000:g} ms pause"
        load = " ".join(f"{x:.2f}" for x in d.get("loadavg", []))
        text += [f"### `{p.name}`: {d['threads']} thread(s), {d['clock']} clock, {d['repeats']} rounds at batch 1, "
                 f"{pause} (measured {mtime(p)}, load average {load})", ""]
        for r in d["results"]:
            block = f", NCHWc block size {r['nchwc_block']}" if r.get("nchwc_block") else ""
            text += [f"**{r['backbone']} @{r['input_size']}**: {r['masked_params']:,} masked parameters, plain graph "
                     f"{r['plain_bytes']:,} B{block}.", ""]
            lat = r.get("latency")
            if lat:
                if p != primary[0]:
                    secondary.setdefault(r["backbone"], []).append((p, d, lat))
                rows = []
                for mode in lat["1"]:
                    b1, b32 = lat["1"][mode], lat.get("32", {}).get(mode)
                    t = EXPORT_TARGETS.get(mode)
                    met = "-" if t is None or b32 is None else (
                        "yes" if b1["x_plain"] <= t[0] and b32["x_plain"] <= t[1] else "NO")
                    rows.append([mode, 1e3 * b1["median_s"], b1["x_plain"], b1["x_plain_no_nchwc"],
                                 None if b32 is None else 1e3 * b32["median_s"],
                                 None if b32 is None else b32["x_plain"],
                                 None if b32 is None else b32["x_plain_no_nchwc"],
                                 "-" if t is None else f"{t[0]} / {t[1]}", met])
                text += [table(["graph", "b1 ms", "b1 x plain", "b1 x no-NCHWc", "b32 ms", "b32 x plain",
                                "b32 x no-NCHWc", "target b1 / b32", "met"], rows, spec=".3f"), ""]
            rows, mem = [], []
            for n, e in sorted(r["by_tasks"].items(), key=lambda kv: int(kv[0])):
                dk = e["disk"]
                rows.append([int(n), dk["baked"], dk["shared"], dk["multitask"], int(e["shared_bound"]),
                             "yes" if dk["shared"] <= e["shared_bound"] else "NO", e["head_bytes"]])
                for mode, m in e["memory"].items():
                    first = m["create_s"][0]
                    per = m["create_s"][1:] if mode == "multitask" else m["create_s"]
                    mem.append([int(n), mode, m["rss_bytes"] / 2**20, 1e3 * first,
                                1e3 * statistics.median(per) if per else None, 1e3 * sum(m["create_s"])])
            text += ["Disk (bytes; shared bound = backbone data + N x 1.1 bit per masked parameter + the tasks' heads "
                     "and BN):", "",
                     table(["tasks", "baked B", "shared B", "multitask B", "shared bound B", "shared <= bound",
                            "heads + BN B"], rows), "",
                     "Session creation and resident memory with all N tasks loaded (multitask: one session, then one "
                     "adapter per task):", "",
                     table(["tasks", "mode", "RSS MiB", "first session ms", "median per task ms",
                            "total load ms"], mem, spec=".1f"), ""]
        text += [code(export_command(p, d)), ""]
    png = export_plot(files, img_dir / "export-latency.png")
    if png:
        text += [f"![export latency ratios]({rel(png, out_dir)})", ""]

    # goals, from the primary file; the other files' values quoted
    p, d = primary
    for r in d["results"]:
        lat = r.get("latency")
        b = r["backbone"]
        if not lat or "32" not in lat:
            continue
        for mode in ("baked", "shared", "multitask (adapter)", "multitask nchwc (adapter)",
                     "multitask nchwc (weights)"):
            if mode not in lat["1"]:  # nchwc: results from before --nchwc-block, or a CPU without the kernels
                continue
            t = EXPORT_TARGETS[mode]
            b1, b32 = lat["1"][mode]["x_plain"], lat["32"][mode]["x_plain"]
            ok = b1 <= t[0] and b32 <= t[1]
            measured = f"{b1:.2f} / {b32:.2f} ({d['clock']} clock, {d['threads']} thr)"
            for q, dq, lq in secondary.get(b, []):
                if mode in lq.get("1", {}) and mode in lq.get("32", {}):
                    measured += (f"; {lq['1'][mode]['x_plain']:.2f} / {lq['32'][mode]['x_plain']:.2f} "
                                 f"({dq['clock']} clock, {dq['threads']} thr, {q.name})")
            note = ""
            if mode == "multitask nchwc (weights)":
                switch = r.get("weights_switch_s", {}).get(mode)
                measured += "" if switch is None else f"; a switch to a task not cached: {1e3 * switch:.1f} ms"
                if not ok:
                    note = ("the body graph runs the plain graph's kernels on weights computed at the switch, so "
                            "the excess is timing noise or the body's own nodes; rerun with `--clock cpu --threads 1`")
            elif not ok and mode == "multitask nchwc (adapter)":
                note = _nchwc_note(lat, t, r.get("op_counts"), r["masked_params"])
            elif not ok and mode.startswith("multitask"):
                note = _multitask_note(lat, t)
            elif not ok:
                note = ("baked/shared run the plain graph's kernels (weights folded at load), so the excess is timing "
                        "noise; rerun on a quiet machine or with `--clock cpu --threads 1`")
            goals.append(Goal("export", f"{mode} latency / plain backbone, {b} @{r['input_size']}, batch 1 / 32",
                              f"<= {t[0]} / {t[1]}", measured, status(ok), note))
    for r in d["results"]:
        e = r["by_tasks"].get("10")
        if e is None:
            goals.append(Goal("export", f"shared-mode disk for 10 tasks, {r['backbone']}", "<= bound", "-",
                              "not measured", "bench_export.py --tasks ... 10"))
            continue
        ok = e["disk"]["shared"] <= e["shared_bound"]
        goals.append(Goal("export", f"shared-mode disk for 10 tasks, {r['backbone']} "
                                    "(backbone + 10 x 1.1 bit/masked param + heads)",
                          f"<= {int(e['shared_bound']):,} B", f"{e['disk']['shared']:,} B (baked: "
                          f"{e['disk']['baked']:,} B)", status(ok),
                          "" if ok else "per-task graph overhead (nodes, names) above 0.1 bit per parameter"))
        m = e["memory"]
        goals.append(Goal("export", f"session creation and resident memory, 10 tasks, {r['backbone']}", "reported",
                          "; ".join(f"{mode} {m[mode]['rss_bytes'] / 2**20:.0f} MiB, "
                                    f"{1e3 * sum(m[mode]['create_s']):.0f} ms to load"
                                    for mode in ("baked", "shared", "multitask") if mode in m), "reported"))
    return "\n".join(text) + "\n", goals


# ----------------------------------------------------------------------------- runtime
def section_runtime(results: Path) -> tuple[str, list[Goal]]:
    files = result_files(results, "runtime", "median_ms")
    text = ["## Runtime: task switching",
            "",
            "`pbexport.runtime.open_model(...).logits(x, task)`, 3 tasks; each variant either stays on one task (no "
            "switch) or moves to the next task on every run (switch); variants interleaved in rounds, medians per run. "
            "The control cycles 3 sessions of the SAME baked task: what separate weight copies cost the CPU caches "
            "without any task switch. A run within 5% of another is treated as not measurably different (medians on "
            "a shared machine scatter by a few percent: identical kernels in baked and shared differ by that much).",
            ""]
    goals = []
    if not files:
        text += ["Not measured: no `runtime.json`.", "", code("python tools/bench_runtime.py")]
        goals += [Goal("runtime", "multitask switch cost beyond feeding tensors", "not measurable", "-", "not measured",
                       "run bench_runtime.py"),
                  Goal("runtime", "shared-mode switch to a cached task", "free", "-", "not measured",
                       "run bench_runtime.py")]
        return "\n".join(text) + "\n", goals
    for i, (p, d) in enumerate(files):
        med = d["median_ms"]
        text += [f"### `{p.name}`: {d['backbone']} @{d['input_size']}, batch {d['batch']}, {d['threads']} thread(s) "
                 f"(measured {mtime(p)})", "",
                 table(["variant", "runs", "median ms"], [[k, d["runs_per_variant"].get(k), v] for k, v in med.items()]
                       + [[f"{m}, cache_size 1: switch (creates a session)", d.get("cold"), v]
                          for m, v in d["cold_switch_ms"].items()], spec=".3f"), "",
                 table(["", "ms per run"], [[f"switch cost: {k}", v] for k, v in d["switch_cost_ms"].items()]
                       + [["feeding a task's tensors (adapter) vs the graph's defaults", d["feeding_cost_ms"]]],
                       spec="+.3f"), "",
                 "Engine bookkeeping per switch to a cached task (lookup and lock, no run): "
                 + ", ".join(f"{k} {v:.1f} us" for k, v in d["bookkeeping_us"].items()) + ". Resident memory per "
                 "extra shared-mode session: " + ", ".join(
                     f"optimization {k} {(m.get('extra_session_bytes') or 0) / 2**20:.1f} MiB"
                     for k, m in d.get("memory", {}).items()) + ".", ""]
        extra = "".join(f" --{k} {d[k]}" for k in ("switches", "rounds", "cold") if k in d)
        text += [code(f"python tools/bench_runtime.py --backbone {d['backbone']} --input-size {d['input_size']} "
                      f"--batch {d['batch']} --threads {d['threads']}{extra} --out {p}"), ""]
        tag = f"{d['backbone']} @{d['input_size']}, batch {d['batch']}"
        # multitask: switching costs what staying costs
        base = med["multitask adapter (LoraAdapter): no switch"]
        cost = d["switch_cost_ms"]["multitask adapter (LoraAdapter)"]
        inputs = d["switch_cost_ms"]["multitask inputs (numpy)"]
        ok = abs(cost) <= NOISE_FRACTION * base
        goals.append(Goal("runtime", f"multitask switch: cost beyond feeding the task's tensors ({tag})",
                          f"within ±{100 * NOISE_FRACTION:.0f}% of a run",
                          f"{cost:+.3f} ms ({100 * cost / base:+.1f}% of {base:.2f} ms; inputs feed {inputs:+.3f} ms); "
                          f"feeding itself {d['feeding_cost_ms']:+.3f} ms", status(ok),
                          "" if ok else "a switch re-binds every task tensor; a per-task OrtValue cache or "
                                        "pre-bound IOBinding per task would make it a pointer swap"))
        # shared: a switch to a cached task is a lookup
        base = med["shared, cached: no switch"]
        cost = d["switch_cost_ms"]["shared, cached"]
        control = med["baked, 3 sessions of one task: cycle (control)"] - med["baked, cached: no switch"]
        book = d["bookkeeping_us"].get("shared", 0.0)
        ok = book < 0.01 * 1e3 * base and (cost <= control or abs(cost) <= NOISE_FRACTION * base)
        goals.append(Goal("runtime", f"shared-mode switch to a cached task ({tag})",
                          "free: bookkeeping < 1% of a run, extra time <= the no-switch control",
                          f"{cost:+.3f} ms ({100 * cost / base:+.1f}%); control (3 sessions of one task, no switch) "
                          f"{control:+.3f} ms; bookkeeping {book:.1f} us; cache miss "
                          f"{d['cold_switch_ms'].get('shared', float('nan')):.1f} ms", status(ok),
                          "" if ok else "the switch costs more than running separate weight copies; profile the "
                                        "engine's lookup path"))
        if i:  # the other files' goals are informative; the first file is the one the goal is judged on
            for g in goals[-2:]:
                g.area = "runtime (extra)"
    return "\n".join(text) + "\n", goals


# ----------------------------------------------------------------------------- int8
def section_int8(results: Path) -> tuple[str, list[Goal]]:
    path = results / "int8.json"
    d = read_json(path)
    text = ["## int8 quantization", ""]
    if not d:
        text += ["Not measured: no `int8.json`.", "", code("python tools/bench_int8.py")]
        return "\n".join(text) + "\n", [
            Goal("int8", "int8 size reduction", f">= {INT8_RATIO:g}x", "-", "not measured", "run bench_int8.py"),
            Goal("int8", "int8 top-1 drop", f"<= {INT8_DROP:g} point", "-", "not measured", "run bench_int8.py")]
    budget = f"{d['epochs']} epochs x {d['max_train_samples'] or 'all'} train images, seed {d['seed']}"
    recipe = f"mask lr {d['lr_mask']:g}" if "lr_mask" in d else "mask lr 1e-3, the default before 3e-4"
    recipe += f", augment {d.get('augment', 'crop')}"  # files without the key were made when crop was the default
    recipe += f", head lr {d.get('lr_head', 1e-3):g}"  # files without the key: 1e-3, the default before 1e-2
    recipe += f", BN lr {bn_lr_text(d.get('lr_bn', d.get('lr_head', 1e-3)))}"  # files without it: the head lr
    text += [f"{d['backbone']} piggyback tasks (per-task BN, {recipe}) trained {budget}, exported baked, quantized "
             "with "
             f"`pbexport.quantize.quantize_model(..., per_channel=True)` (static QDQ, uint8 activations x int8 "
             f"weights, MinMax on {d['calib_samples']} train images); accuracy on the test split ({d['eval_samples']} "
             f"images at most). Latency: onnxruntime, {d['threads']} thread(s), {d['clock']} clock, float and int8 "
             f"interleaved in rounds ({d['rounds']} at batch 1), medians; \"int8/float\" is the median of per-round "
             f"ratios. Measured {mtime(path)}.", "",
             table(["task", "float B", "int8 B", "smaller", "test images", "float top-1 %", "int8 top-1 %",
                    "drop (points)", "top-1 agree %", "b1 float ms", "b1 int8 ms", "b1 int8/float", "b32 float ms",
                    "b32 int8 ms", "b32 int8/float"],
                   [[r["task"], r["float_bytes"], r["int8_bytes"], r["size_ratio"], r["samples"],
                     100 * r["float_accuracy"], 100 * r["int8_accuracy"], r["accuracy_drop_points"],
                     100 * r["top1_agreement"], r["latency"]["1"]["float_ms"], r["latency"]["1"]["int8_ms"],
                     r["latency"]["1"]["int8_over_float"], r["latency"]["32"]["float_ms"],
                     r["latency"]["32"]["int8_ms"], r["latency"]["32"]["int8_over_float"]] for r in d["rows"]]), "",
             code(f"python tools/bench_int8.py --backbone {d['backbone']} --epochs {d['epochs']} "
                  f"--max-train-samples {d['max_train_samples'] or 0} --seed {d['seed']} --calib-samples "
                  f"{d['calib_samples']} --eval-samples {d['eval_samples']} --threads {d['threads']} --clock "
                  f"{d['clock']} --rounds {d['rounds']}"), ""]
    goals = []
    for r in d["rows"]:
        lat = r["latency"]["1"]
        goals.append(Goal("int8", f"int8 size reduction, {d['backbone']} {r['task']}", f">= {INT8_RATIO:g}x",
                          f"{r['size_ratio']:.2f}x ({r['float_bytes']:,} -> {r['int8_bytes']:,} B)",
                          status(r["size_ratio"] >= INT8_RATIO),
                          "" if r["size_ratio"] >= INT8_RATIO else "float tensors left unquantized (head, BN, "
                                                                   "biases); quantize them or drop the QDQ scales"))
        ok = r["accuracy_drop_points"] <= INT8_DROP
        goals.append(Goal("int8", f"int8 top-1 drop, {d['backbone']} {r['task']} ({r['samples']} test images)",
                          f"<= {INT8_DROP:g} point",
                          f"{r['accuracy_drop_points']:+.2f} ({100 * r['float_accuracy']:.2f}% -> "
                          f"{100 * r['int8_accuracy']:.2f}%); b1 latency {lat['float_ms']:.2f} -> "
                          f"{lat['int8_ms']:.2f} ms",
                          status(ok), "" if ok else "calibration: more calibration images, percentile/entropy "
                                                    "calibration, or keep the first conv and head in float"))
    return "\n".join(text) + "\n", goals


# ----------------------------------------------------------------------------- main
def goals_table(goals: list[Goal]) -> str:
    return table(["#", "area", "goal", "target", "measured", "status", "why missed / what would close it"],
                 [[i + 1, g.area, g.goal, g.target, g.measured, f"**{g.status}**" if g.status == "MISSED" else g.status,
                   g.note or "-"] for i, g in enumerate(goals)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("bench-out"), help="what the benchmark scripts wrote")
    p.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    p.add_argument("--img-dir", type=Path, default=Path("docs/img"), help="where the plots go (committed)")
    args = p.parse_args(argv)
    out_dir = args.out.resolve().parent
    m = machine()
    sections, goals = [], []
    text, g = section_train(args.results)
    sections.append(text)
    goals += g
    text_acc, g_acc, cells = section_accuracy(args.results, args.img_dir, out_dir, m)
    text, g = section_storage(args.results, cells, args.img_dir, out_dir)
    sections.append(text)
    goals += g
    text, g = section_frontier(args.results, cells, args.img_dir, out_dir)
    sections.append(text)
    goals += g
    text, g = section_export(args.results, args.img_dir, out_dir)
    sections.append(text)
    goals += g
    text, g = section_runtime(args.results)
    sections.append(text)
    goals += g
    text, g = section_int8(args.results)
    sections.append(text)
    goals += g
    sections.append(text_acc)
    goals += g_acc
    sections.append(section_splits(args.results))
    sections.append(section_selection(args.results))
    sections.append(section_posthoc(args.results))

    v = m["versions"]
    counts = {s: sum(1 for g in goals if g.status == s) for s in ("met", "MISSED", "not measured", "reported")}
    head = [
        "# pbexport benchmarks",
        "",
        f"Generated {m['date']} by `python tools/write_benchmarks.py` (`make bench-report`) from the result files in "
        f"`{args.results}/`; `make bench` reruns every benchmark and then this script. Every figure below comes from "
        "a result file (its own measurement date is given); one that has none is listed as not measured.",
        "",
        "Timing rules: every timing figure is a median of repeated runs, and every comparison is a ratio between "
        "variants timed side by side (interleaved rounds) in the same run, so load from other work on the machine "
        "hits both sides alike.",
        "",
        "The machine below is the one this file was generated on. `make bench-report` rewrites it from recorded "
        "results, which may have been measured on another: each section gives its results' date, and the accuracy "
        "section the CPU each run was trained on; the timing result files record their threads but not their CPU.",
        "",
        "| machine this file was generated on | |",
        "|---|---|",
        f"| date | {m['date']} |",
        f"| cores (`nproc`) | {m['nproc']} |",
        f"| CPU | {m['cpu']} |",
        f"| memory | {f(m['memory_gib'], '.1f')} GiB |",
        f"| OS | {m['os']} |",
        f"| load average when generated | {' '.join(f'{x:.2f}' for x in m['loadavg'])} |",
        f"| python | {v['python']} |",
        f"| libraries | pbexport {v['pbexport']}, torch {v['torch']}, torchvision {v['torchvision']}, "
        f"onnx {v['onnx']}, onnxscript {v['onnxscript']}, onnxruntime {v['onnxruntime']}, numpy {v['numpy']} |",
        "",
        "## Goals",
        "",
        f"{counts['met']} met, {counts['MISSED']} missed, {counts['not measured']} not measured, "
        f"{counts['reported']} reported without a target.",
        "",
        goals_table(goals),
        "",
        "Reproduce everything: `make bench` (training, export, runtime and int8 take about 25 minutes on 2 cores; "
        "the accuracy benchmark, run last, takes hours: see its section). `make bench-report` rewrites this file "
        "from existing results.",
        "",
    ]
    args.out.write_text("\n".join(head) + "\n" + "\n".join(sections))
    print(goals_table(goals))
    print(f"\n{counts} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
