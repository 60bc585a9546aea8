"""`sd-app batch`: prompts files, exactly-once manifest, and a 2-process accelerate run killed and restarted."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pipelines.generation.request import GenerationRequest
from sd_app.batch import MANIFEST, Job, job_ids, read_done, read_prompts, remove_leftovers, repair_manifest
from sd_app.metadata import parse_parameters

BASE = GenerationRequest(steps=2, width=64, height=64)


def test_read_prompts_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n# a comment\n  a blue square  \n")
    assert [r.prompt for r in read_prompts(txt, BASE)] == ["a red circle", "a blue square"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "seed": 4, "n": 2}\n\n{"prompt": "b", "negative_prompt": "c"}\n')
    first, second = read_prompts(jsonl, BASE)
    assert (first.seed, first.n, first.steps) == (4, 2, 2) and second.negative_prompt == "c"
    txt.write_bytes("\ufeffa red circle\n".encode())  # saved by Notepad: a byte order mark first
    assert [r.prompt for r in read_prompts(txt, BASE)] == ["a red circle"]
    txt.write_bytes(b"a caf\xe9\n")  # Latin-1
    with pytest.raises(ValueError, match=r"p.txt: not UTF-8 text \(byte 5"):
        read_prompts(txt, BASE)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "steps": 0}\n', r"p.jsonl:2: steps must be between 1 and 150"),
        ("p.jsonl", '{"prompt": "a", "colour": 1}\n', r"p.jsonl:1: unknown field\(s\) colour"),
        ("p.jsonl", "not json\n", r"p.jsonl:1: "),
        ("p.txt", "\n# only a comment\n", "no prompts found"),
        ("p.csv", "a\n", "must end in .txt or .jsonl"),
    ],
)
def test_bad_prompts_files_name_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_prompts(path, BASE)


def test_a_clip_skip_beyond_the_models_layers_fails_before_any_job_runs(tiny_model, tiny_pipe, tmp_path, capsys):
    """The largest clip skip comes from the model's config (no weights read) and is checked with the other
    per-line validation: a bad third line stops the batch before the first two are generated."""
    from pipelines.models.loading import text_encoder_layers
    from pipelines.models.shipped import EMBEDDED_MODEL_DIR
    from sd_app.cli import main

    layers = tiny_pipe.components.text_encoder.config.num_hidden_layers  # what loading builds: 2
    assert text_encoder_layers(tiny_model) == layers
    assert text_encoder_layers("embedded") == json.loads(
        (EMBEDDED_MODEL_DIR / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    assert text_encoder_layers(single) == 12  # a single SD 1.x file is built with SD 1.x's CLIP ViT-L/14
    prompts_file, out = tmp_path / "p.jsonl", tmp_path / "out"
    prompts_file.write_text('{"prompt": "a"}\n{"prompt": "b", "clip_skip": 2}\n'
                            f'{{"prompt": "c", "clip_skip": {layers + 1}}}\n')
    with pytest.raises(ValueError, match=rf"p.jsonl:3: clip_skip must be between 1 and {layers} \(this model's "):
        read_prompts(prompts_file, BASE, layers)
    assert main(_batch(prompts_file, out, tiny_model)) == 2
    assert f"p.jsonl:3: clip_skip must be between 1 and {layers}" in capsys.readouterr().err
    assert not list(out.glob("*.png")) and not (out / MANIFEST).exists()  # no job ran
    (tmp_path / "p.txt").write_text("a\n")
    assert main([*_batch(tmp_path / "p.txt", out, tiny_model), "--clip-skip", str(layers + 1)]) == 2
    assert f"--clip-skip must be between 1 and {layers}" in capsys.readouterr().err


@pytest.fixture
def network_folder(tmp_path, tiny_model):
    """An A1111 folder with a LoRA and an embedding that fit the tiny model, and one of each defect."""
    import torch
    from safetensors.torch import save_file

    from pipelines.models.loading import text_encoder_width

    width = text_encoder_width(tiny_model)
    loras, embeddings = tmp_path / "webui" / "models" / "Lora", tmp_path / "webui" / "embeddings"
    for folder in (loras / "a", loras / "b", embeddings):
        folder.mkdir(parents=True)
    down = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    save_file({down: torch.zeros(2, width)}, str(loras / "fits.safetensors"),
              metadata={"ss_base_model_version": "sd_v1"})
    save_file({down: torch.zeros(2, 2048)}, str(loras / "xl.safetensors"),
              metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    for seed, twin in enumerate((loras / "a" / "twin.safetensors", loras / "b" / "twin.safetensors")):
        save_file({down: torch.full((2, width), float(seed))}, str(twin))  # one name, two different files
    (loras / "pickled.ckpt").write_bytes(b"pickle")
    save_file({"emb_params": torch.zeros(2, width)}, str(embeddings / "fitword.safetensors"))
    save_file({"emb_params": torch.zeros(2, width + 8)}, str(embeddings / "wideword.safetensors"))
    (embeddings / "pickword.pt").write_bytes(b"pickle")
    return tmp_path / "webui"


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "x <lora:nosuch:1>"}', "p.jsonl:2: no lora named 'nosuch' in the model folders"),
    ('{"prompt": "x <lora:twin:1>"}', "p.jsonl:2: lora name 'twin' is ambiguous"),
    ('{"prompt": "x <lora:pickled:1>"}', "pickled.ckpt: refused"),
    ('{"prompt": "x <lora:xl:0.5>"}', "xl.safetensors: a LoRA for another base (SDXL); this model is SD 1.x"),
    ('{"prompt": "x <hypernet:fits:1>"}', "p.jsonl:2: <hypernet:fits:1>: extra network type 'hypernet' is not"),
    ('{"prompt": "x <lora:fits:lots>"}', "p.jsonl:2: <lora:fits:lots>: weight 'lots' is not a number"),
    ('{"prompt": "x", "negative_prompt": "<lora:fits:1>"}', "p.jsonl:2: negative_prompt: <lora:...> tags belong in"),
    ('{"prompt": "x pickword"}', "pickword.pt: embedding 'pickword' is in the prompt but refused"),
    ('{"prompt": "x", "negative_prompt": "wideword"}', "wideword.safetensors: embedding of width"),
])
def test_a_lines_loras_and_embeddings_are_checked_before_any_job_runs(tiny_model, network_folder, tmp_path, capsys,
                                                                       line, message):
    """A LoRA or embedding a line could not use stops the batch with file:line before the first job is made."""
    from sd_app.cli import main

    prompts_file, out = tmp_path / "p.jsonl", tmp_path / "out"
    prompts_file.write_text(f'{{"prompt": "good one <lora:fits:0.5> fitword"}}\n{line}\n{{"prompt": "good two"}}\n')
    assert main([*_batch(prompts_file, out, tiny_model), "--models-dir", str(network_folder)]) == 2
    err = capsys.readouterr().err
    assert message in err and "p.jsonl:2: " in err and len(err.strip().splitlines()) == 1, err
    assert not list(out.glob("*.png")) and not (out / MANIFEST).exists()  # line 1 was not made either


def test_network_checker_passes_what_fits_and_reads_each_file_once(tiny_model, network_folder, monkeypatch):
    import pipelines.models.network_checks as checks
    from pipelines.models.library import ModelLibrary
    from pipelines.models.loading import text_encoder_width

    checker = checks.NetworkChecker(ModelLibrary([network_folder], shipped=False), text_encoder_width(tiny_model))
    read = []
    real = checks.read_header
    monkeypatch.setattr(checks, "read_header", lambda path: read.append(path.name) or real(path))
    for _ in range(3):
        checker.check("a <lora:fits:1> and fitword, <lora:fits:0.2>", "not fitword")
    assert sorted(read) == ["fits.safetensors", "fitword.safetensors"]


@pytest.mark.parametrize(("args", "message"), [
    (["--strength", "0.5"], "--strength has no effect without --init-image or a hires fix"),
    (["--hires-scale", "2", "--hires-size", "128x128"], "--hires-scale has no effect with --hires-size"),
    (["--no-rerank", "--keep", "1"], "--keep has no effect without reranking"),
])
def test_flags_with_no_effect_are_refused_as_by_generate(tmp_path, capsys, args, message):
    from sd_app.cli import main

    prompts_file, out = tmp_path / "p.txt", tmp_path / "out"
    prompts_file.write_text("a\n")
    assert main(["batch", str(prompts_file), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before anything was made


def test_job_ids_follow_content_not_line_numbers():
    identity = {"model_hash": "abc", "reranker": None}
    first = job_ids([GenerationRequest(prompt="x"), GenerationRequest(prompt="y")], identity)
    edited = job_ids([GenerationRequest(prompt="new"), GenerationRequest(prompt="x"), GenerationRequest(prompt="y")],
                     identity)
    assert edited[1:] == first  # a line inserted above changes nobody else's id
    twice = job_ids([GenerationRequest(prompt="x"), GenerationRequest(prompt="x")], identity)
    assert twice == [first[0], first[0] + "r2"]  # a repeated prompt is made twice
    assert job_ids([GenerationRequest(prompt="x", steps=5)], identity)[0] != first[0]
    assert job_ids([GenerationRequest(prompt="x")], {**identity, "model_hash": "def"})[0] != first[0]


def _batch(prompts_file: Path, out: Path, model: Path) -> list[str]:
    return ["batch", str(prompts_file), "--out", str(out), "--model", str(model), "--no-rerank", "--steps", "2",
            "--width", "64", "--height", "64", "--seed", "7", "--sampler", "Euler"]


def test_editing_the_prompts_file_regenerates_only_what_changed(tiny_model, tmp_path):
    from sd_app.cli import main

    prompts_file, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts_file.write_text("a red circle\na blue square\n")
    assert main(_batch(prompts_file, out, tiny_model)) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    prompts_file.write_text("a green star\na red circle\na blue square\na yellow triangle\n")
    assert main(_batch(prompts_file, out, tiny_model)) == 0
    lines = _manifest_lines(out)
    assert sorted(line["prompt"] for line in lines) == sorted(
        ["a red circle", "a blue square", "a green star", "a yellow triangle"]
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name in before} == before  # untouched


def test_two_launches_on_one_folder_share_the_work(tiny_model, tmp_path):
    prompts_file, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts = [f"prompt number {i}" for i in range(8)]
    prompts_file.write_text("\n".join(prompts) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())}
    command = [sys.executable, "-m", "sd_app.cli", *_batch(prompts_file, out, tiny_model)]
    launches = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [launch.communicate(timeout=240)[1] for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], logs
    lines = _manifest_lines(out)
    assert sorted(line["prompt"] for line in lines) == sorted(prompts)  # each job once, by one of them
    generated = [int(re.search(r"(\d+) generated", log).group(1)) for log in logs]
    assert sum(generated) == len(prompts), logs  # no job was generated twice
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(name for line in lines for name in line["files"])  # nobody deleted the other's files


def test_torn_manifest_line_and_leftovers_are_cleaned(tmp_path):
    (tmp_path / MANIFEST).write_text('{"job": "00000-aaa"}\n{"job": "00001-b')
    assert read_done(tmp_path) == {"00000-aaa"}
    repair_manifest(tmp_path)
    assert (tmp_path / MANIFEST).read_text() == '{"job": "00000-aaa"}\n'
    job = Job(1, GenerationRequest(prompt="x"), "00001-bbb")
    for name in ("00001-bbb-0-5-x.png", ".tmp-00001-bbb-1-6-x-k3j9.png", "00000-aaa-0-5-x.png"):
        (tmp_path / name).write_bytes(b"")
    remove_leftovers(tmp_path, job)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00000-aaa-0-5-x.png"] and not list(
        tmp_path.glob(".tmp-*")
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(args: list[str], prompts: Path, out: Path, model: Path, log: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *args,
        "-m",
        "sd_app.cli",
        "batch",
        str(prompts),
        "--out",
        str(out),
        "--model",
        str(model),
        "--no-rerank",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "7",
        "--sampler",
        "Euler",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())}
    with open(log, "ab") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _manifest_lines(out: Path) -> list[dict]:
    path = out / MANIFEST
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_two_process_run_killed_midway_then_restarted_makes_each_prompt_once(tiny_model, tmp_path):
    prompts = [f"prompt number {i}" for i in range(20)]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    out, log = tmp_path / "out", tmp_path / "launch.log"
    # Two real CPU processes: accelerate's torchrun launcher (--multi_gpu) on a machine without GPUs; the
    # batch sees no CUDA and runs its process group on CPU (gloo). (--cpu alone starts one process.)
    port = str(free_port())
    first = _launch(
        ["--multi_gpu", "--num_processes", "2", "--main_process_port", port], prompts_file, out, tiny_model, log
    )
    try:
        deadline = time.monotonic() + 150
        while {line["rank"] for line in _manifest_lines(out)} != {0, 1}:  # both processes have produced
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    killed_at = _manifest_lines(out)
    assert len(killed_at) < len(prompts), "the first run finished before it could be killed"
    assert {line["rank"] for line in killed_at} <= {0, 1}
    # Restart as the issue writes it; accelerate's --cpu launcher runs it as one process.
    second = _launch(["--cpu", "--num_processes", "2"], prompts_file, out, tiny_model, log)
    assert second.wait(timeout=240) == 0, log.read_text()[-3000:]

    lines = _manifest_lines(out)
    assert sorted(line["index"] for line in lines) == list(range(len(prompts)))  # each prompt exactly once
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(name for line in lines for name in line["files"])  # nothing orphaned or missing
    assert not list(out.glob(".tmp-*"))
    for line in lines:
        assert line["prompt"] == prompts[line["index"]] and line["seeds"] == [7]
        params = parse_parameters(Image.open(out / line["files"][0]).info["parameters"])
        assert params["prompt"] == prompts[line["index"]] and params["Seed"] == "7"

    # A third run has nothing left to do.
    third = _launch([], prompts_file, out, tiny_model, log)
    assert third.wait(timeout=240) == 0
    assert len(_manifest_lines(out)) == len(prompts)
    assert "0 generated, 20 already done" in log.read_text()
