"""The processor an import counts its records' token lengths with (:mod:`med_idefics.data.token_lengths`), before
any stage has run: the one the training stages will use."""

from __future__ import annotations

from pathlib import Path

from med_idefics.config import Params


def token_counter(params: Params):
    """(a :class:`~med_idefics.data.token_lengths.TokenCounter` on the processor the stages will train with, None
    and why when there is none to count with here): the resolved base in ``model.base_dir`` when it exists, else
    what ``model.base`` names — a hub id's processor (the hub, or the HF cache offline), a local folder's, the real
    Idefics2 processor for ``tiny-real-processor``. The ``tiny`` base's tokenizer is built from the data itself."""
    from transformers import AutoProcessor

    from med_idefics.data.token_lengths import TokenCounter
    from med_idefics.modeling.bases import HUB_ID, REAL_PROCESSOR, TINY
    from med_idefics.modeling.loading import hub_token, load_processor, read_pointer
    from med_idefics.modeling.offline import anchor_local_folder

    base, base_dir = params.model.base, Path(params.model.base_dir)
    try:
        if (base_dir / "config.json").is_file() or read_pointer(base_dir) is not None:
            pointer = read_pointer(base_dir) or {}
            name = f"{pointer.get('id', pointer.get('path', base_dir))}@{pointer.get('revision', 'saved')}"
            processor = load_processor(base_dir)
        elif base == TINY:
            return None, "model.base=tiny: its tokenizer is built from the data by `med-idefics base`"
        elif base == REAL_PROCESSOR:
            from med_idefics.modeling.realistic import build_processor

            name, processor = "Idefics2-8b's processor (tiny-real-processor)", build_processor()
        elif anchor_local_folder(base).is_dir():
            name, processor = str(anchor_local_folder(base)), AutoProcessor.from_pretrained(anchor_local_folder(base))
        elif HUB_ID.fullmatch(base):
            name = f"{base}@{params.model.revision or 'main'}"
            processor = AutoProcessor.from_pretrained(base, revision=params.model.revision, token=hub_token())
        else:
            return None, f"model.base={base!r} is neither a base name, a folder nor a hub id"
    except Exception as err:  # no network and no cache, no mistral-common, …: the import goes on, uncounted
        return None, f"no processor for model.base={base!r} here ({type(err).__name__}: {str(err)[:200]})"
    processor.image_processor.do_image_splitting = params.model.do_image_splitting
    return TokenCounter(processor, name, params.data.prompt_prefix), ""
