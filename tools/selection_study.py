"""Choices made on the validation split, checked against the accuracy benchmark's kept runs (no training).

pbexport keeps each run's epoch with the best validation accuracy (earliest on a tie). Would another rule,
or choosing a recipe per task on validation (e.g. the per-task BN lr), move the fine-tune lead? Every run
keeps its per-epoch checkpoints and test accuracies, so this evaluates each checkpoint on the run's own
validation split (for the validation loss, which training does not record) and recomputes the leads:

    python tools/selection_study.py                        # the epoch-selection rules
    python tools/selection_study.py --choose piggyback-bn-head1e-2 piggyback-bn-bn5e-3   # e.g. other BN lrs

The default recipe chooses its per-task BN lr on validation (``lr_bn="auto"``): under each rule that
choice is made again, from its candidates' epochs kept by the rule. The validation losses are cached in
--out (selection.json), keyed by run directory, and reused from any selection*.json beside it while the
run's recorded history is unchanged. docs/TRAINING.md quotes the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

from benchlib import parse_run_dir_name, points_difference
from pbexport import runs
from pbexport.backbones import load_backbone
from pbexport.data import load_data
from pbexport.fileio import atomic_write_json
from pbexport.report import format_table
from pbexport.taskmodel import build_task_model
from pbexport.training import accuracy_and_loss, split_for_run, validation_score

DEFAULT_RECIPE = "piggyback-bn"
PBEXPORT_RULE = "best val acc, earliest tie"
# epoch-selection rules over one run's per-epoch records; the first is what pbexport does
RULES = {PBEXPORT_RULE: lambda rs: max(rs, key=lambda r: (r["val_accuracy"], -r["epoch"])),
         "best val acc, latest tie": lambda rs: max(rs, key=lambda r: (r["val_accuracy"], r["epoch"])),
         "best val acc, then val loss": lambda rs: max(rs, key=lambda r: (r["val_accuracy"], -r["val_loss"])),
         "lowest val loss": lambda rs: min(rs, key=lambda r: r["val_loss"]),
         "last epoch": lambda rs: rs[-1]}


def load_run(run_dir: Path, loaded: dict):
    """(a fresh task model, the task's data, training split, validation split) for run ``run_dir``;
    ``loaded`` keeps one (backbone, dataset) in memory for the runs that follow."""
    cfg = runs.RunDir(run_dir).config()
    source = (cfg.backbone, cfg.weights, cfg.input_size, cfg.data)
    if source not in loaded:
        loaded.clear()
        backbone = load_backbone(cfg.backbone, cfg.weights, cfg.input_size)
        loaded[source] = backbone, load_data(cfg.data, backbone.spec.size)
    backbone, data = loaded[source]
    train_set, val = split_for_run(cfg, data)
    if val is None:
        raise SystemExit(f"{run_dir}: trained without a validation split")
    model = build_task_model(backbone, data.num_classes, cfg.method, cfg.train_bn, cfg.seed)
    return model, data, train_set, val


class NotCached(Exception):
    """A run that must be evaluated but has no checkpoints: restored from bench-record/ (tools/bench_record.py)
    without them, and missing from the cache."""

    def __init__(self, run_dir: Path):
        super().__init__(f"{run_dir}: no checkpoints (restored from bench-record/) and not in the cache: left out")


def require_checkpoints(run_dir: Path) -> None:
    if not (run_dir / "checkpoints").is_dir():
        raise NotCached(run_dir)


def epoch_records(run_dir: Path, history: list[dict], key: str, cache: dict, loaded: dict) -> list[dict]:
    """Per epoch of a run's recorded ``history``: its val and test accuracy, and the val loss of that
    epoch's checkpoint."""
    run = runs.RunDir(run_dir)
    cached = cache.get(key)
    recorded = [(r["val_accuracy"], r["test_accuracy"]) for r in history]
    if cached and [(r["val_accuracy"], r["test_accuracy"]) for r in cached] == recorded:
        return cached
    require_checkpoints(run_dir)
    model, data, _, val = load_run(run_dir, loaded)
    records = []
    for rec in history:
        state, _, _ = run.read_checkpoint(run.checkpoint_path(rec["epoch"]))
        model.load_task_state(state)
        accuracy, loss = accuracy_and_loss(model, val)
        if abs(accuracy - rec["val_accuracy"]) > 1e-9:  # the checkpoint must be the epoch training evaluated
            raise SystemExit(f"{run_dir}: epoch {rec['epoch']} evaluates to {accuracy} on validation, "
                             f"the run recorded {rec['val_accuracy']}")
        records.append({"epoch": rec["epoch"], "val_accuracy": rec["val_accuracy"], "val_loss": loss,
                        "test_accuracy": rec["test_accuracy"]})
    cache[key] = records
    return records


def run_candidates(root: Path, run_dir: Path, metrics: dict, cache: dict, loaded: dict) -> list[list[dict]]:
    """The epoch records of every run a run (with ``metrics``) chose among: its BN-lr candidates (lr_bn
    auto), else itself.

    The choice is checked: under pbexport's rule it must be the BN lr the run recorded.
    """
    tried = metrics.get("lr_bn_candidates")
    if not tried:
        return [epoch_records(run_dir, metrics["epochs"], run_dir.relative_to(root).as_posix(), cache, loaded)]
    where = [run_dir / t["run"] for t in tried]
    candidates = [epoch_records(w, runs.RunDir(w).metrics()["epochs"], w.relative_to(root).as_posix(), cache, loaded)
                  for w in where]
    rule = RULES[PBEXPORT_RULE]
    kept = kept_by(candidates, rule)
    chosen = next(i for i, records in enumerate(candidates) if rule(records) is kept)
    if tried[chosen]["lr_bn"] != metrics["lr_bn"]:
        raise SystemExit(f"{run_dir}: chose BN lr {metrics['lr_bn']}, its candidates' validation scores choose "
                         f"{tried[chosen]['lr_bn']}")
    return candidates


def kept_by(candidates: list[list[dict]], rule) -> dict:
    """The record a run keeps under an epoch rule: each candidate's kept epoch, the best on validation."""
    return max((rule(records) for records in candidates), key=validation_score)  # the first on a full tie


def accuracy_runs(root: Path, seeds: int, variants: set[str]):
    """(run_dir, variant, seed, method, metrics) of every finished accuracy run under ``root`` with a seed
    below ``seeds`` whose recipe is one of ``variants`` or a fine-tune. Runs that keep an average of epochs
    (--average-epochs) are left out: they choose no epoch, and the levers studied here apply to a kept one."""
    for run_dir in sorted(root.glob("*/*/*")):
        parsed = parse_run_dir_name(run_dir.name)
        if parsed is None or not (run_dir / "metrics.json").exists():
            continue
        variant, seed = parsed
        run = runs.RunDir(run_dir)
        cfg = run.config()
        if seed < seeds and (variant in variants or cfg.method == "finetune") and not cfg.average_epochs:
            yield run_dir, variant, seed, cfg.method, run.metrics()


def complete_cells(found: dict, variants: set[str], seeds: int) -> dict:
    """The cells of ``found`` ({cell: {variant: {seed: (method, ...)}}}) where every variant and a fine-tune
    have every seed."""
    return {cell: by_variant for cell, by_variant in found.items()
            if all(len(by_variant.get(v, {})) == seeds for v in variants)
            and any(is_complete_finetune(r, seeds) for r in by_variant.values())}


def collect(root: Path, variants: set[str], seeds: int, cache: dict) -> dict:
    """{(backbone, dataset): {variant: {seed: (method, candidates)}}} for the cells where every variant has
    every seed."""
    found: dict = {}
    loaded: dict = {}
    for run_dir, variant, seed, method, metrics in accuracy_runs(root, seeds, variants):
        try:
            candidates = run_candidates(root, run_dir, metrics, cache, loaded)
        except NotCached as exc:  # its cell is left incomplete, so it is left out
            print(exc, file=sys.stderr)
            continue
        cell = found.setdefault((run_dir.parts[-3], run_dir.parts[-2]), {})
        cell.setdefault(variant, {})[seed] = (method, candidates)
    return complete_cells(found, variants, seeds)


def is_complete_finetune(records_by_seed: dict, seeds: int) -> bool:
    return len(records_by_seed) == seeds and all(method == "finetune" for method, _ in records_by_seed.values())


def mean_accuracy(records_by_seed: dict, rule) -> float:
    return 100 * statistics.mean(kept_by(candidates, rule)["test_accuracy"]
                                 for _, candidates in records_by_seed.values())


def strongest_finetune(by_variant: dict, seeds: int, mean_under) -> tuple[str, float]:
    """(variant, mean test %) of the fine-tune that scores highest by ``mean_under(records_by_seed)``."""
    complete = {v: r for v, r in by_variant.items() if is_complete_finetune(r, seeds)}
    return max(((v, mean_under(r)) for v, r in complete.items()), key=lambda t: t[1])


def leads(cells: dict, seeds: int, mean_under) -> dict:
    """The default's mean test accuracy, the strongest fine-tune's and the fine-tune lead per cell, both
    scored by ``mean_under(records_by_seed)``, and the mean lead over the cells."""
    by_cell = {}
    for (backbone, dataset), by_variant in sorted(cells.items()):
        ours = mean_under(by_variant[DEFAULT_RECIPE])
        ft_name, ft = strongest_finetune(by_variant, seeds, mean_under)
        by_cell[f"{backbone}/{dataset}"] = {"accuracy": ours, "finetune": ft_name, "finetune_accuracy": ft,
                                            "lead": points_difference(round(ft, 4), round(ours, 4))}
    return {"cells": by_cell, "mean_lead": round(statistics.mean(c["lead"] for c in by_cell.values()), 4)}


def lead_rows(label: str, result: dict) -> list[list]:
    """Table rows for ``leads``' result: one per cell, then the mean lead."""
    rows = [[label, *cell.split("/"), c["accuracy"], f"{c['finetune']} {c['finetune_accuracy']:.2f}", c["lead"]]
            for cell, c in result["cells"].items()]
    return rows + [[label, "mean lead", "", None, "", result["mean_lead"]]]


def chosen_on_validation(by_variant: dict, candidates: list[str], seed: int, rule) -> tuple[str, dict]:
    """The candidate recipe whose kept epoch scores best on validation (accuracy, then loss)."""
    kept = {v: kept_by(by_variant[v][seed][1], rule) for v in candidates}
    best = max(candidates, key=lambda v: validation_score(kept[v]))
    return best, kept[best]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("bench-out/accuracy/runs"))
    ap.add_argument("--out", type=Path, default=Path("bench-out/selection.json"))
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of every compared variant")
    ap.add_argument("--choose", nargs="+", metavar="VARIANT",
                    help="also choose among these recipes per task and seed on validation")
    args = ap.parse_args(argv)
    cache = {}  # validation losses already evaluated, by this or another selection*.json beside --out
    for path in sorted(args.out.parent.glob("selection*.json")):
        try:
            cache.update(json.loads(path.read_text()).get("val_loss_cache", {}))
        except (OSError, ValueError, AttributeError) as e:
            raise SystemExit(f"{path}: not a selection study result ({e}); move it away to start afresh") from None
    candidates = args.choose or []
    cells = collect(args.runs, {DEFAULT_RECIPE, *candidates}, args.seeds, cache)
    if not cells:
        print(f"no cell has {DEFAULT_RECIPE} and a fine-tune at {args.seeds} seeds under {args.runs}", file=sys.stderr)
        return 2

    rows = []
    result = {"recipe": DEFAULT_RECIPE, "seeds": args.seeds, "choose": candidates, "rules": {}, "choice": {}}
    for name, rule in RULES.items():
        result["rules"][name] = leads(cells, args.seeds, partial(mean_accuracy, rule=rule))
        rows += lead_rows(name, result["rules"][name])
    print(format_table(["epoch kept", "backbone", "dataset", f"{DEFAULT_RECIPE} %", "strongest fine-tune %",
                        "fine-tune lead"], rows, ".2f"))

    if candidates:
        rule = RULES[PBEXPORT_RULE]
        rows = []
        for (backbone, dataset), by_variant in sorted(cells.items()):
            picks = [chosen_on_validation(by_variant, candidates, s, rule) for s in range(args.seeds)]
            ours = 100 * statistics.mean(kept["test_accuracy"] for _, kept in picks)
            _, ft = strongest_finetune(by_variant, args.seeds, partial(mean_accuracy, rule=rule))
            lead = points_difference(round(ft, 4), round(ours, 4))
            result["choice"][f"{backbone}/{dataset}"] = {"chosen": [v for v, _ in picks], "accuracy": ours,
                                                         "finetune_accuracy": ft, "lead": lead}
            rows.append([backbone, dataset, ", ".join(v for v, _ in picks), ours, lead])
        result["choice_mean_lead"] = round(statistics.mean(c["lead"] for c in result["choice"].values()), 4)
        rows.append(["mean lead", "", "", None, result["choice_mean_lead"]])
        print(f"\nrecipe chosen per task and seed on validation among {', '.join(candidates)}:")
        print(format_table(["backbone", "dataset", "chosen (seed 0, 1, ...)", "test %", "fine-tune lead"], rows, ".2f"))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {**result, "val_loss_cache": cache})
    return 0


if __name__ == "__main__":
    sys.exit(main())
