"""benchmarks/common.py's round-robin order: what every speed ratio in the README is measured with."""

from __future__ import annotations

from benchmarks.common import interleaved_timing, round_orders


def test_round_orders_are_seeded_permutations_without_a_repeat_across_rounds():
    names = [f"s{i}" for i in range(16)]
    orders = round_orders(names, 12)
    assert orders == round_orders(names, 12)  # seeded: a run can be repeated
    assert all(sorted(order) == sorted(names) for order in orders)
    assert all(a[-1] != b[0] for a, b in zip(orders, orders[1:]))  # no system twice in a row
    assert len({order[0] for order in orders}) > 1  # not always the same one first


def test_round_orders_do_not_keep_a_fixed_predecessor():
    """The cyclic rotation this replaced kept 13 of 16 systems after the same predecessor in all 3 rounds."""
    names = [f"s{i}" for i in range(16)]
    orders = round_orders(names, 3)
    predecessors = {name: {order[order.index(name) - 1] if order.index(name) else None for order in orders}
                    for name in names}
    assert sum(len(p) == 1 for p in predecessors.values()) <= 1
    two = round_orders(["a", "b"], 6)
    assert all(a[-1] != b[0] for a, b in zip(two, two[1:]))


def test_interleaved_timing_times_every_system_once_per_round_after_one_warm_up():
    calls = []
    systems = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    seconds = interleaved_timing(systems, 5)
    assert set(seconds) == set("abcd") and all(s >= 0 for s in seconds.values())
    assert calls[:4] == list("abcd") and sorted(calls[4:]) == sorted("abcd" * 5)


def test_whole_last_layer_runs_the_deepest_layer_for_every_token_as_upstream(tiny_lm, tokenizer):
    """The upstream-style rows must not get the library's last-token deepest layer (upstream has none)."""
    import torch

    from benchmarks.common import whole_last_layer
    from matryoshka_reranker.model import modeling
    from tests.test_modeling import PAIRS, batch, wrap

    model, inputs = wrap(tiny_lm, tokenizer), batch(tokenizer, PAIRS)
    seen = []
    hook = model.decoder.layers[1].mlp.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[:2])))
    with torch.no_grad():
        trimmed = model(**inputs, cutoff_layers=2)[0]
        with whole_last_layer():
            whole = model(**inputs, cutoff_layers=2)[0]
    hook.remove()
    assert seen == [(len(PAIRS), 1), tuple(inputs["input_ids"].shape)]
    assert modeling.trim_problem(model.decoder.layers[1]) is None  # restored
    torch.testing.assert_close(whole, trimmed, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), whole_last_layer():  # the upstream-style ratio-4 rows compress as before
        compressed = model(**inputs, cutoff_layers=4, compress_layers=[2], compress_ratio=4)[0]
    torch.testing.assert_close(compressed, model(**inputs, cutoff_layers=4, compress_layers=[2], compress_ratio=4)[0],
                               atol=1e-5, rtol=1e-5)
