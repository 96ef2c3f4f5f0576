"""The datasets in the formats their authors released, recognised by what ``--source`` points at.

- VQA-RAD official (OSF): ``VQA_RAD Dataset Public.json`` + ``VQA_RAD Image Folder/``. train = phrase_type
  freeform + para, test = test_freeform + test_para; answer_type from the file; ``qid_linked_id`` and ``phrase_type``
  kept, which link each rewording to its original (:mod:`med_idefics.data.rewordings`).
- VQA-RAD, MEVF layout (the split most Med-VQA papers train on): ``trainset.json`` / ``testset.json`` (image_name;
  phrase_type, but no qid_linked_id: no rewording is linked to its original);
  the images in ``--images``, else an ``images/`` or ``VQA_RAD Image Folder/`` beside the files or one level up.
- SLAKE 1.0: ``train.json`` / ``validate.json`` / ``test.json`` + ``imgs/`` (img_name ``xmlabN/source.jpg``); one
  language (``q_lang``, English by default); modality, location and content_type kept as extra columns, and
  content_type again as ``question_type``, the column every source's question kind goes by.
- PathVQA: ``{train,val,test}_vqa.pkl`` (lists of plain dicts) loaded with :func:`load_plain_pickle`, which refuses
  every global; images ``<img_id>.jpg`` in ``--images``, else ``images/`` beside or one level up, flat or in
  ``train/ val/ test/`` sub-folders as the release's ``pvqa/images``.

Each release is read into rows ``{id, image (a path), question, answer, answer_type (closed/open), <extras>}`` that
the importer (:mod:`med_idefics.data.importers`) turns into records like any other source.
"""

from __future__ import annotations

import io
import json
import pickle
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from med_idefics.data.schema import CLOSED, OPEN, QUESTION_TYPE, DatasetError
from med_idefics.data.sources import SourceSplit

VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"
VQA_RAD_PHRASES = {"train": ("freeform", "para"), "test": ("test_freeform", "test_para")}
# qid_linked_id and phrase_type: which questions are rewordings of which (med_idefics.data.rewordings)
VQA_RAD_EXTRAS = ("question_type", "image_organ", "phrase_type", "qid_linked_id", "image_name")
MEVF_FILES = {"train": "trainset.json", "test": "testset.json"}
SLAKE_FILES = {"train": ("train.json",), "validation": ("validate.json", "validation.json"), "test": ("test.json",)}
SLAKE_EXTRAS = (
    "modality",
    "location",
    "content_type",
    QUESTION_TYPE,
    "q_lang",
    "img_name",
)  # question_type = content_type
PATH_VQA_FILES = {"train": "train_vqa.pkl", "validation": "val_vqa.pkl", "test": "test_vqa.pkl"}
PATH_VQA_IMAGE_DIRS = {"train": "train", "validation": "val", "test": "test"}
PATH_VQA_EXTRAS = ("question_type", "img_id")
PATH_VQA_CLOSED = "yes/no"  # PathVQA's answer_type for closed questions; "other" and "number" are open
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Release:
    """A source in an authors' release format: the splits it holds and how to open one."""

    format: str  # names the format in messages
    splits: tuple[str, ...]  # stored split names available
    opener: Callable[[str], SourceSplit]

    def open(self, split: str) -> SourceSplit:
        if split not in self.splits:
            raise DatasetError(f"{self.format}: no split {split!r} here; it holds {list(self.splits)}")
        return self.opener(split)


def detect_release(name: str, source: str, images: str | None = None, lang: str = "en") -> Release | None:
    """The release ``source`` is in, for dataset ``name``; None when it is not a release format (hub id, parquet…)."""
    path = Path(source)
    if not path.exists():
        return None
    path = path.resolve()  # image paths are built from it once: a relative one would be joined to itself again
    images = str(Path(images).resolve()) if images is not None and Path(images).is_dir() else images
    folder = path if path.is_dir() else path.parent
    if name == "vqa-rad":
        if (folder / VQA_RAD_JSON).is_file() and (path.is_dir() or path.name == VQA_RAD_JSON):
            return _vqa_rad_official(folder, images)
        mevf = {split: folder / file for split, file in MEVF_FILES.items() if (folder / file).is_file()}
        if path.is_file() and path.name in MEVF_FILES.values():
            mevf = {split: file for split, file in mevf.items() if file == path}
        if mevf:
            return _mevf(folder, mevf, images)
    elif name == "slake":
        files = {split: _first_file(folder, names) for split, names in SLAKE_FILES.items()}
        files = {split: file for split, file in files.items() if file is not None}
        if path.is_file():
            files = {split: file for split, file in files.items() if file == path}
        if files:
            return _slake(folder, files, images, lang)
    elif name == "path-vqa":
        files = {split: folder / file for split, file in PATH_VQA_FILES.items() if (folder / file).is_file()}
        if path.is_file():
            files = {split: file for split, file in files.items() if file == path}
        if files:
            return _path_vqa(folder, files, images)
    return None


# --------------------------------------------------------------------------------------------------------------------
# VQA-RAD


def _vqa_rad_official(folder: Path, images: str | None) -> Release:
    file = folder / VQA_RAD_JSON
    image_dir = _image_dir(folder, images, (VQA_RAD_IMAGES,), "VQA-RAD images (synpic*.jpg)")
    entries = _load_json_list(file)

    def opener(split: str) -> SourceSplit:
        phrases = VQA_RAD_PHRASES[split]
        rows = [_vqa_rad_row(e, image_dir) for e in entries if str(e.get("phrase_type", "")).strip() in phrases]
        return _split(f"{file} (split {split}: phrase_type {' + '.join(phrases)})", rows, image_dir, VQA_RAD_EXTRAS)

    return Release("VQA-RAD official release", tuple(VQA_RAD_PHRASES), opener)


def _mevf(folder: Path, files: dict[str, Path], images: str | None) -> Release:
    image_dir = _image_dir(folder, images, ("images", VQA_RAD_IMAGES), "VQA-RAD images (synpic*.jpg)")

    def opener(split: str) -> SourceSplit:
        rows = [_vqa_rad_row(e, image_dir) for e in _load_json_list(files[split])]
        return _split(str(files[split]), rows, image_dir, VQA_RAD_EXTRAS)

    return Release("VQA-RAD MEVF layout", tuple(files), opener)


def _vqa_rad_row(entry: dict, image_dir: Path) -> dict:
    return {
        "id": entry.get("qid"),
        "image": _path_in(image_dir, entry.get("image_name")),
        "question": entry.get("question"),
        "answer": entry.get("answer"),
        "answer_type": entry.get("answer_type"),  # CLOSED / OPEN, sometimes "CLOSED ": the importer strips and lowers
        **{column: entry.get(column) for column in VQA_RAD_EXTRAS},
    }


# --------------------------------------------------------------------------------------------------------------------
# SLAKE


def _slake(folder: Path, files: dict[str, Path], images: str | None, lang: str) -> Release:
    image_dir = _image_dir(folder, images, ("imgs",), "SLAKE images (imgs/xmlabN/source.jpg)")

    def opener(split: str) -> SourceSplit:
        entries = [e for e in _load_json_list(files[split]) if e.get("q_lang") == lang]
        if not entries:
            raise DatasetError(f"{files[split]}: no question with q_lang {lang!r}; SLAKE has en and zh (--lang)")
        rows = [
            {
                "id": entry.get("qid"),
                "image": _path_in(image_dir, entry.get("img_name")),
                "question": entry.get("question"),
                "answer": entry.get("answer"),
                "answer_type": entry.get("answer_type"),
                **{column: entry.get(column) for column in SLAKE_EXTRAS},
                QUESTION_TYPE: entry.get("content_type"),  # the one name the report reads for every source
            }
            for entry in entries
        ]
        return _split(f"{files[split]} (q_lang {lang})", rows, image_dir, SLAKE_EXTRAS)

    return Release("SLAKE release", tuple(files), opener)


# --------------------------------------------------------------------------------------------------------------------
# PathVQA


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused global {module}.{name}: only plain data (lists, dicts, text) is read")


def load_plain_pickle(path: Path) -> object:
    """A pickle of plain Python data (dicts, lists, str, numbers); any global (class, function) is refused, so a
    downloaded file cannot run code."""
    try:
        return _NoGlobals(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, OSError) as err:
        raise DatasetError(f"{path}: not a plain-data pickle ({type(err).__name__}: {err})") from err


def path_vqa_questions(path: Path) -> list[dict]:
    """The questions of one PathVQA ``*_vqa.pkl`` as rows (image still the ``img_id``)."""
    entries = load_plain_pickle(path)
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: expected a list of question dicts, got {type(entries).__name__}")
    rows = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: expected question dicts, got {type(entry).__name__}")
        label = entry.get("label")
        answers = list(label) if isinstance(label, dict) else []
        answer_type = str(entry.get("answer_type", "")).strip().lower()
        rows.append(
            {
                "id": entry.get("question_id"),
                "image": entry.get("img_id"),
                "question": entry.get("sent"),
                "answer": answers[0] if len(answers) == 1 else None,  # the release has one answer per question
                "answer_type": CLOSED if answer_type == PATH_VQA_CLOSED else OPEN if answer_type else None,
                "question_type": entry.get("question_type"),
                "img_id": entry.get("img_id"),
            }
        )
    return rows


def _path_vqa(folder: Path, files: dict[str, Path], images: str | None) -> Release:
    def opener(split: str) -> SourceSplit:
        rows = path_vqa_questions(files[split])
        image_dir = _image_dir(
            folder, images, ("images",), f"PathVQA images (<img_id>.jpg, e.g. {_first_id(rows)}.jpg)"
        )
        for sub in (image_dir / PATH_VQA_IMAGE_DIRS[split], image_dir):
            if any((sub / f"{_first_id(rows)}{suffix}").is_file() for suffix in IMAGE_SUFFIXES):
                break
        else:
            raise DatasetError(
                f"{files[split]}: image {_first_id(rows)}.jpg is in neither {image_dir / PATH_VQA_IMAGE_DIRS[split]} "
                f"nor {image_dir}; PathVQA's images come from its release (pvqa/images/{{train,val,test}}/): "
                "pass that folder with --images"
            )
        for row in rows:
            row["image"] = _find_image(sub, row["image"])
        return _split(str(files[split]), rows, sub, PATH_VQA_EXTRAS)

    return Release("PathVQA release", tuple(files), opener)


def _first_id(rows: list[dict]) -> str:
    return str(rows[0]["img_id"]) if rows else "?"


def _find_image(folder: Path, img_id: object) -> str | None:
    if img_id is None:
        return None
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{img_id}{suffix}").is_file():
            return str(folder / f"{img_id}{suffix}")
    return str(folder / f"{img_id}.jpg")  # missing: the importer rejects the record as "missing file", naming it


# --------------------------------------------------------------------------------------------------------------------
# Shared


def _image_dir(folder: Path, images: str | None, names: tuple[str, ...], what: str) -> Path:
    """``--images`` when given, else the first of ``names`` beside the files or one level up; a clear error if none."""
    if images is not None:
        if not Path(images).is_dir():
            raise DatasetError(f"--images {images}: no such folder")
        return Path(images)
    candidates = [base / name for base in (folder, folder.parent) for name in names]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise DatasetError(f"{folder}: the {what} are missing; looked in {looked}; pass the image folder with --images")


def _path_in(image_dir: Path, name: object) -> str | None:
    name = str(name).strip() if name is not None else ""
    return str(image_dir / name) if name else None


def _first_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / name for name in names if (folder / name).is_file()), None)


def _load_json_list(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: could not be read as JSON: {err}") from err
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise DatasetError(f"{path}: expected a JSON list of question objects")
    return data


def _split(where: str, rows: list[dict], image_dir: Path, extras: tuple[str, ...]) -> SourceSplit:
    columns = ["id", "image", "question", "answer", "answer_type", *extras]
    uses = Counter(row["image"] for row in rows if row["image"] is not None)
    return SourceSplit(where, columns, iter(rows), image_dir, extras, dict(uses))
