"""Cost of switching tasks in pbexport.runtime, per export mode.

3 tasks, 100 switches each way, through the public engine (``engine.logits(x, task)``): every run
either stays on one task ("no switch") or moves to the next task of a cycle ("switch"). Variants
are timed in interleaved rounds so machine noise hits all alike; medians per run.

- multitask, feed "adapter" (onnxruntime LoraAdapter + RunOptions, the default), feed "inputs"
  (the task's tensors as numpy arrays next to the image), and the same tensors as OrtValues through
  run_with_ort_values; plus the graph run with no task tensors at all (its defaults): what feeding
  itself costs;
- shared and baked, every task's session cached (cache_size 3): a switch is a dict lookup (timed
  alone as "bookkeeping"); a control cycles 3 sessions of the SAME baked task, to tell apart what
  separate weight copies cost the CPU caches from what a task switch costs; and cache_size 1 (every
  switch creates a session): the price of a cache miss;
- graph optimization level "extended" against "all" (latency, and resident memory per extra
  shared-mode session, measured in a fresh process).

    python tools/bench_runtime.py                          # cifar_resnet20 @32, batch 1, 1 thread
    python tools/bench_runtime.py --backbone resnet18 --input-size 64 --batch 8
    python tools/bench_runtime.py --exports DIR            # DIR/{baked,shared,multitask} already exported

Writes bench-out/runtime.json (``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from benchlib import resident_bytes  # noqa: E402
from pbexport import runtime  # noqa: E402
from pbexport.report import format_table  # noqa: E402

MODES = ("baked", "shared", "multitask")


# ----------------------------------------------------------------------------- building (needs [train])
def build_exports(workdir: Path, out: Path, backbone: str, size: int) -> None:
    """3 tiny tasks (2, 3, 4 classes; the first two piggyback + per-task BN, the third classifier-only)."""
    from pbexport.bundle import pack_runs
    from pbexport.export import main_export
    from pbexport.training import TrainConfig, train

    rng = np.random.default_rng(0)
    runs = []
    for i, method in enumerate(("piggyback", "piggyback", "classifier")):
        classes = 2 + i
        data = workdir / f"data{i}.npz"
        imgs = lambda n: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)  # noqa: E731
        np.savez(data, train_images=imgs(16), train_labels=np.arange(16) % classes,
                 test_images=imgs(4), test_labels=np.arange(4) % classes)
        cfg = TrainConfig(backbone=backbone, data=str(data), task=f"task{i}", method=method, epochs=1,
                          batch_size=8, max_train_samples=8, val_fraction=0.5, input_size=size, augment="none",
                          lr_mask=1e-2)
        train(cfg, workdir / f"run{i}", progress=False)
        runs.append(workdir / f"run{i}")
    pack_runs(runs, workdir / "bundle")
    for mode in MODES:
        main_export(workdir / "bundle", out / mode, mode=mode, verify=False)


# ----------------------------------------------------------------------------- timing
def _timed(fn, sequence, x) -> list[float]:
    out = []
    for task in sequence:
        t = time.perf_counter()
        fn(x, task)
        out.append(time.perf_counter() - t)
    return out


def interleaved(variants: dict, x, rounds: int, per_round: int) -> dict[str, list[float]]:
    """variants: name -> (fn(x, task), task sequence maker(n)). Per-run seconds per variant."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn, seq in variants.values():  # warm-up: every task's state loaded once
        _timed(fn, seq(6), x)
    for _ in range(rounds):
        for k, (fn, seq) in variants.items():
            times[k] += _timed(fn, seq(per_round), x)
    return times


def cycle(tasks):
    return lambda n: [tasks[i % len(tasks)] for i in range(n)]


def same(task):
    return lambda n: [task] * n


def multitask_variants(path: Path, tasks: list[str], kw: dict) -> tuple[dict, list]:
    import onnxruntime as ort

    adapter = runtime.open_model(path, feed="adapter", **kw)
    inputs = runtime.open_model(path, feed="inputs", **kw)
    sess = inputs.session()
    values = {}
    for t in tasks:
        fmt = ort.AdapterFormat.read_adapter(str(inputs.adapters[t]))
        values[t] = {k: ort.OrtValue.ortvalue_from_numpy(np.array(v.numpy(), copy=True))
                     for k, v in fmt.get_parameters().items()}
    out = ["logits"]

    def ortvalue_run(x, task):  # the same tensors as OrtValues through run_with_ort_values
        feeds = dict(values[task])
        feeds["image"] = ort.OrtValue.ortvalue_from_numpy(x)
        return np.array(sess.run_with_ort_values(out, feeds)[0].numpy(), copy=True)

    def defaults(x, task):  # no task tensors: the graph's defaults (the plain backbone)
        return sess.run(out, {"image": x})[0]

    v = {}
    for name, fn in (("adapter (LoraAdapter)", adapter.logits), ("inputs (numpy)", inputs.logits),
                     ("inputs (OrtValues)", ortvalue_run)):
        v[f"multitask {name}: no switch"] = (fn, same(tasks[0]))
        v[f"multitask {name}: switch"] = (fn, cycle(tasks))
    v["multitask graph defaults, nothing fed"] = (defaults, same(tasks[0]))
    return v, [adapter, inputs]


def file_variants(mode: str, path: Path, tasks: list[str], kw: dict) -> tuple[dict, list]:
    cached = runtime.open_model(path, **{**kw, "cache_size": len(tasks)})
    v = {f"{mode}, cached: no switch": (cached.logits, same(tasks[0])),
         f"{mode}, cached: switch": (cached.logits, cycle(tasks))}
    if mode == "baked":  # control: 3 sessions of ONE task, cycled: what separate weight copies cost the CPU caches
        copies = [runtime.open_model(path / f"{tasks[0]}.onnx", **kw) for _ in tasks]
        turn = itertools.cycle(copies)
        v["baked, 3 sessions of one task: cycle (control)"] = (lambda x, task: next(turn).logits(x), same(tasks[0]))
    return v, [cached]


def cold_switch(path: Path, tasks: list[str], kw: dict, n: int) -> list[float]:
    """cache_size 1: every switch drops a session and creates the next."""
    engine = runtime.open_model(path, **{**kw, "cache_size": 1})
    size = engine.input_spec(tasks[0]).size
    x = np.zeros((1, 3, size, size), np.float32)
    return _timed(engine.logits, cycle(tasks)(n), x)


# ----------------------------------------------------------------------------- memory (fresh process)
def memory_child(path: str, optimization: str, threads: int) -> dict:
    engine = runtime.open_model(path, cache_size=64, optimization=optimization, threads=threads)
    size = engine.input_spec(engine.tasks[0]).size
    x = np.zeros((1, 3, size, size), np.float32)
    rss = [resident_bytes()]
    for t in engine.tasks:
        engine.logits(x, t)
        rss.append(resident_bytes())
    return {"rss_bytes": rss}


def measure_memory(path: Path, optimization: str, threads: int) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_runtime as b; "
            f"print(json.dumps(b.memory_child({str(path)!r}, {optimization!r}, {threads})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode:
        raise RuntimeError(f"memory measurement failed:\n{out.stderr}")
    rss = json.loads(out.stdout.strip().splitlines()[-1])["rss_bytes"]
    steps = np.diff(rss)
    return {"rss_bytes": rss, "first_session_bytes": int(steps[0]),
            "extra_session_bytes": float(np.median(steps[1:])) if len(steps) > 1 else None}


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exports", type=Path, default=None,
                   help="DIR/{baked,shared,multitask}: reused when there, else built there and kept "
                        "(default: built in a temporary directory)")
    p.add_argument("--backbone", default="cifar_resnet20")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (1: stable on a busy box)")
    p.add_argument("--switches", type=int, default=100, help="switches per task (3 tasks)")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds (more: finer interleaving)")
    p.add_argument("--cold", type=int, default=12, help="cache-miss switches to time")
    p.add_argument("--out", type=Path, default=Path("bench-out/runtime.json"))
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp:
        exports = args.exports or Path(tmp) / "exports"
        if not all((exports / m).exists() for m in MODES):
            print(f"building 3 tiny tasks on {args.backbone} @{args.input_size} and exporting them to {exports} ...",
                  flush=True)
            build_exports(Path(tmp), exports, args.backbone, args.input_size)
        kw = {"threads": args.threads}
        multi = exports / "multitask"
        probe = runtime.open_model(multi)
        tasks = probe.tasks[:3]
        size = probe.input_spec(tasks[0]).size
        x = np.random.default_rng(0).random((args.batch, 3, size, size), dtype=np.float32)
        n = args.switches * len(tasks)
        per_round = max(len(tasks), n // args.rounds // len(tasks) * len(tasks))

        variants, keep = multitask_variants(multi, tasks, kw)
        for mode in ("shared", "baked"):
            v, k = file_variants(mode, exports / mode, tasks, kw)
            variants.update(v)
            keep += k
        for level in ("extended", "all"):
            for mode in ("shared", "multitask"):
                e = runtime.open_model(exports / mode, optimization=level, cache_size=3, **kw)
                keep.append(e)
                variants[f"{mode}, optimization {level}"] = (e.logits, same(tasks[0]))
        print(f"timing {len(variants)} variants: {args.rounds} rounds x {per_round} runs, batch {args.batch}, "
              f"{args.threads} thread(s) ...", flush=True)
        times = interleaved(variants, x, args.rounds, per_round)
        med = {k: statistics.median(v) for k, v in times.items()}
        # the engine's own work per switch to a cached task: argument checks, lock, LRU lookup
        bookkeeping = {}
        for e in keep[:4]:  # multitask adapter, multitask inputs, shared, baked
            seq = cycle(tasks)(3000)
            t = time.perf_counter()
            for task in seq:
                e.warm(task)
            bookkeeping[f"{e.mode}" + (f" ({e.feed})" if e.mode == "multitask" else "")] = \
                1e6 * (time.perf_counter() - t) / len(seq)
        cold = {mode: statistics.median(cold_switch(exports / mode, tasks, kw, args.cold)) for mode in ("shared",
                                                                                                       "baked")}
        memory = {level: measure_memory(exports / "shared", level, args.threads) for level in ("extended", "all")}

    rows = [[k, len(times[k]), 1e3 * med[k], 1e3 * statistics.quantiles(times[k], n=10)[-1]] for k in variants]
    rows += [[f"{mode}, cache_size 1: switch (creates a session)", args.cold, 1e3 * cold[mode], None]
             for mode in cold]
    print(format_table(["variant", "runs", "median ms", "p90 ms"], rows, floatfmt=".3f"))

    def cost(prefix):
        return 1e3 * (med[f"{prefix}: switch"] - med[f"{prefix}: no switch"])

    switch = {"multitask adapter (LoraAdapter)": cost("multitask adapter (LoraAdapter)"),
              "multitask inputs (numpy)": cost("multitask inputs (numpy)"),
              "multitask inputs (OrtValues)": cost("multitask inputs (OrtValues)"),
              "shared, cached": cost("shared, cached"), "baked, cached": cost("baked, cached")}
    feeding = 1e3 * (med["multitask adapter (LoraAdapter): no switch"] - med["multitask graph defaults, nothing fed"])
    print("\nswitch cost per run (median switch - median no switch), ms: "
          + ", ".join(f"{k} {v:+.3f}" for k, v in switch.items()))
    print(f"feeding a task's tensors (adapter) vs running the graph's defaults: {feeding:+.3f} ms per run")
    print("engine bookkeeping per switch to a cached task (lookup + lock, no run), us: "
          + ", ".join(f"{k} {v:.1f}" for k, v in bookkeeping.items()))
    for level, m in memory.items():
        extra = m["extra_session_bytes"]
        print(f"shared, optimization {level}: first session +{m['first_session_bytes'] / 2**20:.1f} MiB, each extra "
              f"task session +{(extra or 0) / 2**20:.1f} MiB")

    result = {"backbone": probe.backbone, "input_size": size, "batch": args.batch, "threads": args.threads,
              "switches": args.switches, "rounds": args.rounds, "cold": args.cold, "tasks": tasks,
              "runs_per_variant": {k: len(v) for k, v in times.items()},
              "median_ms": {k: 1e3 * v for k, v in med.items()},
              "cold_switch_ms": {k: 1e3 * v for k, v in cold.items()},
              "switch_cost_ms": switch, "feeding_cost_ms": feeding, "bookkeeping_us": bookkeeping, "memory": memory,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "onnxruntime": __import__("onnxruntime").__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
