"""Image normalisation: every accepted input becomes a plain RGB image with sensible pixels; bad ones are rejected."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, PngImagePlugin
from pydicom.data import get_testdata_file

from med_idefics.data.images import (
    MAX_SIDE,
    ImageRejected,
    image_from_bytes,
    normalize_image,
    read_dicom,
    to_png_bytes,
)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_png_round_trip_is_deterministic():
    image = Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3), "RGB")
    data = to_png_bytes(image)
    assert data == to_png_bytes(image)
    assert np.array_equal(np.asarray(image_from_bytes(data)), np.asarray(image))


# --------------------------------------------------------------------------------------------------------------------
# Modes


def test_grey_and_bilevel_become_grey_rgb():
    grey = Image.new("L", (10, 10), 100)
    assert (pixels(normalize_image(grey)) == 100).all()
    bilevel = Image.new("1", (10, 10), 0)
    bilevel.putpixel((3, 4), 1)
    out = pixels(normalize_image(encode(bilevel)))
    assert out[4, 3].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]


def test_palette_and_cmyk_map_to_their_colours():
    palette = Image.new("P", (10, 10), 1)
    palette.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    assert pixels(normalize_image(encode(palette)))[5, 5].tolist() == [200, 30, 40]
    cmyk = Image.new("CMYK", (10, 10), (0, 0, 0, 0))
    cmyk.putpixel((1, 1), (0, 0, 0, 255))
    out = pixels(normalize_image(encode(cmyk, "JPEG", quality=100)))
    assert out[8, 8].min() > 240 and out[1, 1].max() < 60  # JPEG blurs a lone pixel a little


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_black(mode):
    colour = (200, 200, 200, 255) if mode == "RGBA" else (200, 255)
    image = Image.new(mode, (10, 10), colour)
    image.putpixel((0, 0), (200, 200, 200, 0) if mode == "RGBA" else (200, 0))  # fully transparent
    image.putpixel((1, 0), (200, 200, 200, 128) if mode == "RGBA" else (200, 128))  # half transparent
    out = pixels(normalize_image(encode(image)))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert abs(int(out[0, 1, 0]) - 100) <= 1
    assert out[5, 5].tolist() == [200, 200, 200]


def test_palette_transparency_is_composited_on_black():
    image = Image.new("P", (10, 10), 1)
    image.putpalette([0, 0, 0, 250, 250, 250] + [0] * 762)
    image.putpixel((2, 2), 0)
    image.info["transparency"] = 1  # the bright entry is transparent
    out = pixels(normalize_image(encode(image, transparency=1)))
    assert out[5, 5].tolist() == [0, 0, 0] and out[2, 2].tolist() == [0, 0, 0]


def test_16_bit_grey_is_min_max_scaled_not_clipped():
    ramp = np.linspace(1000, 3000, 16 * 16).reshape(16, 16).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    out = pixels(normalize_image(encode(image)))[..., 0]
    assert out[0, 0] == 0 and out[-1, -1] == 255  # clipping at 255 would make almost everything white
    assert 120 <= out[8, 0] <= 135  # the middle of the ramp stays mid-grey
    assert (np.diff(out.ravel().astype(int)) >= 0).all()  # order of intensities preserved


def test_32_bit_int_and_float_with_non_finite_values():
    signed = Image.fromarray(np.array([[-500, 0, 500]] * 8, dtype=np.int32).repeat(3, axis=1), "I")
    assert pixels(normalize_image(signed))[0, [0, 3, 8], 0].tolist() == [0, 128, 255]
    values = np.full((8, 8), 2.0, np.float32)
    values[0, 0], values[0, 1], values[0, 2] = 1.0, 3.0, np.nan
    out = pixels(normalize_image(Image.fromarray(values, "F")))[..., 0]
    assert out[0, 0] == 0 and out[0, 1] == 255 and out[0, 2] == 0 and out[4, 4] == 128
    with pytest.raises(ImageRejected, match="no pixel values"):
        normalize_image(Image.fromarray(np.full((8, 8), np.nan, np.float32), "F"))


def test_constant_16_bit_image_maps_to_black():
    out = pixels(normalize_image(Image.fromarray(np.full((9, 9), 4000, np.uint16))))
    assert (out == 0).all()


# --------------------------------------------------------------------------------------------------------------------
# Inputs


def test_accepted_input_forms_give_the_same_pixels(tmp_path):
    image = Image.new("RGB", (12, 10), (10, 120, 230))
    data = encode(image)
    (tmp_path / "img.png").write_bytes(data)
    forms = [
        image,
        data,
        bytearray(data),
        {"bytes": data, "path": None},
        {"bytes": None, "path": "img.png"},
        str(tmp_path / "img.png"),
        np.asarray(image),
    ]
    for form in forms:
        out = normalize_image(form, base_dir=tmp_path)
        assert out.size == (12, 10) and pixels(out)[0, 0].tolist() == [10, 120, 230], type(form)


def test_callers_image_is_not_modified_and_metadata_is_dropped():
    info = PngImagePlugin.PngInfo()
    info.add_text("PatientName", "Doe^Jane")
    data = encode(Image.new("RGB", (3000, 10), (1, 2, 3)), pnginfo=info)
    source = Image.open(io.BytesIO(data))
    out = normalize_image(source)
    assert source.size == (3000, 10) and "PatientName" in source.info
    assert out.info == {} and b"Doe^Jane" not in to_png_bytes(out)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\x89PNG\r\n\x1a\nnot really a png", "corrupt image"),
        (b"", "missing image"),
        (None, "missing image"),
        ({"bytes": None, "path": None}, "missing image"),
        ("does/not/exist.png", "missing file"),
        (12345, "unsupported image value"),
    ],
)
def test_bad_values_are_rejected_with_a_reason(value, reason):
    with pytest.raises(ImageRejected) as err:
        normalize_image(value)
    assert err.value.reason == reason


def test_truncated_image_is_rejected():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageRejected, match="corrupt image"):
        normalize_image(data[: len(data) // 2])


# --------------------------------------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize("size", [(1, 1), (7, 100), (100, 7)])
def test_tiny_images_are_rejected(size):
    with pytest.raises(ImageRejected, match="too small"):
        normalize_image(encode(Image.new("L", size)))


def test_smallest_allowed_image_is_kept():
    assert normalize_image(Image.new("L", (8, 8))).size == (8, 8)


def test_large_images_are_downscaled_keeping_aspect():
    out = normalize_image(encode(Image.new("RGB", (3000, 1000), (50, 60, 70))))
    assert out.size == (MAX_SIDE, 683)
    assert pixels(out)[300, 1000].tolist() == [50, 60, 70]
    assert normalize_image(Image.new("RGB", (MAX_SIDE, 100))).size == (MAX_SIDE, 100)  # never upscaled


def test_decompression_bomb_is_rejected_from_its_header():
    """A tiny PNG whose header claims 50,000 x 50,000 pixels is refused before anything is decoded."""
    data = bytearray(encode(Image.new("L", (8, 8))))
    ihdr = bytearray(data[12:29])  # chunk type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", 50_000, 50_000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    with pytest.raises(ImageRejected) as err:
        normalize_image(bytes(data))
    assert err.value.reason == "too large"


# --------------------------------------------------------------------------------------------------------------------
# DICOM


def test_ct_without_window_is_min_max_scaled():
    path = get_testdata_file("CT_small.dcm")
    raw = pydicom.dcmread(path).pixel_array
    out = pixels(read_dicom(path))[..., 0]
    assert out.shape == raw.shape
    assert out.min() == 0 and out.max() == 255
    assert out.flat[raw.argmin()] == 0 and out.flat[raw.argmax()] == 255
    order = np.argsort(raw.ravel(), kind="stable")
    assert (np.diff(out.ravel()[order].astype(int)) >= 0).all()  # monotone in the stored values


def test_mr_uses_the_window_stored_in_the_file():
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(float)
    low = float(ds.WindowCenter) - float(ds.WindowWidth) / 2
    high = float(ds.WindowCenter) + float(ds.WindowWidth) / 2
    assert raw.max() > high  # the window saturates the brightest tissue, which min–max would not
    out = pixels(read_dicom(path))[..., 0]
    assert (out[raw >= high] == 255).all()
    inside = (raw > low) & (raw < high)
    expected = np.round((raw[inside] - low) / (high - low) * 255)
    assert np.abs(out[inside] - expected).max() <= 1


def test_dicom_bytes_are_detected_and_no_metadata_is_kept():
    path = get_testdata_file("CT_small.dcm")
    data = Path(path).read_bytes()
    out = normalize_image({"bytes": data, "path": None})
    assert np.array_equal(np.asarray(out), np.asarray(read_dicom(path)))
    png = to_png_bytes(out)
    for tag in (b"CompressedSamples", b"1CT1", b"JFK IMAGING"):
        assert tag not in png


def test_monochrome1_is_inverted():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    normal = np.asarray(read_dicom(get_testdata_file("CT_small.dcm")))
    ds.PhotometricInterpretation = "MONOCHROME1"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    assert np.array_equal(np.asarray(read_dicom(buffer.getvalue())), 255 - normal)


def test_broken_dicom_is_rejected():
    data = b"\0" * 128 + b"DICM" + b"garbage" * 10
    with pytest.raises(ImageRejected) as err:
        normalize_image(data)
    assert err.value.reason == "unreadable DICOM"


# --------------------------------------------------------------------------------------------------------------------
# Reading a split: a limit reads only what it keeps


def test_reading_the_first_records_of_a_split_reads_only_their_row_groups(tmp_path, monkeypatch):
    """A 7,000-caption sweep point of a 55,000-record ROCO split (tens of GB) must not read the whole file. Measured
    in a fresh process: pyarrow's peak allocation for the first 3 records of a ~12 MB split of 12 row groups."""
    import subprocess
    import sys

    from med_idefics.data import schema

    monkeypatch.setattr(schema, "BATCH_BYTES", 1_000_000)  # row groups of ~1 MB, as the 64 MB ones of a real split
    rng = np.random.default_rng(0)
    records = [{"id": f"r{i}", "image": rng.bytes(250_000), "question": "q", "answer": "a", "answer_type": "open",
                "dataset": "big", "split": "train"} for i in range(48)]  # fmt: skip
    schema.write_splits(tmp_path, "big", {"train": records})
    script = (
        "import pyarrow as pa\n"
        "from med_idefics.data.schema import read_records\n"
        f"rows = read_records({str(tmp_path)!r}, 'big', 'train', limit=3)\n"
        "assert [r['id'] for r in rows] == ['r0', 'r1', 'r2']\n"
        "print(pa.default_memory_pool().max_memory())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    peak = int(done.stdout.split()[-1])
    assert peak < 4_000_000, f"{peak:,} bytes allocated to read 3 records of a {48 * 250_000:,}-byte split"
