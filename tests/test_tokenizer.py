"""The shipped tokenizer is the real CLIP BPE: known ids for a known caption."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "pipelines" / "models" / "configs" / "clip-tokenizer"


def test_known_caption_ids():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    ids = tokenizer("a red circle", padding="max_length", max_length=77).input_ids
    assert ids == [49406, 320, 736, 7117, 49407] + [49407] * 72
