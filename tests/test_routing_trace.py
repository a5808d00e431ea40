"""Trace-driven expert load in the simulator (``scheduler.experts.RoutingTrace``): the loads a
hand-made trace implies, windows advancing as tokens are routed, EPLB re-placing from them,
and inter-layer affinity raising the stay share only where successors are predictable. Plain
Python, no jax."""

from __future__ import annotations

import pytest

from qllm_jax.scheduler import experts as ex


def ids_trace(picks: list[list[int]], num_experts: int, window: int) -> ex.RoutingTrace:
    """A one-sequence trace from top-1 ``picks[layer][token]``."""
    seq = [[[e] for e in layer] for layer in picks]  # [L][T][k=1]
    return ex.RoutingTrace.from_ids([seq], num_experts, window)


def state(trace: ex.RoutingTrace, ranks: int, layers: int = 2, g: int = 1, **kw):
    kw = dict(a2a_latency_s=0.0, a2a_gbps=1e30) | kw  # no all-to-all unless asked
    ep = ex.ExpertParallel(
        num_layers=layers, num_experts=trace.num_experts, top_k=trace.top_k, hidden=8,
        ranks=ranks, trace=trace, **kw,
    )  # fmt: skip
    return ex.ExpertState(ep, g)


def test_loads_and_pairs_are_the_counts_of_the_token_range():
    # 2 layers, 4 experts, windows of 2 tokens: w0 = tokens 0-1, w1 = 2-3, w2 = 4-5
    layer0 = [0, 1, 2, 2, 3, 3]
    layer1 = [1, 1, 0, 3, 2, 2]
    tr = ids_trace([layer0, layer1], 4, 2)
    assert (tr.num_windows, tr.num_layers, tr.tokens) == (3, 2, 6)
    assert tr.counts[1] == [[0, 0, 2, 0], [1, 0, 0, 1]]
    assert tr.transitions[0] == [[[0, 1, 0, 0], [0, 1, 0, 0], [0] * 4, [0] * 4]]
    assert tr.loads(2, 4) == [[0, 0, 2, 0], [1, 0, 0, 1]]
    assert tr.loads(3, 5) == [[0, 0, 1, 0.5 + 0.5], [0.5, 0, 1, 0.5]]  # half windows prorated
    assert tr.loads(6, 8) == tr.loads(0, 2)  # replayed cyclically
    assert tr.loads(0, 12) == [[2 * x for x in layer] for layer in tr.loads(0, 6)]
    pairs = tr.pairs(0, 6)
    assert pairs[0][2] == [1, 0, 0, 1] and pairs[0][3] == [0, 0, 2, 0]
    # pair L-1 wraps from the last layer to the first with independent picks: per window the
    # outer product of the two layers' counts over its tokens
    w0 = tr.pairs(0, 2)[1]
    assert w0[1] == [1.0, 1.0, 0.0, 0.0] and sum(map(sum, w0)) == pytest.approx(2)


def test_a_trace_file_round_trips_and_bad_ones_are_refused(tmp_path):
    tr = ids_trace([[0, 1, 2, 3], [3, 2, 1, 0]], 4, 2)
    path = tmp_path / "t.json"
    import json

    path.write_text(json.dumps(tr.to_dict()))
    back = ex.RoutingTrace.load(path)
    assert (back.counts, back.transitions, back.top_k) == (tr.counts, tr.transitions, 1)
    with pytest.raises(ValueError, match="not a routing trace"):
        ex.RoutingTrace.from_dict({"format": "x"})
    with pytest.raises(ValueError, match="do not sum to 2"):
        ex.RoutingTrace(2, 1, [[[1, 0], [1, 1]]], [[[[1, 0], [0, 1]]]])
    with pytest.raises(ValueError, match="window_tokens must be an int >= 1"):
        ex.RoutingTrace(0, 1, tr.counts, tr.transitions)
    with pytest.raises(ValueError, match="top-1 of 4 experts, not top_k=2 of num_experts=4"):
        ex.ExpertParallel(2, 4, 2, 8, 2, trace=tr)
    with pytest.raises(ValueError, match="affinity=True needs a trace"):
        ex.ExpertParallel(2, 4, 1, 8, 2, eplb=True, affinity=True)
    with pytest.raises(ValueError, match="a2a_handoff=True needs a trace"):
        ex.ExpertParallel(2, 4, 1, 8, 2, a2a_handoff=True)


def test_windows_advance_as_tokens_are_routed_and_eplb_reads_them():
    # window 0 (tokens 0-3) routes evenly to experts 0 and 2, window 1 only to 0 and 1.
    # Static placement over 2 ranks ({0, 1} and {2, 3}): balanced in w0, one rank in w1.
    picks = [0, 2, 0, 2, 0, 1, 0, 1]
    tr = ids_trace([picks, picks], 4, 4)
    s = state(tr, 2)
    per_row = 1.0  # expert seconds per routed token on one device: time = rows * hot
    assert s.block_time(0, 4, 4, 0.0, per_row) == pytest.approx(4 * 0.5)
    assert s.block_time(0, 4, 4, 0.0, per_row) == pytest.approx(4 * 1.0)
    assert s.block_time(0, 4, 4, 0.0, per_row) == pytest.approx(4 * 0.5)  # cycled to w0
    assert s.block_time(1, 4, 4, 0.0, per_row) == pytest.approx(4 * 0.5)  # its own cursor
    assert s.rank_balance == pytest.approx((1 + 2 + 1 + 1) / 4)
    assert all(s.tick(t) == 0 for t in range(3)) and s.migrations == 0  # static: no drift
    # EPLB re-placing every step from that step's tokens: a placement fitted to w0 ({0, 2}
    # on separate ranks; 1 joins 0) is stale in w1, where it is re-fitted
    e = state(tr, 2, 1, redundant_per_rank=0, eplb=True, rebalance_steps=1, window_steps=1,
              migration_s=1.0)  # fmt: skip
    e.block_time(0, 4, 4, 0.0, per_row)
    e.tick(0.0)
    assert e.placement[0] == ex.eplb_placement(tr.loads(0, 4)[0], 2, 2)
    assert e.block_time(0, 4, 4, 0.0, per_row) == pytest.approx(4 * 1.0)  # w1: 0, 1 together
    assert e.tick(1.0) > 0 and e.migrations == 2
    assert e.placement[0] == ex.eplb_placement(tr.loads(4, 8)[0], 2, 2)
    assert max(ex.rank_shares(e.placement[0], tr.loads(4, 8)[0])) == pytest.approx(2)  # even


def successor_trace(strong: bool) -> ex.RoutingTrace:
    """8 experts, 2 layers, 64 tokens in windows of 16: layer 0 cycles through the experts;
    layer 1 picks (a + 1) % 8 (``strong``: one successor each; EPLB's greedy puts a and a + 4
    on a rank, so never a and its successor) or every pair equally often."""
    a = [i % 8 for i in range(64)]
    b = [(x + 1) % 8 for x in a] if strong else [i // 8 for i in range(64)]
    return ids_trace([a, b], 8, 16)


@pytest.mark.parametrize("strong", [True, False])
def test_affinity_raises_the_stay_share_only_with_predictable_successors(strong):
    tr = successor_trace(strong)
    stays = {}
    for affinity in (False, True):
        s = state(tr, 4, 2, 2, eplb=True, redundant_per_rank=0, affinity=affinity,
                  affinity_slack=0.3, a2a_handoff=True, a2a_gbps=1.0)  # fmt: skip
        t = s.block_time(0, tr.tokens, tr.tokens, 0.0, 0.0)  # the all-to-all alone
        stays[affinity] = (s.stay_share, t)
    pairs = tr.pairs(0, 64)[:1]  # the recorded pair (not the wrap)
    want = ex.pair_stay_share(ex.colocated_placement(tr.loads(0, 64), pairs, 4, 2, 0.3), pairs)
    assert stays[True][0] == pytest.approx(want)
    if strong:  # each pair on one rank: every pick pair stays, and only the last layer pays
        assert stays[False][0] < 0.3 and stays[True][0] == pytest.approx(1.0)
        assert stays[True][1] < 0.6 * stays[False][1]
    else:  # nothing to co-locate: the stay share is 1 / ranks either way
        assert stays[True][0] == pytest.approx(0.25) and stays[False][0] == pytest.approx(0.25)


def test_pair_stay_share_counts_copies_evenly():
    # expert 0 has copies on ranks 0 and 1, its successor 1 lives on rank 0: half stay
    placements = [[[0, 1, 2], [0, 3, 2]], [[1, 0], [2, 3]]]
    t = [[[0.0] * 4 for _ in range(4)]]
    t[0][0][1] = 10.0
    assert ex.pair_stay_share(placements, t) == pytest.approx(0.5)
    same = ex.same_rank(placements[0], placements[1], 4)
    assert same[3][3] == 1.0 and same[2][0] == 0.5 and same[1][2] == 0.0
