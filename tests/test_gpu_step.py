"""benchmarks/gpu_step.py at the tiny size on CPU: the smoke test of the GPU speed path.

It runs the whole script (the RAG model with torch exact search over a synthetic corpus,
the timed steps, the profiler's kernel report, the FLOP count, the retrieval timing, and
the Llama anchor) for two steps without compiling, and checks what it reports is
consistent; the GPU figures themselves are measured on a GPU machine (see
trainers/parallel/README.md). Also: its refusals, by name.

Run: .venv/bin/pytest tests/test_gpu_step.py -q       (about 15 s on 2 cores)
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_step

SMOKE = ["--device", "cpu", "--size", "tiny", "--steps", "2", "--warmup", "1", "--no-compile",
         "--corpus-size", "1000", "--batch-size", "1"]


def test_tiny_cpu_run_reports_the_table_and_json(capsys):
    result = gpu_step.main(SMOKE)
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["benchmark"] == "gpu_step" and report["device"] == "cpu"
    rag, anchor = report["rows"]
    assert rag["model"] == "rag tiny" and anchor["model"] == "llama anchor"
    assert rag["tokens_per_step"] == anchor["tokens_per_step"] == 1 * 2 * 47  # B x k x T
    assert abs(anchor["params"] / rag["params"] - 1) < 0.01  # same parameter count
    for row in (rag, anchor):
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] and row["counted_flops_per_step"] > 0
        assert row["peak_memory_gib"] is None  # CPU: not measured
    # is_causal without a mask: CPU's flash kernel ran in the decoder (the towers too)
    assert rag["attention"] == "causal" and rag["attention_kernels"] == ["flash (cpu)"]
    assert "flash_attention" in rag["sdpa_backends_accepting"]
    assert anchor["attention_kernels"] == ["flash (cpu)"]
    assert 0 < rag["search_lookup_share"] < rag["retrieve_share"] < 1
    assert rag["activation_checkpointing"] == "off"  # auto: the first setting fits
    assert result["rows"][0]["tokens_per_s"] == rag["tokens_per_s"]
    assert any(line.startswith("| rag tiny |") for line in lines)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the default runs")
def test_missing_cuda_and_bad_flags_are_refused_by_name(capsys):
    from trainers.errors import UserExit

    with pytest.raises(UserExit, match="--device cuda: no CUDA device is visible to torch"):
        gpu_step.cli(["--size", "tiny"])
    with pytest.raises(UserExit, match="needs n >= 1"):
        gpu_step.cli([*SMOKE, "--activation-checkpointing", "0"])
    with pytest.raises(UserExit, match="--steps must be >= 1"):
        gpu_step.cli([*SMOKE, "--steps", "0"])
    with pytest.raises(UserExit, match="--encoder-dir /nowhere: no config.json"):
        gpu_step.cli([*SMOKE, "--encoder-dir", "/nowhere"])
    with pytest.raises(UserExit, match="--attention flex trains on GPUs only"):
        gpu_step.cli([*SMOKE, "--attention", "flex"])
    assert "gpu_step.py: error:" in capsys.readouterr().err


def test_a_failing_compile_falls_back_to_eager(capsys):
    import argparse

    built = []

    def build(compiled: bool):
        built.append(compiled)

        def step():
            if compiled:
                raise RuntimeError("inductor: no working compiler")

        return (step,)

    args = argparse.Namespace(compile=True, warmup=2)
    _, _, compiled = gpu_step.warm_up(build, args, torch.device("cpu"), "rag")
    assert built == [True, False] and compiled is False
    assert "rag: torch.compile failed (RuntimeError: inductor: no working compiler)" in \
        capsys.readouterr().err
    args.compile = False
    with pytest.raises(ValueError, match="not a compile error"):  # eager failures still raise
        gpu_step.warm_up(lambda on: (lambda: (_ for _ in ()).throw(
            ValueError("not a compile error")),), args, torch.device("cpu"), "rag")
