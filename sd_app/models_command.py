"""``sd-app models``: what a model folder holds, as the server and ``--model``/``<lora:...>`` will see it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sd_app.arguments import add_library_arguments


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    add_library_arguments(parser)
    parser.add_argument("--kind", choices=("checkpoint", "vae", "lora", "embedding"), action="append",
                        help="only these kinds (repeatable; default all)")
    parser.add_argument("--no-hash", action="store_true", help="skip hashing (the first listing of big files)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line, metadata included")


def _size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def run_models(args: argparse.Namespace) -> int:
    from pipelines.models.hash_cache import HashCache, default_cache_file
    from pipelines.models.library import KINDS, ModelLibrary

    library = ModelLibrary([Path(d) for d in args.models_dir], HashCache(default_cache_file()))
    for kind in args.kind or KINDS:
        rows = [library.describe(entry, hashes=not args.no_hash) for entry in library.files(kind)]
        if args.json:
            for row in rows:
                print(json.dumps(row))
            continue
        print(f"{kind}s ({len(rows)}):")
        for row in rows:
            meta = row["metadata"]
            trained = f", dim {meta['ss_network_dim']}" if "ss_network_dim" in meta else ""
            stem = row["name"].rsplit("/", 1)[-1]
            trained += f", alias {row['alias']}" if row.get("alias") not in (None, stem) else ""
            state = f"  REFUSED: {row['refused']}" if row["refused"] else ""
            print(f"  {row['name']:<40} {row['format']:<11} {_size(row['size']):>9}  {row['hash'] or '-':<10}  "
                  f"{row['base_model'] or '-'}{trained}{state}")
    print(f"hash cache: {library.hashes.file}", file=sys.stderr)
    return 0
