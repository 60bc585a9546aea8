"""``sd-app generate --server URL`` against a live server on the tiny models: the same files as a local run,
no torch in the client, clear errors; and what the cold path imports (``sd_app.lean_imports``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sd_app.cli import main

pytest_plugins = ["tests.serve_fixtures"]

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a blue background"
SMALL = ["--steps", "2", "--width", "64", "--height", "64", "--seed", "11"]


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.png"))}


def _lines(text: str, folder: Path) -> list[str]:
    return [line.replace(str(folder), "OUT") for line in text.splitlines()]


@pytest.mark.parametrize(
    "options",
    [
        ["--n", "3", "--keep", "2"],  # reranked best first, the best two kept
        ["--n", "2", "--no-rerank", "--sampler", "Euler a", "--negative", "blurry", "--cfg", "5"],
        ["--hires-scale", "1.5", "--clip-skip", "2", "--sampler", "DPM++ 2M Karras"],
        ["--n", "1"],  # one image: not scored
        ["--sampler", "DDIM", "--eta", "0.5"],  # the step noise travels too
        ["--n", "2", "--min-score", "99", "--extra-rounds", "1"],  # never reached: two rounds, all written
        ["--n", "4", "--prune-to", "2", "--prune-at", "1"],  # early pruning: the pruned are listed
        ["--n", "2", "--scorer", "clip:1", "--scorer", "contrastive:0.5"],  # a Weighted score, by name
    ],
)
def test_server_run_writes_the_files_of_a_local_run(live_server, tiny_model, tiny_clip, tmp_path, capsys, options):
    local, remote = tmp_path / "local", tmp_path / "remote"
    common = ["generate", PROMPT, *SMALL, *options, "--model", str(tiny_model)]
    assert main([*common, "--reranker", str(tiny_clip), "--device", "cpu", "--out", str(local)]) == 0
    local_out, local_err = capsys.readouterr()
    assert main([*common, "--server", live_server.url, "--out", str(remote)]) == 0
    remote_out, remote_err = capsys.readouterr()
    assert _files(local) and _files(remote) == _files(local)  # same names, same pixels, same parameters
    assert _lines(remote_out, remote) == _lines(local_out, local)  # same paths, seeds and scores printed
    assert _summary(remote_err, remote) == _summary(local_err, local)  # same counts, order and settings


def _summary(err: str, folder: Path) -> str:
    """The summary line up to its time, and the notes after it."""
    lines = _lines(err, folder)
    index = next(i for i, line in enumerate(lines) if " written to OUT/ " in line)
    return "\n".join([lines[index].rsplit(", ", 1)[0], *lines[index + 1:]])


def test_the_server_takes_its_scorers_by_name(live_server, tiny_model, tmp_path, capsys):
    args = ["generate", PROMPT, *SMALL, "--n", "2", "--model", str(tiny_model), "--server", live_server.url,
            "--out", str(tmp_path)]
    assert main([*args, "--scorer", f"clip={tmp_path}:1"]) == 2  # a file: refused before anything is sent
    assert "--scorer with --server: give scorers by name and weight" in capsys.readouterr().err
    assert main([*args, "--scorer", "aesthetic:1"]) == 2  # not among the server's scorers: its reason
    assert "the server refused the request" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_servers_default_decoder_does_not_change_a_clients_files(live_server, tiny_model, tmp_path, capsys):
    local, remote = tmp_path / "local", tmp_path / "remote"
    common = ["generate", PROMPT, *SMALL, "--no-rerank", "--model", str(tiny_model)]
    assert main([*common, "--device", "cpu", "--out", str(local)]) == 0  # the full VAE decoder, the default
    live_server.engine.vae_decoder = "TAESD"  # as `sd-app serve --vae-decoder TAESD` starts it
    try:
        assert main([*common, "--server", live_server.url, "--out", str(remote)]) == 0
    finally:
        live_server.engine.vae_decoder = "Full"
    capsys.readouterr()
    assert _files(local) and _files(remote) == _files(local)


def test_the_client_imports_no_torch(live_server, tiny_model, tmp_path):
    code = (
        "import json, sys; from sd_app.cli import main; "
        f"rc = main(['generate', 'a red square', *{SMALL!r}, '--model', {str(tiny_model)!r}, "
        f"'--server', {live_server.url!r}, '--out', {str(tmp_path)!r}]); "
        "print(json.dumps([rc, sorted(m for m in ('torch', 'diffusers', 'transformers', 'gradio', 'numpy') "
        "if m in sys.modules)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [0, []]
    assert len(list(tmp_path.glob("*-11-a_red_square.png"))) == 1


def test_an_unreachable_server_is_one_clear_line(tmp_path, capsys):
    from tests.serve_fixtures import free_port

    url = f"http://127.0.0.1:{free_port()}"
    assert main(["generate", PROMPT, *SMALL, "--server", url, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the server at {url}/sdapi/v1/txt2img" in err and "sd-app serve" in err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


def test_what_the_server_refuses_is_reported_with_its_reason(live_server, tmp_path, capsys):
    args = ["generate", PROMPT, *SMALL, "--server", live_server.url, "--out", str(tmp_path)]
    assert main([*args, "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "the server refused the request (422)" in err and "no-such-model" in err
    assert main([*args, "--device", "cpu"]) == 2  # the server's choice, not the client's
    assert "--device is the server's setting" in capsys.readouterr().err
    assert main([*args, "--steps", "0"]) == 2  # checked here, before anything is sent
    assert "steps" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def auth_server(serve_engine):
    from sd_app.server import create_app
    from tests.serve_fixtures import start_server

    url, server, thread = start_server(create_app(serve_engine, credentials={"alice": "s3cret"}))
    yield url
    server.should_exit = server.force_exit = True
    thread.join(timeout=10)


def test_auth_from_the_option_or_the_url(auth_server, tiny_model, tmp_path, capsys):
    args = ["generate", PROMPT, *SMALL, "--model", str(tiny_model), "--out", str(tmp_path)]
    assert main([*args, "--server", auth_server]) == 2
    assert "requires auth (pass --server-auth USER:PASSWORD)" in capsys.readouterr().err
    assert main([*args, "--server", auth_server, "--server-auth", "alice:wrong"]) == 2
    assert "wrong user or password" in capsys.readouterr().err
    assert main([*args, "--server", auth_server, "--server-auth", "alice:s3cret"]) == 0
    with_userinfo = auth_server.replace("http://", "http://alice:s3cret@")
    assert main([*args, "--server", with_userinfo]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_the_cold_generate_path_imports_only_what_it_runs(tiny_model, tiny_clip, tmp_path):
    """The process's own ``sd-app generate`` (main() with argv None) trims its imports (sd_app.lean_imports),
    runs without the cyclic garbage collector and ends without the interpreter's teardown (sd_app.lifetime):
    the atexit handlers still run, the lines are all written and the exit status is the command's."""
    never = ["gradio", "matplotlib", "torchmetrics", "peft", "sd_app.api", "sd_app.ui",
             "diffusers.models.unets.unet_3d_condition", "diffusers.models.transformers.transformer_flux"]
    code = (
        "import atexit, gc, json, sys; from sd_app.cli import main\n"
        "def report():\n"
        f"    loaded = sorted(m for m in {never!r} if sys.modules.get(m) is not None)\n"
        "    from diffusers.models.unets import UNet1DModel\n"  # a deferred package still answers every name
        "    print(json.dumps([loaded, UNet1DModel.__name__, gc.isenabled()]))\n"
        "atexit.register(report)\n"
        f"sys.argv = ['sd-app', 'generate', 'a red square', *{SMALL!r}, '--model', {str(tiny_model)!r}, "
        f"'--n', '2', '--reranker', {str(tiny_clip)!r}, '--device', 'cpu', '--out', {str(tmp_path)!r}]\n"
        "main()\n"
        "print('main returned')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == [[], "UNet1DModel", False] and "main returned" not in out.stdout
    assert len(lines) == 3 and all("CLIP score" in line for line in lines[:2])  # both file lines, flushed
    assert len(list(tmp_path.glob("*.png"))) == 2 and " written to " in out.stderr
    bad = subprocess.run([sys.executable, "-c", code.replace("'--n', '2'", "'--n', '0'")], capture_output=True,
                         text=True, cwd=REPO)
    assert bad.returncode == 2 and "sd-app: error: --n must be" in bad.stderr


def _interrupted_answer(stopped_at_step: list[int | None]) -> dict:
    """An sd-app server's txt2img answer for a job interrupted with these images (A1111's shape)."""
    import base64
    import io

    from PIL import Image

    def png() -> str:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    count = len(stopped_at_step)
    texts = [f"{PROMPT}\nSteps: 2, Sampler: Euler, Seed: {11 + i}" +
             (f", Stopped at step: {step} of 2" if step is not None else "") for i, step in enumerate(stopped_at_step)]
    info = {"all_seeds": [11 + i for i in range(count)], "infotexts": texts, "interrupted": True,
            "stopped_at_step": stopped_at_step, "sd_model_name": "tiny"}
    return {"images": [png() for _ in range(count)], "parameters": {}, "info": json.dumps(info)}


def test_an_interrupted_server_job_writes_what_it_made_and_says_so(monkeypatch, tmp_path, capsys):
    """The server answers an interrupted job with its finished images and the stopped ones (A1111): the
    client writes them and says how many were stopped early; with no image at all, one clear error line."""
    from sd_app import remote

    monkeypatch.setattr(remote, "post_json", lambda *args, **kwargs: _interrupted_answer([None, 1]))
    assert main(["generate", PROMPT, "--server", "http://127.0.0.1:9", "--n", "2", "--out", str(tmp_path),
                 *SMALL]) == 0
    err = capsys.readouterr().err
    assert len(list(tmp_path.glob("*.png"))) == 2
    assert "note: the job was interrupted on the server (POST /sdapi/v1/interrupt): 1 of the 2 image(s)" in err
    assert "best first by" not in err  # nothing was scored
    answer = _interrupted_answer([None, 1])
    answer["info"] = json.dumps({**json.loads(answer["info"]), "reranker": "clip-tiny", "rerank_scores": [31.5, None]})
    monkeypatch.setattr(remote, "post_json", lambda *args, **kwargs: answer)
    assert main(["generate", PROMPT, "--server", "http://127.0.0.1:9", "--n", "2", "--out", str(tmp_path / "ranked"),
                 *SMALL]) == 0
    assert "best first by clip-tiny" in capsys.readouterr().err
    stopped = _interrupted_answer([1, 1])
    stopped["info"] = json.dumps({**json.loads(stopped["info"]), "reranker": "clip-tiny",
                                  "rerank_scores": [None, None]})
    monkeypatch.setattr(remote, "post_json", lambda *args, **kwargs: stopped)
    assert main(["generate", PROMPT, "--server", "http://127.0.0.1:9", "--n", "2", "--out", str(tmp_path / "stopped"),
                 *SMALL]) == 0
    err = capsys.readouterr().err
    assert "in generation order" in err and "best first" not in err
    monkeypatch.setattr(remote, "post_json", lambda *args, **kwargs: _interrupted_answer([]))
    assert main(["generate", PROMPT, "--server", "http://127.0.0.1:9", "--out", str(tmp_path / "none"),
                 *SMALL]) != 0
    assert "interrupted (POST /sdapi/v1/interrupt) on the server before its first step" in capsys.readouterr().err
    skipped = _interrupted_answer([])
    skipped["info"] = json.dumps({**json.loads(skipped["info"]), "interrupted": False})  # a skip is no interrupt
    monkeypatch.setattr(remote, "post_json", lambda *args, **kwargs: skipped)
    assert main(["generate", PROMPT, "--server", "http://127.0.0.1:9", "--out", str(tmp_path / "none"),
                 *SMALL]) != 0
    assert "skipped (POST /sdapi/v1/skip) on the server before its first step" in capsys.readouterr().err
