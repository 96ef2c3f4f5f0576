"""Image bytes in and out of the record schema: every stored image is an RGB PNG."""

from __future__ import annotations

import io

from PIL import Image


def to_png_bytes(image: Image.Image) -> bytes:
    """Encode as PNG, deterministically (same pixels → same bytes), so DVC hashes are reproducible."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def image_from_bytes(data: bytes) -> Image.Image:
    """Decode stored PNG bytes to an RGB PIL image."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")
