"""The partitioner on the project's model (`rag_mm` tiny): declared chain, the retrieval
group, and analytic costs (meta device) equal to the measured count.

Run: .venv/bin/pytest tests/test_partition_rag.py -q
"""

from __future__ import annotations

import pytest

from trainers.partition.models import profile_rag
from trainers.partition.partition import PartitionConfig, plan_partition
from trainers.partition.schedule import ScheduleSpec
from trainers.partition.units import chain_from_profile


def test_tiny_rag_model_plans_with_its_declared_chain():
    measured = profile_rag("tiny", analytic=False, batch_size=2, runs=1)
    analytic = profile_rag("tiny", analytic=True, batch_size=2)
    chain = chain_from_profile(measured)
    assert [u.name for u in chain.units] == ["retrieval", "blocks.0", "blocks.1", "head"]
    assert chain.units[0].param_count > chain.units[1].param_count  # query encoder + towers
    assert [u.layer for u in chain.units] == [None, "blocks.0", "blocks.1", None]
    # Shapes alone give the FLOPs of the real pass, unit by unit (attention may take
    # another CPU kernel on placeholders: flash recomputes, the math path does not).
    costed = chain_from_profile(analytic)
    for real, fake in zip(chain.units, costed.units):
        assert fake.flops == pytest.approx(real.flops, rel=0.03), real.name
        assert fake.param_count == real.param_count
        assert fake.out_bytes == real.out_bytes
    result = plan_partition(chain, PartitionConfig(
        num_stages=2, batch_size=4, schedule=ScheduleSpec(num_microbatches=2)))
    stages = [s.units for s in result.plan.stages]
    assert stages[0][0] == "retrieval" and stages[-1][-1] == "head"
    walked = chain_from_profile(measured, declared=False, max_unit_share=1e-6)  # descend wherever possible: timing-independent
    names = [u.name for u in walked.units]
    assert "blocks.0.attn_norm" in names and "blocks.0" not in names  # walked inside blocks
    # tok_embed runs three times inside the retrieval unit: not a chain, kept whole.
    assert [n for n in names if n.startswith("retrieval")] == ["retrieval"]
    assert sum(u.compute_ms for u in walked.units) == pytest.approx(
        sum(u.compute_ms for u in chain.units))
