"""Image bytes in and out of the record schema: every stored image is an RGB PNG, or an RGB JPEG as its source
had it (:func:`stored_bytes`: re-encoding ROCO's 12.8 GB of JPEGs as PNG made tens of GB).

:func:`normalize_image` turns whatever a source holds (PIL image, encoded bytes, an HF ``{bytes, path}`` struct, a
file path, a DICOM file) into a plain RGB image, or raises :class:`ImageRejected` with a short reason. The rules:

- fewer than ``MIN_SIDE`` px on a side (1×1 placeholders, icons) → rejected;
- more than ``MAX_PIXELS`` decoded pixels → rejected from the header alone, before decoding (decompression bombs);
- longest edge above ``MAX_SIDE`` → downscaled to ``MAX_SIDE``, keeping the aspect ratio;
- 16-bit / 32-bit / float grey (``I;16``, ``I``, ``F``) → min–max scaled to 8 bits (not clipped);
- RGBA / LA / PA / P with transparency → composited on black: radiographs, CT and MR are read on black, so transparent
  margins stay background rather than turning into bright frames;
- L, 1, P, CMYK, YCbCr → PIL's RGB conversion;
- DICOM (by its ``DICM`` magic or a ``.dcm`` name) → :func:`read_dicom`. Only pixels are kept: no metadata (DICOM
  tags, EXIF, ICC profiles, text chunks) reaches the stored PNG;
- an RGB JPEG that decodes completely within the size limits is stored as it came, less its metadata segments
  (:func:`strip_jpeg_metadata`: EXIF, XMP, ICC, comments); its compressed pixels are not touched.
"""

from __future__ import annotations

import functools
import hashlib
import io
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMPORT_COMPRESS_LEVEL = 1  # see to_png_bytes
MIN_SIDE = 8  # smaller is a placeholder or icon, not a picture a model can read
MAX_SIDE = 2048  # Idefics2 works at ≤ 980 px (no image splitting); 2048 keeps headroom without storing 10k-px scans
MAX_PIXELS = 8192 * 8192  # refuse to decode more: a few bytes of PNG can claim gigapixels
HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
JPEG_START = b"\xff\xd8\xff"
#: JPEG segments that carry metadata, never pixels: APP1-APP13 and APP15 (EXIF, XMP, ICC, IPTC, …) and COM. APP0
#: (JFIF) and APP14 (Adobe: which colour transform the pixels use) stay.
JPEG_METADATA_MARKERS = frozenset({*range(0xE1, 0xEE), 0xEF, 0xFE})


class ImageRejected(ValueError):
    """An image that cannot be soundly turned into RGB; ``reason`` is a short category for import summaries."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def to_png_bytes(image: Image.Image, compress_level: int = 6) -> bytes:
    """Encode as PNG, deterministically (same pixels → same bytes), so DVC hashes are reproducible.

    Importers pass :data:`IMPORT_COMPRESS_LEVEL`: zlib level 6 costs ~3x the time of level 1 on a 2k-px scan for ~15%
    smaller PNGs, and parquet's zstd recovers most of that difference.
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=compress_level)
    return buffer.getvalue()


def blank_like(data: bytes) -> bytes:
    """A black RGB PNG of the size of the stored image ``data`` (read from its header): what the blank suites show
    instead of it (:mod:`med_idefics.data.suites` says why black)."""
    with Image.open(io.BytesIO(data)) as image:
        return _black_png(image.size)


@functools.lru_cache(maxsize=64)
def _black_png(size: tuple[int, int]) -> bytes:
    return to_png_bytes(Image.new("RGB", size, (0, 0, 0)))


def stored_bytes(obj: object, base_dir: str | Path | None = None, compress_level: int = 6) -> bytes:
    """What a record stores for an image value: its own JPEG bytes when it already is a sound RGB JPEG
    (:func:`sound_rgb_jpeg`), else the RGB PNG of :func:`normalize_image`; raises :class:`ImageRejected`."""
    data = _encoded(obj, base_dir)
    kept = sound_rgb_jpeg(data) if data is not None else None
    return kept if kept is not None else to_png_bytes(normalize_image(obj, base_dir), compress_level)


def sound_rgb_jpeg(data: bytes) -> bytes | None:
    """``data`` without its metadata segments when it is an RGB JPEG within :data:`MIN_SIDE`-:data:`MAX_SIDE` px that
    decodes completely (what :func:`normalize_image` would keep pixel for pixel); None for anything else."""
    stripped = strip_jpeg_metadata(data) if data[:3] == JPEG_START else None
    if stripped is None:
        return None
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(stripped)) as image:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            width, height = image.size
            if image.format != "JPEG" or image.mode != "RGB" or not MIN_SIDE <= min(width, height) <= MAX_SIDE:
                return None
            if max(width, height) > MAX_SIDE:
                return None
            image.load()  # a truncated or corrupt JPEG is not sound
    except Exception:  # PIL's decoders raise many types on bad data; normalize_image names the reason
        return None
    return stripped


def strip_jpeg_metadata(data: bytes) -> bytes | None:
    """A JPEG's bytes less its metadata segments (:data:`JPEG_METADATA_MARKERS`), everything from the first
    start-of-scan on as it was; None when its segments cannot be read."""
    kept, i = [data[:2]], 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: the compressed pixels and whatever follows them
            return b"".join([*kept, data[i:]])
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            kept.append(data[i : i + 2])
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2 or i + 2 + length > len(data):
            return None
        if marker not in JPEG_METADATA_MARKERS:
            kept.append(data[i : i + 2 + length])
        i += 2 + length
    return None


def mime_type(data: bytes) -> str:
    """The MIME type of stored image bytes (a JPEG, else a PNG)."""
    return "image/jpeg" if data[:3] == JPEG_START else "image/png"


def _encoded(obj: object, base_dir: str | Path | None) -> bytes | None:
    """The encoded bytes behind an image value (bytes, an HF ``{bytes, path}`` struct, a file), or None."""
    if isinstance(obj, Mapping):
        obj = obj.get("bytes") or obj.get("path")
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj)
    if isinstance(obj, str | Path) and str(obj):
        path = Path(obj) if Path(obj).is_absolute() or base_dir is None else Path(base_dir) / obj
        try:
            return path.read_bytes()
        except OSError:
            return None  # normalize_image says why
    return None


class ImageCache:
    """Stored bytes of the images an import has already converted, keyed by file path or content hash, so an image
    shared by many questions is decoded and encoded once, with memory bounded however many images a source has.

    A release lists its questions up front, so :meth:`expect` is told how often each image file is used: such an
    image is kept until its last question (at most ``max_expected_bytes`` of them, oldest dropped first). Images of
    sources read as a stream (hub, parquet) are kept in a small least-recently-used buffer of ``max_bytes``, which
    catches the consecutive questions about one image that such files hold. Rejections are remembered too.
    """

    def __init__(
        self, max_bytes: int = 32 * 2**20, max_expected_bytes: int = 512 * 2**20, compress_level: int = 6
    ) -> None:
        self.compress_level = compress_level
        self.hits = self.misses = 0
        self._uses: dict[tuple, int] = {}  # key → questions still to come (expected images only)
        self._expected = _Lru(max_expected_bytes)
        self._recent = _Lru(max_bytes)

    def expect(self, paths: Mapping[str, int]) -> None:
        """Image file → how many questions of this import use it."""
        for path, uses in paths.items():
            key = _cache_key(path, None)
            if key is not None:
                self._uses[key] = self._uses.get(key, 0) + uses

    def stored(self, value: object, base_dir: str | Path | None = None) -> bytes:
        """``value`` (anything :func:`normalize_image` accepts) as stored bytes (:func:`stored_bytes`); raises
        :class:`ImageRejected`."""
        key = _cache_key(value, base_dir)
        expected = key in self._uses
        if expected:
            self._uses[key] -= 1
        entry = None if key is None else (self._expected.get(key) if expected else self._recent.get(key))
        if entry is not None:
            self.hits += 1
        else:
            self.misses += 1
            try:
                entry = stored_bytes(value, base_dir, self.compress_level)
            except ImageRejected as err:
                entry = err
        if expected and self._uses[key] <= 0:
            self._expected.pop(key)  # its last question: no need to keep it
        elif expected:
            self._expected.put(key, entry)
        elif key is not None:
            self._recent.put(key, entry)
        return _result(entry)


class _Lru:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.size = max_bytes, 0
        self._entries: OrderedDict[tuple, bytes | ImageRejected] = OrderedDict()

    def get(self, key: tuple) -> bytes | ImageRejected | None:
        if key in self._entries:
            self._entries.move_to_end(key)
        return self._entries.get(key)

    def put(self, key: tuple, entry: bytes | ImageRejected) -> None:
        if key in self._entries:
            return
        self._entries[key] = entry
        self.size += _size(entry)
        while self.size > self.max_bytes and self._entries:
            _, dropped = self._entries.popitem(last=False)
            self.size -= _size(dropped)

    def pop(self, key: tuple) -> None:
        if key in self._entries:
            self.size -= _size(self._entries.pop(key))


def _size(entry: bytes | ImageRejected) -> int:
    return len(entry) if isinstance(entry, bytes) else 0


def _result(entry: bytes | ImageRejected) -> bytes:
    if isinstance(entry, ImageRejected):
        raise entry
    return entry


def _cache_key(value: object, base_dir: str | Path | None) -> tuple | None:
    """("path", resolved path) for a file, ("sha1", digest) for encoded bytes, None for decoded images."""
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        value = data if data else path
    if isinstance(value, bytes | bytearray | memoryview):
        return ("sha1", hashlib.sha1(value).digest())
    if isinstance(value, str | Path) and str(value):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        return ("path", str(path.absolute()))
    return None


def image_from_bytes(data: bytes) -> Image.Image:
    """Decode stored image bytes (PNG or JPEG) to an RGB PIL image."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def normalize_image(obj: object, base_dir: str | Path | None = None) -> Image.Image:
    """Any supported image value → an RGB image within the size limits above, carrying no metadata.

    ``obj``: a PIL image, a numpy array, encoded bytes (PNG, JPEG, TIFF, DICOM, …), a ``{"bytes", "path"}`` mapping
    (HF parquet image struct / undecoded ``datasets.Image``), or a file path (relative paths resolve under
    ``base_dir``). Raises :class:`ImageRejected` for anything else, and for corrupt, tiny or oversized images.
    """
    image = _open(obj, base_dir)
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageRejected("too large", f"{width}x{height} px is over the {MAX_PIXELS:,}-pixel decoding limit")
    try:
        image.load()
    except Exception as err:  # PIL's decoders raise many types on bad data (OSError, SyntaxError, struct.error, …)
        raise ImageRejected("corrupt image", f"{type(err).__name__}: {err}") from err
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise ImageRejected("too small", f"{width}x{height} px; at least {MIN_SIDE} px per side are needed")
    rgb = _to_rgb(image)
    if rgb is image:
        rgb = rgb.copy()  # never resize (or strip the metadata of) the caller's own object
    rgb.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    rgb.info = {}
    return rgb


def read_dicom(source: str | Path | bytes) -> Image.Image:
    """A DICOM file (path or bytes) → an 8-bit RGB image of its pixels; no tag is copied anywhere.

    The modality LUT (rescale slope/intercept, e.g. to Hounsfield units) is applied first; then the file's first
    window (WindowCenter/WindowWidth) when present, else min–max to 8 bits. MONOCHROME1 (white = low) is inverted.
    Multi-frame files give their middle frame (the first slice of a series is often blank).
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(bytes(source)) if isinstance(source, bytes | bytearray) else source)
        pixels = ds.pixel_array
    except Exception as err:  # not DICOM, no pixel data, or a transfer syntax without an installed decoder
        raise ImageRejected("unreadable DICOM", f"{type(err).__name__}: {err}") from err
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        pixels = pixels[frames // 2]
    if int(ds.get("SamplesPerPixel") or 1) == 3:  # colour; pydicom already converts YBR to RGB
        return Image.fromarray(_scale_to_uint8(pixels) if pixels.dtype != np.uint8 else pixels, "RGB")
    values = apply_modality_lut(pixels, ds).astype(np.float32)
    window = _dicom_window(ds)
    if window is None:
        grey = _scale_to_uint8(values)
    else:
        low, high = window
        grey = np.round(np.clip((values - low) / (high - low), 0.0, 1.0) * 255).astype(np.uint8)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        grey = 255 - grey
    return Image.fromarray(grey, "L").convert("RGB")


def _dicom_window(ds) -> tuple[float, float] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    center = float(np.ravel(np.asarray(center, dtype=np.float64))[0])  # multi-valued: the first is the default view
    width = float(np.ravel(np.asarray(width, dtype=np.float64))[0])
    if not np.isfinite(center) or not np.isfinite(width) or width <= 0:
        return None
    return center - width / 2, center + width / 2


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Min–max to 0..255 over the finite values; a constant image maps to 0, non-finite pixels to 0."""
    values = values.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.any():
        raise ImageRejected("no pixel values", "every pixel is NaN or infinite")
    low, high = float(values[finite].min()), float(values[finite].max())
    scaled = np.zeros(values.shape, np.float32) if high == low else (values - low) * (255.0 / (high - low))
    return np.round(np.where(finite, scaled, 0.0)).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in HIGH_BIT_MODES:
        return Image.fromarray(_scale_to_uint8(np.asarray(image)), "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageRejected("unsupported mode", f"PIL mode {mode} has no sound RGB conversion") from err


def _open(obj: object, base_dir: str | Path | None) -> Image.Image:
    """A lazily decoded PIL image (header read, pixels not yet loaded) for any accepted value."""
    if obj is None:
        raise ImageRejected("missing image", "the image field is empty")
    if isinstance(obj, Image.Image):
        return obj
    if isinstance(obj, np.ndarray):
        try:
            return Image.fromarray(obj)
        except (TypeError, ValueError) as err:
            raise ImageRejected("unsupported array", f"dtype {obj.dtype}, shape {obj.shape}") from err
    if isinstance(obj, Mapping):  # HF image struct {bytes, path}: bytes win, path is the fallback
        data, path = obj.get("bytes"), obj.get("path")
        if data:
            return _open_bytes(bytes(data), path)
        if path:
            return _open_path(path, base_dir)
        raise ImageRejected("missing image", "image struct has neither bytes nor path")
    if isinstance(obj, bytes | bytearray | memoryview):
        return _open_bytes(bytes(obj))
    if isinstance(obj, str | Path):
        return _open_path(obj, base_dir)
    raise ImageRejected("unsupported image value", f"got {type(obj).__name__}")


def _open_path(path: str | Path, base_dir: str | Path | None) -> Image.Image:
    path = Path(path)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageRejected("missing file", f"{path}: {err.strerror or err}") from err
    return _open_bytes(data, path)


def _open_bytes(data: bytes, name: str | Path | None = None) -> Image.Image:
    if not data:
        raise ImageRejected("missing image", "zero bytes")
    if data[128:132] == b"DICM" or (name is not None and Path(name).suffix.lower() in DICOM_SUFFIXES):
        return read_dicom(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS is checked by the caller
            image = Image.open(io.BytesIO(data))
        image.draft(image.mode, (MAX_SIDE, MAX_SIDE))  # JPEG only: decode at a reduced scale when that suffices
        return image
    except Image.DecompressionBombError as err:
        raise ImageRejected("too large", str(err)) from err
    except UnidentifiedImageError as err:
        raise ImageRejected("corrupt image", f"not a known image format (starts {data[:8]!r})") from err
    except Exception as err:  # a plugin choking on a broken header
        raise ImageRejected("corrupt image", f"{type(err).__name__}: {err}") from err
