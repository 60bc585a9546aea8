"""The Python API: README's examples run as written, the package exports, and bad arguments get a clear
ValueError naming them before any model loads."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pipelines
from pipelines.generation.request import GenerationRequest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_examples() -> list[str]:
    """The ```python blocks README.md marks with ``<!-- python-example -->``."""
    return re.findall(r"<!-- python-example -->\n```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_python_examples():
    assert len(readme_python_examples()) >= 3


@pytest.mark.parametrize("index", range(3))
def test_readme_python_example_runs_as_written(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = readme_python_examples()[index]
    exec(compile(code, f"README.md python example {index + 1}", "exec"), {"__name__": "__readme__"})  # noqa: S102
    printed = capsys.readouterr().out
    if index == 0:  # two images, seeds 1 and 2, written where the example says
        assert sorted(p.name for p in tmp_path.glob("*.png")) == ["circle-1.png", "circle-2.png"]
    elif index == 1:  # progress for each of the 20 steps of the 4 candidates' batch, then the best first
        assert "step 20/20" in printed
        seed, score, order = printed.strip().splitlines()[-1].split(" ", 2)
        assert sorted(eval(order)) == [7, 8, 9, 10] and int(seed) == eval(order)[0]  # noqa: S307
    else:
        assert re.search(r"hexagon: [0-9a-f]{12}", printed)


def test_the_package_exports_its_public_names_without_loading_torch_first():
    import subprocess

    code = "import sys, pipelines; print('torch' in sys.modules); pipelines.GenerationRequest; print(pipelines.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "False"
    assert sorted(pipelines.__all__) == sorted(pipelines._EXPORTS)
    for name in pipelines.__all__:
        assert getattr(pipelines, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'load_pipelin'"):
        pipelines.load_pipelin  # noqa: B018


@pytest.mark.parametrize(("device", "message"), [
    ("tpu", r"device 'tpu': not a device; use cpu, cuda, cuda:N or mps"),
    ("cuda", r"device cuda: no CUDA device is available"),
    (3, r"device must be a string .* or a torch.device, got 3"),
])
def test_a_bad_device_is_refused_before_loading(device, message, monkeypatch):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from pipelines.models import loading

    monkeypatch.setattr(loading, "resolve_spec", lambda spec: pytest.fail("the model was looked up"))
    with pytest.raises(ValueError, match=message):
        pipelines.load_pipeline("embedded", device=device)
    with pytest.raises(ValueError, match=message):
        pipelines.ClipScorer.load("no-such-folder", device=device)  # the device is checked before the folder


@pytest.mark.parametrize(("dtype", "message"), [
    ("float16", r"dtype must be a torch.dtype, got the string 'float16'; use torch.float16"),
    (torch.int8, r"dtype must be one of torch.float32, torch.float16, torch.bfloat16, got torch.int8"),
])
def test_a_bad_dtype_is_refused_naming_dtype(dtype, message):
    with pytest.raises(ValueError, match=message):
        pipelines.load_pipeline("embedded", device="cpu", dtype=dtype)


def test_a_torch_device_is_accepted(tiny_model):
    pipe = pipelines.load_pipeline(tiny_model, device=torch.device("cpu"), dtype=torch.float32)
    assert pipe.device.type == "cpu"


def test_settings_that_are_not_a_request_get_a_clear_error_before_any_model_loads(tiny_pipe, tmp_path):
    from sd_app.engine import Engine

    engine = Engine(model="no-such-model", output_dir=tmp_path)
    for call in (lambda: engine.generate({"prompt": "x"}), lambda: pipelines.best_of_n(tiny_pipe, {"prompt": "x"}),
                 lambda: tiny_pipe({"prompt": "x"})):
        with pytest.raises(ValueError, match=r"request must be a GenerationRequest, got dict; build one with "
                                             r"GenerationRequest\(\*\*settings\)"):
            call()


def test_numpy_numbers_and_sampler_spellings_make_the_same_request():
    plain = GenerationRequest(prompt="x", seed=5, steps=4, cfg_scale=3.5, sampler="Euler a")
    numpy = GenerationRequest(prompt="x", seed=np.int64(5), steps=np.int32(4), cfg_scale=np.float32(3.5),
                              sampler=" euler  A ")
    assert numpy == plain and numpy.to_dict() == plain.to_dict()
    assert type(numpy.seed) is int and type(numpy.cfg_scale) is float
    with pytest.raises(ValueError, match="seed must be an integer"):
        GenerationRequest(seed=np.bool_(True))
