"""Reranking existing images (sd_app.rerank_folder), the Rerank view's handlers, ``sd-app score`` with
scorers, and preference scorers through the engine (metadata, minimum score) and the HTTP API."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from PIL import Image

from pipelines.generation.request import GenerationRequest
from pipelines.rerank.clip_scorer import ClipScorer
from pipelines.rerank.scorer_specs import ScorerSpec
from sd_app.cli import main
from sd_app.engine import Engine
from sd_app.metadata import parse_parameters
from sd_app.rerank_folder import keep_best, rank_files
from sd_app.storage import slugify
from sd_app.ui_handlers import UserSession
from sd_app.ui_rerank import RerankView, weights_for
from tests.clip_fixtures import blob_images
from tests.scorer_fixtures import write_aesthetic_head

pytest_plugins = ["tests.serve_fixtures"]
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    return write_aesthetic_head(tmp_path_factory.mktemp("head") / "tiny-aesthetic.safetensors")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Five images under awkward names, plus a text file with an image suffix and a note."""
    root = tmp_path_factory.mktemp("pictures")
    names = ["b one.png", "a?two.jpg", "c-three.png", "d four.webp", "e five.png"]
    for name, image in zip(names, blob_images([(64, 64)] * 5, seed=11), strict=True):
        image.save(root / name)
    (root / "broken.png").write_text("not an image")
    (root / "notes.txt").write_text("not listed")
    return root


@pytest.fixture(scope="module")
def engine(tiny_clip, head, tmp_path_factory):
    return Engine(reranker=str(tiny_clip), device="cpu", output_dir=tmp_path_factory.mktemp("out"),
                  scorers=(ScorerSpec("clip", weight=1.0), ScorerSpec("aesthetic", str(head), str(tiny_clip), 0.5)))


def test_rank_files_sorts_a_folder_and_lists_what_it_skipped(folder, tiny_clip):
    scorer = ClipScorer.load(tiny_clip, device="cpu")
    ranking = rank_files([folder], PROMPT, scorer)
    readable = sorted(p for p in folder.iterdir() if p.name not in ("broken.png", "notes.txt"))
    expected = scorer.score([Image.open(p).convert("RGB") for p in readable], PROMPT)
    assert [row.path for row in ranking.rows] == [readable[i] for i in expected.order()]
    assert [row.score for row in ranking.rows] == pytest.approx(sorted(expected.scores, reverse=True), abs=1e-4)
    assert [p.name for p, _ in ranking.skipped] == ["broken.png"] and ranking.labels == ["CLIP score"]
    with pytest.raises(ValueError, match="not a readable image"):
        rank_files([folder], PROMPT, scorer, strict=True)


def test_csv_holds_every_scorer_number_best_first(folder, engine):
    scorer = engine.ranking_scorer({"clip": 1.0, "aesthetic": 0.5})
    ranking = rank_files([folder], PROMPT, scorer)
    rows = list(csv.DictReader(io.StringIO(ranking.csv_text())))
    assert list(rows[0]) == ["rank", "file", "path", "Weighted score", "CLIP score", "Aesthetic score"]
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    weighted = [float(r["Weighted score"]) for r in rows]
    assert weighted == sorted(weighted, reverse=True)
    images = [Image.open(r["path"]).convert("RGB") for r in rows]
    clip = engine.scorer().score(images, PROMPT).scores
    aesthetic = engine.ranking_scorer({"aesthetic": 1.0}).score(images, PROMPT).scores
    assert [float(r["CLIP score"]) for r in rows] == pytest.approx(clip, abs=1e-4)
    assert [float(r["Aesthetic score"]) for r in rows] == pytest.approx(aesthetic, abs=1e-5)


def test_keep_best_copies_under_sanitised_names_and_never_overwrites(folder, tiny_clip, tmp_path):
    ranking = rank_files([folder], PROMPT, ClipScorer.load(tiny_clip, device="cpu"))
    first = keep_best(ranking, 2, tmp_path / "best")
    again = keep_best(ranking, 2, tmp_path / "best")
    best = ranking.rows[0].path
    assert first[0].name.startswith("01-") and "?" not in "".join(p.name for p in first + again)
    assert [p.name for p in again] == [p.with_stem(p.stem + "-2").name for p in first]
    assert first[0].read_bytes() == best.read_bytes() == again[0].read_bytes()
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == sorted(p.name for p in first + again)


def test_rerank_view_handlers_rank_uploads_and_write_the_csv(folder, engine):
    view = RerankView(engine, local_paths=False)
    session = UserSession()
    files = [str(folder / "b one.png"), str(folder / "c-three.png"), str(folder / "e five.png")]
    status, table, gallery, csv_path = view.rerank(files, "", PROMPT, ["clip", "aesthetic"], "aesthetic:2", session)
    assert status.startswith("Ranked 3 image(s) by Weighted score")
    assert list(table.columns) == ["rank", "file", "Weighted score", "CLIP score", "Aesthetic score"]
    data = table.values.tolist()
    assert [row[0] for row in data] == [1, 2, 3] and len(gallery) == 3
    assert gallery[0][1].startswith(f"#1 {data[0][1]} · Weighted ")
    rows = list(csv.reader(open(csv_path, encoding="utf-8")))
    assert [r[1] for r in rows[1:]] == [row[1] for row in data]
    direct = rank_files(files, PROMPT, engine.ranking_scorer({"clip": 1.0, "aesthetic": 2.0}))
    assert [r.path.name for r in direct.rows] == [row[1] for row in data]  # typed weight 2 was used
    assert session.last_ranking.rows[0].path.name == data[0][1]


def test_rerank_view_reads_folders_and_copies_anywhere_only_on_localhost(folder, engine, tmp_path):
    import gradio as gr

    remote = RerankView(engine, local_paths=False)
    with pytest.raises(gr.Error, match="only when the server runs on this computer"):
        remote.rerank([], str(folder), PROMPT, ["clip"], "", UserSession())
    for bad in (str(tmp_path / "x"), "../escape"):
        with pytest.raises(ValueError):
            remote.destination(bad)
    assert remote.destination("best/today") == (engine.output_dir / "best" / "today").resolve()
    local = RerankView(engine, local_paths=True)
    session = UserSession()
    status, *_ = local.rerank([], str(folder), PROMPT, ["clip"], "", session)
    assert status.startswith("Ranked 5 image(s) by CLIP score") and "skipped 1 unreadable: broken.png" in status
    kept = local.keep(2, str(tmp_path / "chosen"), session)
    assert kept.startswith(f"Copied the best 2 into {tmp_path / 'chosen'}: 01-")
    with pytest.raises(gr.Error, match="Rerank some images first"):
        local.keep(2, "x", UserSession())
    with pytest.raises(gr.Error, match="not available here"):
        local.rerank([], str(folder), PROMPT, ["pickscore"], "", UserSession())


def test_weights_for_the_chosen_scorers():
    assert weights_for(["clip", "aesthetic"], "", {"aesthetic": 0.5}) == {"clip": 1.0, "aesthetic": 0.5}
    assert weights_for(["clip", "aesthetic"], "clip:3", {}) == {"clip": 3.0, "aesthetic": 1.0}
    assert weights_for([], "aesthetic:2", {}) == {"aesthetic": 2.0}
    with pytest.raises(ValueError, match="not chosen: aesthetic"):
        weights_for(["clip"], "aesthetic:2", {})


def test_score_command_ranks_a_folder_with_scorers_csv_and_keep(folder, tiny_clip, head, tmp_path, capsys):
    table, into = tmp_path / "table.csv", tmp_path / "kept"
    code = main(["score", str(folder), "--prompt", PROMPT, "--reranker", str(tiny_clip), "--scorer", "clip",
                 "--scorer", f"aesthetic={head}@{tiny_clip}:0.5", "--csv", str(table), "--keep-best", "2",
                 "--into", str(into)])
    assert code == 2 and "broken.png is not a readable image file" in capsys.readouterr().err  # named: strict
    (folder / "broken.png").rename(tmp_path / "broken.png")
    try:
        assert main(["score", str(folder), "--prompt", PROMPT, "--reranker", str(tiny_clip), "--scorer", "clip",
                     "--scorer", f"aesthetic={head}@{tiny_clip}:0.5", "--csv", str(table), "--keep-best", "2",
                     "--into", str(into)]) == 0
    finally:
        (tmp_path / "broken.png").rename(folder / "broken.png")
    out = capsys.readouterr().out.splitlines()
    assert "Weighted score" in out[0] and "Aesthetic score" in out[0]
    rows = list(csv.DictReader(table.open(encoding="utf-8")))
    assert [r["file"] for r in rows] == [line.split("  ")[0].rsplit("/", 1)[-1] for line in out[1:6]]
    expected = [f"{k:02d}-{slugify(Path(r['file']).stem)}{Path(r['file']).suffix}" for k, r in enumerate(rows[:2], 1)]
    assert sorted(p.name for p in into.iterdir()) == expected
    assert main(["score", str(folder), "--prompt", PROMPT, "--scorer", "pickscore"]) == 2
    assert "needs its file" in capsys.readouterr().err
    # outputs that cannot be written are refused before anything is scored (no table printed)
    refused = ((["--csv", str(tmp_path)], f"--csv {tmp_path}: a folder"),
               (["--keep-best", "0", "--into", str(into)], "--keep-best must be at least 1, got 0"),
               (["--keep-best", "1", "--into", str(table)], f"--into {table}: exists and is not a folder"))
    for options, message in refused:
        assert main(["score", str(folder), "--prompt", PROMPT, "--reranker", str(tiny_clip), *options]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and captured.out == "", options


def test_engine_records_each_score_and_the_minimum_in_the_metadata(tiny_model, tiny_clip, head, tmp_path):
    engine = Engine(model=str(tiny_model), reranker=str(tiny_clip), output_dir=tmp_path, device="cpu",
                    scorers=(ScorerSpec("aesthetic", str(head), str(tiny_clip), 0.5),))
    request = GenerationRequest(prompt=PROMPT, steps=2, width=64, height=64, seed=7, n=2, sampler="Euler")
    rounds = []
    result = engine.generate(request, scorers={"clip": 1, "aesthetic": 0.5}, min_score={"aesthetic": 1e9},
                             extra_rounds=1, on_round=rounds.append)
    assert (result.rounds, result.max_rounds, result.passed) == (2, 2, False) and len(rounds) == 2
    assert sorted(c.seed for c in result.candidates) == [7, 8, 9, 10]
    assert result.score_label == "Weighted score"
    for candidate in result.candidates:
        params = parse_parameters(Image.open(candidate.path).info["parameters"])
        assert params["Weighted score"] == f"{candidate.score:.2f}"
        assert params["CLIP score"] == f"{candidate.details['CLIP score']:.2f}"
        assert params["Aesthetic score"] == f"{candidate.details['Aesthetic score']:.2f}"
        assert params["Min score"] == "Aesthetic score 1e+09" and params["Min score passed"] == "no"
        assert params["Rounds"] == "2 of 2" and "aesthetic tiny-aesthetic" in params["Reranker"]
    lone = engine.generate(request, min_score=-1e9, save=False)  # the default: the configured aesthetic alone
    assert lone.score_label == "Aesthetic score" and lone.rounds == 1 and lone.passed is True
    with pytest.raises(ValueError, match="name the scorer"):
        engine.generate(request, scorers="clip, aesthetic", min_score=5, save=False)
    for minimum in ({"clip": 200}, {"clip": -0.5}):  # CLIP score is max(100 * cos, 0): refused, not run in vain
        with pytest.raises(ValueError, match="minimum score for clip must be between 0 and 100"):
            engine.generate(request, scorers="clip, aesthetic", min_score=minimum, save=False)
    from sd_app.limits import RequestLimits

    engine.limits = RequestLimits(max_pixel_steps=64 * 64 * 2 * 2 * 3)  # 3 rounds of this request, not 4
    with pytest.raises(ValueError, match=r"64x64x2x2x4 = 65536 \(a minimum score may take 4 rounds\)"):
        engine.generate(request, min_score=5, extra_rounds=3, save=False)
    assert engine.generate(request, min_score=-1e9, extra_rounds=2, save=False).passed
    pruned = engine.generate(replace(request, prune_to=1, prune_at=1), min_score=1e9, extra_rounds=1, save=False)
    assert pruned.rounds == 2 and len(pruned.candidates) == request.n and not pruned.pruned  # the pruned, finished


def test_api_scorers_by_name_only_and_their_scores_in_info(live_server, head, tiny_clip, monkeypatch):
    monkeypatch.setattr(live_server.engine, "scorers", (ScorerSpec("aesthetic", str(head), str(tiny_clip), 0.5),))
    url = f"{live_server.url}/sdapi/v1"
    listed = httpx.get(f"{url}/scorers", timeout=30).json()
    assert {row["name"] for row in listed} == {"clip", "contrastive", "mixed", "aesthetic"}
    assert str(head) not in json.dumps(listed)  # the server's files are not shown
    body = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 3,
            "batch_size": 2, "scorers": {"clip": 1, "aesthetic": 0.5}, "min_score": {"aesthetic": -1e9}}
    response = httpx.post(f"{url}/txt2img", json=body, timeout=120)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["score_label"] == "Weighted score" and info["min_score_passed"] == [True, True]
    assert all({"CLIP score", "Aesthetic score"} <= set(d) for d in info["rerank_details"])
    assert info["clip_scores"] == [d["CLIP score"] for d in info["rerank_details"]] and info["rounds"] == 1
    for scorers, message in [("aesthetic=/etc/passwd", "not files"), ({"pickscore": 1}, "not available")]:
        refused = httpx.post(f"{url}/txt2img", json={**body, "scorers": scorers}, timeout=60)
        assert refused.status_code == 422 and message in refused.json()["detail"]
    out_of_range = httpx.post(f"{url}/txt2img", json={**body, "min_score": {"clip": 200}}, timeout=60)
    assert out_of_range.status_code == 422
    assert "minimum score for clip must be between 0 and 100" in out_of_range.json()["detail"]


def test_rerank_and_generate_views_through_gradio(live_server, folder):
    from gradio_client import Client, handle_file

    client = Client(live_server.url, verbose=False, analytics_enabled=False)
    files = [handle_file(str(folder / name)) for name in ("b one.png", "c-three.png")]
    status, table, gallery, csv_file = client.predict(files, "", PROMPT, ["clip"], "", api_name="/rerank")
    assert status.startswith("Ranked 2 image(s) by CLIP score")
    assert table["headers"] == ["rank", "file", "CLIP score"] and [row[1] for row in table["data"]] == [
        item["caption"].split(" · ")[0].split(" ", 1)[1] for item in gallery
    ]
    assert open(csv_file, encoding="utf-8").readline().strip() == "rank,file,path,CLIP score"
    kept = client.predict(1, "rerank-test", api_name="/rerank_keep")
    assert kept.startswith("Copied the best 1 into ") and (live_server.engine.output_dir / "rerank-test").is_dir()
    # Generate with a minimum score: prompt, negative, sampler, steps, cfg, width, height, seed, candidates,
    # rerank by, hires fix (5), clip skip, scorers, minimum score, extra rounds
    args = (PROMPT, "", "Euler", 2, 7, 64, 64, 21, 2, "clip", False, 2, "Latent", 0, 0.7, 1)
    status, _, gallery, parameters, _ = client.predict(*args, "", "clip=0", 2, api_name="/generate")
    assert "minimum CLIP score 0 reached in round 1" in status and len(gallery) == 2  # max(100 cos, 0) >= 0
    assert parse_parameters(parameters)["Min score passed"] == "yes"
    status, _, gallery, _, _ = client.predict(*args, "", "100", 1, api_name="/generate")  # cos 1: never
    assert "no candidate reached the minimum CLIP score 100 in 2 round(s)" in status and len(gallery) == 4
    assert all(item["caption"].endswith(f"below min · seed {item['caption'].split()[-1]}") for item in gallery)
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="minimum score for clip must be between 0 and 100"):
        client.predict(*args, "", "clip=200", 1, api_name="/generate")


def test_batch_ranks_with_scorers_and_records_them(tiny_model, tiny_clip, head, tmp_path):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("a red circle\n")
    common = ["batch", str(prompts), "--out", str(out), "--model", str(tiny_model), "--reranker", str(tiny_clip),
              "--steps", "2", "--width", "64", "--height", "64", "--seed", "7", "--sampler", "Euler", "--n", "2",
              "--device", "cpu"]
    assert main([*common, "--scorer", "clip", "--scorer", f"aesthetic={head}@{tiny_clip}:0.5",
                 "--min-score", "aesthetic=-1000"]) == 0
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert record["score_label"] == "Weighted score" and len(record["files"]) == 2
    params = parse_parameters(Image.open(out / record["files"][0]).info["parameters"])
    assert {"Weighted score", "CLIP score", "Aesthetic score", "Min score passed"} <= set(params)
    assert main(common) == 0  # other scorers: another job, not "already done"
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2


SYNTAX_PROMPT = "(a red hexagon:1.5) on a [blue] background <lora:hexagon:0.8>"


def test_score_command_and_rerank_view_give_the_generation_scores_for_a_prompt_with_syntax(tmp_path, capsys):
    """Emphasis and a LoRA tag: every path scores ``scoring_prompt`` of it, so the numbers are the same."""
    engine = Engine(output_dir=tmp_path / "out", device="cpu")  # the embedded model, CLIP and example LoRA
    request = GenerationRequest(prompt=SYNTAX_PROMPT, steps=2, width=64, height=64, seed=1, n=2)
    made = sorted(engine.generate(request).candidates, key=lambda c: c.seed)  # generation order, as scored
    paths = [str(c.path) for c in made]
    generated = {Path(c.path).name: c.score for c in made}
    assert len(set(generated.values())) == 2

    table = tmp_path / "table.csv"
    assert main(["score", *paths, "--prompt", SYNTAX_PROMPT, "--csv", str(table), "--device", "cpu"]) == 0
    scored = {row["file"]: float(row["CLIP score"]) for row in csv.DictReader(table.open(encoding="utf-8"))}
    assert scored == generated
    assert "scored against: 'a red hexagon on a blue background'" in capsys.readouterr().out

    session = UserSession()
    status, *_ = RerankView(engine).rerank(paths, "", SYNTAX_PROMPT, ["clip"], "", session)
    assert {row.path.name: row.score for row in session.last_ranking.rows} == generated
    assert "scored against: 'a red hexagon on a blue background'" in status
