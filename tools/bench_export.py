"""Benchmark the three ONNX export modes against the plain backbone (disk, latency, load, memory).

For each backbone: train N tiny tasks (1 step each on random images; every second task with per-task
BN), pack them into a bundle, export all three modes (plus the plain backbone graph, and the multitask
graph with --nchwc-block for this CPU's block size where onnxruntime has NCHWc kernels), then

- disk bytes per mode for N = 1, 3, 10 tasks, and the shared-mode bound
  backbone data + N x 1.1 bit per masked parameter + the tasks' heads (+ per-task BN);
- CPU latency at batch 1 and 32: onnxruntime, --threads intra-op threads, every session created up
  front and run in --repeats interleaved rounds, each in a fresh random order (plain, plain without
  NCHWc, baked, shared, multitask and multitask nchwc, each through its adapter and with its tensors
  fed as inputs), medians; and the nodes per run of the plain graph and of the nchwc graph's unpack;
- session creation time and resident memory with all N tasks loaded at once (each in a fresh
  subprocess: N baked sessions, N shared sessions, or one multitask session + N adapters).

    python tools/bench_export.py                              # resnet18 @224 and cifar_resnet56 @32
    python tools/bench_export.py --backbones cifar_resnet56 --tasks 1 3 --repeats 20
    python tools/bench_export.py --clock cpu --threads 1      # latency ratios that a busy machine barely skews
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from benchlib import resident_bytes  # noqa: E402
from pbexport.report import format_table  # noqa: E402

DEFAULT_BACKBONES = ["resnet18", "cifar_resnet56"]
# wall: elapsed time (what a user waits). cpu: this process's CPU time, which other processes on a busy
# machine barely disturb; with --threads 1 it is the single-thread latency of an idle machine.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
TARGETS = {"baked": (1.03, 1.03), "shared": (1.03, 1.03), "multitask (adapter)": (1.5, 1.15),
           "multitask (inputs)": (1.5, 1.15), "multitask nchwc (adapter)": (1.5, 1.15),
           "multitask nchwc (inputs)": (1.5, 1.15), "multitask (weights)": (1.5, 1.15),
           "multitask nchwc (weights)": (1.5, 1.15)}  # (batch 1, batch 32) latency vs the plain backbone


# ----------------------------------------------------------------------------- building
def make_bundle(workdir: Path, backbone: str, size: int, n_tasks: int) -> Path:
    from pbexport.bundle import pack_runs
    from pbexport.training import TrainConfig, train

    runs = []
    rng = np.random.default_rng(0)
    for i in range(n_tasks):
        classes = 2 + i % 5
        data = workdir / f"data{i}.npz"
        imgs = lambda n: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)  # noqa: E731
        np.savez(data, train_images=imgs(16), train_labels=np.arange(16) % classes,
                 test_images=imgs(4), test_labels=np.arange(4) % classes)
        cfg = TrainConfig(backbone=backbone, data=str(data), task=f"task{i}", epochs=1, batch_size=8,
                          max_train_samples=8, val_fraction=0.5, input_size=size, augment="none",
                          train_bn=(i % 2 == 0), lr_mask=1e-2)
        train(cfg, workdir / f"run{i}", progress=False)
        runs.append(workdir / f"run{i}")
    bundle = workdir / "bundle"
    pack_runs(runs, bundle)
    return bundle


def dir_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_all(bundle: Path, out: Path, tasks: list[str]) -> dict[str, Path]:
    from pbexport.export import main_export
    from pbexport.runtime import nchwc_block_size

    paths = {"baked": out / "baked", "shared": out / "shared", "multitask": out / "multitask"}
    for mode, path in paths.items():
        main_export(bundle, path, mode=mode, tasks=tasks, verify=False)
    block = nchwc_block_size()
    if block is not None:  # the multitask graph on this CPU's blocked convolutions (--nchwc-block)
        paths["multitask-nchwc"] = out / "multitask-nchwc"
        main_export(bundle, paths["multitask-nchwc"], mode="multitask", tasks=tasks, verify=False, nchwc_block=block)
    return paths


def export_plain(bundle: Path, path: Path) -> dict:
    import onnx

    from pbexport.bundle import load_bundle
    from pbexport.export.graph import export_base

    b = load_bundle(bundle)
    base = export_base(b.backbone(), b.masked_names)
    onnx.save_model(base.model, str(path))
    masked = sum(math.prod(s) for s in b.masked_shapes.values())
    return {"masked_params": masked, "tasks": b.tasks}


# ----------------------------------------------------------------------------- measuring
def sessions_for(paths: dict[str, Path], plain: Path, task: str, threads: int) -> dict:
    import onnxruntime as ort

    from pbexport.export.verify import read_adapter

    def sess(path, disabled=None):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        kw = {"disabled_optimizers": disabled} if disabled else {}
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], **kw)

    def multitask(directory: Path, label: str) -> dict:
        """The multitask graph of ``directory`` three ways: through its adapter, with its tensors as inputs,
        and as the runtime's feed="weights" runs it; each directory has its own adapters (nchwc: masks and
        BN scales in the blocked layout)."""
        adapter_path = directory / "adapters" / f"{task}.onnx_adapter"
        adapter = ort.LoraAdapter()
        adapter.Load(str(adapter_path))
        ro = ort.RunOptions()
        ro.add_active_adapter(adapter)
        model = sess(directory / "model.onnx")
        return {f"{label} (adapter)": (model, {}, ro), f"{label} (inputs)": (model, read_adapter(adapter_path), None),
                f"{label} (weights)": weights_session(directory, task, sess), f"_keep {label}": adapter}

    out = {"plain": (sess(plain), {}, None),
           "plain (no NCHWc)": (sess(plain, ["NchwcTransformer"]), {}, None),
           "baked": (sess(paths["baked"] / f"{task}.onnx"), {}, None),
           "shared": (sess(paths["shared"] / f"{task}.onnx"), {}, None),
           **multitask(paths["multitask"], "multitask")}
    if "multitask-nchwc" in paths:
        out.update(multitask(paths["multitask-nchwc"], "multitask nchwc"))
    return out


def weights_session(directory: Path, task: str, sess) -> tuple:
    """(body session, feed, None, switch seconds) as the runtime's feed="weights" runs a task: the unpack
    graph's weights for the task (its run timed: the cost of a switch to a task not cached) and the task's
    tensors the body reads."""
    from pbexport.export.verify import read_adapter
    from pbexport.runtime import weights_feed

    index = json.loads((directory / "tasks.json").read_text())
    unpack, body = sess(directory / index["unpack"]), sess(directory / index["body"])
    tensors = read_adapter(directory / "adapters" / f"{task}.onnx_adapter")

    times, feed = [], None
    for _ in range(5):
        t = time.perf_counter()
        feed, unknown = weights_feed(unpack, body, index["weights"], tensors)
        times.append(time.perf_counter() - t)
        assert not unknown, f"adapter tensors the graphs do not take: {unknown}"
    return body, feed, None, float(np.median(times))


def op_counts(plain: Path, nchwc: Path, threads: int) -> dict[str, int]:
    """Nodes per run after onnxruntime's optimizations: the plain graph's, and the NCHWc multitask graph's
    that compute weights from the task's tensors (fed per run: nothing folds them), i.e. the unpack."""
    import onnx
    import onnxruntime as ort

    def optimized(path: Path) -> onnx.GraphProto:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath).graph

    g = optimized(nchwc)
    image, task = {g.input[0].name}, {i.name for i in g.input[1:]}
    for node in g.node:  # topological order: what depends on the image, what on the task's tensors only
        if image & set(node.input):
            image.update(node.output)
        elif task & set(node.input):
            task.update(node.output)
    unpack = sum(1 for n in g.node if set(n.output) & task and not set(n.output) & image)
    return {"plain": len(optimized(plain).node), "unpack": unpack}


SETTLE_S = 0.05  # pause before each graph's turn: the previous session's spinning threads go idle


def latency(sessions: dict, size: int, batch: int, repeats: int, clock=time.perf_counter,
            inner: int = 5, settle_s: float = SETTLE_S) -> dict[str, dict]:
    """Median and min seconds per graph, and the median over rounds of its time / the plain graph's time
    in the same round (robust to slow drifts in what else the machine runs). In a round each graph runs
    ``inner`` times back to back and counts the median of those, so one scheduler hiccup does not decide
    a round's ratio. onnxruntime's worker threads spin a while after a run, so a graph timed right after
    another shares the cores with that session's threads: each graph's turn starts with a pause
    (``settle_s``, when those threads go idle) and two untimed runs, and each round takes the graphs in a
    fresh random order. Without the pause, cifar_resnet56 at batch 1 timed a median ~1.3x its minimum and
    ratios of identical kernels swung 0.73-1.06; with it, within 5% and 0.98-1.01 (three runs)."""
    rng = np.random.default_rng(0)
    x = rng.random((batch, 3, size, size), dtype=np.float32)
    runs = {k: v[:3] for k, v in sessions.items() if not k.startswith("_")}
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for _ in range(repeats):
        for k in rng.permutation(names):
            sess, feeds, ro = runs[k]
            time.sleep(settle_s)
            for _ in range(2):  # untimed: the first turn's warm-up too
                sess.run(None, {"image": x, **feeds}, ro)
            samples = []
            for _ in range(inner):
                t = clock()
                sess.run(None, {"image": x, **feeds}, ro)
                samples.append(clock() - t)
            times[k].append(float(np.median(samples)))
    plain, base = np.array(times["plain"]), np.array(times["plain (no NCHWc)"])
    return {k: {"median_s": float(np.median(v)), "min_s": float(np.min(v)),
                "x_plain": float(np.median(np.array(v) / plain)),
                "x_plain_no_nchwc": float(np.median(np.array(v) / base))} for k, v in times.items()}


def memory_child(mode: str, paths: list[str], size: int, threads: int) -> dict:
    """Runs in a fresh process: load every task at once, run each once, report RSS and load times."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    x = np.zeros((1, 3, size, size), np.float32)
    rss0 = resident_bytes()
    create = []
    if mode == "multitask":
        t = time.perf_counter()
        sess = ort.InferenceSession(paths[0], so, providers=["CPUExecutionProvider"])
        create.append(time.perf_counter() - t)
        adapters = []
        for p in paths[1:]:
            t = time.perf_counter()
            ad = ort.LoraAdapter()
            ad.Load(p)
            adapters.append(ad)
            create.append(time.perf_counter() - t)
        for ad in adapters:
            ro = ort.RunOptions()
            ro.add_active_adapter(ad)
            sess.run(None, {"image": x}, ro)
    else:
        sessions = []
        for p in paths:
            t = time.perf_counter()
            sessions.append(ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]))
            create.append(time.perf_counter() - t)
        for s in sessions:
            s.run(None, {"image": x})
    return {"rss_bytes": resident_bytes() - rss0, "create_s": create}


def measure_memory(mode: str, paths: list[Path], size: int, threads: int) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_export as b; "
            f"print(json.dumps(b.memory_child({mode!r}, {[str(p) for p in paths]!r}, {size}, {threads})))")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"memory measurement of {mode} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def bench_backbone(name: str, size: int, task_counts: list[int], args, workdir: Path) -> dict:
    print(f"\n== {name} @ {size}x{size}: training {max(task_counts)} tiny tasks, packing, exporting", flush=True)
    t0 = time.time()
    bundle = make_bundle(workdir, name, size, max(task_counts))
    plain = workdir / "plain.onnx"
    info = export_plain(bundle, plain)
    all_tasks = info["tasks"]
    from pbexport.runtime import nchwc_block_size

    result = {"backbone": name, "input_size": size, "nchwc_block": nchwc_block_size(),
              "masked_params": info["masked_params"],
              "plain_bytes": plain.stat().st_size, "by_tasks": {}}
    for n in task_counts:
        tasks = all_tasks[:n]
        paths = export_all(bundle, workdir / f"export{n}", tasks)
        from pbexport.bundle import load_bundle

        b = load_bundle(bundle)
        head_bytes = sum(sum(v.nbytes for v in b.task_tensors(t).values()) for t in tasks)
        data = paths["shared"] / "backbone.onnx.data"
        bound = data.stat().st_size + n * 1.1 * info["masked_params"] / 8 + head_bytes
        disk = {m: dir_bytes(p) for m, p in paths.items()}
        entry = {"disk": disk, "shared_bound": bound, "head_bytes": head_bytes,
                 "shared_task_graph_bytes": [dir_bytes(paths["shared"] / f"{t}.onnx") for t in tasks],
                 "memory": {}}
        for mode in ("baked", "shared", "multitask"):
            files = ([paths[mode] / "model.onnx"] + [paths[mode] / "adapters" / f"{t}.onnx_adapter" for t in tasks]
                     if mode == "multitask" else [paths[mode] / f"{t}.onnx" for t in tasks])
            entry["memory"][mode] = measure_memory(mode, files, size, args.threads)
        entry["memory"]["plain"] = measure_memory("plain", [plain] * n, size, args.threads)
        result["by_tasks"][n] = entry
        if n == max(task_counts):
            if "multitask-nchwc" in paths:
                result["op_counts"] = op_counts(plain, paths["multitask-nchwc"] / "model.onnx", args.threads)
            result["latency"] = {}
            sessions = sessions_for(paths, plain, tasks[0], args.threads)
            result["weights_switch_s"] = {k: v[3] for k, v in sessions.items() if k.endswith("(weights)")}
            for batch, reps, inner in ((1, args.repeats, 7), (32, max(3, args.repeats // 4), 3)):
                print(f"   latency at batch {batch} ({reps} rounds x {inner} runs)...", flush=True)
                result["latency"][batch] = latency(sessions, size, batch, reps, CLOCKS[args.clock], inner)
            del sessions
    result["seconds"] = time.time() - t0
    return result


def report(r: dict) -> None:
    name, size = r["backbone"], r["input_size"]
    print(f"\n## {name} @ {size}x{size}: {r['masked_params']:,} masked parameters, plain graph {r['plain_bytes']:,} B")
    rows = []
    for n, e in r["by_tasks"].items():
        d = e["disk"]
        rows.append([n, d["baked"], d["shared"], d["multitask"], int(e["shared_bound"]),
                     "yes" if d["shared"] <= e["shared_bound"] else "NO",
                     max(e["shared_task_graph_bytes"])])
    print(format_table(["tasks", "baked B", "shared B", "multitask B", "shared bound B", "shared<=bound",
                        "largest shared task graph B"], rows))
    lat = r.get("latency")
    if lat:
        rows = []
        for mode in lat[1]:
            b1, b32 = lat[1][mode], lat[32][mode]
            target = TARGETS.get(mode)
            ok = "-" if target is None else ("yes" if b1["x_plain"] <= target[0] and b32["x_plain"] <= target[1]
                                             else "NO")
            rows.append([mode, 1e3 * b1["median_s"], 1e3 * b1["min_s"], b1["x_plain"], 1e3 * b32["median_s"],
                         1e3 * b32["min_s"], b32["x_plain"], b1["x_plain_no_nchwc"], b32["x_plain_no_nchwc"],
                         "-" if target is None else f"{target[0]}/{target[1]}", ok])
        print("\n" + format_table(["graph", "b1 ms", "b1 min", "b1 x plain", "b32 ms", "b32 min", "b32 x plain",
                                   "b1 x no-NCHWc", "b32 x no-NCHWc", "target", "met"], rows, floatfmt=".3f"))
        print("(x plain: median over rounds of the graph's time / the plain graph's time in the same round)")
    rows = []
    for n, e in r["by_tasks"].items():
        for mode, m in e["memory"].items():
            rows.append([n, mode, m["rss_bytes"] / 2**20, 1e3 * float(np.median(m["create_s"][:n if mode != "multitask"
                                                                                              else 1])),
                         1e3 * sum(m["create_s"])])
    print("\n" + format_table(["tasks", "mode", "RSS MiB (all loaded)", "first/median session ms", "total load ms"],
                              rows, floatfmt=".1f"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES)
    p.add_argument("--sizes", nargs="+", type=int, default=None,
                   help="input size per backbone (default: each backbone's own, 224 / 32)")
    p.add_argument("--tasks", nargs="+", type=int, default=[1, 3, 10])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: process CPU time (use with --threads 1 on a busy machine)")
    p.add_argument("--repeats", type=int, default=20, help="rounds at batch 1 (batch 32: a quarter, at least 3)")
    p.add_argument("--out", default="bench-out/export.json")
    p.add_argument("--workdir", default=None, help="keep bundles and exports here (default: a temp dir)")
    args = p.parse_args(argv)
    from pbexport.backbones import default_input_spec

    sizes = args.sizes or [default_input_spec(b).size for b in args.backbones]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in zip(args.backbones, sizes, strict=True):
            work = Path(args.workdir or tmp) / name
            work.mkdir(parents=True, exist_ok=True)
            r = bench_backbone(name, size, sorted(args.tasks), args, work)
            report(r)
            results.append(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    out.write_text(json.dumps({"threads": args.threads, "clock": args.clock, "repeats": args.repeats, "loadavg": load,
                               "settle_s": SETTLE_S, "results": results}, indent=2) + "\n")
    print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (other work on the machine skews latency)")
    print(f"results -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
