"""tools/bench_record.py: the benchmarks' light results survive the loss of bench-out/. A restored run has no
weights, yet bench_accuracy.py reuses it with its recorded storage figures, and the report reads it."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, import_tool


def _tree(root, files: dict) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_record_keeps_finished_results_and_no_weight_checkpoint_or_unfinished_run(tmp_path):
    record = import_tool("bench_record")
    results = tmp_path / "bench-out"
    done, cand, running = "accuracy/runs/bb/ds/piggyback-bn-s0", "candidates/lr-bn-0.01", "accuracy/runs/bb/ds/x-s1"
    _tree(results, {"train.json": "{}", "accuracy/accuracy.json": "{}", "posthoc.json": "{}",
                    f"{done}/config.json": "{}", f"{done}/metrics.json": "{}", f"{done}/bench-storage.json": "{}",
                    f"{done}/model.safetensors": "w", f"{done}/checkpoints/epoch-0001.json": "{}",
                    f"{done}/{cand}/config.json": "{}", f"{done}/{cand}/metrics.json": "{}",
                    f"{running}/config.json": "{}", f"{running}/checkpoints/epoch-0001.json": "{}",
                    f"{running}/{cand}/config.json": "{}", f"{running}/{cand}/metrics.json": "{}",
                    "int8/bundle-x/manifest.json": "{}", "int8/bundle-x/tasks/t.json": "{}"})
    kept = {p.relative_to(results).as_posix() for p in record.light_files(results)}
    assert kept == {"train.json", "accuracy/accuracy.json", "posthoc.json", f"{done}/config.json",
                    f"{done}/metrics.json", f"{done}/bench-storage.json", f"{done}/{cand}/config.json",
                    f"{done}/{cand}/metrics.json"}


def test_save_then_restore_brings_back_contents_and_times_and_never_overwrites(tmp_path, capsys):
    record = import_tool("bench_record")
    results, rec = tmp_path / "bench-out", tmp_path / "bench-record"
    _tree(results, {"train.json": '{"a": 1}', "export.json": '{"b": 2}'})
    os.utime(results / "train.json", (1_700_000_000, 1_700_000_000))
    assert record.save(results, rec) == {"new": 2, "changed": 0, "unchanged": 0}
    assert record.save(results, rec) == {"new": 0, "changed": 0, "unchanged": 2}
    (results / "export.json").write_text('{"b": 3}')
    assert record.save(results, rec) == {"new": 0, "changed": 1, "unchanged": 1}

    fresh = tmp_path / "fresh"
    _tree(fresh, {"export.json": '{"local": true}'})
    assert record.restore(rec, fresh) == {"restored": 1, "present": 0, "kept local": 1}
    assert (fresh / "train.json").read_text() == '{"a": 1}'
    assert (fresh / "train.json").stat().st_mtime == 1_700_000_000
    assert (fresh / "export.json").read_text() == '{"local": true}'  # bench-out's own work wins
    # a run is restored whole or not at all: never into a run directory bench-out already has (here, one
    # that is training again)
    run = "accuracy/runs/bb/ds/piggyback-bn-s0"
    _tree(results, {f"{run}/config.json": "{}", f"{run}/metrics.json": "{}", f"{run}/candidates/c/config.json": "{}",
                    f"{run}/candidates/c/metrics.json": "{}"})
    record.save(results, rec)
    _tree(fresh, {f"{run}/config.json": "{}"})
    assert record.restore(rec, fresh) == {"restored": 0, "present": 2, "kept local": 4}
    assert sorted(p.name for p in (fresh / run).rglob("*")) == ["config.json"]
    # the record keeps what a later bench-out lacks
    (results / "train.json").unlink()
    assert record.save(results, rec) == {"new": 0, "changed": 0, "unchanged": 5}
    assert (rec / "train.json").exists() and "train.json" in json.loads((rec / "index.json").read_text())["files"]
    # a record file that is not what its index says is refused, naming it
    (rec / "train.json").write_text("{}")
    with pytest.raises(SystemExit, match="train.json: missing or not the file the record's index lists"):
        record.restore(rec, tmp_path / "other")
    assert not (tmp_path / "other").exists()  # checked before anything is written


def _bench(out, data, *seeds: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "bench_accuracy.py"), "--quiet", "--backbones",
                           "cifar_resnet20", "--datasets", str(data), "--variants", "piggyback", "finetune-contig",
                           "--seeds", *(seeds or ["0"]), "--epochs", "1", "--out", str(out)],
                          capture_output=True, text=True)


def _report(results, tmp_path) -> str:
    out = tmp_path / "BENCHMARKS.md"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "write_benchmarks.py"), "--results", str(results),
                        "--out", str(out), "--img-dir", str(tmp_path / "img")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out.read_text()


def test_restored_runs_are_reused_without_weights_with_their_recorded_figures(resnet20_weights, tiny_npz, tmp_path):
    record = import_tool("bench_record")
    first = _bench(tmp_path / "bench-out" / "accuracy", tiny_npz, "0", "1", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    bundle_goal = ("| 3-task cifar_resnet20 bundle <= backbone + 3 x (1 bit/masked param + head + BN) "
                   "| total <= budget | ")
    measured = _report(tmp_path / "bench-out", tmp_path).split(bundle_goal)[1].split("\n")[0]
    assert measured.endswith("| met | - |")  # packed from the runs' weights, kept in three-task.json
    record.save(tmp_path / "bench-out", tmp_path / "bench-record")
    saved = {p.relative_to(tmp_path / "bench-record").as_posix() for p in (tmp_path / "bench-record").rglob("*")
             if p.is_file()}
    assert {"accuracy/bundles/cifar_resnet20.info.json", "three-task.json"} <= saved
    assert not any(name.endswith(".safetensors") or "checkpoints" in name for name in saved)

    # a new checkout: only the record
    restored = tmp_path / "restored"
    record.restore(tmp_path / "bench-record", restored)
    again = _bench(restored / "accuracy", tiny_npz, "0", "1", "2")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert not list(restored.rglob("*.safetensors"))  # nothing was trained again
    before = json.loads((tmp_path / "bench-out" / "accuracy" / "accuracy.json").read_text())
    after = json.loads((restored / "accuracy" / "accuracy.json").read_text())
    keys = ["variant", "seed", "test_accuracy", "bytes_per_task", "stored_bits_per_param", "train_seconds"]
    assert [{k: r[k] for k in keys} for r in after["rows"]] == [{k: r[k] for k in keys} for r in before["rows"]]
    assert after["base_task"]["cifar_resnet20"] == {**before["base_task"]["cifar_resnet20"], "recorded": True}
    assert "(recorded: no run with weights here)" in again.stdout

    text = _report(restored, tmp_path)
    assert "as recorded: the bundle is gone" in text and "| tiny-piggyback-s2 |" in text
    assert "as recorded: no run of this backbone had its weights" in text
    assert text.split(bundle_goal)[1].split("\n")[0] == measured


def test_a_run_without_weights_or_recorded_figures_is_named(resnet20_weights, tiny_npz, tmp_path):
    first = _bench(tmp_path / "accuracy", tiny_npz)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "accuracy" / "runs" / "cifar_resnet20" / "tiny" / "finetune-contig-s0"
    (run / "model.safetensors").unlink()
    (run / "bench-storage.json").unlink()
    again = _bench(tmp_path / "accuracy", tiny_npz)
    assert again.returncode != 0 and f"{run}: no weights and no bench-storage.json" in again.stderr


def test_a_smaller_live_bundle_keeps_the_recorded_tasks_it_lacks():
    benchlib = import_tool("benchlib")

    def info(fingerprint, **sizes):
        return {"backbone": {"fingerprint": fingerprint}, "manifest_size": 100,
                "total_size": 1000 + 100 + sum(sizes.values()), "tasks": {n: {"size": s} for n, s in sizes.items()}}

    recorded = info("f", a=10, b=20)
    live = info("f", b=25, c=30)  # a new checkout repacked b and added c; a has no weights there
    merged = benchlib.merge_recorded_tasks(live, recorded)
    assert merged["tasks"] == {"a": {"size": 10}, "b": {"size": 25}, "c": {"size": 30}}  # the live b wins
    assert merged["total_size"] == live["total_size"] + 10 and merged[benchlib.CARRIED] == ["a"]
    # merged again later, a stays carried and nothing is counted twice
    again = benchlib.merge_recorded_tasks(info("f", c=30), merged)
    assert again["tasks"].keys() == {"a", "b", "c"} and again[benchlib.CARRIED] == ["a", "b"]
    assert again["total_size"] == 1000 + 100 + 30 + 10 + 25
    assert benchlib.merge_recorded_tasks(live, info("other", a=10)) == live  # another backbone: nothing carried
    assert benchlib.merge_recorded_tasks(live, None) == live
    assert benchlib.merge_recorded_tasks(live, info("f", b=20)) == live  # nothing missing: the live info as it is


def test_a_live_bundle_is_reported_and_saved_with_the_recorded_tasks_it_lacks(tiny_npz, tmp_path):
    from pbexport import load_bundle, pack_runs
    from pbexport.training import TrainConfig, train

    record = import_tool("bench_record")
    results = tmp_path / "bench-out"
    run = results / "accuracy" / "runs" / "cifar_resnet20" / "tiny" / "piggyback-bn-s0"
    train(TrainConfig(backbone="cifar_resnet20", data=str(tiny_npz), task="tiny-piggyback-bn-s0", epochs=1,
                      batch_size=8, lr_bn=1e-2), run, progress=False)
    bundle = results / "accuracy" / "bundles" / "cifar_resnet20"
    pack_runs([run], bundle)
    live = load_bundle(bundle).info()
    earlier = {**live, "tasks": {"tiny-old-s0": {**live["tasks"]["tiny-piggyback-bn-s0"], "size": 1234}}}
    for task in earlier["tasks"].values():
        task.pop("layers", None)
    # restored beside the live bundle, as a new checkout has it: the earlier checkout's bundle held another task
    (bundle.parent / "cifar_resnet20.info.json").write_text(json.dumps(earlier))
    storage = _report(results, tmp_path).split("## Storage", 1)[1].split("\n## ", 1)[0]
    assert "| tiny-piggyback-bn-s0 |" in storage and "| tiny-old-s0 |" in storage
    assert "1 of its tasks as recorded from an earlier checkout's bundle" in storage

    (tmp_path / "bench-record" / "accuracy" / "bundles").mkdir(parents=True)
    (tmp_path / "bench-record" / "accuracy" / "bundles" / "cifar_resnet20.info.json").write_text(json.dumps(earlier))
    record.save(results, tmp_path / "bench-record")
    saved = json.loads((tmp_path / "bench-record" / "accuracy" / "bundles" / "cifar_resnet20.info.json").read_text())
    assert list(saved["tasks"]) == ["tiny-old-s0", "tiny-piggyback-bn-s0"]
    assert saved[import_tool("benchlib").CARRIED] == ["tiny-old-s0"]
    assert saved["total_size"] == live["total_size"] + 1234
