"""Loading without the libraries' progress bars: users see what was made, not "Loading weights 68/68"."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Switch transformers' and diffusers' progress bars off inside the block, then back as they were."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was_on = {lib: lib.is_progress_bar_enabled() for lib in (transformers_logging, diffusers_logging)}
    for lib in was_on:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, on in was_on.items():
            if on:
                lib.enable_progress_bar()
