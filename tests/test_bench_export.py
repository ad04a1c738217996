"""tools/bench_export.py's latency loop: every graph is timed in every round, each turn after a pause and two
untimed runs, in an order that changes between rounds, and "x plain" pairs each graph with the plain graph of
the same round."""

from conftest import import_tool


class FakeSession:
    """Records when it ran (on a shared log) and advances a fake clock by its own cost."""

    def __init__(self, name, cost, clock, log):
        self.name, self.cost, self.clock, self.log = name, cost, clock, log

    def run(self, outputs, feeds, run_options):
        self.log.append(self.name)
        self.clock.now += self.cost


class FakeClock:
    now = 0.0

    def __call__(self):
        return self.now


def test_latency_times_every_graph_each_round_after_a_settle_in_changing_orders():
    bench = import_tool("bench_export")
    clock, log = FakeClock(), []
    costs = {"plain": 1.0, "plain (no NCHWc)": 2.0, "baked": 1.0, "shared": 1.5}
    sessions = {k: (FakeSession(k, c, clock, log), {}, None) for k, c in costs.items()}
    sessions["_keep"] = object()  # kept alive, never run
    repeats, inner = 6, 3
    result = bench.latency(sessions, size=4, batch=1, repeats=repeats, clock=clock, inner=inner, settle_s=0)

    assert set(result) == set(costs)
    for name, cost in costs.items():
        assert log.count(name) == repeats * (2 + inner)  # per round 2 untimed runs, then inner timed ones
        assert result[name]["median_s"] == cost and result[name]["min_s"] == cost
        assert result[name]["x_plain"] == cost / costs["plain"]
        assert result[name]["x_plain_no_nchwc"] == cost / costs["plain (no NCHWc)"]
    turns = log[::2 + inner]  # the graph of each turn, round after round
    rounds = [tuple(turns[i:i + len(costs)]) for i in range(0, len(turns), len(costs))]
    assert all(sorted(r) == sorted(costs) for r in rounds)
    assert len(set(rounds)) > 1  # not one fixed order
