"""What an sd-app process started from its own command line skips at its start and end.

Importing torch, diffusers and transformers (and Gradio for ``serve``) makes some 400,000 long-lived
Python objects and 3,000 modules. Two things then cost seconds and give the process nothing:

- The cyclic garbage collector: each full collection walks every object there is, and imports trigger
  many of them. ``pause_gc`` switches it off. A one-shot ``generate`` or ``score`` process keeps it
  off: reference counting still frees everything else (tensors included), and a 2-round best-of-4
  (8 images) reached the same memory peak without it. ``serve`` turns it back on once its UI and API
  are imported (``resume_gc``), with what was loaded frozen (``gc.freeze``: never walked again).
- The interpreter's teardown, after a one-shot process has written and closed its files: clearing the
  modules and collecting the objects. ``end_process`` runs the atexit handlers, flushes the standard
  streams and ends the process with ``os._exit``.

Measured in README "Start-up". For the application's own entry point only (``sd_app.cli.main`` with the
process's command line): a caller of ``main(argv)`` and the library (``pipelines``) keep the
interpreter's defaults.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from typing import NoReturn


def pause_gc() -> None:
    """Switch the cyclic garbage collector off (module docstring)."""
    gc.disable()


def resume_gc() -> None:
    """After ``pause_gc`` and the loading it covered: freeze what exists (``gc.freeze``), collect again.
    Does nothing when the collector was not paused."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def end_process(code: int) -> NoReturn:
    """End this process now with exit status ``code``: the atexit handlers (logging, file locks, temporary
    files, ...) run as at a normal exit, the standard streams are flushed, the teardown is skipped."""
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's own, what a normal exit runs
    if run_exit_handlers is not None:
        run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
