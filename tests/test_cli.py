"""`sd-app generate | info` as a user runs them: files, metadata, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from sd_app.cli import main
from sd_app.metadata import parse_parameters


def test_generate_writes_pngs_with_parameters(tiny_model, tmp_path, capsys):
    out = tmp_path / "images"
    code = main([
        "generate", "a red circle", "--negative", "blurry", "--steps", "3", "--seed", "77", "--width", "64",
        "--height", "64", "--n", "2", "--model", str(tiny_model), "--out", str(out), "--no-rerank",
        "--sampler", "Euler a",
    ])
    assert code == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-77-a_red_circle.png", "00001-78-a_red_circle.png"]
    printed = capsys.readouterr().out
    assert str(files[0]) in printed and "seed 78" in printed
    params = parse_parameters(Image.open(files[1]).info["parameters"])
    assert params["Seed"] == "78" and params["Steps"] == "3" and params["Sampler"] == "Euler a"
    assert params["negative_prompt"] == "blurry" and params["Model"] == "tiny-sd"


def test_random_seed_is_written_into_metadata(tiny_model, tmp_path):
    assert main(["generate", "x", "--steps", "1", "--width", "64", "--height", "64", "--model",
                 str(tiny_model), "--out", str(tmp_path), "--no-rerank"]) == 0
    (file,) = tmp_path.glob("*.png")
    seed = file.name.split("-")[1]
    assert parse_parameters(Image.open(file).info["parameters"])["Seed"] == seed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "500"], "width must be a positive multiple of 8, got 500"),
        (["--steps", "0"], "steps must be between 1 and 150, got 0"),
        (["--seed", "-5"], "seed must be -1 (random)"),
        (["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
        (["--cfg", "nan"], "cfg_scale must be a finite number"),
        (["--n", "17"], "n must be between 1 and 16, got 17"),
        (["--sampler", "Euler z"], "unknown sampler 'Euler z'; choose one of: DPM++ 2M, DPM++ 2M Uniform"),
        (["--model", "/no/such/model"], "model not found: /no/such/model"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, capsys):
    with pytest.raises(SystemExit) if "invalid int" in message else _no_exit():
        code = main(["generate", "x", *args])
        assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_console_script_error_has_no_traceback(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"x")
    result = subprocess.run(
        [sys.executable, "-m", "sd_app.cli", "generate", "x", "--model", str(tmp_path / "model.ckpt")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "never loaded" in result.stderr and "Traceback" not in result.stderr


def test_info_lists_samplers_and_models(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "DPM++ 2M" in out and "Euler a Karras" in out and "UniPC" in out and "embedded" in out


def test_generate_does_not_import_gradio():
    code = "import sys, sd_app.cli, sd_app.engine; print('gradio' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False"


def test_out_and_device_are_checked_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import sd_app.engine

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(sd_app.engine.Engine, "pipeline", no_loading)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    cases = [
        (["--out", str(a_file)], f"--out {a_file}: exists and is not a folder"),
        (["--device", "nosuchdevice"], "--device 'nosuchdevice': not a device; use cpu, cuda, cuda:N or mps"),
        (["--device", "cuda:7"], "--device cuda:7: "),
    ]
    import os

    if os.geteuid() != 0:  # root writes anywhere
        cases.append((["--out", str(read_only / "sub")], f"no permission to write in {read_only}"))
    for args, message in cases:
        assert main(["generate", "x", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_long_prompt_says_its_tokens_and_chunks(tiny_model, tmp_path):
    prompt = " ".join(["red circle"] * 150)  # 300 tokens
    result = subprocess.run(
        [sys.executable, "-m", "sd_app.cli", "generate", prompt, "--steps", "1", "--width", "64", "--height", "64",
         "--model", str(tiny_model), "--out", str(tmp_path), "--no-rerank", "--seed", "1"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert "the prompt has 300 tokens; it was encoded in 4 chunks of 75" in result.stderr
    assert "Token indices sequence length" not in result.stderr and "Loading weights" not in result.stderr
    assert "1 of 1 image(s) written to" in result.stderr
