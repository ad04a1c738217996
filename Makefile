# Two entry points on a fresh machine (only Python needed): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo test test-fast lint bench bench-report clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[train,test]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/pbexport demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check pbexport tests tools

# Every benchmark in sequence, then BENCHMARKS.md (tools/write_benchmarks.py). Results go to bench-out/.
# Training, export, runtime and int8 take about 25 minutes on 2 cores; the accuracy benchmark runs last and
# takes hours: 2 backbones x 2 datasets x 4 methods x 3 seeds, 10 epochs each (the default piggyback-bn
# trains each task twice, to choose its BN lr); a cifar_resnet20 run takes 3-6 minutes on 2 cores, a
# cifar_resnet56 run 11-17 minutes; --frontier adds 21 recipes x 2 datasets on cifar_resnet20 (about
# 2.5 hours), and the fine-tune baselines at other settings (no augmentation, head lr 1e-2), which the
# accuracy goal compares with, 12 more runs per backbone (about 4.3 hours); the recipes that
# docs/TRAINING.md compares over 3 seeds get seeds 1 and 2, and run on cifar_resnet56 too (about 4 hours;
# the fixed BN lrs 1e-2 and 3e-3 are copied from the default's BN-lr candidates, not trained again), and a
# larger validation split, BN lr 3e-2 and mask lr 1e-3 on cifar_resnet20 / GTSRB (about 55 minutes), and
# the default and fine-tuning with a contiguous validation split on cifar_resnet20 (about 1.4 hours) and cifar_resnet56
# (about 4 hours), and on cifar_resnet20's GTSRB keeping the mean of the last 3 epochs (about 45 minutes) and
# the mask (fine-tuning: the backbone) waiting an epoch while the head settles (about 30 minutes), and Adam's
# eps for the mask scores, 1e-5 and 3e-6 on cifar_resnet20 (3 seeds), and on cifar_resnet56 / GTSRB 1e-5 (1 seed)
# and 3e-6 (3 seeds; its score gradients are weaker) (about 1.9 hours), and seeds 3-5 of the default, finetune and
# finetune-contig on both backbones, kept apart in bench-out/accuracy-seeds3-5 (the
# goals stay on seeds 0-2; about 3.4 hours): about 30 hours in all (the grid about 7; run times measured on 2
# cores), and the studies below about 50 minutes more
# (BENCHMARKS.md estimates what is left from the runs that finished). tools/split_study.py counts the validation
# images with a near copy in training, per split (seconds, no training); tools/score_gradients.py measures the mask
# scores' gradients at the start, the scale --mask-eps compares with (seconds); tools/selection_study.py then checks the
# choices made on the validation split against the kept checkpoints (about 20 minutes, no training), and
# tools/posthoc_study.py applies levers after training (precise BN, averaged epochs, the BN-lr choice on
# shifted validation images) to the cifar_resnet20 runs (about 30 minutes, no training).
# Finished accuracy runs are reused, so an interrupted `make bench` continues where it stopped. bench-out/ is
# git-ignored (weights, checkpoints); tools/bench_record.py keeps its light results in bench-record/ (tracked):
# `restore` first brings back what an earlier checkout measured (its runs are reused without their weights),
# `save` last records this run's (commit bench-record/ after it).
bench: setup
	$(BIN)/python tools/bench_record.py restore
	$(BIN)/python tools/bench_train.py
	$(BIN)/python tools/bench_export.py --repeats 40
	$(BIN)/python tools/bench_export.py --clock cpu --threads 1 --repeats 40 --out bench-out/export-cpu1.json
	$(BIN)/python tools/bench_runtime.py
	$(BIN)/python tools/bench_runtime.py --backbone resnet18 --input-size 64 --out bench-out/runtime-resnet18.json
	$(BIN)/python tools/bench_int8.py --quiet
	$(BIN)/python tools/bench_accuracy.py --quiet --variants finetune-none finetune-head1e-2
	$(BIN)/python tools/bench_accuracy.py --quiet --frontier
	$(BIN)/python tools/bench_accuracy.py --quiet --backbones cifar_resnet20 --variants piggyback-bn-head1e-3 \
		piggyback-bn-head3e-3 piggyback-bn-head1e-2 piggyback-bn-none piggyback-bn-bn3e-3 piggyback-bn-bn5e-3 \
		piggyback-bn-head3e-2-bn3e-3 piggyback-bn-lr1e-4-head1e-2
	$(BIN)/python tools/bench_accuracy.py --quiet --backbones cifar_resnet56 --variants piggyback-bn-head1e-3 \
		piggyback-bn-head3e-3 piggyback-bn-head1e-2 piggyback-bn-bn3e-3
	$(BIN)/python tools/bench_accuracy.py --quiet --backbones cifar_resnet20 --datasets gtsrb \
		--variants piggyback-bn-val20 finetune-val20 piggyback-bn-bn3e-2 \
		piggyback-bn-lr1e-3-head1e-2
	$(BIN)/python tools/bench_accuracy.py --quiet --variants piggyback-bn-contig finetune-contig
	$(BIN)/python tools/bench_accuracy.py --quiet --backbones cifar_resnet20 --datasets gtsrb \
		--variants piggyback-bn-contig-avg3 finetune-contig-avg3
	$(BIN)/python tools/bench_accuracy.py --quiet --backbones cifar_resnet20 --datasets gtsrb \
		--variants piggyback-bn-warm1 finetune-warm1
	$(BIN)/python tools/bench_accuracy.py --quiet --backbones cifar_resnet20 --variants piggyback-bn-eps1e-5 \
		piggyback-bn-eps3e-6
	$(BIN)/python tools/bench_accuracy.py --quiet --backbones cifar_resnet56 --datasets gtsrb \
		--variants piggyback-bn-eps1e-5 --seeds 0
	$(BIN)/python tools/bench_accuracy.py --quiet --backbones cifar_resnet56 --datasets gtsrb --variants piggyback-bn-eps3e-6
	$(BIN)/python tools/bench_accuracy.py --quiet --backbones cifar_resnet20 --variants piggyback-bn finetune \
		finetune-contig --seeds 3 4 5 --out bench-out/accuracy-seeds3-5
	$(BIN)/python tools/bench_accuracy.py --quiet --backbones cifar_resnet56 --variants piggyback-bn finetune \
		finetune-contig --seeds 3 4 5 --out bench-out/accuracy-seeds3-5
	$(BIN)/python tools/split_study.py
	$(BIN)/python tools/score_gradients.py
	$(BIN)/python tools/selection_study.py
	$(BIN)/python tools/posthoc_study.py --backbones cifar_resnet20
	$(BIN)/python tools/write_benchmarks.py
	$(BIN)/python tools/bench_record.py save

# BENCHMARKS.md (and docs/img/) again from the results already in bench-out/ and bench-record/, measuring nothing.
bench-report: setup
	$(BIN)/python tools/bench_record.py restore
	$(BIN)/python tools/write_benchmarks.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .hypothesis
