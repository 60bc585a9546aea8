"""What an open page shows of the server's selection, and how the page follows a switch made elsewhere.

The checkpoint and VAE are the server's (A1111's ``sd_model_checkpoint`` / ``sd_vae``): another page or
``POST /sdapi/v1/options`` may switch them while a page is open. Each page keeps, in a ``gr.State``, the
selection its widgets show (``ShownSelection``); a run passes it to ``Engine.generate(expect_selection=)``,
which refuses (``SelectionChanged``) rather than run a model the page does not show, and after each run the
page's widgets follow the server (``follow``). No timer: a page learns of a switch when its user next acts.

Clip skip and the VAE decoder are per-request fields whose defaults are the server's options: a widget
the user left at the default it was shown follows a new default; one the user moved keeps their value.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class ShownSelection(NamedTuple):
    """The server's selection as a page last showed it."""

    selection: tuple[str, str | None] | None  # Engine.selection(): checkpoint spec, VAE file (None if unreadable)
    checkpoint: str  # the Checkpoint dropdown's spelling
    vae: str  # the VAE dropdown's spelling
    clip_skip: int  # the server's default clip skip
    vae_decoder: str  # the server's default VAE decoder ("Full" or "TAESD")


def follow(page_value: Any, shown_default: Any, server_default: Any, unchanged: Any) -> Any:
    """A per-request field after the server's default may have changed: the new default when the page still
    holds the default it was shown (the user left it alone), else ``unchanged`` (Gradio's no-op update)."""
    if server_default != shown_default and page_value == shown_default:
        return server_default
    return unchanged


def changed_message(shown: ShownSelection, current: ShownSelection) -> str:
    """Why a run was refused: the server's model is no longer the one the page showed."""
    return (
        f"Not generated: the server now runs {current.checkpoint} (VAE {current.vae}), switched from another page "
        f"or the HTTP API after this page showed {shown.checkpoint} (VAE {shown.vae}). The Checkpoint and VAE "
        f"dropdowns (Generate tab) show it now: generate again to use it, or choose {shown.checkpoint} to switch "
        "back."
    )
