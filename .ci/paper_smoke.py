"""``make paper-smoke``: the paper profile's own DVC pipeline, end to end on CPU, in ``outputs/paper-smoke/``.

What a GPU user runs (docs/paper-gpu.md), with this working tree's ``dvc.yaml`` and commands:

    med-idefics profile paper                      then `med-idefics profile paper-smoke`: the base and sizes only
    med-idefics data roco|vqa-rad|path-vqa|med-halt --source …     each ends with `dvc add data`
    git add -A && git commit                        the copy is a git repository of its own
    dvc repro

in ``outputs/paper-smoke/``: a copy of the working tree's files as git sees them (tracked and not ignored), a git
repository of its own, with its own ``params.yaml``, ``data/``, ``dvc.lock``, DVC cache and MLflow store — the
working copy's params, data, outputs and store are never touched. The datasets come from small local files in the
hub datasets' own schemas, written here from the demo's images (ROCO ``image, image_id, caption``; PathVQA ``image,
question, answer``; Med-HALT's ``reasoning_fake.csv`` as released); VQA-RAD is its authors' release in
``../shared/realdata/vqa-rad`` when that is there (passed as a relative path, as docs/data.md's example does), else
a generated file in the hub's schema.

After ``dvc repro``, the cheap ``base`` stage is forced to run again, as any change to its code would make it, and
``dvc status`` must stay clean: a rerun of the base must not invalidate the GPU stages after it. Last,
``tests/test_paper_smoke.py`` checks what the run left. A second run reuses everything that is up to date.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEST = REPO / "outputs" / "paper-smoke"
REAL_VQA_RAD = REPO.parent / "shared" / "realdata" / "vqa-rad"
MANIFEST = ".paper-smoke-files"  # the files copied last time: those no longer in the working tree are removed
PIPELINE_STATE = {"data", "outputs", "metrics", "reports", "dvc.lock", "data.dvc"}  # the copy's own, never copied
VQA_RAD_LIMITS = ("train=48", "test=24")  # a few dozen questions; 48 keep a whole image for the validation split
SEED = 2024
IMAGE_SIZE = 64  # the demo's images; the real processor scales them to its 378-980 px geometry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEST, help="Where the copy lives  [default: %(default)s]")
    args = parser.parse_args()
    started = time.monotonic()
    dest = args.dest.resolve()
    copy_working_tree(REPO, dest)
    env = smoke_env(dest)
    run(["med-idefics", "profile", "paper"], dest, env)
    run(["med-idefics", "profile", "paper-smoke"], dest, env)
    sources = write_sources(dest / "sources")
    for dataset, options in import_commands(sources, dest).items():
        run(["med-idefics", "data", dataset, *options], dest, env)
    commit(dest, env)
    run(["dvc", "repro"], dest, env)
    # A rerun of the cheap base stage (as any edit to its code makes one) must leave every later stage up to date.
    run(["dvc", "repro", "--force", "--single-item", "base"], dest, env)
    status = run(["dvc", "status"], dest, env, capture=True)
    stale = "up to date" not in status
    if stale:
        print("paper-smoke: FAILED: after rerunning `base`, the stages above are out of date", flush=True)
    checks = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "paper_smoke"]
    run([*checks, "tests/test_paper_smoke.py"], dest, env)
    if stale:
        sys.exit("paper-smoke: failed (a rerun of `base` invalidated the stages after it)")
    print(f"paper-smoke: green in {time.monotonic() - started:.0f} s ({dest})")


def copy_working_tree(repo: Path, dest: Path) -> None:
    """The files of ``repo`` as git sees them (tracked and not ignored; the pipeline's own state left out) into
    ``dest``; unchanged files are not rewritten, files gone from ``repo`` since the last copy are removed."""
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    files = sorted({f for f in listed if f and f.split("/")[0] not in PIPELINE_STATE and (repo / f).is_file()})
    dest.mkdir(parents=True, exist_ok=True)
    manifest = dest / MANIFEST
    before = set(manifest.read_text().splitlines()) if manifest.is_file() else set()
    for gone in sorted(before - set(files)):
        (dest / gone).unlink(missing_ok=True)
    for name in files:
        source, target = repo / name, dest / name
        data = source.read_bytes()
        if not target.is_file() or target.read_bytes() != data:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            target.chmod(source.stat().st_mode & 0o777)
    manifest.write_text("\n".join(files) + "\n")
    (dest / ".dvc" / "config.local").unlink(missing_ok=True)  # an earlier harness's no_scm: the copy has its own git
    if not (dest / ".git").is_dir():  # a clone of its own, as a GPU user has (this repository's git ignores the copy)
        subprocess.run(["git", "init", "-q", str(dest)], check=True)
        (dest / ".git" / "info" / "exclude").write_text("/sources/\n")  # the hub-schema files the imports read


def commit(dest: Path, env: dict[str, str]) -> None:
    """Commit the copy's tree — code, params after the profile switch, data.dvc after the imports — as a GPU user
    commits before `dvc repro`: the registry promotes only versions made from committed work (docs/registry.md)."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    identity = ["-c", "user.name=paper-smoke", "-c", "user.email=paper-smoke@localhost"]
    run(["git", "add", "-A"], dest, env)
    staged = subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=dest)
    if staged.returncode != 0:
        message = f"paper-smoke: the working tree of {head.stdout.strip() or 'this repository'}, paper profile, data"
        run(["git", *identity, "commit", "-q", "-m", message], dest, env)


def smoke_env(dest: Path) -> dict[str, str]:
    """The venv first on PATH, the copy's own code (before the venv's editable install of this tree), offline, one
    torch thread per process, and the copy's own MLflow store."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(dest / "src"), env.get("PYTHONPATH")]))
    env.pop("MLFLOW_TRACKING_URI", None)  # the copy's sqlite:///mlflow.db, never a store the caller points at
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run(
    command: list[str],
    cwd: Path,
    env: dict[str, str],
    capture: bool = False,
    expect_failure: bool = False,
    label: str = "paper-smoke",
) -> str:
    """Run ``command``, its output shown as it comes (and, with ``capture``, returned: stdout and stderr together);
    exit naming it when it fails, or when it succeeds although ``expect_failure``; then print how long it took."""
    print(f"{label}$ {shlex.join(command)}", flush=True)
    started = time.monotonic()
    output = []
    with subprocess.Popen(
        command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT
    ) as process:
        for line in process.stdout if capture else ():
            print(line, end="", flush=True)
            output.append(line)
    if (process.returncode != 0) != expect_failure:
        sys.exit(f"{label}: `{shlex.join(command)}` exited {process.returncode}")
    print(f"{label}: {time.monotonic() - started:.0f} s", flush=True)
    return "".join(output)


# --------------------------------------------------------------------------------------------------------------------
# The sources: small files in the hub datasets' own schemas, from the demo's images (as JPEG, as the hub holds them)


def import_commands(sources: Path, dest: Path) -> dict[str, list[str]]:
    """``med-idefics data <dataset>`` options per dataset, each ``--source`` relative to the copy."""
    vqa_rad = ["--source", sources.relative_to(dest).as_posix() + "/vqa-rad"]
    if (REAL_VQA_RAD / "VQA_RAD Dataset Public.json").is_file():
        vqa_rad = ["--source", os.path.relpath(REAL_VQA_RAD, dest)]
        vqa_rad += [option for limit in VQA_RAD_LIMITS for option in ("--limit", limit)]
    folder = sources.relative_to(dest).as_posix()
    return {
        "roco": ["--source", f"{folder}/roco"],
        "vqa-rad": vqa_rad,
        "path-vqa": ["--source", f"{folder}/path-vqa"],
        "med-halt": ["--source", f"{folder}/med-halt/reasoning_fake.csv"],
    }


def write_sources(folder: Path) -> Path:
    """ROCO, PathVQA and (for when the real release is absent) VQA-RAD as hub-layout parquet folders
    (``<dataset>/data/<split>-00000-of-00001.parquet``), Med-HALT as its released CSV."""
    import numpy as np

    from med_idefics.data import demo, demo_world

    prompt = "unused"  # the importer asks its own caption prompt (params data.caption_prompt)
    roco = {
        "train": demo.caption_records("caption-train", 32, IMAGE_SIZE, SEED, prompt),
        "validation": demo.caption_records("caption-validation", 8, IMAGE_SIZE, SEED, prompt),
        "test": demo.caption_records("caption-validation", 8, IMAGE_SIZE, SEED + 1, prompt),
    }
    for split, records in roco.items():
        rows = {
            "image": [jpeg(r["image"]) for r in records],
            "image_id": [f"ROCO_{split}_{i:05d}" for i in range(len(records))],
            "caption": [r["answer"] for r in records],
        }
        hub_parquet(folder / "roco" / "data" / f"{split}-00000-of-00001.parquet", rows)
    vqa = {
        # 7 bare questions per image (the demo's test style): 10 % of train holds one whole image, the validation split
        "vqa-rad": {
            split: demo.vqa_records("test", n, IMAGE_SIZE, SEED + i)
            for i, (split, n) in enumerate((("train", 10), ("test", 4)))
        },
        "path-vqa": {
            split: demo.vqa_records("pathology", 4, IMAGE_SIZE, SEED + i)
            for i, split in enumerate(("train", "validation", "test"))
        },
    }
    for dataset, splits in vqa.items():
        for split, records in splits.items():
            rows = {
                "image": [jpeg(r["image"]) for r in records],
                "question": [r["question"] for r in records],
                "answer": [r["answer"] for r in records],
            }
            hub_parquet(folder / dataset / "data" / f"{split}-00000-of-00001.parquet", rows)
    questions = demo_world.nonsense_questions(np.random.default_rng(SEED), 24)
    write_med_halt_csv(folder / "med-halt" / "reasoning_fake.csv", questions)
    return folder


def jpeg(png: bytes) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(io.BytesIO(png)) as image:
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def hub_parquet(path: Path, rows: dict[str, list]) -> None:
    """A parquet file as the hub serves it: the image a ``{bytes, path}`` struct, HF features in its metadata."""
    import datasets

    features = {name: datasets.Value("string") for name in rows}
    features["image"] = datasets.Image()
    rows = {**rows, "image": [{"bytes": data, "path": None} for data in rows["image"]]}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=datasets.Features(features)).to_parquet(str(path))


def write_med_halt_csv(path: Path, questions: list[str]) -> None:
    """Med-HALT ``reasoning_fake.csv`` as released: no correct-answer column; each question's options (a Python dict
    literal) include "I do not know", the expected response to a nonsense question."""
    import pandas as pd

    options = ["a clinical sign", "a laboratory value", "a drug interaction", "I do not know"]
    frame = pd.DataFrame(
        {
            "id": [f"smoke-{i:04d}" for i in range(len(questions))],
            "subject_name": "medicine", "topic_name": "", "split_type": "train", "dataset": "smoke",
            "len": [len(q) for q in questions], "year": 2023.0, "exam_name": "smoke",
            "question": questions,
            "options": [repr({str(k): option for k, option in enumerate(options)})] * len(questions),
        }
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)


if __name__ == "__main__":
    main()
