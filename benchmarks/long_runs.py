"""What a long run's events cost (docs/long-runs.md): the disk a training needs, and on CPU how long a preemption
signal takes to end a training and what its rerun repeats.

    python benchmarks/long_runs.py               # both
    python benchmarks/long_runs.py --disk-only   # the disk table only (seconds, nothing trained)

Disk: the stage's own estimate (:func:`med_idefics.modeling.checkpoints.space_needed`: LoRA of params ``lora`` on
the trainable set of :func:`~med_idefics.modeling.lora.add_lora`, AdamW's two moments, ``save_total_limit`` 2) for
the Idefics2-8B architecture, built on the meta device (nothing downloaded or allocated), and for the tiny base,
beside the size of a checkpoint the tiny training really writes.

Signal: ``med-idefics train single-stage`` on the tiny base (random weights, a small generated dataset, in a temp
folder with its own sqlite store), SIGUSR1 sent after its first checkpoint: the seconds from the signal to the exit
(status 75), the step it stopped at, and the rerun — its first step and its wall time against an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]


def disk_rows(params) -> list[tuple[str, object]]:
    from eval_throughput import idefics2_8b

    from med_idefics.modeling.checkpoints import human, space_needed
    from med_idefics.modeling.lora import add_lora
    from med_idefics.modeling.tiny import build_tiny

    rows = []
    model, _ = idefics2_8b(["a"], device="meta")
    rows.append(("Idefics2-8B shape", space_needed(add_lora(model, params.lora), 2)))
    tiny, _ = build_tiny(["is there a lesion yes no"], params.model.tiny, seed=0)
    rows.append(("tiny base", space_needed(add_lora(tiny, params.lora), 2)))
    print("| base | trainable parameters | adapter | one checkpoint (estimate) | free disk a training needs |")
    print("|---|---|---|---|---|")
    for name, need in rows:
        print(
            f"| {name} | {need.trainable:,} | {human(need.adapter)} | {human(need.checkpoint)} | {human(need.total)} |"
        )
    return rows


def project(folder: Path) -> list[str]:
    """A tiny base and a small generated dataset in ``folder``; the ``--set`` overrides that point params at them."""
    from med_idefics.config import DemoDataConfig, load_params
    from med_idefics.data.demo import write_demo_dataset
    from med_idefics.data.schema import read_records
    from med_idefics.modeling.tiny import build_tiny

    params = load_params(REPO / "params.yaml")
    small = DemoDataConfig(seed=3, image_size=64, n_general_images=2, n_general_validation_images=1,
                           n_caption_train=4, n_caption_validation=1, n_vqa_train_images=12, n_vqa_test_images=2,
                           n_pathology_images=1, n_nonsense=2)  # fmt: skip
    write_demo_dataset(folder / "data", small, params.data.caption_prompt)
    texts = [f"{r['question']} {r['answer']}" for split in ("train", "test")
             for r in read_records(folder / "data", "demo", split)]  # fmt: skip
    model, processor = build_tiny(texts, params.model.tiny, seed=0)
    model.save_pretrained(folder / "base")
    processor.save_pretrained(folder / "base")
    return [f"data.root={folder / 'data'}", f"model.base_dir={folder / 'base'}", "single_stage.epochs=6",
            "single_stage.micro_batch=4", "single_stage.save_steps=10", "single_stage.eval_steps=1000",
            "single_stage.logging_steps=1", f"mlflow.tracking_uri=sqlite:///{folder / 'mlflow.db'}"]  # fmt: skip


def signal_rows(folder: Path) -> dict:
    from med_idefics.modeling.checkpoints import MANIFEST, human, scan

    overrides = project(folder)
    env = os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def command(out: str) -> list[str]:
        argv = [sys.executable, "-m", "med_idefics.cli", "train", "single-stage", "--out", str(folder / out),
                "--params", str(REPO / "params.yaml")]  # fmt: skip
        return argv + [arg for item in overrides for arg in ("--set", item)]

    started = time.perf_counter()
    done = subprocess.run(command("whole"), env=env, cwd=folder, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the uninterrupted training failed: {done.stderr[-3000:]}")
    whole_s = time.perf_counter() - started
    steps = json.loads((folder / "whole" / "train_summary.json").read_text())["optimizer_steps"]

    first = subprocess.Popen(command("ss"), env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = folder / "ss" / "checkpoints"
    while not (checkpoints.exists() and scan(checkpoints)[0]):
        if first.poll() is not None:
            raise SystemExit(f"training ended before the signal: {first.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    signalled = time.perf_counter()
    first.send_signal(signal.SIGUSR1)
    written = sum(json.loads((scan(checkpoints)[0][0].path / MANIFEST).read_text())["files"].values())
    first.wait()
    exit_s = time.perf_counter() - signalled
    stopped = scan(checkpoints)[0][-1].step
    started = time.perf_counter()
    rerun = subprocess.run(command("ss"), env=env, cwd=folder, capture_output=True, text=True)
    rerun_s = time.perf_counter() - started
    result = {
        "steps": steps, "uninterrupted_s": round(whole_s, 1), "exit_status": first.returncode,
        "signal_to_exit_s": round(exit_s, 2), "stopped_at_step": stopped, "rerun_status": rerun.returncode,
        "rerun_first_step": stopped + 1, "rerun_s": round(rerun_s, 1), "checkpoint_bytes": written,
    }  # fmt: skip
    print(f"\nA checkpoint the tiny training wrote: {human(written)} ({written:,} bytes)")
    print(f"\n{steps} steps on the tiny base, CPU: uninterrupted {result['uninterrupted_s']} s")
    print("| signal | exit status | signal → exit | stopped at step | rerun starts at step | rerun wall time |")
    print("|---|---|---|---|---|---|")
    print(f"| SIGUSR1 after the first checkpoint | {first.returncode} | {result['signal_to_exit_s']} s | {stopped} "
          f"| {stopped + 1} | {result['rerun_s']} s (status {rerun.returncode}) |")  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--disk-only", action="store_true", help="only the disk table")
    args = parser.parse_args(argv)
    from med_idefics.config import load_params

    disk_rows(load_params(REPO / "params.yaml"))
    if not args.disk_only:
        with tempfile.TemporaryDirectory(prefix="long-runs-") as folder:
            signal_rows(Path(folder))


if __name__ == "__main__":
    main()
