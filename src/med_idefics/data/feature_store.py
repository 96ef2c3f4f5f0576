"""The on-disk store of the vision encoder's outputs: one safetensors file per image, in a folder per context.

A *context* is everything that decides what the frozen vision encoder makes of an image — the base's digest, the image
processor's settings, the encoder's dtype and attention kernel (:func:`med_idefics.modeling.vision_cache.context_of`)
— so a new base or another image size never meets stale features: it gets another folder. Inside, a file is named by
the digest of the image's stored bytes and holds ``hidden`` (patches x width, the encoder's last hidden state over the
image's own patch grid, row-major) and ``grid`` (rows, columns): the patch mask is the full grid, padding is added per
batch by :func:`pad_features`.

Files are written next to their final name and renamed (never half-written), carry the digest of their tensor bytes,
and are verified on their first read in a process: a truncated or corrupted file is reported (:class:`CacheError`)
and, where a model is at hand, recomputed. The folder as a whole stays under ``max_bytes``: :meth:`FeatureStore.admit`
makes room for a split by removing the least recently used files of other images, or says that the split does not fit.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from med_idefics.files import write_atomic

SUFFIX = ".safetensors"
CONTEXT_FILE = "context.json"


class CacheError(RuntimeError):
    """A cache file is unreadable or does not hold what its digest says; the message names it."""


def image_digest(image: bytes) -> str:
    """The cache name of an image: the digest of its stored (PNG) bytes."""
    return hashlib.blake2b(image, digest_size=16).hexdigest()


def context_digest(context: Mapping) -> str:
    return hashlib.blake2b(json.dumps(context, sort_keys=True).encode(), digest_size=12).hexdigest()


def _tensor_digest(hidden: torch.Tensor) -> str:
    raw = hidden.contiguous().view(torch.uint8) if hidden.dim() else hidden.reshape(1).view(torch.uint8)
    return hashlib.blake2b(raw.numpy().tobytes(), digest_size=16).hexdigest()


class FeatureStore:
    """Vision-encoder outputs of one context under ``root/<context digest>/``; picklable (DataLoader workers)."""

    def __init__(self, root: str | Path, context: Mapping, max_bytes: int) -> None:
        self.root = Path(root)
        self.folder = self.root / context_digest(context)
        self.max_bytes = int(max_bytes)
        self._verified: set[str] = set()
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self.folder / CONTEXT_FILE
        if not marker.is_file():
            write_atomic(marker, json.dumps(dict(context), indent=1, sort_keys=True) + "\n")

    def path(self, digest: str) -> Path:
        return self.folder / f"{digest}{SUFFIX}"

    def __contains__(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def load(self, digest: str) -> tuple[torch.Tensor, tuple[int, int]]:
        """(hidden, grid) of an image; raises :class:`CacheError` for a missing, truncated or corrupted file."""
        path = self.path(digest)
        try:
            tensors = load_file(str(path))
            hidden, grid = tensors["hidden"], tuple(int(v) for v in tensors["grid"].tolist())
        except (OSError, SafetensorError, KeyError, ValueError) as err:
            raise CacheError(f"vision cache file {path} is unreadable ({err}); delete it to recompute it") from err
        if digest not in self._verified:
            expected = tensors["digest"].numpy().tobytes().hex() if "digest" in tensors else None
            if expected != _tensor_digest(hidden) or hidden.shape[0] != grid[0] * grid[1]:
                raise CacheError(f"vision cache file {path} does not hold what it was written with; delete it")
            self._verified.add(digest)
            os.utime(path)  # recently used: the last to be removed to make room
        return hidden, grid

    def verified(self, digest: str) -> bool:
        """True when the image's file exists and reads back intact (a corrupted one is removed)."""
        if digest not in self:
            return False
        try:
            self.load(digest)
        except CacheError:
            self.path(digest).unlink(missing_ok=True)
            return False
        return True

    def save(self, digest: str, hidden: torch.Tensor, grid: tuple[int, int]) -> Path:
        hidden = hidden.detach().to("cpu").contiguous()
        stamp = torch.frombuffer(bytearray(bytes.fromhex(_tensor_digest(hidden))), dtype=torch.uint8)
        tensors = {"hidden": hidden, "grid": torch.tensor(grid, dtype=torch.int64), "digest": stamp}
        path = self.path(digest)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._verified.add(digest)
        return path

    def files(self) -> list[Path]:
        """Every cache file under ``root`` (all contexts): the bound is on the whole folder."""
        return [p for p in self.root.glob(f"*/*{SUFFIX}") if p.is_file()]

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    def admit(self, digests: Iterable[str], bytes_per_image: int) -> bool:
        """Whether the images ``digests`` can all be cached within ``max_bytes`` (at most ``bytes_per_image`` each
        for those not cached yet); makes room by removing the least recently used files of other images."""
        wanted = {self.path(d) for d in digests}
        present = {p for p in wanted if p.is_file()}
        needed = (len(wanted) - len(present)) * bytes_per_image + sum(p.stat().st_size for p in present)
        if needed > self.max_bytes:
            return False
        others = sorted((p for p in self.files() if p not in wanted), key=lambda p: p.stat().st_mtime)
        total = needed + sum(p.stat().st_size for p in others)
        while total > self.max_bytes and others:
            victim = others.pop(0)
            total -= victim.stat().st_size
            victim.unlink(missing_ok=True)
        return True


def pad_features(examples: Sequence[tuple[torch.Tensor, tuple[int, int]]]) -> dict[str, torch.Tensor]:
    """Per-image (hidden, grid) → the batch keys ``vision_hidden_states`` (batch, 1, rows x columns, width) and
    ``patch_attention_mask`` (batch, 1, rows, columns): every grid zero-padded to the largest, as the encoder sees a
    padded image batch, and masked out there."""
    rows = max(grid[0] for _, grid in examples)
    columns = max(grid[1] for _, grid in examples)
    hidden, masks = [], []
    for features, (h, w) in examples:
        grid = features.reshape(h, w, -1)
        hidden.append(F.pad(grid, (0, 0, 0, columns - w, 0, rows - h)).reshape(rows * columns, -1))
        mask = torch.zeros(rows, columns, dtype=torch.bool)
        mask[:h, :w] = True
        masks.append(mask)
    return {"vision_hidden_states": torch.stack(hidden)[:, None], "patch_attention_mask": torch.stack(masks)[:, None]}
