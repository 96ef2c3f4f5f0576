"""Pixels of the demo dataset: real textures from images bundled with installed packages, synthetic findings on top.

Every attribute a demo question asks about is a large, unambiguous cue that a tiny ViT with 8x8 patches on 64x64
images can see:

* modality — the texture source *and* its intensity statistics: ct (pydicom's CT_small, mid-grey body, fine noise),
  mri (MR_small, high-contrast body), x-ray (blurred Shepp-Logan phantom, dark body on a grey background);
* organ — the global layout: brain (tall ellipse with a bright skull ring), chest (wide ellipse with two dark lung
  fields, a thin vertical spine below), abdomen (boxy outline with a flat vertebra at the bottom); bones are never
  disc-shaped and dimmer than lesions, so they cannot pass for one;
* lesions — 1 to 3 bright discs (~1/7 of the image wide), well apart, all in the left or all in the right half of the
  image. Sides are image sides, not the patient's (the radiological convention is deliberately ignored: the cue is
  what matters here).

Pathology images crop scikit-image's immunohistochemistry sample (or recolour it as h&e) with dark lesion discs.
Nothing is downloaded; pixels depend only on the numpy Generator passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from scipy.ndimage import gaussian_filter
from skimage import data as skdata

MODALITIES = ("ct", "mri", "x-ray")
ORGANS = ("brain", "chest", "abdomen")
SIDES = ("left", "right")
STAINS = ("immunohistochemistry", "h&e")
MAX_LESIONS = 3

# Lesion slots in the left half, as fractions of the image side (x, y); the right half mirrors them.
# The innermost slot stays 0.16 from the midline, so that a single lesion's side is plain to see (at 0.40 it was not).
_LEFT_SLOTS = np.array([(0.22, 0.25), (0.22, 0.75), (0.34, 0.50)])
_LESION_RADIUS = (0.07, 0.085)  # fraction of the image side: 4.5-5.4 px at 64 px
_SLOT_JITTER = 0.015


@dataclass(frozen=True)
class _ModalityLook:
    texture: str
    body_range: tuple[float, float]  # the texture's [0, 1] mapped into this intensity range inside the body
    background: float
    noise: float


_LOOKS = {
    "ct": _ModalityLook("ct", (0.30, 0.60), 0.0, 0.012),
    "mri": _ModalityLook("mri", (0.08, 0.62), 0.0, 0.0),
    "x-ray": _ModalityLook("x-ray", (0.12, 0.38), 0.52, 0.005),
}
_BONE, _LUNG, _LESION = 0.75, 0.05, 1.0  # lesions are always the brightest thing
_PATHOLOGY_LESION = {"immunohistochemistry": (0.12, 0.05, 0.0), "h&e": (0.08, 0.0, 0.12)}
_HE_LIGHT, _HE_DARK = np.array([0.96, 0.74, 0.86]), np.array([0.36, 0.12, 0.50])


def _unit(array: np.ndarray) -> np.ndarray:
    """Robustly scaled into [0, 1] (1st-99th percentile)."""
    low, high = np.percentile(array, [1, 99])
    return np.clip((array.astype(np.float64) - low) / (high - low), 0.0, 1.0)


def _resized(array: np.ndarray, side: int) -> np.ndarray:
    channels = [array] if array.ndim == 2 else [array[..., c] for c in range(array.shape[2])]
    out = [np.asarray(Image.fromarray(c.astype(np.float32)).resize((side, side), Image.BILINEAR)) for c in channels]
    return np.clip(np.stack(out, axis=-1) if array.ndim == 3 else out[0], 0.0, 1.0).astype(np.float64)


@cache
def base_textures(size: int) -> dict[str, np.ndarray]:
    """Grey textures at 2x ``size`` per modality and the RGB pathology texture at 4x ``size`` — loaded once."""
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array
    mri = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    phantom = gaussian_filter(skdata.shepp_logan_phantom(), sigma=4.0)
    return {
        "ct": _resized(_unit(ct), 2 * size),
        "mri": _resized(_unit(mri), 2 * size),
        "x-ray": _resized(_unit(phantom), 2 * size),
        "pathology": _resized(skdata.immunohistochemistry() / 255.0, 4 * size),
    }


@cache
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as fractions of the image side."""
    coords = (np.arange(size) + 0.5) / size
    return np.meshgrid(coords, coords, indexing="xy")


def _ellipse(size: int, centre: tuple[float, float], axes: tuple[float, float], power: float = 2.0) -> np.ndarray:
    """Anti-aliased (super-)ellipse alpha mask; ``power`` 2 is an ellipse, 4 a rounded box."""
    x, y = _grid(size)
    rho = (np.abs((x - centre[0]) / axes[0]) ** power + np.abs((y - centre[1]) / axes[1]) ** power) ** (1.0 / power)
    return np.clip((1.0 - rho) * min(axes) * size + 0.5, 0.0, 1.0)


@cache
def organ_layouts(size: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per organ: alphas of the body outline, of the (dark) lungs and of the bones, painted in that order."""
    brain = _ellipse(size, (0.5, 0.5), (0.44, 0.48))
    skull = brain - _ellipse(size, (0.5, 0.5), (0.39, 0.43))
    lungs = np.maximum(_ellipse(size, (0.27, 0.5), (0.17, 0.30)), _ellipse(size, (0.73, 0.5), (0.17, 0.30)))
    none = np.zeros((size, size))
    return {
        "brain": (brain, none, skull),
        "chest": (_ellipse(size, (0.5, 0.5), (0.48, 0.40)), lungs, _ellipse(size, (0.5, 0.78), (0.03, 0.12))),
        "abdomen": (
            _ellipse(size, (0.5, 0.5), (0.46, 0.42), power=4.0),
            none,
            _ellipse(size, (0.5, 0.82), (0.14, 0.045)),
        ),
    }


def _texture_crops(rng: np.random.Generator, textures: Sequence[np.ndarray], size: int) -> np.ndarray:
    """A random ``size`` square of each texture, randomly flipped and rotated by a multiple of 90 degrees."""
    corners = rng.random((len(textures), 2))
    flips = rng.integers(0, 2, size=(len(textures), 2))
    turns = rng.integers(0, 4, size=len(textures))
    crops = []
    for texture, (top, left), (flip_x, flip_y), turn in zip(textures, corners, flips, turns, strict=True):
        top, left = (np.array([top, left]) * (texture.shape[0] - size + 1)).astype(int)
        crop = texture[top : top + size, left : left + size]
        crop = crop[:, ::-1] if flip_x else crop
        crops.append(np.rot90(crop[::-1] if flip_y else crop, k=int(turn)))
    return np.stack(crops) if crops else np.zeros((0, size, size))


def lesion_alpha(
    rng: np.random.Generator,
    size: int,
    counts: Sequence[int],
    sides: Sequence[str | None],
    radius: tuple[float, float] = _LESION_RADIUS,
) -> np.ndarray:
    """(n, size, size) alphas: ``counts[i]`` discs (``radius``: a range, as fractions of the side) in distinct slots
    of the ``sides[i]`` half of image i."""
    counts = np.asarray(counts, dtype=int)
    if ((counts < 0) | (counts > MAX_LESIONS)).any() or any(
        s not in SIDES for c, s in zip(counts, sides, strict=True) if c
    ):
        raise ValueError(f"lesions: counts must be 0-{MAX_LESIONS}, each with a side left/right; got {counts}, {sides}")
    n, n_slots = len(counts), len(_LEFT_SLOTS)
    used = rng.random((n, n_slots)).argsort(axis=1).argsort(axis=1) < counts[:, None]  # `count` random slots
    centres = _LEFT_SLOTS + rng.uniform(-_SLOT_JITTER, _SLOT_JITTER, size=(n, n_slots, 2))
    right = np.array([side == "right" for side in sides], dtype=bool)
    centres[right, :, 0] = 1.0 - centres[right, :, 0]
    radii = rng.uniform(*radius, size=(n, n_slots)) * size
    coords = (np.arange(size) + 0.5) / size
    alpha = np.zeros((n, size, size))
    for slot in range(n_slots):  # discs only where a slot is used: most images have none or one
        (index,) = np.nonzero(used[:, slot])
        dx2 = (coords[None, None, :] - centres[index, slot, 0, None, None]) ** 2
        dy2 = (coords[None, :, None] - centres[index, slot, 1, None, None]) ** 2
        disc = np.clip(radii[index, slot, None, None] - np.sqrt(dx2 + dy2) * size + 0.5, 0.0, 1.0)
        alpha[index] = np.maximum(alpha[index], disc)
    return alpha


def _to_rgb8(grey_or_rgb: np.ndarray, grey: bool) -> np.ndarray:
    pixels = np.clip(np.rint(grey_or_rgb * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(pixels[..., None], 3, axis=-1) if grey else pixels


def render_radiology(
    rng: np.random.Generator,
    size: int,
    modalities: Sequence[str],
    organs: Sequence[str],
    counts: Sequence[int],
    sides: Sequence[str | None],
) -> np.ndarray:
    """(n, size, size, 3) uint8 grey radiology images, image i showing ``modalities[i]``, ``organs[i]``, ..."""
    if not len(modalities):
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    looks = [_LOOKS[m] for m in modalities]
    settings = np.array([(*look.body_range, look.background, look.noise) for look in looks])[:, :, None, None]
    low, high, background, noise = (settings[:, i] for i in range(4))
    textures = base_textures(size)
    body = low + (high - low) * _texture_crops(rng, [textures[look.texture] for look in looks], size)
    outline, lungs, bones = (np.stack(parts) for parts in zip(*[organ_layouts(size)[o] for o in organs], strict=True))
    image = background + outline * (body - background)
    image += lungs * (_LUNG + 0.1 * (body - low) - image)
    image += bones * (_BONE + 0.1 * (body - low) - image)
    image += rng.uniform(-0.03, 0.03, size=(len(looks), 1, 1)) + noise * rng.standard_normal(image.shape)
    image += lesion_alpha(rng, size, counts, sides) * (_LESION - image)
    return _to_rgb8(image, grey=True)


def render_pathology(
    rng: np.random.Generator, size: int, stains: Sequence[str], counts: Sequence[int], sides: Sequence[str | None]
) -> np.ndarray:
    """(n, size, size, 3) uint8 tissue crops, image i stained as ``stains[i]``, with dark lesion discs."""
    if unknown := set(stains) - set(STAINS):
        raise ValueError(f"stains must be among {STAINS}, got {sorted(unknown)}")
    tissue = _texture_crops(rng, [base_textures(size)["pathology"]] * len(stains), size)
    lightness = tissue.mean(axis=-1, keepdims=True)
    low, high = np.percentile(lightness, [1, 99], axis=(1, 2, 3), keepdims=True)
    lightness = np.clip((lightness - low) / np.maximum(high - low, 1e-6), 0.0, 1.0)
    he = np.array([s == "h&e" for s in stains])[:, None, None, None]
    tissue = np.where(he, lightness * _HE_LIGHT + (1.0 - lightness) * _HE_DARK, tissue)
    lesion_colour = np.array([_PATHOLOGY_LESION[s] for s in stains]).reshape(-1, 1, 1, 3)
    image = tissue + lesion_alpha(rng, size, counts, sides)[..., None] * (lesion_colour - tissue)
    return _to_rgb8(image, grey=False)


# --------------------------------------------------------------------------------------------------------------------
# The general domain: what the tiny base is pretrained on before it ever sees a medical image.

COLOURS = ("red", "green", "blue")
PATTERNS = ("plain", "striped", "checkered")
# Light fills on a light background: the black dots are the only dark pixels, in every channel.
_RGB = {"red": (0.95, 0.45, 0.42), "green": (0.45, 0.90, 0.45), "blue": (0.45, 0.55, 0.98)}
_DOT = (0.02, 0.02, 0.02)  # dots are black; lesions are white: the base learns to count blobs, not to see lesions
# Dots are larger than lesions: their dark area is a strong cue for how many there are, which the base then learns
# reliably (at lesion size the count was learned in some pretraining runs and stayed at chance in others).
_DOT_RADIUS = (0.095, 0.11)
_PATTERN_DARKEN = 0.72  # the darker half of a pattern's cells; still far lighter than a dot


@cache
def _photo_textures(size: int) -> tuple[np.ndarray, ...]:
    """Everyday photographs bundled with scikit-image, at 2x ``size``."""
    photos = (skdata.coffee(), skdata.chelsea(), skdata.rocket(), skdata.astronaut())
    return tuple(_resized(photo / 255.0, 2 * size) for photo in photos)


@cache
def pattern_masks(size: int) -> dict[str, np.ndarray]:
    """Where a pattern's fill is darkened: nowhere (plain), vertical bands (striped), a checkerboard (checkered)."""
    period = max(4, size // 8)
    cells = (np.arange(size) // (period // 2)) % 2
    return {
        "plain": np.zeros((size, size)),
        "striped": np.broadcast_to(cells[None, :], (size, size)).astype(np.float64),
        "checkered": (cells[:, None] ^ cells[None, :]).astype(np.float64),
    }


def render_general(
    rng: np.random.Generator,
    size: int,
    colours: Sequence[str],
    patterns: Sequence[str],
    counts: Sequence[int],
    sides: Sequence[str | None],
) -> np.ndarray:
    """(n, size, size, 3) uint8 everyday pictures: a large ``colours[i]`` square filled with ``patterns[i]`` on a
    light background, with ``counts[i]`` black dots in the ``sides[i]`` half (the slots of radiology lesions)."""
    if not len(colours):
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    n = len(colours)
    # Backgrounds from black to white, half of them a washed-out photograph: the base sees all kinds of pictures
    # (as Idefics2 did), so a radiograph is an unfamiliar subject, not an unfamiliar kind of input.
    level = rng.uniform(0.05, 0.95, size=(n, 1, 1, 1))
    photos = _photo_textures(size)
    texture = _texture_crops(rng, [photos[i] for i in rng.integers(0, len(photos), size=n)], size).mean(-1)[..., None]
    background = level + rng.integers(0, 2, size=(n, 1, 1, 1)) * 0.3 * (texture - texture.mean((1, 2), keepdims=True))
    background = np.clip(np.broadcast_to(background, (n, size, size, 3)), 0.0, 1.0)
    fill = np.array([_RGB[c] for c in colours])[:, None, None, :] + rng.uniform(-0.04, 0.04, (n, 1, 1, 3))
    shade = 1.0 - (1.0 - _PATTERN_DARKEN) * np.stack([pattern_masks(size)[p] for p in patterns])[..., None]
    square = _ellipse(size, (0.5, 0.5), (0.40, 0.40), power=12.0)[None, ..., None]
    image = background + square * (fill * shade - background)
    image += lesion_alpha(rng, size, counts, sides, _DOT_RADIUS)[..., None] * (np.array(_DOT) - image)
    return _to_rgb8(image + 0.01 * rng.standard_normal(image.shape), grey=False)
