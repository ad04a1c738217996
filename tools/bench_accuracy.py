"""Does a mask on a frozen backbone come close to fine-tuning? Measured with pbexport's defaults.

Every (backbone, dataset, method, seed) is trained with `pbexport.training` on the same epoch budget
and the same data; masks are packed into one bundle per backbone (which also gives the bytes each
task adds). The base task (CIFAR-10) is evaluated from the original weights and from the bundle
after all tasks were added: its logits must be bitwise identical.

    python tools/bench_accuracy.py                               # full run (hours on 2 cores)
    python tools/bench_accuracy.py --quick                       # CI-sized: fails if piggyback does
                                                                 # not beat classifier-only by --margin
    python tools/bench_accuracy.py --datasets my_task.npz --backbones cifar_resnet56

Runs are kept under --out/runs and reused when complete, so an interrupted benchmark continues. A run restored
from bench-record/ (tools/bench_record.py) is reused without its weights: it is not packed, and its bytes per
task and stored bits are the ones measured when it had them (bench-storage.json beside the run). A recipe at
a fixed BN lr that the default chooses between (piggyback-bn-head1e-2, piggyback-bn-bn3e-3) is copied from the
default's candidate of the same cell and seed, not trained again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchlib import has_weights, parse_run_dir_name, points_difference, run_dir_name
from pbexport import runs
from pbexport.backbones import load_backbone
from pbexport.bundle import load_bundle, pack_runs
from pbexport.data import ImageSet
from pbexport.errors import PbexportError
from pbexport.fileio import atomic_write_json
from pbexport.report import format_table
from pbexport.taskmodel import TaskModel
from pbexport.training import TrainConfig, evaluate, predict_logits, run_settings, train_or_reuse, train_seconds

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = {"cifar_resnet20": SHARED / "resnet_cifar10" / "resnet20-12fca82f.th",
           "cifar_resnet56": SHARED / "resnet_cifar10" / "resnet56-4bfd9763.th"}
DATASETS = {"gtsrb": SHARED / "gtsrb32.npz", "mnist": SHARED / "mnist28.npz"}
BASE_TASK = SHARED / "cifar10_test2k.npz"
# name -> TrainConfig settings on top of the defaults; "piggyback-bn" is pbexport's default recipe
VARIANTS = {"classifier": {"method": "classifier"}, "piggyback": {"method": "piggyback", "train_bn": False},
            "piggyback-bn": {"method": "piggyback"}, "finetune": {"method": "finetune"}}
# Recipes beside the default (docs/TRAINING.md), run on request (--variants) or by --frontier.
# fine-tuning without augmentation: "gap to fine-tune" compares with the strongest fine-tune
EXTRA_FINETUNE = {"finetune-none": {"method": "finetune", "augment": "none"},
                  # fine-tuning with piggyback's faster head lr: is the baseline held back by its own?
                  "finetune-head1e-2": {"method": "finetune", "lr_head": 1e-2},
                  # the backbone waits while the fresh head settles (linear probing, then fine-tuning)
                  "finetune-warm1": {"method": "finetune", "warmup_epochs": 1}}
# The storage frontier: the default recipe with another mask lr, mask decay, head or BN lr, augmentation or
# epoch count. The recipes tried around the first default (head lr 1e-3) keep that head lr, so their runs
# stay valid; the table names it. Each trains one fixed per-task BN lr (the head lr unless it names one),
# where the default chooses it per task on validation: head1e-2 is the default before it did.
HEAD_1E3 = {"lr_head": 1e-3}
FRONTIER_RECIPES = {"head1e-3": HEAD_1E3, "head3e-3": {"lr_head": 3e-3}, "head1e-2": {"lr_head": 1e-2},
                    "lr1e-3": {"lr_mask": 1e-3, **HEAD_1E3}, "lr1e-4": {"lr_mask": 1e-4, **HEAD_1E3},
                    "lr3e-4-decay1e-6": {"lr_mask": 3e-4, "mask_decay": 1e-6, **HEAD_1E3},
                    "lr1e-3-decay1e-6": {"lr_mask": 1e-3, "mask_decay": 1e-6, **HEAD_1E3},
                    "lr1e-3-decay3e-6": {"lr_mask": 1e-3, "mask_decay": 3e-6, **HEAD_1E3},
                    "lr1e-3-decay1e-5": {"lr_mask": 1e-3, "mask_decay": 1e-5, **HEAD_1E3},
                    "none": {"augment": "none", **HEAD_1E3}, "lr1e-4-head3e-3": {"lr_mask": 1e-4, "lr_head": 3e-3},
                    "ep15": {"epochs": 15, **HEAD_1E3},  # 1.5x the budget: does a longer schedule close the gap?
                    # at the default head lr 1e-2: a slower per-task BN, and a slower mask (fewer bits)
                    "bn3e-3": {"lr_bn": 3e-3}, "lr1e-4-head1e-2": {"lr_mask": 1e-4, "lr_head": 1e-2},
                    # between the two BN lrs, and a faster head beside the slower BN
                    "bn5e-3": {"lr_bn": 5e-3}, "head3e-2-bn3e-3": {"lr_head": 3e-2, "lr_bn": 3e-3},
                    # GTSRB on ResNet-20 scored higher at each faster BN lr (3e-3, 5e-3, 1e-2): faster still?
                    "bn3e-2": {"lr_bn": 3e-2},
                    # the mask waits an epoch while a fresh head and BN settle (--warmup-epochs 1): are some
                    # flips made only to make up for a random head?
                    "warm1": {"warmup_epochs": 1},
                    # Adam's eps for the scores at 1e-5: only the scores with strong gradients flip at full speed;
                    # 3e-6 for cifar_resnet56, whose score gradients are about 2.6x weaker (docs/TRAINING.md)
                    "eps1e-5": {"mask_eps": 1e-5}, "eps3e-6": {"mask_eps": 3e-6},
                    # mask lr 1e-3 beside the default head lr: the mask lr was chosen at head lr 1e-3 on seed
                    # 0 alone, whose ranking of 1e-3 and 3e-4 flipped when rebuilt on another CPU
                    "lr1e-3-head1e-2": {"lr_mask": 1e-3, "lr_head": 1e-2}}
DEFAULT_SETTINGS = TrainConfig(backbone="-", data="-", task="-")  # what piggyback-bn trains with (lr_bn auto)
FRONTIER = {f"piggyback-bn-{name}": {"method": "piggyback", "lr_bn": overrides.get("lr_head", DEFAULT_SETTINGS.lr_head),
                                      **overrides} for name, overrides in FRONTIER_RECIPES.items()}
# The default and fine-tuning with a validation split twice as large (a fifth of train, so fewer training
# images): can a larger split tell the BN-lr candidates apart where 1,200 images could not (docs/TRAINING.md)?
VALIDATION_SPLIT = {"piggyback-bn-val20": {"method": "piggyback", "val_fraction": 0.2},
                    "finetune-val20": {"method": "finetune", "val_fraction": 0.2},
                    # a contiguous split: GTSRB's train images come in tracks of near-identical frames stored
                    # together, so a random split holds near-copies of training images (docs/TRAINING.md)
                    "piggyback-bn-contig": {"method": "piggyback", "val_split": "contiguous"},
                    "finetune-contig": {"method": "finetune", "val_split": "contiguous"}}
# Keeping the mean of the last 3 epochs' task states instead of the best epoch (--average-epochs 3), alike for
# the default and fine-tuning, on the contiguous split: tools/posthoc_study.py found it the closest lever
AVERAGING = {"piggyback-bn-contig-avg3": {"method": "piggyback", "val_split": "contiguous", "average_epochs": 3},
             "finetune-contig-avg3": {"method": "finetune", "val_split": "contiguous", "average_epochs": 3}}
ALL_VARIANTS = {**VARIANTS, **EXTRA_FINETUNE, **FRONTIER, **VALIDATION_SPLIT, **AVERAGING}
FINETUNE_VARIANTS = tuple(v for v, settings in ALL_VARIANTS.items() if settings["method"] == "finetune")


def task_name(dataset: str, variant: str, seed: int) -> str:
    return f"{dataset}-{variant}-s{seed}"


def make_config(backbone: str, data: str, variant: str, seed: int, args) -> TrainConfig:
    base = dict(backbone=backbone, weights=str(WEIGHTS.get(backbone, "")) or None,
                data=str(DATASETS.get(data, data)), task=task_name(dataset_key(data), variant, seed),
                seed=seed, epochs=args.epochs, max_train_samples=args.max_train_samples)
    return TrainConfig(**{**base, **ALL_VARIANTS[variant]})


def dataset_key(data: str) -> str:
    return data if data in DATASETS else Path(data).stem


def run_one(out: Path, backbone: str, data: str, variant: str, seed: int, args) -> dict:
    run_dir = out / "runs" / backbone / dataset_key(data) / run_dir_name(variant, seed)
    cfg = make_config(backbone, data, variant, seed, args)
    copied_from = copy_candidate(cfg, run_dir)
    if copied_from is not None:
        print(f"  the same run as {copied_from}: copied, not trained again", flush=True)
    # reused only if trained with this config's settings (defaults may have changed since)
    return run_row(cfg, variant, run_dir, train_or_reuse(cfg, run_dir, progress=not args.quiet))


def _settings_but_task(settings: dict | None) -> dict | None:
    return None if settings is None else {k: v for k, v in settings.items() if k != "task"}


def copy_candidate(cfg: TrainConfig, run_dir: Path) -> str | None:
    """A recipe that trains one fixed BN lr (piggyback-bn-head1e-2, piggyback-bn-bn3e-3) is exactly one of
    the candidates the default (lr_bn auto) trained for the same cell and seed: the task name shapes no
    training. Copy that candidate, under this recipe's task name, instead of training it again (about 3
    hours of `make bench`). Returns the candidate copied, as the copy's metrics record it (`copied_from`, relative
    to the cell), None where there is none or the run is done."""
    if cfg.method != "piggyback" or cfg.lr_bn == "auto":
        return None
    want, stored = _settings_but_task(cfg.settings()), run_settings(run_dir)
    if stored == cfg.settings() and (run_dir / "metrics.json").exists():
        return None  # finished already
    if stored is None and run_dir.exists():
        return None  # not a run: left alone, as train_or_reuse leaves it
    for source in sorted(run_dir.parent.glob(f"*-s{cfg.seed}/candidates/*")):
        if (_settings_but_task(run_settings(source)) == want and (source / "metrics.json").exists()
                and has_weights(source)):
            break
    else:
        return None
    candidate = runs.RunDir(source)  # read before anything is written: a damaged candidate stops here, named
    config, metrics = candidate.info(), candidate.metrics()
    config["config"]["task"] = config["task"]["name"] = cfg.task
    staging = run_dir.with_name(f".{run_dir.name}.copying")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns(STORAGE_RECORD))
    atomic_write_json(staging / "config.json", config)
    copied_from = source.relative_to(run_dir.parent).as_posix()
    atomic_write_json(staging / "metrics.json", {**metrics, "task": cfg.task, "copied_from": copied_from})
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished or stale run of this recipe
    staging.rename(run_dir)
    return copied_from


def run_row(cfg: TrainConfig, variant: str, run_dir: Path, metrics: dict) -> dict:
    data = next((k for k, path in DATASETS.items() if str(path) == cfg.data), cfg.data)
    return {"backbone": cfg.backbone, "dataset": dataset_key(data), "data": data, "variant": variant,
            "method": cfg.method, "seed": cfg.seed, "run": str(run_dir), "test_accuracy": metrics["test_accuracy"],
            "mask_density": metrics["mask_density"], "train_seconds": train_seconds(metrics),
            "lr_bn": metrics.get("lr_bn")}  # the BN lr a piggyback-bn run chose on validation


def earlier_rows(out: Path, planned: set, args) -> list[dict]:
    """Rows of the finished runs under --out/runs that are not planned now and were trained with today's
    settings and defaults: results accumulate, so a benchmark can be completed piece by piece. Each row
    is read from its run, so it always says what the run directory holds."""
    kept = []
    for run in sorted((out / "runs").glob("*/*/*-s*")):
        name = parse_run_dir_name(run.name)
        if name is None or name[0] not in ALL_VARIANTS or not (run / "metrics.json").exists():
            continue
        (variant, seed), backbone, dataset = name, run.parent.parent.name, run.parent.name
        stored = run_settings(run)
        if (backbone, dataset, variant, seed) in planned or stored is None:
            continue
        cfg = make_config(backbone, dataset if dataset in DATASETS else stored["data"], variant, seed, args)
        if stored == cfg.settings():
            kept.append(run_row(cfg, variant, run, runs.RunDir(run).metrics()))
    return kept


def base_task_check(backbone: str, bundle_dir: Path) -> dict:
    """CIFAR-10 accuracy of the original weights and of the bundle's backbone (after all tasks)."""
    with np.load(BASE_TASK) as z:  # a test split only
        test = ImageSet(z["test_images"], z["test_labels"].astype(np.int64))
    results = {}
    logits = {}
    for label, bb in (("original", load_backbone(backbone, WEIGHTS[backbone])),
                      ("bundle", load_bundle(bundle_dir).backbone())):
        model = TaskModel(bb.model, bb.spec, "classifier", False, "").eval()
        logits[label] = predict_logits(model, test)
        results[label] = evaluate(model, test)
    results["bitwise_identical"] = bool(torch.equal(logits["original"], logits["bundle"]))
    return results


STORAGE_RECORD = "bench-storage.json"  # beside a run: its storage figures, for when its weights are gone


def storage(bundle_dir: Path | None, rows: list[dict]) -> None:
    """Bytes each task adds: its task file in the bundle (masks, head, BN) or the whole net (finetune);
    ``bundle_dir`` is None where no row was packed. Each measured row's figures are written beside its run;
    a run without weights gets the figures recorded there when it had them."""
    info = load_bundle(bundle_dir).info() if bundle_dir is not None else None
    for r in rows:
        record = Path(r["run"]) / STORAGE_RECORD
        if not has_weights(r["run"]):
            if not record.is_file():
                raise SystemExit(f"error: {r['run']}: no weights and no {STORAGE_RECORD}: its bytes per task "
                                 "cannot be measured; delete the run to train it again")
            r.update(json.loads(record.read_text()))
            continue
        if r["variant"] in FINETUNE_VARIANTS:
            net = load_backbone(r["backbone"], r["run"]).model
            r["bytes_per_task"] = sum(t.numel() * t.element_size() for t in net.state_dict().values())
            r["stored_bits_per_param"] = None
        else:
            task = info["tasks"][task_name(r["dataset"], r["variant"], r["seed"])]
            r["bytes_per_task"] = task["size"]
            r["stored_bits_per_param"] = task["stored_bits_per_param"] if r["variant"] != "classifier" else None
        atomic_write_json(record, {k: r[k] for k in ("bytes_per_task", "stored_bits_per_param")})


def recorded_base_checks(path: Path) -> dict:
    """The base-task checks of the last accuracy.json, {} where there is none to read."""
    try:
        return json.loads(path.read_text()).get("base_task", {})
    except (OSError, ValueError, AttributeError):
        return {}


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["backbone"], r["dataset"], r["variant"]), []).append(r)
    out = []
    for (backbone, dataset, variant), rs in groups.items():
        accs = [100 * r["test_accuracy"] for r in rs]
        ft_means = [statistics.mean(100 * r["test_accuracy"] for r in groups[(backbone, dataset, v)])
                    for v in FINETUNE_VARIANTS if (backbone, dataset, v) in groups]
        ft_mean = max(ft_means) if ft_means and variant not in FINETUNE_VARIANTS else None
        mean = statistics.mean(accs)
        bits = [r["stored_bits_per_param"] for r in rs if r.get("stored_bits_per_param") is not None]
        out.append({"backbone": backbone, "dataset": dataset, "variant": variant, "seeds": len(rs),
                    "accuracy_mean": mean, "accuracy_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                    "gap_to_finetune": None if ft_mean is None else points_difference(mean, ft_mean),
                    "bytes_per_task": statistics.mean(r.get("bytes_per_task", 0) for r in rs),
                    "stored_bits_per_param": statistics.mean(bits) if bits else None,
                    "mask_density": statistics.mean(r["mask_density"] for r in rs) if rs[0]["mask_density"] else None,
                    "train_seconds": statistics.mean(r["train_seconds"] for r in rs)})
    return out


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(s["backbone"], s["dataset"]) for s in summary})
    variants = [v for v in VARIANTS if any(s["variant"] == v for s in summary)]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(keys), 3.6))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        vals = [next((s["accuracy_mean"] for s in summary if (s["backbone"], s["dataset"]) == k
                      and s["variant"] == v), 0) for k in keys]
        errs = [next((s["accuracy_std"] for s in summary if (s["backbone"], s["dataset"]) == k
                      and s["variant"] == v), 0) for k in keys]
        ax.bar(np.arange(len(keys)) + i * width, vals, width, yerr=errs, label=v)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, [f"{b}\n{d}" for b, d in keys], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_frontier(summary: list[dict], path: Path) -> None:
    """Accuracy against stored bits per masked parameter for every piggyback recipe, fine-tune as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(s["backbone"], s["dataset"]) for s in summary if s["variant"] in FRONTIER})
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.0), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        here = [s for s in summary if (s["backbone"], s["dataset"]) == key]
        for s in here:
            default = s["variant"] == "piggyback-bn"
            if s["stored_bits_per_param"] is None or not (default or s["variant"] in FRONTIER):
                continue
            ax.errorbar(s["stored_bits_per_param"], s["accuracy_mean"], yerr=s["accuracy_std"],
                        fmt="*" if default else "o", color="C3" if default else "C0", markersize=11 if default else 6)
            label = "default" if default else s["variant"].removeprefix("piggyback-bn-").replace("-decay", " decay")
            ax.annotate(label, (s["stored_bits_per_param"], s["accuracy_mean"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        fts = [s for s in here if s["variant"] in FINETUNE_VARIANTS]
        if fts:
            ft = max(fts, key=lambda s: s["accuracy_mean"])
            ax.axhline(ft["accuracy_mean"], color="C2", linestyle="--",
                       label=f"{ft['variant']} {ft['accuracy_mean']:.2f}%")
        ax.axvline(0.8, color="C7", linestyle=":", label="goal: <= 0.8 bits")
        shown = [s["accuracy_mean"] for s in here if s["variant"] in (*FRONTIER, "piggyback-bn", *FINETUNE_VARIANTS)]
        ax.set_ylim(min(shown) - 1.0, max(shown) + 0.5)
        ax.set_title(f"{key[0]} {key[1]}", fontsize=9)
        ax.set_xlabel("stored bits per masked parameter")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["cifar_resnet20", "cifar_resnet56"])
    parser.add_argument("--datasets", nargs="+", default=["gtsrb", "mnist"],
                        help="gtsrb, mnist (from shared/data) or paths to ImageFolder dirs / .npz files")
    extra = " ".join(v for v in ALL_VARIANTS if v not in VARIANTS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(ALL_VARIANTS), metavar="VARIANT",
                        help=f"default: {' '.join(VARIANTS)}; also: {extra}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--frontier", action="store_true",
                        help="also run the recipes beside the default (mask lr, mask decay, head or BN lr, "
                             "augmentation, epochs: the storage frontier) on the first backbone, every dataset, "
                             "--frontier-seeds; plots accuracy against stored bits")
    parser.add_argument("--frontier-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench-out/accuracy"))
    parser.add_argument("--quick", action="store_true",
                        help="CI size: cifar_resnet20, gtsrb, classifier vs piggyback-bn, 1 seed, 3 epochs, "
                             "4000 train images; exit 1 unless piggyback wins by --margin points")
    parser.add_argument("--margin", type=float, default=20.0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.backbones, args.datasets, args.variants = ["cifar_resnet20"], ["gtsrb"], ["classifier", "piggyback-bn"]
        args.seeds, args.epochs, args.max_train_samples = [0], 3, args.max_train_samples or 4000
    missing = [str(p) for p in [*(WEIGHTS[b] for b in args.backbones if b in WEIGHTS),
                                *(DATASETS[d] for d in args.datasets if d in DATASETS)] if not p.exists()]
    if missing:
        print(f"error: real data not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    plan = [(b, d, v, s) for b in args.backbones for d in args.datasets for v in args.variants for s in args.seeds]
    if args.frontier:
        plan += [(args.backbones[0], d, v, s) for d in args.datasets for v in FRONTIER for s in args.frontier_seeds
                 if (args.backbones[0], d, v, s) not in plan]
    started = time.time()
    rows = earlier_rows(args.out, {(b, dataset_key(d), v, s) for b, d, v, s in plan}, args)
    for backbone, data, variant, seed in plan:
        print(f"[{time.time() - started:6.0f}s] {backbone} {data} {variant} seed {seed}", flush=True)
        rows.append(run_one(args.out, backbone, data, variant, seed, args))
    rows.sort(key=lambda r: (r["backbone"], r["dataset"], list(ALL_VARIANTS).index(r["variant"]), r["seed"]))
    recorded_base = recorded_base_checks(args.out / "accuracy.json")
    base = {}
    for backbone in sorted({r["backbone"] for r in rows}):
        bundle_dir = args.out / "bundles" / backbone
        # fine-tunes add no task to the backbone; runs restored without weights cannot be packed
        packable = [r for r in rows if r["backbone"] == backbone and r["variant"] not in FINETUNE_VARIANTS
                    and has_weights(r["run"])]
        shutil.rmtree(bundle_dir, ignore_errors=True)
        if packable:
            pack_runs([r["run"] for r in packable], bundle_dir, name=None)
        storage(bundle_dir if packable else None, [r for r in rows if r["backbone"] == backbone])
        if backbone in WEIGHTS and packable:
            base[backbone] = {**base_task_check(backbone, bundle_dir), "tasks": len(packable)}
        elif backbone in recorded_base:  # no run with weights: the check the last run of bench_accuracy made
            base[backbone] = {**recorded_base[backbone], "recorded": True}
    summary = summarize(rows)
    table = format_table(
        ["backbone", "dataset", "method", "seeds", "test acc %", "± std", "gap to finetune", "bytes/task",
         "stored bits/param", "density", "train s"],
        [[s["backbone"], s["dataset"], s["variant"], s["seeds"], s["accuracy_mean"], s["accuracy_std"],
          s["gap_to_finetune"], int(s["bytes_per_task"]), s["stored_bits_per_param"], s["mask_density"],
          s["train_seconds"]] for s in summary], floatfmt=".2f")
    print(table)
    for backbone, b in base.items():
        print(f"base task (CIFAR-10 2k) on {backbone}: original {100 * b['original']:.2f}%, from the bundle after "
              f"adding {b.get('tasks', 'its')} tasks {100 * b['bundle']:.2f}%, logits bitwise identical: "
              f"{b['bitwise_identical']}" + (" (recorded: no run with weights here)" if b.get("recorded") else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = sorted({r["seed"] for r in rows})
    (args.out / "accuracy.json").write_text(json.dumps({"rows": rows, "summary": summary, "base_task": base,
                                                        "epochs": args.epochs, "seeds": seeds}, indent=2))
    grid = [s for s in summary if s["variant"] in VARIANTS]
    if grid:  # the chart shows the grid's methods; recipes beside it are run alone on request
        plot(grid, args.out / "accuracy.png")
    if any(s["variant"] in FRONTIER for s in summary):
        plot_frontier(summary, args.out / "frontier.png")
    (args.out / "accuracy.md").write_text(table + "\n")
    if args.quick:
        acc = {s["variant"]: s["accuracy_mean"] for s in summary}
        won = acc["piggyback-bn"] - acc["classifier"]
        print(f"piggyback beats classifier-only by {won:.1f} points (required: {args.margin})")
        if won < args.margin or not all(b["bitwise_identical"] for b in base.values()):
            return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PbexportError as exc:  # a damaged run or data file: one line naming it, as the CLI says it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
