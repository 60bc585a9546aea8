"""The Rerank view's handlers: images (uploaded, or a folder on this computer) + a prompt -> best first.

Thin: the work is ``sd_app.rerank_folder`` (shared with ``sd-app score``) and ``Engine.ranking_scorer``.
A folder typed in the view is read, and "keep the best K" may write outside the output folder, only when
the server answers on a loopback address (``local_paths``: the person at the browser is on this
computer); otherwise only uploads are ranked and copies go under the output folder.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd_app.ui_handlers import reported_to_user, uploads_named_as_uploaded, user_error

if TYPE_CHECKING:
    from sd_app.engine import Engine
    from sd_app.rerank_folder import FileRanking
    from sd_app.ui_handlers import UserSession

GALLERY_MAX = 48  # thumbnails shown; the table and CSV hold every image
THUMB_PX = 256


def weights_for(chosen: list[str] | None, weights_text: str, defaults: dict[str, float]) -> dict[str, float]:
    """The chosen scorers' weights: typed ``name:weight`` values win, then the server's, then 1."""
    from pipelines.rerank.scorer_specs import parse_weights

    typed = parse_weights(weights_text or "")
    names = list(chosen or []) or list(typed)
    unknown = [name for name in typed if name not in names]
    if unknown:
        raise ValueError(f"weights given for scorers not chosen: {', '.join(unknown)}")
    return {name: typed.get(name, defaults.get(name, 1.0)) for name in names}


class RerankView:
    """Handlers of the Rerank tab for one engine."""

    def __init__(self, engine: Engine, local_paths: bool = False) -> None:
        self.engine = engine
        self.local_paths = local_paths

    def scorer_choices(self) -> list[str]:
        return list(self.engine.available_scorers())

    def default_choice(self) -> list[str]:
        available = self.engine.available_scorers()
        return [name for name in self.engine.default_weights() if name in available]

    def rerank(
        self,
        files: list[str] | None,
        folder: str,
        prompt: str,
        chosen: list[str] | None,
        weights_text: str,
        session: UserSession,
    ) -> tuple[Any, ...]:
        """(status, table, gallery, CSV file): the images best first with every scorer's number."""
        from sd_app.rerank_folder import image_files, rank_files

        if not (prompt or "").strip():
            raise user_error("Type a prompt to rank the images against.")
        folder = (folder or "").strip()
        if folder and not self.local_paths:
            raise user_error("Folders can be read only when the server runs on this computer (localhost); "
                             "upload the images instead.")
        paths: list[str | Path] = list(files or [])
        with reported_to_user("rerank"), uploads_named_as_uploaded(files or []):
            if folder:
                paths += image_files(folder)
            if not paths:
                raise ValueError("Drop some images or type a folder.")
            if self.engine.limits is not None:  # characters; CLIP reads its first 77 tokens
                self.engine.limits.check_text("prompt", prompt or "")
            weights = weights_for(chosen, weights_text, self.engine.default_weights())
            scorer = self.engine.ranking_scorer(weights)
            ranking = rank_files(paths, prompt or "", scorer)
        session.last_ranking = ranking
        csv_path = Path(tempfile.mkdtemp(prefix="sd-app-rerank-")) / "rerank.csv"
        csv_path.write_text(ranking.csv_text(), encoding="utf-8")
        return self._status(ranking), self._table(ranking), self._gallery(ranking), str(csv_path)

    def keep(self, k: Any, folder: str, session: UserSession) -> str:
        """Copy the best K of the last ranking into ``folder`` (under the output folder unless local)."""
        from sd_app.rerank_folder import keep_best
        from sd_app.ui_handlers import integer

        ranking: FileRanking | None = getattr(session, "last_ranking", None)
        if ranking is None:
            raise user_error("Rerank some images first.")
        with reported_to_user("keep best"):
            target = self.destination(folder)
            copies = keep_best(ranking, integer("K", k), target)
        return f"Copied the best {len(copies)} into {target}: " + ", ".join(p.name for p in copies)

    def destination(self, folder: str) -> Path:
        """Where "keep the best K" copies to: a folder under the output folder; anywhere when local."""
        text = (folder or "").strip()
        if not text:
            raise ValueError("Type a folder to copy the best images into.")
        base = Path(self.engine.output_dir).expanduser().resolve()
        path = Path(text).expanduser()
        if path.is_absolute():
            if not self.local_paths:
                raise ValueError("Give a folder name under the output folder (absolute paths only on localhost).")
            return path
        target = (base / path).resolve()
        if not self.local_paths and not target.is_relative_to(base):
            raise ValueError("The folder must stay inside the output folder.")
        return target

    @staticmethod
    def _status(ranking: FileRanking) -> str:
        best = ranking.rows[0]
        status = (f"Ranked {len(ranking.rows)} image(s) by {ranking.label} ({ranking.scorer}); "
                  f"best: {best.path.name} ({best.score:.2f})")
        if ranking.skipped:
            names = ", ".join(path.name for path, _ in ranking.skipped[:5])
            status += f" · skipped {len(ranking.skipped)} unreadable: {names}"
        if ranking.truncated:
            status += " · the scorer read only the prompt's first 77 tokens"
        if ranking.note:
            status += f" · {ranking.note}"
        return status

    @staticmethod
    def _table(ranking: FileRanking) -> Any:
        """A pandas DataFrame (its columns become the table's headers)."""
        import pandas as pd

        return pd.DataFrame(ranking.table(), columns=["rank", "file", *ranking.labels])

    @staticmethod
    def _gallery(ranking: FileRanking) -> list[tuple[Any, str]]:
        from PIL import Image

        items = []
        for rank, row in enumerate(ranking.rows[:GALLERY_MAX], start=1):
            with Image.open(row.path) as opened:
                thumb = opened.convert("RGB")
            thumb.thumbnail((THUMB_PX, THUMB_PX))
            items.append((thumb, f"#{rank} {row.path.name} · {ranking.label.removesuffix(' score')} {row.score:.2f}"))
        return items
