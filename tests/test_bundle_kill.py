"""SIGKILL `pbexport pack` at random points, again and again: the bundle must always load, completely.

Most kills hit a pack forked from a server process that has already imported torch (a fresh
interpreter spends seconds importing, and a kill there proves nothing); the child runs the CLI
entry point `pbexport.cli.main` exactly as `python -m pbexport` does. A few kills and the final
complete pack use real `python -m pbexport pack` processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pbexport.bundle import CRASH_ENV, MANIFEST, load_bundle
from pbexport.training import TrainConfig, train

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")

REPO = Path(__file__).resolve().parents[1]
SEED = 20240531
FORKED_KILLS = 20
PROCESS_KILLS = 2

SERVER = r"""
import json, os, sys
import torch  # noqa: F401  everything a pack imports, loaded once before forking
import pbexport.backbones, pbexport.bundle, pbexport.masking, pbexport.runs, pbexport.taskmodel  # noqa: F401
from pbexport.cli import main

print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.environ.update(request["env"])
        code = 1
        try:
            main(request["args"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code)
    print(pid, flush=True)
    sys.stdin.readline()  # the test says when to reap (a zombie's pid cannot be reused before)
    _, status = os.waitpid(pid, 0)
    print(status, flush=True)
"""


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


class ForkServer:
    def __init__(self):
        started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=_env())
        assert self.proc.stdout.readline().strip() == "ready"
        self.startup = time.perf_counter() - started

    def run(self, args: list, kill_after: float | None = None, crash_at: str | None = None) -> int:
        """Run `pbexport <args>` in a forked child; SIGKILL it after ``kill_after`` s, or let it SIGKILL
        itself at step ``crash_at``. Returns the child's wait status."""
        env = {CRASH_ENV: crash_at} if crash_at else {}
        self.proc.stdin.write(json.dumps({"args": [str(a) for a in args], "env": env}) + "\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(pid, signal.SIGKILL)  # our own child; not yet reaped, so the pid is still it
        self.proc.stdin.write("reap\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _content(bundle, task: str) -> str:
    """Digest of what a task adds (masks and tensors), independent of its name."""
    h = hashlib.sha256()
    for name, mask in bundle.task_masks(task).items():
        h.update(name.encode() + mask.tobytes())
    for name, arr in sorted(bundle.task_tensors(task).items()):
        h.update(name.encode() + arr.tobytes())
    return h.hexdigest()


def _snapshot(path: Path) -> dict[str, str]:
    """task -> content; fails if the bundle does not load or any task file does not read back."""
    bundle = load_bundle(path)
    return {task: _content(bundle, task) for task in bundle.tasks}


def _check(state: dict, path: Path, targets: dict, content: dict, status: int, label) -> dict:
    """After an interrupted pack: nothing lost, every task old or new (whole), a finished pack committed."""
    after = _snapshot(path)
    assert set(state) <= set(after), f"{label}: lost tasks {set(state) - set(after)}"
    assert set(after) <= set(state) | set(targets), label
    for task, digest in after.items():
        assert digest in {state.get(task), content[targets[task]] if task in targets else None}, (label, task)
    if status == 0:
        assert all(after[t] == content[src] for t, src in targets.items()), label
    return after


@pytest.fixture(scope="module")
def kill_runs(tmp_path_factory, tiny_npz) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kill-runs")
    out = {}
    for name, method, train_bn in (("a", "piggyback", True), ("b", "piggyback", False), ("c", "classifier", False)):
        train(TrainConfig(backbone="cifar_resnet20", data=str(tiny_npz), task=name, method=method, train_bn=train_bn,
                          epochs=1, batch_size=8, max_train_samples=16, input_size=32, lr_mask=4e-3),
              root / name, progress=False)
        out[name] = root / name
    return out


CRASH_STEPS = ["task-partial", "task-written", "manifest-partial", "manifest-written", "gc"]


def test_sigkill_during_pack_never_breaks_the_bundle(kill_runs, tmp_path):
    rng = random.Random(SEED)
    bundle = tmp_path / "bundle"
    runs = kill_runs
    server = ForkServer()
    try:
        # what each run packs to (name-independent)
        assert server.run(["pack", runs["a"], runs["b"], runs["c"], "-o", tmp_path / "ref"]) == 0
        content = _snapshot(tmp_path / "ref")

        # an interrupted first pack leaves no bundle, and the next pack completes it
        for step in ("backbone-partial", "backbone-written", "task-written", "manifest-partial"):
            assert _killed(server.run(["pack", runs["a"], "--name", "t0", "-o", bundle], crash_at=step)), step
            assert not (bundle / MANIFEST).exists()
        assert server.run(["pack", runs["a"], "--name", "t0", "-o", bundle]) == 0
        state = _snapshot(bundle)
        assert state == {"t0": content["a"]}

        # the kinds of update: replace a task's content, add a task, pack two runs at once
        def kinds(i):
            if i % 3 == 2:
                return ["pack", runs["c"], runs["b"], "--replace"], {"c": "c", "b": "b"}
            src = "ab"[i % 2]
            name = f"t{rng.randrange(4)}"
            return ["pack", runs[src], "--name", name, "--replace"], {name: src}

        # every step where a writer can die, for every kind of update (and for remove)
        for step in CRASH_STEPS:
            for i in range(3):
                args, targets = kinds(i)
                status = server.run([*args, "-o", bundle], crash_at=step)
                assert _killed(status) or step == "gc", (step, i)  # gc: nothing may be left to delete
                state = _check(state, bundle, targets, content, status, (step, i))
        for step in ("manifest-partial", "manifest-written", "gc"):
            task = next(iter(state))
            status = server.run(["remove", bundle, "--task", task], crash_at=step)
            after = _snapshot(bundle)
            assert set(after) in (set(state), set(state) - {task}) and all(after[t] == state[t] for t in after)
            state = after

        # SIGKILL after random delays, drawn over the measured duration of each kind of pack
        duration = {}
        for k in range(3):
            args, targets = kinds(k)
            started = time.perf_counter()
            assert server.run([*args, "-o", bundle]) == 0
            duration[k] = time.perf_counter() - started
            state = _check(state, bundle, targets, content, 0, ("timed", k))
        statuses = []
        for i in range(FORKED_KILLS):
            args, targets = kinds(i)
            status = server.run([*args, "-o", bundle], kill_after=rng.uniform(0.0, 1.2 * duration[i % 3]))
            statuses.append(status)
            state = _check(state, bundle, targets, content, status, ("random", i))
        assert sum(map(_killed, statuses)) >= FORKED_KILLS // 3, statuses  # kills landed while packs ran

        # real `python -m pbexport pack` processes, killed late enough to be past the imports
        real = server.startup + max(duration.values())
        for _ in range(PROCESS_KILLS):
            proc = subprocess.Popen([sys.executable, "-m", "pbexport", "pack", str(runs["a"]), "--name", "t9",
                                     "--replace", "-o", str(bundle)], env=_env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.6 * real, 1.3 * real))
            proc.send_signal(signal.SIGKILL)
            status = proc.wait()
            state = _check(state, bundle, {"t9": "a"}, content, 0 if status == 0 else -1, "process")
    finally:
        server.close()
    # finally a complete pack succeeds, and leaves no orphan files behind
    done = subprocess.run([sys.executable, "-m", "pbexport", "pack", str(runs["c"]), "--name", "final",
                           "-o", str(bundle)], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    state = _check(state, bundle, {"final": "c"}, content, 0, "final")
    manifest = json.loads((bundle / MANIFEST).read_text())
    on_disk = {f"tasks/{p.name}" for p in (bundle / "tasks").iterdir()}
    assert on_disk == {t["file"] for t in manifest["tasks"]}
    assert sorted(p.name for p in bundle.iterdir()) == ["backbone.safetensors", "manifest.json", "tasks"]
