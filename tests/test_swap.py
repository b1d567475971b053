"""The index swap: facts permuted among passages by a corpus-independent rule.

Run: `.venv/bin/python -m pytest tests/test_swap.py -q`
"""

from rag_mm.swap import swap_facts

PASSAGES = {
    "a": "alpha lives in paris .", "b": "beta lives in tokyo .", "c": "gamma lives in rome .",
    "d": "delta eats rice .", "e": "epsilon eats cake .",
    "f": "zeta lives in lima and lima .",  # the answer twice: which one is the fact?
    "g": "eta lives in oslo .",  # its examples disagree on the answer
    "h": "theta lives in cairo .",  # no example asks about it
    "i": "iota lives in romeo .",  # its target "rome" is not a whole word of it
}
EXAMPLES = [
    {"gold_id": "a", "target": "paris", "rel": "lives"},
    {"gold_id": "a", "target": "paris", "rel": "lives"},
    {"gold_id": "b", "target": "tokyo", "rel": "lives"},
    {"gold_id": "c", "target": "rome", "rel": "lives"},
    {"gold_id": "d", "target": "rice", "rel": "eats"},
    {"gold_id": "e", "target": "cake", "rel": "eats"},
    {"gold_id": "f", "target": "lima", "rel": "lives"},
    {"gold_id": "g", "target": "oslo", "rel": "lives"},
    {"gold_id": "g", "target": "bergen", "rel": "lives"},
    {"gold_id": "b", "target": "ro", "rel": "lives"},  # b's examples disagree: left out
    {"gold_id": "i", "target": "rome", "rel": "lives"},
]


def test_swap_moves_each_answer_to_another_passage_and_the_targets_with_it():
    for group in (None, "rel"):
        swapped, targets, report = swap_facts(PASSAGES, EXAMPLES, seed=0, group=group)
        assert swapped.keys() == PASSAGES.keys()
        assert report["eligible"] == report["swapped"] == 4  # a, c, d, e
        for pid in "bfghi":
            assert swapped[pid] == PASSAGES[pid]
        old = {"a": "paris", "c": "rome", "d": "rice", "e": "cake"}
        moved = {pid: swapped[pid].split()[-2] for pid in old}
        assert all(moved[pid] != old[pid] for pid in old)
        for ex, new in zip(EXAMPLES, targets):
            if ex["gold_id"] in old:
                assert new == moved[ex["gold_id"]]  # the target follows its passage
                assert swapped[ex["gold_id"]].replace(new, ex["target"]) == PASSAGES[ex["gold_id"]]
            else:
                assert new is None
        if group:  # within a relation only
            assert moved == {"a": "rome", "c": "paris", "d": "cake", "e": "rice"}
