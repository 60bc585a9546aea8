"""How a one-shot ``sd-app generate`` or ``score`` process runs: without the work it does not need.

Importing torch, diffusers and transformers makes some 400,000 long-lived Python objects and 3,000
modules. Two things then cost seconds and give a one-shot process nothing:

- The cyclic garbage collector: each full collection walks every object there is, and imports trigger
  many of them. ``start_one_shot`` switches it off for the process; reference counting still frees
  everything else (tensors included). A cold ``generate`` measured about 1 s faster, and a 2-round
  best-of-4 (8 images) reached the same memory peak without it (README "Start-up").
- The interpreter's teardown: clearing the modules and collecting the objects after the files are
  written and closed (about 1 s). ``end_process`` runs the atexit handlers, flushes the standard streams
  and ends the process with ``os._exit``.

For the application's own entry point only (``sd_app.cli.main`` with the process's command line): a
caller of ``main(argv)`` and the library (``pipelines``) keep the interpreter's defaults.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from typing import NoReturn


def start_one_shot() -> None:
    """Switch the cyclic garbage collector off for the rest of this process (module docstring)."""
    gc.disable()


def end_process(code: int) -> NoReturn:
    """End this process now with exit status ``code``: the atexit handlers (logging, file locks, temporary
    files, ...) run as at a normal exit, the standard streams are flushed, the teardown is skipped."""
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's own, what a normal exit runs
    if run_exit_handlers is not None:
        run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
