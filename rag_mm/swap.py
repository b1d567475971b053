"""Index swap: the same passages with their facts permuted, to test that answers follow them.

`swap_facts` takes a corpus (`id -> text`) and examples (`gold_id`, `target`), and moves each
answer to another passage: passage p, which said answer a_p, now says a_{pi(p)}, and every
example whose gold passage is p now has the target a_{pi(p)}. The rule is the corpus' own
text, nothing task-specific: a passage takes part when all examples pointing at it share one
target and that target occurs in the passage exactly once as a whole word (verbatim, case
sensitive); other passages, and their examples, are left out of the swap. `pi` is a random
cyclic shift within each group (all passages, or those whose examples share a value of a
grouping column, e.g. a relation); a passage whose new answer equals its old one stays as it
was and its examples are left out.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np


def _occurrences(text: str, answer: str) -> list[re.Match]:
    return list(re.finditer(rf"(?<!\w){re.escape(answer)}(?!\w)", text))


def swap_facts(passages: dict[str, str], examples: list[dict], *, seed: int = 0,
               group: str | None = None) -> tuple[dict[str, str], list[str | None], dict]:
    """(new passages, each example's new target or None if left out, a report of counts).

    `examples`: dicts with `gold_id`, `target` (and `group` when given)."""
    targets: dict[str, set] = defaultdict(set)
    groups: dict[str, set] = defaultdict(set)
    for ex in examples:
        if ex.get("gold_id") is not None:
            targets[ex["gold_id"]].add(ex["target"])
            groups[ex["gold_id"]].add(ex[group] if group else None)
    eligible = {pid: next(iter(ts)) for pid, ts in targets.items()
                if len(ts) == 1 and len(groups[pid]) == 1 and pid in passages
                and len(_occurrences(passages[pid], next(iter(ts)))) == 1}
    by_group: dict = defaultdict(list)
    for pid in sorted(eligible):
        by_group[next(iter(groups[pid]))].append(pid)
    rng = np.random.default_rng(seed)
    new_answer: dict[str, str] = {}
    for key in sorted(by_group, key=str):
        members = [by_group[key][i] for i in rng.permutation(len(by_group[key]))]
        for i, pid in enumerate(members):
            answer = eligible[members[(i + 1) % len(members)]]
            if answer != eligible[pid]:
                new_answer[pid] = answer
    swapped = dict(passages)
    for pid, answer in new_answer.items():
        match = _occurrences(passages[pid], eligible[pid])[0]
        swapped[pid] = passages[pid][: match.start()] + answer + passages[pid][match.end():]
    new_targets = [new_answer.get(ex.get("gold_id")) for ex in examples]
    report = {"passages": len(passages), "eligible": len(eligible), "swapped": len(new_answer),
              "examples": len(examples),
              "examples_swapped": sum(t is not None for t in new_targets)}
    return swapped, new_targets, report
