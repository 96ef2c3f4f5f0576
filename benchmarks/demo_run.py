"""``make demo`` from a fresh checkout, timed: one row of docs/performance.md's seeds × threads table.

    python benchmarks/demo_run.py                              # HEAD, seed 42, 1 torch thread, 2 stages at a time
    python benchmarks/demo_run.py --seed 7 --threads 2
    python benchmarks/demo_run.py --clone /tmp/demo-clone      # reuse that checkout's venv across runs

Clones this repository at ``--ref`` (or, with ``--clone`` naming an earlier clone, checks it out there and removes
every untracked and ignored file but its ``.venv``: the state of a fresh clone), builds the venv (``make venv``, not
timed), sets ``seed`` in its params.yaml (the data stay the same: they have their own seed), then times ``make demo``
with ``OMP_NUM_THREADS=--threads`` (and ``DEMO_JOBS=--jobs`` if given). Prints the wall time, each stage's time as
``med-idefics repro`` reported it, the demo-check's result, and the figures of the demo's acceptance criteria 1–6 read
from the files the run wrote (``tests/test_demo_results.py`` asserts their thresholds; this only reports them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGE_DONE = re.compile(r"\] done (\S+) in (\d+) s")


def checkout(ref: str, clone: Path) -> str:
    """``clone`` as a fresh clone of this repository at ``ref`` (its .venv kept); returns the commit."""
    if (clone / ".git").is_dir():
        subprocess.run(["git", "fetch", "-q", str(REPO), "+refs/heads/*:refs/remotes/bench/*"], cwd=clone, check=True)
        subprocess.run(["git", "checkout", "-q", "--force", ref], cwd=clone, check=True)
        subprocess.run(["git", "clean", "-xfdq", "-e", ".venv"], cwd=clone, check=True)
    else:
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        subprocess.run(["git", "checkout", "-q", ref], cwd=clone, check=True)
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True
    ).stdout.strip()


def set_seed(params_file: Path, seed: int) -> None:
    text, n = re.subn(r"(?m)^seed: \d+", f"seed: {seed}", params_file.read_text())
    if n != 1:
        sys.exit(f"{params_file}: no top-level `seed:` line to set")
    params_file.write_text(text)


def criteria(root: Path) -> dict[str, float | list[float]]:
    """The figures of criteria 1–6 (and two more of interest) from a finished demo's metrics and paired tests."""

    def metric(variant: str, suite: str, name: str) -> float:
        return json.loads((root / "metrics" / variant / f"{suite}.json").read_text())[name]

    claims = json.loads((root / "reports" / "paired_tests.json").read_text())["claims"]
    (claim,) = [c for c in claims if c["title"] == "Two-stage vs single-stage"]
    closed = metric("two-stage", "vqa-rad", "closed_accuracy")
    sizes = sorted(int(p.name.removeprefix("two-stage-n")) for p in (root / "metrics").glob("two-stage-n*"))
    curve = ["single-stage", *(f"two-stage-n{n}" for n in sizes), "two-stage"]
    return {
        "two_stage_closed": closed,
        "base_closed": metric("base", "vqa-rad", "closed_accuracy"),
        "base_abstention": metric("base", "med-halt", "abstention_rate"),
        "em_diff": claim["test"]["exact_match"]["diff"],
        "em_p": claim["test"]["exact_match"]["p_value"],
        "swap_cost_points": 100 * (closed - metric("two-stage", "swap", "closed_accuracy")),
        "expert_cost_points": 100 * (closed - metric("two-stage", "expert-prompt", "closed_accuracy")),
        "figure3_exact_match": [metric(v, "vqa-rad", "exact_match") for v in curve],
        "single_stage_closed": metric("single-stage", "vqa-rad", "closed_accuracy"),
        "two_stage_abstention": metric("two-stage", "med-halt", "abstention_rate"),
    }


def table_row(seed: int, threads: int, c: dict, checks: str, wall: float) -> str:
    def mark(ok: bool) -> str:
        return "✓" if ok else "✗"

    curve = c["figure3_exact_match"]
    base_ok = 0.35 <= c["base_closed"] <= 0.65 and c["base_abstention"] >= 0.5
    return " | ".join(
        [
            f"| {seed}",
            str(threads),
            f"{c['two_stage_closed']:.3f} {mark(c['two_stage_closed'] >= 0.80)}",
            f"{c['base_closed']:.3f} / {c['base_abstention']:.2f} {mark(base_ok)}",
            f"{c['em_diff']:+.3f} ({c['em_p']:.1e}) {mark(c['em_diff'] >= 0.05 and c['em_p'] < 0.05)}",
            f"{c['swap_cost_points']:.1f} pts {mark(c['swap_cost_points'] >= 25)}",
            f"{c['expert_cost_points']:+.1f} pts {mark(abs(c['expert_cost_points']) <= 5)}",
            " → ".join(f"{x:.3f}" for x in curve) + f" {mark(len(curve) >= 4 and curve[-1] >= curve[0] + 0.05)}",
            checks,
            f"{wall:.0f} s |",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="HEAD", help="the commit to run (default: this checkout's HEAD)")
    parser.add_argument("--seed", type=int, default=42, help="params `seed` (training seeds; the data keep theirs)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS")
    parser.add_argument("--jobs", type=int, default=None, help="DEMO_JOBS (default: the Makefile's: cores / threads)")
    parser.add_argument("--clone", type=Path, default=None, help="a checkout to reuse (default: a new temp folder)")
    args = parser.parse_args(argv)

    ref = subprocess.run(["git", "rev-parse", args.ref], cwd=REPO, capture_output=True, text=True, check=True)
    clone = args.clone or Path(tempfile.mkdtemp(prefix="med-idefics-demo-")) / "clone"
    commit = checkout(ref.stdout.strip(), clone)
    subprocess.run(["make", "venv"], cwd=clone, check=True, stdout=subprocess.DEVNULL)
    set_seed(clone / "params.yaml", args.seed)
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)} | ({"DEMO_JOBS": str(args.jobs)} if args.jobs else {})
    log = clone / "demo.log"
    started = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.run(["make", "demo"], cwd=clone, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started

    text = log.read_text(errors="replace")
    stages = ", ".join(f"{name} {seconds} s" for name, seconds in STAGE_DONE.findall(text))
    jobs = re.findall(r"med-idefics repro --jobs (\d+)", text)
    checks = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?) in [\d.]+s", text, re.MULTILINE)
    print(
        f"make demo: exit {code} in {wall:.0f} s (commit {commit}, seed {args.seed}, {args.threads} thread(s), "
        f"{jobs[0] if jobs else '?'} stages at a time; log {log})"
    )
    print(f"stages: {stages}")
    print(f"demo-check: {checks[-1] if checks else 'did not run'}")
    if (clone / "reports" / "paired_tests.json").is_file():
        print(table_row(args.seed, args.threads, criteria(clone), checks[-1] if checks else "-", wall))
    sys.exit(code)


if __name__ == "__main__":
    main()
