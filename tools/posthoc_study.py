"""Levers applied after training, checked against the accuracy benchmark's runs (no training).

Do any of these move the default recipe's fine-tune lead? Each is applied alike to the default's BN-lr
candidates and to every fine-tune, and the default's BN lr is chosen again on validation under it:

- precise BN: the kept model's BN running statistics recomputed over its training split as a plain
  average (training keeps a moving one), once with the training's random shifts and once without;
- averaging: the mean of the last AVERAGED_EPOCHS (3) epochs' task states (mask scores, BN, head;
  every weight for fine-tuning), kept instead of the best epoch (what `--average-epochs 3` trains);
- shifted validation: the BN-lr choice made on the validation images under the training's shifts, a
  grid of every second offset (25 shifts at the default padding), which leaves more errors to tell the
  candidates apart than the plain split. A grid, not random draws: on ResNet-20 / GTSRB seed 0 two sets
  of 8 random draws chose different BN lrs.

    python tools/posthoc_study.py            # every cell with the default and a fine-tune at 3 seeds
    python tools/posthoc_study.py --backbones cifar_resnet20

Each run's evaluations are cached in --out (posthoc.json) by run directory while its recorded result is
unchanged. docs/TRAINING.md quotes the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

from pbexport import masking, runs
from pbexport.data import batches, crop_padding
from pbexport.fileio import atomic_write_json
from pbexport.report import format_table
from pbexport.training import accuracy_and_loss, average_states, validation_score
from selection_study import NotCached, accuracy_runs, complete_cells, lead_rows, leads, load_run, require_checkpoints

DEFAULT_RECIPE = "piggyback-bn"
AVERAGED_EPOCHS = 3
SHIFT_STEP = 2  # pixels between the offsets of the shifted validation's grid
AS_TRAINED = "as trained"
PRECISE_SHIFTED, PRECISE_UNSHIFTED = "precise BN, shifted", "precise BN, unshifted"
AVERAGED = "average of the last epochs"
SHIFTED = "BN lr chosen on a grid of shifts"
LEVERS = (AS_TRAINED, PRECISE_SHIFTED, PRECISE_UNSHIFTED, AVERAGED, SHIFTED)


def _scores(model, val, test) -> dict:
    val_accuracy, val_loss = accuracy_and_loss(model, val)
    return {"val_accuracy": val_accuracy, "val_loss": val_loss, "test_accuracy": accuracy_and_loss(model, test)[0]}


@torch.no_grad()
def _recompute_bn(model, train_set, batch_size: int, augmentation: str) -> None:
    """Replace every trained BN's running statistics by their plain average over ``train_set``."""
    for _, bn in masking.batchnorms(model.net):
        bn.reset_running_stats()
        bn.momentum = None  # None: a cumulative average
    model.train()
    generator = torch.Generator().manual_seed(0)
    for x, _ in batches(train_set, batch_size, model.spec.size, shuffle=True, augmentation=augmentation,
                        generator=generator):
        model(x)
    model.eval()


def _shifted_validation(model, val) -> dict:
    """Accuracy and mean loss on ``val`` under a grid of the training's shifts (data.augment's padding),
    every SHIFT_STEP-th offset in each direction."""
    correct = seen = 0
    loss = 0.0
    with torch.no_grad():
        for x, y in batches(val, 256, model.spec.size):
            h, w = x.shape[-2:]
            pad = crop_padding(h)
            padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
            y = y.long()
            for dy in range(0, 2 * pad + 1, SHIFT_STEP):
                for dx in range(0, 2 * pad + 1, SHIFT_STEP):
                    logits = model(padded[:, :, dy:dy + h, dx:dx + w])
                    correct += int((logits.argmax(1) == y).sum())
                    loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                    seen += len(y)
    return {"val_accuracy": correct / seen, "val_loss": loss / seen}


def evaluate_run(run_dir: Path, metrics: dict, loaded: dict, levers=LEVERS) -> dict:
    """{lever: {val_accuracy, val_loss, test_accuracy}} for one run (not an lr_bn="auto" outer run) with
    recorded ``metrics``, for AS_TRAINED and each of ``levers``."""
    run = runs.RunDir(run_dir)
    cfg = run.config()
    model, data, train_set, val = load_run(run_dir, loaded)
    kept = run.final_state()

    model.load_task_state(kept)
    model.eval()
    out = {AS_TRAINED: _scores(model, val, data.test)}
    if abs(out[AS_TRAINED]["test_accuracy"] - metrics["test_accuracy"]) > 1e-9:
        raise SystemExit(f"{run_dir}: the kept model scores {out['as trained']['test_accuracy']} on test, "
                         f"the run recorded {metrics['test_accuracy']}")
    if SHIFTED in levers:  # it changes a choice among candidates only: a fine-tune has none
        shifted = _shifted_validation(model, val) if cfg.method != "finetune" else out[AS_TRAINED]
        out[SHIFTED] = {**shifted, "test_accuracy": out[AS_TRAINED]["test_accuracy"]}
    for lever, augmentation in ((PRECISE_SHIFTED, cfg.augment), (PRECISE_UNSHIFTED, "none")):
        if lever in levers:
            model.load_task_state(kept)
            _recompute_bn(model, train_set, cfg.batch_size, augmentation)
            out[lever] = _scores(model, val, data.test)
    if AVERAGED in levers:
        last = [r["epoch"] for r in metrics["epochs"]][-AVERAGED_EPOCHS:]
        states = [run.read_checkpoint(run.checkpoint_path(epoch))[0] for epoch in last]
        model.load_task_state(average_states(states))
        model.eval()
        out[AVERAGED] = _scores(model, val, data.test)
    return out


def _evaluations(root: Path, run_dir: Path, cache: dict, loaded: dict) -> dict:
    """The run's evaluations, from the cache where its recorded result is unchanged; only the levers the
    cache lacks are evaluated."""
    key = run_dir.relative_to(root).as_posix()
    metrics = runs.RunDir(run_dir).metrics()
    recorded = metrics["test_accuracy"]
    if key not in cache or cache[key]["recorded_test_accuracy"] != recorded:
        cache[key] = {"recorded_test_accuracy": recorded, "levers": {}}
    done = {k: v for k, v in cache[key]["levers"].items() if k in LEVERS}
    missing = [lever for lever in LEVERS if lever not in done]
    if missing:
        require_checkpoints(run_dir)
        done.update(evaluate_run(run_dir, metrics, loaded, missing))
        print(f"evaluated {key}: {', '.join(missing)}", file=sys.stderr, flush=True)
    cache[key]["levers"] = done
    return done


def kept_test_accuracy(candidates: list[dict], lever: str) -> float:
    """Test accuracy of the candidate a run keeps under ``lever``: the best on (that lever's) validation."""
    return max((c[lever] for c in candidates), key=validation_score)["test_accuracy"]  # the first on a tie


def collect(root: Path, seeds: int, cache: dict, backbones: list[str] | None = None) -> dict:
    """{(backbone, dataset): {variant: {seed: (method, [candidate evaluations])}}} for the default and every
    fine-tune, in the cells where the default and a fine-tune have every seed."""
    found: dict = {}
    loaded: dict = {}
    for run_dir, variant, seed, method, metrics in accuracy_runs(root, seeds, {DEFAULT_RECIPE}):
        if backbones and run_dir.parts[-3] not in backbones:
            continue
        tried = metrics.get("lr_bn_candidates")
        where = [run_dir / t["run"] for t in tried] if tried else [run_dir]
        try:
            candidates = [_evaluations(root, w, cache, loaded) for w in where]
        except NotCached as exc:  # its cell is left incomplete, so it is left out
            print(exc, file=sys.stderr)
            continue
        if tried:  # as trained, the choice must be the one the run recorded
            chosen = max(range(len(tried)), key=lambda i: validation_score(candidates[i][AS_TRAINED]))
            if tried[chosen]["lr_bn"] != metrics["lr_bn"]:
                raise SystemExit(f"{run_dir}: chose BN lr {metrics['lr_bn']}, its candidates' validation scores "
                                 f"choose {tried[chosen]['lr_bn']}")
        cell = found.setdefault((run_dir.parts[-3], run_dir.parts[-2]), {})
        cell.setdefault(variant, {})[seed] = (method, candidates)
    return complete_cells(found, {DEFAULT_RECIPE}, seeds)


def mean_accuracy(by_seed: dict, lever: str) -> float:
    return 100 * statistics.mean(kept_test_accuracy(candidates, lever) for _, candidates in by_seed.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("bench-out/accuracy/runs"))
    ap.add_argument("--out", type=Path, default=Path("bench-out/posthoc.json"))
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of every compared variant")
    ap.add_argument("--backbones", nargs="+", metavar="NAME", help="only these backbones' cells (default: all)")
    args = ap.parse_args(argv)
    cache = {}
    if args.out.exists():
        try:
            cache = json.loads(args.out.read_text())["cache"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{args.out}: not a post-hoc study result ({e}); move it away to start afresh") from None
    cells = collect(args.runs, args.seeds, cache, args.backbones)
    if not cells:
        print(f"no cell has {DEFAULT_RECIPE} and a fine-tune at {args.seeds} seeds under {args.runs}", file=sys.stderr)
        return 2

    rows = []
    result = {"recipe": DEFAULT_RECIPE, "seeds": args.seeds, "backbones": args.backbones, "levers": {}}
    for lever in LEVERS:
        result["levers"][lever] = leads(cells, args.seeds, partial(mean_accuracy, lever=lever))
        rows += lead_rows(lever, result["levers"][lever])
    print(format_table(["lever", "backbone", "dataset", f"{DEFAULT_RECIPE} %", "strongest fine-tune %",
                        "fine-tune lead"], rows, ".2f"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {**result, "cache": cache})
    return 0


if __name__ == "__main__":
    sys.exit(main())
