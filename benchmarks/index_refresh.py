"""Index refresh during training (issue 11, item 5), measured on CPU.

`--part recall`: does a trained document tower with refresh find documents the frozen one
cannot? A generated title-and-body corpus: each document is a unique pair of title words
followed by `--body-words` random words; a query names the title only. The words are drawn
from the tokenizer's whole-word vocabulary with a seed (nothing here knows the demo task).
The frozen encoder's mean pooling gives the random body most of each document vector, so
documents are told apart mostly by text the queries never mention; learning to weigh the
title is the document side's job. Queries of the first 70% of documents train (the tiny model's
retriever loss: in-batch negatives, `shared_negatives=0` in every row, so positives and
negatives are both fresh or both stored); recall@k is measured on the other 30% (documents
never seen as positives) searching all documents. Rows:
- frozen documents: query encoder trained, the index's vectors fixed (today's training);
- doc tower, no refresh: the document tower trained (scores use fresh vectors) but the
  search keeps the initial index;
- doc tower + refresh: the same, with `IndexRefresh(every)` swapping a re-embedded index in
  whenever a background build finished (training did not wait); recall on the index in use
  at the end and on one re-embedded from the final weights.

`--part run`: the same task trained by `scripts/pretrain.py` itself (a real run: Lightning,
checkpoints, the module's refresh hooks), retriever phase only (`--retriever-warmup-steps` =
`--max-steps`), three runs from the same seed: frozen documents; `--train-doc-encoder` (the
search keeps the initial index); `--train-doc-encoder --refresh-every N` (background refreshes
swapped in whenever one finished; training never waits). After each run the saved model
(`last.ckpt`) and the index its checkpoint records (the one the run searched at its end) give
held-out recall@k; the refresh run's swaps and staleness come from its log and
`train_summary.json`. A last row re-embeds the corpus with the refresh run's final document
tower (how stale its last index was).

`--part overhead`: refresh at `--num-docs` (10k) documents: its duration, and the training
step (the tiny model's retriever step with the trainable MiniLM document tower, batch 16,
torch's default threads) without a refresh running, while one runs (child process, 1 thread,
nice +`--refresh-nice`), and after it. The machine's load average is printed with the numbers.

    .venv/bin/python benchmarks/index_refresh.py --part recall
    .venv/bin/python benchmarks/index_refresh.py --part overhead --num-docs 10000
    .venv/bin/python benchmarks/index_refresh.py --part run --num-docs 400 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import retrieval_index
from rag_mm.config import model_config
from rag_mm.model import build_model
from retrieval_index.refresh import RefreshJob, check_record
from trainers.refresh import IndexRefresh


def title_body_corpus(num_docs: int, body_words: int, seed: int, tokenizer) -> list[dict]:
    """Unique two-word titles + random bodies, words from the tokenizer's vocabulary."""
    rng = np.random.default_rng(seed)
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) >= 4)
    titles: set[tuple[str, str]] = set()
    rows = []
    while len(rows) < num_docs:
        a, b = (words[i] for i in rng.choice(len(words), 2, replace=False))
        if (a, b) in titles:
            continue
        titles.add((a, b))
        body = " ".join(words[i] for i in rng.choice(len(words), body_words))
        rows.append({"id": f"d{len(rows)}", "text": f"{a} {b} . {body}", "title": f"{a} {b}"})
    return rows


def make_model(train_doc_encoder: bool):
    config = model_config("tiny")
    config.retriever.train_doc_encoder = train_doc_encoder
    config.retriever.shared_negatives = 0
    torch.manual_seed(0)
    return build_model(config)


def batch_of(model, rows: list[dict], keys: np.ndarray) -> dict:
    cfg = model.config
    tok = model.retrieval.tokenizer([rows[k]["title"] for k in keys], padding="max_length",
                                    truncation=True, max_length=cfg.max_prompt_tokens,
                                    return_tensors="pt")
    size = cfg.vision.image_size
    return {"images": torch.zeros(len(keys), 3, size, size), "prompt_ids": tok["input_ids"],
            "prompt_mask": tok["attention_mask"], "gold_keys": torch.as_tensor(keys)}


def optimizer_for(model, lr: float, doc_lr: float):
    doc = model.retrieval.doc_encoder
    doc_params = {id(p) for p in doc.parameters()} if doc is not None else set()
    rest = [p for p in model.retrieval.query_encoder.parameters()
            if p.requires_grad and id(p) not in doc_params]
    groups = [{"params": rest, "lr": lr}]
    if doc is not None:
        groups.append({"params": list(doc.parameters()), "lr": doc_lr})
    return torch.optim.AdamW(groups, weight_decay=0.0)


def train_step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    model.retriever_loss(batch).backward()
    optimizer.step()
    return time.perf_counter() - start


@torch.no_grad()
def recall(model, index, rows, keys: np.ndarray, ks=(1, 4, 16)) -> dict:
    model.eval()
    found = []
    for start in range(0, len(keys), 64):
        part = keys[start:start + 64]
        batch = batch_of(model, rows, part)
        q = model.retrieval.query_encoder(batch["images"], batch["prompt_ids"], batch["prompt_mask"])
        found.append(index.search(q, max(ks))[1])
    model.train()
    found = np.concatenate(found)
    return {f"recall@{k}": float((found[:, :k] == keys[:, None]).any(1).mean()) for k in ks}


def final_index(model, source, out: Path):
    weights = {k: v.detach().clone() for k, v in
               model.retrieval.doc_encoder.text.model.state_dict().items()}
    result = RefreshJob.start(weights, source_dir=source, out_dir=out, threads=2, nice=0).wait()
    if not result.ok:
        raise RuntimeError(result.error)
    return result.index


def build_corpus(args, model) -> tuple[Path, list[dict], float]:
    """The title-and-body corpus and its index in a fresh temporary folder: (folder, rows,
    build seconds)."""
    root = Path(tempfile.mkdtemp(prefix="refresh_bench_"))
    rows = title_body_corpus(args.num_docs, args.body_words, args.seed, model.retrieval.tokenizer)
    start = time.perf_counter()
    retrieval_index.build_index([{"id": r["id"], "text": r["text"]} for r in rows], root / "index",
                                progress=False, num_recall_queries=100)
    return root, rows, time.perf_counter() - start


def run_recall(args) -> dict:
    probe = make_model(False)
    root, rows, build_seconds = build_corpus(args, probe)
    num_train = int(0.7 * len(rows))
    rng = np.random.default_rng(args.seed)
    order = [rng.permutation(num_train) for _ in range(args.steps * args.batch_size // num_train + 1)]
    train_keys = np.concatenate(order)
    held_out = np.arange(num_train, len(rows))
    results = []
    base = retrieval_index.load(root / "index")
    results.append({"row": "before training", **recall(probe.eval(), base, rows, held_out)})
    for name, train_doc, every in [("frozen documents", False, None),
                                   ("doc tower, no refresh", True, None),
                                   (f"doc tower + refresh every {args.refresh_every}", True,
                                    args.refresh_every)]:
        model = make_model(train_doc)
        model.attach(retrieval_index.load(root / "index"), check_encoder=not train_doc)
        model.train()
        optimizer = optimizer_for(model, args.lr, args.doc_lr)
        refresh = (IndexRefresh(every, root / f"refresh_{len(results)}", nice=args.refresh_nice)
                   if every else None)
        begin, step_times = time.perf_counter(), []
        for step in range(args.steps):
            if refresh is not None:
                refresh.at_step_boundary(step, model)
            keys = train_keys[step * args.batch_size:(step + 1) * args.batch_size]
            step_times.append(train_step(model, optimizer, batch_of(model, rows, keys)))
            if refresh is not None:
                refresh.after_step(step + 1, model)
        row = {"row": name, "seconds": round(time.perf_counter() - begin, 1),
               "step_ms": round(1000 * statistics.median(step_times), 1),
               **recall(model, model.retrieval.backend, rows, held_out)}
        if refresh is not None:
            refresh.stop()
            row["refreshes"] = refresh.refreshes
            row["stale_recall"] = [round(e[k], 3) for e in refresh.events for k in e
                                   if k.startswith("stale_recall")]
        results.append(row)
        if train_doc:
            final = final_index(model, model.retrieval.backend.path, root / f"final_{len(results)}")
            results.append({"row": f"{name}: index re-embedded at the end",
                            **recall(model, final, rows, held_out)})
    return {"part": "recall", "num_docs": args.num_docs, "body_words": args.body_words,
            "steps": args.steps, "batch_size": args.batch_size, "initial_build_s":
            round(build_seconds, 1), "rows": results}


def run_overhead(args) -> dict:
    model = make_model(True)
    root, rows, build_seconds = build_corpus(args, model)
    model.attach(retrieval_index.load(root / "index"), check_encoder=False)
    model.train()
    optimizer = optimizer_for(model, args.lr, args.doc_lr)
    rng = np.random.default_rng(args.seed)
    refresh = IndexRefresh(10**9, root / "refresh", nice=args.refresh_nice)
    load_start = os.getloadavg()

    def steps(n, step0):
        times = []
        for step in range(step0, step0 + n):
            refresh.at_step_boundary(step, model)
            keys = rng.choice(len(rows), args.batch_size, replace=False)
            times.append(train_step(model, optimizer, batch_of(model, rows, keys)))
        return times

    steps(3, 0)  # warm-up
    before = steps(args.baseline_steps, 3)
    refresh.every = 1
    t0 = time.perf_counter()
    refresh.after_step(args.baseline_steps + 3, model)  # starts the refresh (snapshot copy)
    snapshot_ms = 1000 * (time.perf_counter() - t0)
    refresh.every = 10**9
    during, step = [], args.baseline_steps + 3
    while refresh.job is not None and refresh.job.running:
        during += steps(1, step)
        step += 1
    t0 = time.perf_counter()
    refresh.at_step_boundary(step, model)  # the swap
    swap_ms = 1000 * (time.perf_counter() - t0)
    event = refresh.events[-1]
    after = steps(args.baseline_steps, step + 1)
    load_end = os.getloadavg()
    ms = lambda xs: round(1000 * statistics.median(xs), 1)
    return {"part": "overhead", "num_docs": args.num_docs, "body_words": args.body_words,
            "initial_build_s": round(build_seconds, 1), "refresh_ok": event["ok"],
            "refresh_s": event.get("seconds"), "snapshot_ms": round(snapshot_ms, 1),
            "swap_ms": round(swap_ms, 1), "step_ms_before": ms(before),
            "step_ms_during": ms(during), "step_ms_after": ms(after),
            "steps_during": len(during), "load_start": [round(x, 1) for x in load_start],
            "load_end": [round(x, 1) for x in load_end], "torch_threads": torch.get_num_threads(),
            "refresh_nice": args.refresh_nice, "batch_size": args.batch_size}


# -- --part run: real pretrain.py runs -------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def write_run_data(root: Path, rows: list[dict], num_train: int, image_size: int) -> Path:
    """corpus / train / val parquet files of the title task: a prompt is a title, its gold
    document the one with that title; val holds the documents never used in training."""
    from PIL import Image

    from rag_mm.demo_data import _png, _write_parquet

    data = root / "data"
    data.mkdir(parents=True)
    blank = _png(Image.new("RGB", (image_size, image_size)))
    _write_parquet({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]},
                   data / "corpus.parquet")
    for split, part in (("train", rows[:num_train]), ("val", rows[num_train:])):
        _write_parquet({"image": [blank] * len(part), "prompt": [r["title"] for r in part],
                        "target": ["yes"] * len(part), "gold_id": [r["id"] for r in part]},
                       data / f"{split}.parquet")
    return data


def pretrain(args, data: Path, index: Path, out: Path, extra: list[str]) -> dict:
    """One `scripts/pretrain.py` run (retriever phase only); its summary, stderr and time."""
    command = [sys.executable, "scripts/pretrain.py", "--data", str(data), "--index", str(index),
               "--out", str(out), "--size", "tiny", "--max-steps", str(args.steps),
               "--retriever-warmup-steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--lr", str(args.lr), "--warmup-steps", "5", "--val-every", str(10 * args.steps),
               "--seed", str(args.seed), *extra]
    start = time.perf_counter()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": path})  # this checkout's packages
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "train_summary.json").read_text())
    return {"summary": summary, "stderr": done.stderr, "seconds": time.perf_counter() - start,
            "command": " ".join(command[1:])}


def saved_model_recall(out: Path, rows: list[dict], held_out: np.ndarray):
    """Held-out recall of the saved model searching the index its checkpoint records."""
    from trainers.refresh import INDEX_RECORD
    from trainers.run import load_module

    checkpoint = out / "checkpoints" / "last.ckpt"
    record = torch.load(checkpoint, map_location="cpu", weights_only=False)[INDEX_RECORD]
    index = retrieval_index.load(check_record(record), check_encoder=False)
    module = load_module(checkpoint)
    module.configure_model()
    model = module.model
    model.attach(index, check_encoder=False)
    return model, index, recall(model, index, rows, held_out)


def run_runs(args) -> dict:
    probe = make_model(False)
    root, rows, build_seconds = build_corpus(args, probe)
    num_train = int(0.7 * len(rows))
    held_out = np.arange(num_train, len(rows))
    data = write_run_data(root, rows, num_train, probe.config.vision.image_size)
    index = root / "index"
    results = [{"row": "before training", **recall(probe.eval(), retrieval_index.load(index),
                                                  rows, held_out)}]
    runs = [("frozen documents", []),
            ("document tower, no refresh (initial index)", ["--train-doc-encoder"]),
            (f"document tower + refresh every {args.refresh_every}",
             ["--train-doc-encoder", "--refresh-every", str(args.refresh_every)])]
    load_start = os.getloadavg()
    for name, extra in runs:
        out = root / f"run_{len(results)}"
        done = pretrain(args, data, index, out, extra)
        model, used, found = saved_model_recall(out, rows, held_out)
        row = {"row": name, "seconds": round(done["seconds"], 1), "index": str(used.path),
               "steps": done["summary"]["steps"], "command": done["command"], **found}
        refresh = done["summary"].get("refresh")
        if refresh is not None:
            row["refresh"] = refresh
            row["log"] = [line for line in done["stderr"].splitlines() if "index refresh" in line]
        results.append(row)
        if refresh is not None:
            final = final_index(model, used.path, root / "final")
            results.append({"row": "the refresh run's final tower, corpus re-embedded after it",
                            **recall(model, final, rows, held_out)})
    return {"part": "run", "num_docs": args.num_docs, "body_words": args.body_words,
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "refresh_every": args.refresh_every, "initial_build_s": round(build_seconds, 1),
            "load_start": [round(x, 1) for x in load_start],
            "load_end": [round(x, 1) for x in os.getloadavg()], "rows": results}


def print_table(result: dict) -> None:
    if result["part"] == "run":
        print(f"{result['num_docs']} documents (title + {result['body_words']} words), "
              f"{result['steps']} steps x batch {result['batch_size']} (scripts/pretrain.py); "
              f"held-out queries, saved model + the index its checkpoint records")
        print("| row | recall@1 | recall@4 | recall@16 | run s |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for r in result["rows"]:
            print(f"| {r['row']} | {r['recall@1']:.3f} | {r['recall@4']:.3f} | "
                  f"{r['recall@16']:.3f} | {r.get('seconds', '')} |")
        for r in result["rows"]:
            for line in r.get("log", []):
                print(line)
    elif result["part"] == "recall":
        print(f"{result['num_docs']} documents (title + {result['body_words']} words), "
              f"{result['steps']} steps x batch {result['batch_size']}; held-out queries")
        print("| row | recall@1 | recall@4 | recall@16 | train s | step ms |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in result["rows"]:
            print(f"| {r['row']} | {r['recall@1']:.3f} | {r['recall@4']:.3f} | "
                  f"{r['recall@16']:.3f} | {r.get('seconds', '')} | {r.get('step_ms', '')} |")
    else:
        print("| measure | value |\n| --- | ---: |")
        for key in ("num_docs", "refresh_s", "snapshot_ms", "swap_ms", "step_ms_before",
                    "step_ms_during", "step_ms_after", "steps_during", "load_start", "load_end"):
            print(f"| {key} | {result[key]} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", choices=("recall", "overhead", "run"), required=True)
    p.add_argument("--num-docs", type=int, default=None, help="default 2000 (recall), 10000")
    p.add_argument("--body-words", type=int, default=None, help="default 24 (recall), 12")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--refresh-every", type=int, default=25)
    p.add_argument("--baseline-steps", type=int, default=15)
    p.add_argument("--refresh-nice", type=int, default=10,
                   help="niceness added to the refresh process (IndexRefresh's default 10)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--doc-lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    recall_part = args.part in ("recall", "run")
    args.num_docs = args.num_docs or (2000 if recall_part else 10_000)
    args.body_words = args.body_words or (24 if recall_part else 12)
    result = {"recall": run_recall, "overhead": run_overhead, "run": run_runs}[args.part](args)
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
