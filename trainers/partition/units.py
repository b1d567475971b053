"""From a profiled module tree to the ordered chain of units the partitioner cuts.

Two ways to pick the units:

* declared: the model's own ``units()`` chain (what its pipeline runtime can cut);
* walked: start from the root and keep descending into the costliest unit while it holds
  more than ``max_unit_share`` of the total time, it ran exactly once, and it has children
  that ran; leaves stay whole. Containers that never run themselves (``nn.ModuleList``)
  are looked through.

A unit's cost is its module's inclusive cost plus the glue of the ancestors above the units
(work a parent does between its children, handed to the child that runs next, or the last
one). Parameters registered directly on such an ancestor go to the unit that runs next
when the ancestor first uses them (its first unit when unused or used after the last).

Groups that must share a stage: the model's ``colocation_groups()``, the caller's groups
(module names), and modules holding the same parameter (``tied="colocate"``). With
``tied="replicate"`` a shared parameter is instead copied into every unit that uses it
(Megatron's way with tied embeddings: a copy per stage, gradients summed between them).
"""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import replace

from trainers.partition.chain import CostChain, UnitCost
from trainers.partition.trace import ModuleRecord, Profile

TIED = ("colocate", "replicate")


def chain_from_profile(profile: Profile, *, declared: bool | None = None,
                       max_unit_share: float = 1 / 32, groups=(), tied: str = "colocate",
                       max_depth: int | None = None,
                       low_precision_types: tuple[str, ...] = ()) -> CostChain:
    """The unit chain of ``profile``.

    declared: use the model's declared chain (default: when the model offered one).
    max_unit_share: walked chains descend until no unit exceeds this share of the time.
    groups: extra lists of module names that must share a stage.
    tied: "colocate" (shared parameters keep their modules in one stage) or "replicate".
    low_precision_types: module type names whose parameters the runtime gathers in a lower
        precision (the runtime's bf16 FSDP2 groups: ``Attention``, ``MLP``); each unit's
        ``low_precision_param_count`` counts the parameters inside such modules.
    """
    if tied not in TIED:
        raise ValueError(f"tied={tied!r}: use one of {', '.join(TIED)}")
    if not 0 < max_unit_share <= 1:
        raise ValueError(f"max_unit_share={max_unit_share} must be in (0, 1]")
    use_declared = profile.declared_units is not None if declared is None else declared
    if use_declared:
        if profile.declared_units is None:
            raise ValueError("declared=True but the model declares no units() chain")
        names = list(profile.declared_units)
        _check_names(profile, names, "declared unit")
    else:
        names = walk(profile, max_unit_share, max_depth)
    all_groups = [list(g) for g in profile.declared_groups] + [list(g) for g in groups]
    if tied == "colocate":
        all_groups += [list(s["modules"]) for s in profile.shared_params]
    for group in all_groups:
        _check_names(profile, group, "group member")
    units = _unit_costs(profile, names, tied)
    if low_precision_types:
        units = tuple(replace(u, low_precision_param_count=_low_precision_count(
            profile, name, low_precision_types)) for u, name in zip(units, names))
    index_groups = tuple(tuple(_units_of(profile, names, member) for member in group)
                         for group in all_groups)
    flat = tuple(tuple(sorted({i for part in g for i in part})) for g in index_groups)
    notes = tuple(f"tied parameter of {s['modules']} replicated ({s['bytes']} bytes per copy)"
                  for s in profile.shared_params if tied == "replicate")
    return CostChain(units=units, groups=tuple(g for g in flat if g),
                     microbatch_size=profile.batch_size, source=profile.source, notes=notes)


def walk(profile: Profile, max_unit_share: float, max_depth: int | None = None) -> list[str]:
    """Unit module names in execution order, from the root down."""
    mods = profile.modules
    total = max(_cost(mods[""]), 1e-12)
    units = _look_through(profile, [""])
    while True:
        candidates = [u for u in units if _cost(mods[u]) > max_unit_share * total
                      and _descendable(profile, u, max_depth)]
        if not candidates:
            return units
        worst = max(candidates, key=lambda u: (_cost(mods[u]), u))
        i = units.index(worst)
        units[i:i + 1] = _look_through(profile, _ran_children(profile, worst))


def _cost(rec: ModuleRecord) -> float:
    return rec.fwd_ms + rec.bwd_ms


def _ran(profile: Profile, name: str) -> bool:
    """The module, or something below it, ran."""
    return _first_order(profile, name) < (1 << 30)


def _first_order(profile: Profile, name: str) -> int:
    rec = profile.modules[name]
    orders = [rec.order] if rec.order >= 0 else []
    orders += [_first_order(profile, c) for c in rec.children]
    return min(orders, default=1 << 30)


def _ran_children(profile: Profile, name: str) -> list[str]:
    children = [c for c in profile.modules[name].children if _ran(profile, c)]
    return sorted(children, key=lambda c: _first_order(profile, c))


def _look_through(profile: Profile, names: list[str]) -> list[str]:
    """Replace containers that never ran themselves by their children that did."""
    out = []
    for name in names:
        if profile.modules[name].order < 0:
            out += _look_through(profile, _ran_children(profile, name))
        else:
            out.append(name)
    return out


def _descendable(profile: Profile, name: str, max_depth: int | None) -> bool:
    rec = profile.modules[name]
    if rec.calls != 1 or (max_depth is not None and rec.depth >= max_depth):
        return False
    children = _look_through(profile, _ran_children(profile, name))
    return bool(children) and all(profile.modules[c].calls == 1 for c in children)


def _low_precision_count(profile: Profile, unit: str, types: tuple[str, ...]) -> int:
    """Parameters of ``unit`` inside modules of ``types``: all of them when the unit is such
    a module or inside one, else those of its outermost such submodules."""
    mods = profile.modules
    if any(mods[m].type in types for m in mods if m and _inside(unit, m)):
        return mods[unit].param_count
    tops = [m for m in mods if m != unit and _inside(m, unit) and mods[m].type in types]
    return sum(mods[m].param_count for m in tops
               if not any(o != m and _inside(m, o) for o in tops))


def _inside(name: str, ancestor: str) -> bool:
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def _units_of(profile: Profile, units: list[str], member: str) -> list[int]:
    """Units holding ``member``: the unit it is inside, or every unit inside it."""
    holders = [i for i, u in enumerate(units) if _inside(member, u)]
    return holders or [i for i, u in enumerate(units) if _inside(u, member)]


def _check_names(profile: Profile, names, what: str) -> None:
    for name in names:
        if name not in profile.modules:
            close = difflib.get_close_matches(name, list(profile.modules), n=3)
            raise ValueError(f"{what} {name!r} is not a module of the model; close: {close}")


def _unit_costs(profile: Profile, units: list[str], tied: str) -> tuple[UnitCost, ...]:
    mods = profile.modules
    # fwd, bwd, flops, act, parameter count, parameter bytes, weight-gradient part of bwd
    extra = {u: [0.0, 0.0, 0.0, 0.0, 0, 0, 0.0] for u in units}
    above = [n for n in mods if n not in units and any(_inside(u, n) and u != n for u in units)]
    for name in above:
        rec = mods[name]
        under = [u for u in units if _inside(u, name)]
        if not under:
            continue
        for glue in rec.glue:
            target = _glue_target(profile, units, under, glue.next_child)
            for i, value in enumerate((glue.fwd_ms, glue.bwd_ms, glue.flops, glue.act_bytes)):
                extra[target][i] += value
            extra[target][6] += glue.wgrad_ms
        first = min(under, key=lambda u: _first_order(profile, u))
        placed_count = placed_bytes = 0
        for param in rec.own_params:  # to the unit running when the parameter is first used
            target = (_glue_target(profile, units, under, param["next_child"])
                      if param["used"] else first)
            extra[target][4] += param["numel"]
            extra[target][5] += param["bytes"]
            placed_count += param["numel"]
            placed_bytes += param["bytes"]
        extra[first][4] += rec.own_param_count - placed_count
        extra[first][5] += rec.own_param_bytes - placed_bytes
    counts, sizes = _param_shares(profile, units, tied)
    layers = _layer_of(profile, units)
    return tuple(
        UnitCost(name=u or "(root)", fwd_ms=mods[u].fwd_ms + extra[u][0],
                 bwd_ms=mods[u].bwd_ms + extra[u][1],
                 param_count=counts[u] + extra[u][4], param_bytes=sizes[u] + extra[u][5],
                 state_bytes=mods[u].buffer_bytes, act_bytes=mods[u].act_bytes + extra[u][3],
                 out_bytes=mods[u].output_bytes, flops=mods[u].flops + extra[u][2],
                 weight_grad_ms=min(mods[u].wgrad_ms + extra[u][6], mods[u].bwd_ms + extra[u][1]),
                 modules=(u,), is_layer=layers[u] is not None, layer=layers[u])
        for u in units)


def _glue_target(profile: Profile, units, under, next_child) -> str:
    if next_child is None or next_child not in profile.modules:
        return max(under, key=lambda u: _first_order(profile, u))
    inside = [u for u in under if _inside(u, next_child) or _inside(next_child, u)]
    if inside:
        return min(inside, key=lambda u: _first_order(profile, u))
    after = [u for u in under if _first_order(profile, u) >= _first_order(profile, next_child)]
    return min(after or under, key=lambda u: _first_order(profile, u))


def _param_shares(profile: Profile, units, tied: str):
    """Parameter count and bytes per unit; a shared parameter once (or in every user)."""
    counts = {u: profile.modules[u].param_count for u in units}
    sizes = {u: profile.modules[u].param_bytes for u in units}
    for shared in profile.shared_params:
        holders = sorted({units[i] for m in shared["modules"]
                          for i in _units_of(profile, units, m)},
                         key=lambda u: _first_order(profile, u))
        # Inclusive counts already hold it once per holder whose subtree registers it.
        registered = [u for u in holders if any(_inside(m, u) for m in shared["modules"])]
        keep = holders if tied == "replicate" else holders[:1]
        for u in holders:
            owns = u in registered
            if u in keep and not owns:
                counts[u] += shared["numel"]
                sizes[u] += shared["bytes"]
            elif u not in keep and owns:
                counts[u] -= shared["numel"]
                sizes[u] -= shared["bytes"]
    return counts, sizes


def _layer_of(profile: Profile, units) -> dict[str, str | None]:
    """The repeated block each unit belongs to: children of the costliest container above
    the units whose (two or more) children that ran all have one type."""
    mods = profile.modules
    best, best_cost = None, -1.0
    for name in mods:
        if any(_inside(name, u) for u in units):
            continue  # blocks inside a unit are not cut apart anyway
        ran = _ran_children(profile, name)
        types = Counter(mods[c].type for c in ran)
        if len(ran) >= 2 and len(types) == 1:
            cost = sum(_cost(mods[c]) for c in ran)
            if cost > best_cost:
                best, best_cost = name, cost
    layers = _ran_children(profile, best) if best is not None else []
    out: dict[str, str | None] = {}
    for u in units:
        owner = [layer for layer in layers if _inside(u, layer)]
        out[u] = owner[0] if owner else None
    return out
