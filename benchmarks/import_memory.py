"""Peak memory of a ROCO-sized import: does the importer hold every image at once? (It must not.)

    python benchmarks/import_memory.py                   # 55,000 records (the paper's ROCO subset), 96 px images
    python benchmarks/import_memory.py --records 5000    # a quicker look

Writes a synthetic source parquet in ROCO's hub schema (image struct, image_id, caption) with ``--records`` distinct
noise images, then imports it in a fresh process with :func:`med_idefics.data.importers.import_dataset` — the code
`med-idefics data roco` runs — and reports the import's wall time and peak RSS next to the total bytes of PNG it
stored. Bounded memory shows as a peak RSS that does not grow with ``--records``, well under the stored total.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def write_source(path: Path, records: int, size: int, seed: int = 0) -> int:
    """A ROCO-schema parquet of ``records`` distinct noise PNGs; returns their total bytes."""
    rng = np.random.default_rng(seed)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", struct), ("image_id", pa.string()), ("caption", pa.string())])
    total = 0
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, records, 1000):
            images, ids = [], []
            for i in range(start, min(start + 1000, records)):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
                images.append({"bytes": buffer.getvalue(), "path": f"ROCO_{i:05d}.jpg"})
                ids.append(f"ROCO_{i:05d}")
                total += len(images[-1]["bytes"])
            captions = [f"synthetic radiograph number {i}." for i in range(start, start + len(ids))]
            writer.write_table(pa.table({"image": images, "image_id": ids, "caption": captions}, schema=schema))
    return total


def child(source: str, root: str) -> None:
    """Run in a fresh process: import, then print the measurements as JSON."""
    from med_idefics.data.importers import import_dataset

    started = time.perf_counter()
    reports = import_dataset("roco", root, caption_prompt="Describe this radiology image.", source=source,
                             splits=("train",))  # fmt: skip
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    stored = pq.read_table(reports["train"].path, columns=["image"]).column("image")
    print(json.dumps({"kept": reports["train"].kept, "seconds": round(seconds, 1), "peak_rss_mib": round(peak_mib),
                      "stored_png_mib": round(sum(len(b.as_py()) for b in stored) / 2**20)}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=55_000)
    parser.add_argument("--size", type=int, default=96, help="image side in px (noise PNG ~28 KB at 96 px)")
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "roco-train.parquet"
        source_mib = write_source(source, args.records, args.size) / 2**20
        command = [sys.executable, __file__, "--child", str(source), str(Path(tmp) / "data")]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    print(f"records {result['kept']:,}  source PNG {source_mib:,.0f} MiB  stored PNG {result['stored_png_mib']:,} MiB")
    print(f"import {result['seconds']} s  peak RSS {result['peak_rss_mib']:,} MiB")


if __name__ == "__main__":
    main()
