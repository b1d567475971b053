"""The GPU speed path: the `1b` RAG model's training step on one GPU against a Hugging Face
Llama of the same parameter count and tokens per step, both under torch.compile.

    python benchmarks/gpu_step.py --save-encoder-config gpu_encoder     # here (1 MB, no weights)
    python3 benchmarks/gpu_step.py --encoder-dir gpu_encoder            # on the GPU machine

What runs (each model in this one process, one after the other):

- peak: a bf16 matmul (8192^3 on CUDA; fp32 1024^3 with --device cpu), the best of 10 timed
  calls: the TFLOP/s MFU is measured against.
- rag: `RAGModel` of `--size` (default `1b`): bf16 autocast over fp32 weights, fused
  AdamW (on CPU: fp32, plain AdamW), each decoder block compiled (`--no-compile` to skip), `--attention causal`
  (SDPA without a mask: FlashAttention-eligible; the synthetic documents fill all their
  token slots and the prompts are full, so no sequence has padding before its target;
  `masked` / `flex` for the other kernels), activation checkpointing `--activation-
  checkpointing auto`: off, else every 2nd block, else every block, the first that fits
  memory (the setting that ran is printed). The text tower has the bundled MiniLM's
  architecture with random weights (`--encoder-dir`: a folder with its config and
  tokenizer; `--save-encoder-config DIR` writes one from the bundled package). Retrieval:
  exact search in torch on the device (`TorchSearchBackend`) over `--corpus-size` random
  unit vectors (384-d) with synthetic passages; `--no-retrieval` uses `mode="random"`
  (random documents, no search: same sequences and tokens).
- anchor: `transformers.LlamaForCausalLM` from a `LlamaConfig` (random weights, nothing
  downloaded): the generator's hidden size, layers and heads and vocabulary, its MLP width
  chosen so the parameter count matches the RAG model's; as many sequences of the RAG
  model's fused length as the RAG step has (B x k); bf16 autocast, fused AdamW, the whole
  model compiled.

Printed per model: tokens/s (generator tokens: B x k x fused length), MFU = (6 x params +
12 x layers x hidden x seq) x tokens/s / peak, peak memory (torch.cuda.max_memory_allocated),
the attention kernel that ran (the `aten::_scaled_dot_product_*` / flex kernels in a
profiler trace of one step, cross-checked by running the block's attention with each SDPA
backend alone: `torch.nn.attention.sdpa_kernel`), and for the RAG model the share of the
step in retrieval: `RetrievalUnit.retrieve` (query encoding, search, vector lookup,
scoring, contrastive loss) and its search + lookup part alone, timed with device syncs in
separate steps after the timed ones. A table, then one JSON line.

On CPU (`--device cpu --size tiny --steps 2 --no-compile`) it is the suite's smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

SDPA_OPS = {"aten::_scaled_dot_product_flash_attention": "flash",
            "aten::_scaled_dot_product_cudnn_attention": "cudnn",
            "aten::_scaled_dot_product_efficient_attention": "efficient",
            "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
            "aten::_scaled_dot_product_attention_math": "math",
            "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable"}
WORDS = ("the red blue green striped dotted circle star triangle square lives in paris rome "  # noqa: SIM905
         "oslo lima eats rice bread fish likes music chess rain snow near river old young").split()


class TorchSearchBackend:
    """Exact inner-product search in torch on the vectors' device (the `RetrievalBackend`
    protocol of `rag_mm.retriever`): one matmul and a top-k per batch of queries."""

    def __init__(self, vectors: torch.Tensor, texts: list[str]) -> None:
        self.device_vectors = vectors
        self.host_vectors = vectors.float().cpu().numpy()
        self.texts = texts
        self.seconds = 0.0  # search + lookup time, device-synchronised, while `timing`
        self.timing = False

    def _timed(self, fn, *args):
        if not self.timing:
            return fn(*args)
        sync(self.device_vectors.device)
        start = time.perf_counter()
        out = fn(*args)
        sync(self.device_vectors.device)
        self.seconds += time.perf_counter() - start
        return out

    def search(self, queries: np.ndarray, k: int):
        def run():
            q = torch.as_tensor(queries, device=self.device_vectors.device,
                                dtype=self.device_vectors.dtype)
            scores, keys = (q @ self.device_vectors.T).topk(min(k, len(self)), dim=1)
            return scores.float().cpu().numpy(), keys.cpu().numpy().astype(np.int64)
        return self._timed(run)

    def vectors(self, keys: np.ndarray) -> np.ndarray:
        return self._timed(lambda: self.host_vectors[np.asarray(keys)])

    def documents(self, keys: np.ndarray) -> list[dict]:
        return self._timed(lambda: [{"text": self.texts[k], "image": None}
                                    for k in np.asarray(keys)])

    def __len__(self) -> int:
        return len(self.texts)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_corpus(num_docs: int, dim: int, words_per_doc: int, device, seed: int = 0):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((num_docs, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    picks = rng.integers(0, len(WORDS), size=(num_docs, words_per_doc))
    texts = [" ".join(WORDS[i] for i in row) for row in picks]
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return TorchSearchBackend(torch.as_tensor(vectors).to(device, dtype), texts)


# -- measurements ------------------------------------------------------------------------------
def matmul_peak(device: torch.device) -> tuple[float, str]:
    """Best TFLOP/s of a square matmul: bf16 8192^3 on CUDA, fp32 1024^3 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = math.inf
    for i in range(12):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12, f"{str(dtype).split('.')[-1]} {n}^3"


def attention_ops(step, device: torch.device, decoder_shape: tuple[int, ...] | None = None
                  ) -> tuple[list[str], list[str]]:
    """The attention kernels one step ran, from a profiler trace: (those whose query has
    `decoder_shape`, the decoder's; the others: vision / text towers). FlexAttention's
    Triton kernels carry no shapes and count as the decoder's."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        step()
        sync(device)
    decoder, other = set(), set()
    for event in prof.events():
        if event.name in SDPA_OPS:
            shapes = event.input_shapes or [[]]
            mine = decoder_shape is None or tuple(shapes[0]) == tuple(decoder_shape)
            (decoder if mine else other).add(SDPA_OPS[event.name])
        elif "flex_attention" in event.name or "triton_tem_fused" in event.name:
            decoder.add("flex")
    if not decoder and other:  # no shapes recorded for the decoder's op: say so
        return [f"{name} (shape not matched)" for name in sorted(other)], sorted(other)
    return sorted(decoder), sorted(other)


def counted_flops(step, device: torch.device) -> float:
    """FLOPs of one step as run (matmuls, convolutions, SDPA; recomputed forwards included),
    counted by `torch.utils.flop_counter` on the eager step (compiled code runs eagerly)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.compiler.set_stance("force_eager"), counter:
        step()
    sync(device)
    return float(counter.get_total_flops())


def sdpa_backends_that_run(shape, device, dtype, *, causal: bool, masked: bool) -> list[str]:
    """SDPA backends that accept the block's attention call (each one alone)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, _heads, seq, _head_dim = shape
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    mask = torch.ones(batch, 1, seq, seq, dtype=torch.bool, device=device).tril() if masked else None
    ok = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            ok.append(backend.name.lower())
        except RuntimeError:
            pass
    return ok


def timed_steps(step, steps: int, device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def autocast(device: torch.device):
    """bf16 autocast on CUDA; on CPU (the smoke test) fp32, which CPUs without bf16 matmul
    units run faster."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def optimizer_for(params, device: torch.device):
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01,
                             fused=device.type == "cuda")


def mfu(params: int, layers: int, hidden: int, seq: int, tokens_per_s: float,
        peak_tflops: float) -> float:
    return (6 * params + 12 * layers * hidden * seq) * tokens_per_s / (peak_tflops * 1e12)


def peak_memory(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -- the RAG model -----------------------------------------------------------------------------
def rag_config(args):
    from rag_mm.config import model_config

    base = model_config(args.size, mode="rag" if args.retrieval else "random")
    retriever = replace(base.retriever, text_encoder=args.encoder_dir, shared_negatives=0)
    return replace(base, retriever=retriever,
                   generator=replace(base.generator, attention=args.attention))


def build_rag(args, device, setting, compiled: bool):
    from rag_mm.model import RAGModel, synthetic_batch
    from trainers.parallel.checkpointing import apply_activation_checkpointing

    config = rag_config(args)
    torch.manual_seed(0)
    model = RAGModel(config, pretrained_text=False)  # the text tower from its config
    model.init_weights()
    backend = synthetic_corpus(args.corpus_size, model.retrieval.query_encoder.dim,
                               config.max_doc_tokens + 8, device)
    model.attach(backend, check_encoder=False)
    model.to(device)
    names = apply_activation_checkpointing(model, setting)
    if compiled:
        for block in model.blocks:
            block.compile()
    optimizer = optimizer_for([p for p in model.parameters() if p.requires_grad], device)
    batches = [{k: v.to(device) for k, v in
                synthetic_batch(config, args.batch_size, seed=i, num_docs=args.corpus_size).items()}
               for i in range(4)]
    counter = iter(range(10**9))

    def step():
        batch = batches[next(counter) % len(batches)]
        with autocast(device):
            loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, backend, names, step


def warm_up(build, args, device, label: str):
    """Build with `build(compile)` and run the warm-up steps. A compile that fails (not for
    memory) is reported and the model runs uncompiled, so the run still gives a table."""
    compiled = args.compile
    while True:
        start = time.perf_counter()
        built = build(compiled)
        try:
            for _ in range(args.warmup):
                built[-1]()
            sync(device)
            return built, time.perf_counter() - start, compiled
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            if not compiled:
                raise
            print(f"{label}: torch.compile failed ({type(err).__name__}: "
                  f"{' '.join(str(err).split())[:300]}); running it uncompiled",
                  file=sys.stderr, flush=True)
            built = None
            torch._dynamo.reset()
            compiled = False


def measured(what: str, fn, default):
    """`fn()`, or `default` with the error on stderr: a failed extra measurement (profiler,
    FLOP count) must not cost the table."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - reported, and the run goes on
        print(f"{what} failed: {type(err).__name__}: {' '.join(str(err).split())[:300]}",
              file=sys.stderr, flush=True)
        return default


def run_rag(args, device, peak):
    settings = ["off", 2, "every"] if args.activation_checkpointing == "auto" else \
        [args.activation_checkpointing]
    for setting in settings:
        reset_memory(device)
        try:
            (model, backend, names, step), warmup_s, compiled = warm_up(
                lambda on, setting=setting: build_rag(args, device, setting, on), args, device,
                "rag")
            break
        except torch.OutOfMemoryError:
            print(f"rag: activation_checkpointing={setting!r} ran out of memory; next setting",
                  file=sys.stderr)
            model = backend = step = None
            torch._dynamo.reset()  # compiled graphs hold the failed setting's modules
            torch.cuda.empty_cache()
    else:
        raise SystemExit("rag: out of memory with every activation checkpointing setting; "
                         "lower --batch-size")
    seconds = timed_steps(step, args.steps, device)
    memory = peak_memory(device)
    config = model.config
    seqs = args.batch_size * config.docs_per_query
    tokens = seqs * config.seq_len
    gen = config.generator
    head_dim = gen.hidden_size // gen.num_heads
    kernels, tower_kernels = measured("rag: profiler", lambda: attention_ops(
        step, device, (seqs, gen.num_heads, config.seq_len, head_dim)), (["?"], ["?"]))
    flops = measured("rag: FLOP count", lambda: counted_flops(step, device), math.nan)
    # retrieval share: separate steps with device syncs around retrieve() and the backend
    retrieve, spent = model.retrieval.retrieve, [0.0]

    def timed_retrieve(batch):
        sync(device)
        start = time.perf_counter()
        out = retrieve(batch)
        sync(device)
        spent[0] += time.perf_counter() - start
        return out

    model.retrieval.retrieve = timed_retrieve
    backend.timing = True
    probe = max(2, min(5, args.steps))
    probe_s = timed_steps(step, probe, device)
    model.retrieval.retrieve = retrieve
    params = sum(p.numel() for p in model.parameters())
    backends = measured("rag: SDPA backend probe", lambda: sdpa_backends_that_run(
        (seqs, gen.num_heads, config.seq_len, head_dim), device,
        torch.bfloat16 if device.type == "cuda" else torch.float32,
        causal=gen.attention == "causal", masked=gen.attention == "masked"), ["?"])
    return {"model": f"rag {args.size}", "params": params, "layers": gen.num_layers,
            "hidden": gen.hidden_size, "seq_len": config.seq_len, "sequences": seqs,
            "tokens_per_step": tokens, "step_s": seconds, "tokens_per_s": tokens / seconds,
            "mfu": mfu(params, gen.num_layers, gen.hidden_size, config.seq_len,
                       tokens / seconds, peak),
            "peak_memory_gib": memory, "warmup_s": warmup_s, "compiled": compiled,
            "attention": gen.attention,
            "attention_kernels": kernels, "tower_attention_kernels": tower_kernels,
            "sdpa_backends_accepting": backends, "counted_flops_per_step": flops,
            "counted_flop_share": flops / seconds / (peak * 1e12),
            "activation_checkpointing": str(setting),
            "checkpointed_blocks": len(names),
            "retrieval": args.retrieval,
            "retrieve_share": spent[0] / probe / probe_s,
            "search_lookup_share": backend.seconds / probe / probe_s}


# -- the anchor --------------------------------------------------------------------------------
def llama_config(rag: dict, vocab: int, num_heads: int):
    """A LlamaConfig with the RAG model's width, depth, heads and vocabulary and the MLP
    width (a multiple of 64) that brings its parameter count closest to the RAG model's."""
    from transformers import LlamaConfig

    hidden, layers = rag["hidden"], rag["layers"]

    def count(inner: int) -> int:  # embeddings + untied head + layers (attention, SwiGLU, 2 norms) + norm
        return 2 * vocab * hidden + layers * (4 * hidden**2 + 3 * hidden * inner + 2 * hidden) + hidden

    inner = max(64, round((rag["params"] - count(0)) / (3 * hidden * layers) / 64) * 64)
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inner,
                       num_hidden_layers=layers, num_attention_heads=num_heads,
                       num_key_value_heads=num_heads, max_position_embeddings=rag["seq_len"],
                       tie_word_embeddings=False, attn_implementation="sdpa")


def run_anchor(args, device, peak, rag: dict, vocab: int, num_heads: int):
    from transformers import LlamaForCausalLM

    reset_memory(device)
    config = llama_config(rag, vocab, num_heads)

    def build(compiled: bool):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(device)
        model.train()
        if compiled:
            model.compile()
        optimizer = optimizer_for(model.parameters(), device)
        ids = [torch.randint(0, vocab, (rag["sequences"], rag["seq_len"]), device=device)
               for _ in range(4)]
        counter = iter(range(10**9))

        def step():
            batch = ids[next(counter) % len(ids)]
            with autocast(device):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return model, step

    (model, step), warmup_s, compiled = warm_up(build, args, device, "anchor")
    seconds = timed_steps(step, args.steps, device)
    memory = peak_memory(device)
    params = sum(p.numel() for p in model.parameters())
    tokens = rag["tokens_per_step"]
    kernels, _ = measured("anchor: profiler", lambda: attention_ops(step, device), (["?"], []))
    flops = measured("anchor: FLOP count", lambda: counted_flops(step, device), math.nan)
    return {"model": "llama anchor", "params": params, "layers": config.num_hidden_layers,
            "hidden": config.hidden_size, "seq_len": rag["seq_len"],
            "sequences": rag["sequences"], "tokens_per_step": tokens, "step_s": seconds,
            "tokens_per_s": tokens / seconds,
            "mfu": mfu(params, config.num_hidden_layers, config.hidden_size, rag["seq_len"],
                       tokens / seconds, peak),
            "peak_memory_gib": memory, "warmup_s": warmup_s, "compiled": compiled,
            "attention": "sdpa causal", "attention_kernels": kernels,
            "counted_flops_per_step": flops,
            "counted_flop_share": flops / seconds / (peak * 1e12),
            "intermediate_size": config.intermediate_size}


# -- entry point -------------------------------------------------------------------------------
def save_encoder_config(folder: Path) -> None:
    """The bundled MiniLM folder without its weights: config, pooling and tokenizer files."""
    from rag_mm.tokenizer import default_encoder_path

    source = default_encoder_path()
    shutil.copytree(source, folder, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "README.md"))
    print(f"wrote {folder} ({sum(p.stat().st_size for p in folder.rglob('*') if p.is_file()) / 1e6:.1f} MB): "
          f"{', '.join(sorted(p.name for p in folder.iterdir()))}")


def check_compiler(device: torch.device) -> None:
    """Refuse --compile where no compiler works: a C++ compiler on CPU, Triton on CUDA."""
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        raise ValueError("--compile on --device cpu needs a C++ compiler (g++ / clang++) for "
                         "inductor, and none is on PATH; pass --no-compile")
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError("--compile on CUDA needs Triton, which is not installed; pass "
                             "--no-compile")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--size", default="1b", help="rag_mm.config named size (tiny, demo, 1b)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiling)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (x top_k sequences)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--retrieval", action=argparse.BooleanOptionalAction, default=True,
                   help="search the index (mode rag); --no-retrieval: random documents")
    p.add_argument("--attention", default="causal", choices=("causal", "masked", "flex"))
    p.add_argument("--activation-checkpointing", default="auto",
                   help="auto (off, else every 2nd, else every block: the first that fits), "
                        "or a setting of trainers.parallel.checkpointing")
    p.add_argument("--corpus-size", type=int, default=100_000)
    p.add_argument("--encoder-dir", default=None,
                   help="text encoder folder (config + tokenizer, no weights needed); "
                        "default: the bundled MiniLM's")
    p.add_argument("--anchor", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--save-encoder-config", type=Path, default=None, metavar="DIR",
                   help="write the bundled MiniLM's config and tokenizer to DIR and exit")
    args = p.parse_args(argv)
    if args.activation_checkpointing not in ("auto",):
        from trainers.parallel.checkpointing import ActivationCheckpointing

        ActivationCheckpointing.parse(args.activation_checkpointing)
    for flag in ("steps", "batch_size", "corpus_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args


def main(argv=None) -> dict | None:
    args = parse(argv)
    if args.save_encoder_config is not None:
        save_encoder_config(args.save_encoder_config)
        return None
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch "
                         f"(torch {torch.__version__}); run on a GPU machine or pass --device cpu")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {args.device!r}: use cuda or cpu")
    if args.attention == "flex" and device.type == "cpu":
        raise ValueError("--attention flex trains on GPUs only: FlexAttention has no CPU "
                         "backward; use causal or masked with --device cpu")
    if args.compile:
        check_compiler(device)
    if args.encoder_dir is not None and not (Path(args.encoder_dir) / "config.json").is_file():
        raise ValueError(f"--encoder-dir {args.encoder_dir}: no config.json there; write one "
                         f"with --save-encoder-config DIR on a machine with the bundled MiniLM")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak, peak_what = matmul_peak(device)
    rows = [run_rag(args, device, peak)]
    if args.anchor:
        config = rag_config(args)
        anchor = measured("anchor", lambda: run_anchor(
            args, device, peak, rows[0], config.generator.vocab_size,
            config.generator.num_heads), None)
        if anchor is not None:
            rows.append(anchor)
    report(rows, peak, peak_what, args, device)
    return {"rows": rows, "peak_tflops": peak}


def report(rows, peak, peak_what, args, device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, matmul peak {peak:.1f} TFLOP/s ({peak_what}); "
          f"{args.steps} timed steps after {args.warmup}; compile "
          f"{'on' if args.compile else 'off'}; "
          f"{'bf16 autocast, fused AdamW' if device.type == 'cuda' else 'fp32, AdamW'}")
    print("| model | params | tokens/step | tokens/s | MFU | counted FLOP/s / peak | peak GiB | "
          "attention kernel | checkpointing | retrieval share | warm-up s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        memory = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        share = (f"{100 * r['retrieve_share']:.1f}% (search+lookup "
                 f"{100 * r['search_lookup_share']:.1f}%)" if "retrieve_share" in r else "-")
        ac = (f"{r['activation_checkpointing']} ({r['checkpointed_blocks']} blocks)"
              if "checkpointed_blocks" in r else "off")
        share_of_peak = r["counted_flop_share"]
        counted = "n/a" if math.isnan(share_of_peak) else f"{100 * share_of_peak:.1f}%"
        print(f"| {r['model']} | {r['params'] / 1e6:.0f} M | {r['tokens_per_step']} | "
              f"{r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | "
              f"{counted} | {memory} | "
              f"{r.get('attention')}: {', '.join(r['attention_kernels']) or 'none seen'} | "
              f"{ac} | {share} | {r['warmup_s']:.1f}{'' if r['compiled'] else ' (eager)'} |")
    rag = rows[0]
    print(f"rag: SDPA backends that accept its decoder attention call ({rag['attention']}, "
          f"each alone): {', '.join(rag['sdpa_backends_accepting'])}; the vision / text "
          f"towers' attention ran {', '.join(rag['tower_attention_kernels']) or 'nothing seen'}")
    if len(rows) > 1:
        print(f"rag / anchor: tokens/s {rag['tokens_per_s'] / rows[1]['tokens_per_s']:.3f}, "
              f"MFU {rag['mfu'] / rows[1]['mfu']:.3f}")
    print(json.dumps({"benchmark": "gpu_step", "device": name, "peak_tflops": round(peak, 2),
                      "size": args.size, "steps": args.steps, "compile": args.compile,
                      "rows": rows}, default=str))


def cli(argv=None) -> dict | None:
    """`main` with a bad flag or a missing device as one line on stderr, exit code 2 (like
    `trainers.errors.run_cli`, whose error list imports FAISS, absent on the GPU machine)."""
    from trainers.errors import UserExit, one_line

    try:
        return main(argv)
    except ValueError as err:
        message = f"gpu_step.py: error: {one_line(err)}"
        print(message, file=sys.stderr, flush=True)
        raise UserExit(message) from None


if __name__ == "__main__":
    cli()
