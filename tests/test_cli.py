"""`sd-app generate | info` as a user runs them: files, metadata, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
        (["--width", "500"], "--width must be a positive multiple of 8, got 500"),
        (["--steps", "0"], "--steps must be between 1 and 150, got 0"),
        (["--seed", "-5"], "--seed must be -1 (random)"),
        (["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
        (["--cfg", "nan"], "--cfg must be a finite number"),
        (["--n", "17"], "--n must be between 1 and 16, got 17"),
        (["--hires-scale", "9"], "--hires-scale must be between 1 and 8, got 9"),
        (["--hires-scale", "2", "--hires-steps", "999"], "--hires-steps must be"),
        (["--negative", "\udfff"], "--negative is not valid Unicode"),
        # flags the others make meaningless are refused, not silently ignored
        (["--n", "2", "--no-rerank", "--keep", "1"], "--keep has no effect without reranking"),
        (["--no-rerank", "--score", "--rerank-by", "mixed"], "--score, --rerank-by have no effect without reranking"),
        (["--strength", "0.5"], "--strength has no effect without --init-image or a hires fix"),
        (["--hires-steps", "5"], "--hires-steps has no effect without a hires fix (--hires-scale or --hires-size)"),
        (["--mask-blur", "8"], "--mask-blur has no effect without --init-image"),
        (["--mask-blur", "4"], "--mask-blur has no effect without --init-image"),  # given, though it is the default
        (["--hires-steps", "0"], "--hires-steps has no effect without a hires fix"),
        (["--hires-scale", "2", "--hires-size", "256x256"], "--hires-scale has no effect with --hires-size (the size "
                                                            "wins, as A1111's hr_resize_x/y over hr_scale)"),
        (["--extra-rounds", "5"], "--extra-rounds has no effect without --min-score"),
        (["--server-auth", "a:b"], "--server-auth has no effect without --server"),
        (["--sampler", "Euler z"], "unknown sampler 'Euler z'; choose one of: DPM++ 2M, DPM++ 2M Uniform"),
        (["--model", "/no/such/model"], "model not found: /no/such/model"),
        (["--vae-decoder", "fast"], "--vae-decoder must be one of Full, TAESD, got 'fast'"),
        (["--scorer", "clip:abc"], "--scorer 'clip:abc': scorer weight must be a number, got 'clip:abc'"),
        (["--scorer", "clip:inf"], "--scorer 'clip:inf': scorer weight must be a number, got 'clip:inf'"),
        (["--min-score", "200"], "--min-score: minimum score for clip must be between 0 and 100"),
        (["--rerank-by", "mixed", "--min-score", "mixed=-1"], "minimum score for mixed must be between 0 and 100"),
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
    if Path("/proc/self").is_dir():  # writable by its permissions (as root), but no folder can be made in it
        cases.append((["--out", "/proc/sd-app-out"], "--out /proc/sd-app-out: cannot create the folder"))
    for command in ("generate", "batch"):
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("x\n")
        for args, message in cases:
            assert main([command, "x" if command == "generate" else str(prompts), *args]) == 2
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
@pytest.fixture
def init_files(tmp_path):
    from PIL import ImageDraw

    init = Image.new("RGB", (72, 64), (40, 80, 220))
    ImageDraw.Draw(init).ellipse((16, 12, 56, 52), fill=(220, 40, 40))
    init.save(tmp_path / "init.png")
    mask = Image.new("L", (36, 32), 0)
    ImageDraw.Draw(mask).rectangle((8, 6, 28, 26), fill=255)
    mask.save(tmp_path / "mask.png")
    Image.new("L", (72, 64), 0).save(tmp_path / "black.png")
    (tmp_path / "text.png").write_text("not an image")
    return tmp_path


def _generate(tiny_model, out, *args):
    return main(["generate", "a green circle", "--steps", "4", "--seed", "5", "--model", str(tiny_model),
                 "--out", str(out), "--no-rerank", *args])


def test_img2img_inpaint_outpaint_and_hires_from_the_command_line(tiny_model, init_files, capsys):
    out = init_files / "out"
    assert _generate(tiny_model, out, "--init-image", str(init_files / "init.png"), "--strength", "0.5") == 0
    assert _generate(tiny_model, out, "--init-image", str(init_files / "init.png"), "--mask",
                     str(init_files / "mask.png"), "--only-masked", "--mask-blur", "2", "--padding", "16") == 0
    assert "note: mask 36x32 resized to the init image's 72x64" in capsys.readouterr().err
    assert _generate(tiny_model, out, "--init-image", str(init_files / "init.png"), "--outpaint", "8",
                     "--outpaint-sides", "left,right", "--mask-blur", "3") == 0  # the border is the mask
    assert _generate(tiny_model, out, "--width", "64", "--height", "64", "--hires-scale", "1.5",
                     "--hires-upscaler", "Lanczos", "--hires-steps", "2") == 0
    files = sorted(out.glob("*.png"))
    params = [parse_parameters(Image.open(f).info["parameters"]) for f in files]
    sizes = [Image.open(f).size for f in files]
    assert sizes == [(72, 64), (72, 64), (88, 64), (96, 96)]  # init size (floored to 8), outpaint canvas, hires
    assert params[0]["Denoising strength"] == "0.5" and params[0]["Size"] == "72x64"
    assert params[1]["Inpaint area"] == "Only masked" and params[1]["Mask blur"] == "2"
    assert params[1]["Masked area padding"] == "16"
    assert params[2]["Masked content"] == "fill" and params[2]["Mask blur"] == "3"
    hires = (params[3]["Hires upscale"], params[3]["Hires steps"], params[3]["Hires upscaler"])
    assert hires == ("1.5", "2", "Lanczos")
    assert params[3]["Denoising strength"] == "0.7" and params[3]["Size"] == "64x64"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--init-image", "{dir}/text.png"], "--init-image {dir}/text.png is not a readable image"),
        (["--init-image", "{dir}/missing.png"], "--init-image {dir}/missing.png: no such file"),
        (["--init-image", "{dir}/init.png", "--mask", "{dir}/black.png"], "mask is all black: nothing to repaint"),
        (["--init-image", "{dir}/init.png", "--strength", "1.5"], "strength must be between 0 and 1, got 1.5"),
        (["--mask", "{dir}/mask.png"], "--mask needs --init-image"),
        (["--hires-scale", "0.5"], "--hires-scale must be between 1 and 8, got 0.5"),
        (["--hires-size", "big"], "--hires-size must look like 1024x768"),
        (["--init-image", "{dir}/init.png", "--hires-scale", "2"], "are for text to image"),
        (["--init-image", "{dir}/init.png", "--outpaint", "8", "--outpaint-sides", "up"], "--outpaint-sides must"),
        # flags that have no effect with the others are refused, not ignored
        (["--init-image", "{dir}/init.png", "--hires-steps", "5", "--hires-upscaler", "Lanczos"],
         "--hires-steps, --hires-upscaler have no effect without a hires fix (--hires-scale or --hires-size)"),
        (["--init-image", "{dir}/init.png", "--outpaint-sides", "left"], "--outpaint-sides has no effect without "
                                                                         "--outpaint"),
        *[(["--init-image", "{dir}/init.png", *flag], f"{flag[0]} has no effect without a mask (--mask, or the border "
                                                      "--outpaint repaints)")
          for flag in (["--only-masked"], ["--masked-content", "fill"], ["--mask-blur", "3"], ["--invert-mask"],
                       ["--padding", "8"])],
        (["--init-image", "{dir}/init.png", "--mask", "{dir}/mask.png", "--padding", "40"],
         "--padding has no effect without --only-masked"),
    ],
)
def test_bad_image_input_is_one_clear_line_and_writes_nothing(tiny_model, init_files, args, message, capsys):
    out = init_files / "out"
    code = _generate(tiny_model, out, *[a.format(dir=init_files) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and message.format(dir=init_files) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not list(out.iterdir())


def test_a_reader_that_goes_away_is_no_error(tmp_path):
    """`sd-app models --json | head -1`: the pipe closes under the writer; no error line, no traceback."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-m", "sd_app.cli", "models", "--json", "--no-hash"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # before it writes anything
    err = child.stderr.read().decode()
    assert child.wait(timeout=300) == 1 and err == ""


def test_library_warnings_are_one_line_notes(tiny_model, tmp_path):
    """LCM at CFG 5 warns (it was distilled for CFG 1-2): one 'sd-app: note:' line, no file path, no source line."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "sd_app.cli", "generate", "a red circle", "--model", str(tiny_model), "--sampler", "LCM",
         "--cfg", "5", "--steps", "2", "--width", "64", "--height", "64", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if "note:" in line]
    assert notes and all(line.startswith("sd-app: note: ") for line in notes), done.stderr
    assert "UserWarning" not in done.stderr and ".py:" not in done.stderr


def test_a_run_that_fails_after_the_output_check_leaves_no_empty_folder(tmp_path, capsys):
    """--out is made and test-written before any model loads, then removed again: a run stopped by a later error
    (here a missing model) leaves nothing behind; a folder that was there stays."""
    out = tmp_path / "new" / "nested"
    assert main(["generate", "x", "--model", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "model not found" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main(["generate", "x", "--model", str(tmp_path / "missing"), "--out", str(kept)]) == 2
    assert kept.is_dir() and not any(kept.iterdir())


@pytest.mark.parametrize(("args", "message"), [
    (["a cat <lora:nope:1>"], "no lora named 'nope'"),
    (["a cat", "--negative", "<lora:hexagon:1>"], "negative"),
    (["a cat", "--clip-skip", "6"], "--clip-skip must be between 1 and 4 (this model's text encoder has 4 layers)"),
])
def test_what_the_config_and_folders_tell_is_checked_before_the_model_loads(args, message, tmp_path, capsys,
                                                                            monkeypatch):
    import sd_app.engine

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(sd_app.engine.Engine, "pipeline", no_loading)
    assert main(["generate", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
