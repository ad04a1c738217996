"""What the benchmark scripts share: the accuracy runs' naming and the rounding of their comparisons, and a
memory probe. Torch-free, so that write_benchmarks.py can read the results without importing the benchmarks."""

from __future__ import annotations

import re
from pathlib import Path

# runs/<backbone>/<dataset>/<variant>-s<seed>; recipe names carry learning rates (piggyback-bn-head1e-3)
_RUN_DIR = re.compile(r"(?P<variant>[a-z0-9.-]+)-s(?P<seed>\d+)")


def run_dir_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def parse_run_dir_name(name: str) -> tuple[str, int] | None:
    """(variant, seed) of a run directory's name, or None for anything else."""
    m = _RUN_DIR.fullmatch(name)
    return (m["variant"], int(m["seed"])) if m else None


def has_weights(run) -> bool:
    """Does accuracy run directory ``run`` hold its weights? A run restored from bench-record/
    (tools/bench_record.py) has its config and metrics only."""
    return (Path(run) / "model.safetensors").is_file()


def points_difference(a: float, b: float) -> float:
    """a - b in accuracy points. Accuracies are counts over one test set: equal counts must compare equal,
    not by the last bit of a float mean (and -0.0 prints as +0.00)."""
    return round(a - b, 9) + 0.0


def resident_bytes() -> int:
    """This process's resident memory (Linux; 0 where /proc is not available)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


SPLIT_HEADERS = ["dataset", "split", "images", "with a near copy in training %", "per seed %"]


def split_rows(datasets: dict) -> list[list]:
    """tools/split_study.py's table (its "datasets" result): one row per dataset, split and image set, in %."""
    return [[dataset, split, images, 100 * sum(shares) / len(shares), " ".join(f"{100 * x:.1f}" for x in shares)]
            for dataset, by_split in datasets.items() for split, by_images in by_split.items()
            for images, shares in by_images.items()]


CARRIED = "tasks_carried_from_record"  # in a saved bundle info: the tasks kept from the recorded info


def merge_recorded_tasks(live: dict, recorded: dict | None) -> dict:
    """A live bundle's info, with the tasks of the recorded info of the same bundle that it lacks carried over.

    A new checkout packs only the runs it has weights for, so its bundle holds fewer tasks than the one recorded
    before; saved as it is, its info would drop the tasks measured earlier. A task's figures (its file's size,
    masks, entropy) depend on its task file and the backbone alone, so the tasks of a recorded info on the same
    backbone (fingerprint) stay, named in CARRIED, and count in ``total_size``; a live task replaces a recorded
    one of its name. On another backbone nothing is carried."""
    if not recorded or recorded["backbone"]["fingerprint"] != live["backbone"]["fingerprint"]:
        return live
    carried = {name: t for name, t in recorded["tasks"].items() if name not in live["tasks"]}
    if not carried:
        return live
    return {**live, "tasks": {**carried, **live["tasks"]},
            "total_size": live["total_size"] + sum(t["size"] for t in carried.values()), CARRIED: sorted(carried)}
