"""Build an HF ``CLIPTokenizer`` (vocab.json + merges.txt) from OpenAI's CLIP BPE file.

The BPE file ``bpe_simple_vocab_16e6.txt.gz`` ships inside the open-clip-torch wheel (MIT). The
vocabulary is built exactly as openai/CLIP ``simple_tokenizer.py`` does: 256 byte symbols, the same
with ``</w>``, 48894 merges, then the two special tokens -> 49408 ids (bos 49406, eos 49407).

    pip download --no-deps open-clip-torch -d /tmp/oc
    python -m pipelines.training.build_tokenizer /tmp/oc/open_clip_torch-*.whl pipelines/models/configs/clip-tokenizer
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # openai/CLIP keeps this many merge rules
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable unicode table of GPT-2 / CLIP BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def read_bpe_merges(source: Path) -> list[str]:
    """Merge lines from the .txt.gz itself or from an open-clip-torch wheel holding it."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            raw = wheel.read(BPE_MEMBER)
    else:
        raw = source.read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    return lines[1 : N_MERGES + 1]


def build_tokenizer_files(source: Path, out_dir: Path) -> int:
    """Write vocab.json, merges.txt and the tokenizer configs; returns the vocabulary size."""
    merges = read_bpe_merges(source)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return len(vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="open-clip-torch wheel or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    size = build_tokenizer_files(args.source, args.out_dir)
    print(f"wrote {args.out_dir} ({size} tokens)")


if __name__ == "__main__":
    main()
