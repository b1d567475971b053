"""How long runs survive, measured with real processes and real signals (trainers/run/).

    python benchmarks/run_survival.py [--size demo] [--kills 20] [--out DIR]

On a small demo task (made here) and its index, `scripts/pretrain.py` at `--size`:
1. checkpoint save time (serialise, write, fsync, switch `last.ckpt`; from the run's log)
   and size: a run saving every 5 steps;
2. SIGTERM -> exit: SIGTERM sent during joint training right after a checkpoint appears;
   the time until the process has saved the step it was in and exited (code 75);
3. SIGKILL trials: a run saving every step is SIGKILLed N times (every other kill the moment
   a save's temporary file appears, the others at a random moment), resumed after each;
   after every kill `last.ckpt` must load and name a saved step.
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from trainers.run import LAST, latest, saved_steps

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def script(name: str, *args) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / name), *map(str, args)]


def wait(condition, process, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise RuntimeError(f"the run ended early ({process.returncode})")
        if time.monotonic() > deadline:
            raise TimeoutError("the run did not get there in time")
        time.sleep(0.005)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="demo")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="run_survival_"))
    data, index = root / "data", root / "index"
    if not (data / "meta.json").exists():
        subprocess.run(script("make_demo_data.py", "--out", data, "--entities", 48), check=True,
                       env=ENV, stdout=subprocess.DEVNULL)
        subprocess.run(script("build_index.py", "--corpus", data / "corpus.parquet", "--out",
                              index), check=True, env=ENV, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    common = ["--data", data, "--index", index, "--size", args.size, "--batch-size", 16,
              "--val-every", 1000]

    # 1 + 2: save time and size, then SIGTERM during joint training
    run = root / "sigterm"
    process = subprocess.Popen(
        script("pretrain.py", *common, "--max-steps", 10_000, "--retriever-warmup-steps", 2,
               "--save-every", 5, "--keep", 100, "--out", run),
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait(lambda: len(saved_steps(run / "checkpoints")) >= 3, process)
    newest = saved_steps(run / "checkpoints")[-1]
    size = newest.stat().st_size if newest.is_file() else sum(
        f.stat().st_size for f in newest.rglob("*") if f.is_file())
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, log = process.communicate(timeout=600)
    sigterm_s = time.monotonic() - sent
    saves = [float(line.rsplit(" in ", 1)[1].split()[0]) for line in log.splitlines()
             if "checkpoint: step" in line]
    preempted = process.returncode

    # 3: SIGKILL trials
    run = root / "sigkill"
    command = script("pretrain.py", *common, "--max-steps", 10_000, "--retriever-warmup-steps",
                     10_000, "--save-every", 1, "--out", run)
    rng = random.Random(0)
    survived = during_save = 0
    folder = run / "checkpoints"
    for trial in range(args.kills):
        resume = ["--resume"] if latest(folder) is not None else []
        process = subprocess.Popen([*command, *resume], env=ENV, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        before = {p.name for p in saved_steps(folder)}
        wait(lambda before=before: not {p.name for p in saved_steps(folder)} <= before, process)
        if trial % 2 == 0:
            wait(lambda: any(p.name.endswith(".partial") for p in folder.glob(".*")), process)
        else:
            time.sleep(rng.uniform(0.0, 2.0))
        process.kill()
        process.wait()
        during_save += any(p.name.endswith(".partial") for p in folder.glob(".*"))
        target = latest(folder)
        saved = torch.load(folder / LAST, map_location="cpu", weights_only=False)
        survived += target is not None and target.name == f"step-{saved['global_step']:07d}.ckpt"
        print(f"kill {trial + 1}/{args.kills}: last.ckpt -> {target.name}", flush=True)

    result = {"size": args.size, "save_s": round(sum(saves) / len(saves), 2),
              "checkpoint_bytes": size, "sigterm_to_exit_s": round(sigterm_s, 2),
              "sigterm_exit_code": preempted, "sigkill_trials": args.kills,
              "sigkill_survived": survived, "sigkill_during_save": during_save}
    print(f"\n| measure ({args.size} size) | value |\n| --- | --- |")
    print(f"| checkpoint save (write + fsync + switch) | {result['save_s']} s |")
    print(f"| checkpoint size | {size / 2**20:.0f} MiB |")
    print(f"| SIGTERM -> exit (step finished, saved) | {result['sigterm_to_exit_s']} s, "
          f"exit code {preempted} |")
    print(f"| SIGKILL trials survived | {survived} of {args.kills} ({during_save} during a "
          f"save) |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
