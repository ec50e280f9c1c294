"""generate.py: streams a completion from a converted tiny model and reports the depth used."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from retrofit.model.conversion import LayerChoice, convert


@pytest.fixture(scope="module")
def recurrent_dir(tmp_path_factory, tiny_llama_dir):
    out, _ = convert(tiny_llama_dir, tmp_path_factory.mktemp("gen") / "rec", LayerChoice([0, 1], [4, 5], [6, 7]),
                     dtype="float32", verify=False, mean_recurrence=3)
    return out


def load_generate():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_streams_and_reports_depth(recurrent_dir, capsys):
    gen = load_generate()
    assert gen.main([str(recurrent_dir), "--prompt", "Ava has 3 apples.", "--num_steps", "4", "--max_new_tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert "mean depth 4.00 iterations/token" in captured.err and "tokens in" in captured.err
    assert captured.out.strip()  # the completion was streamed to stdout
    assert gen.main([str(recurrent_dir), "--prompt", "Ava", "--max_new_tokens", "5", "--adaptive", "1e9", "--no_chat"]) == 0
    assert "mean depth 2.00" in capsys.readouterr().err  # exits at the first comparison


def test_generate_baseline_and_errors(tiny_llama_dir, tmp_path, capsys):
    gen = load_generate()
    assert gen.main([str(tiny_llama_dir), "--prompt", "Ava", "--max_new_tokens", "3"]) == 0
    assert "mean depth" not in capsys.readouterr().err
    assert gen.main([str(tiny_llama_dir), "--prompt", "Ava", "--num_steps", "2"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        gen.main([str(tmp_path), "--prompt", "x"])
    assert exit_info.value.code == 2 and "no config.json" in capsys.readouterr().err


@pytest.mark.slow  # inductor compiles the decode step (C++ on the CPU): about a minute
def test_generate_compile_streams_the_same_completion(recurrent_dir, capsys):
    gen = load_generate()
    argv = [str(recurrent_dir), "--prompt", "Ava has 3 apples.", "--num_steps", "2", "--max_new_tokens", "6", "--no_chat"]
    assert gen.main(argv) == 0
    eager = capsys.readouterr().out
    assert gen.main(argv + ["--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == eager and eager.strip() and "mean depth 2.00" in compiled.err


def test_generate_compile_errors(recurrent_dir, tiny_llama_dir, capsys):
    gen = load_generate()
    with pytest.raises(SystemExit) as exit_info:
        gen.main([str(recurrent_dir), "--prompt", "x", "--compile", "--adaptive", "1e-3"])
    assert exit_info.value.code == 2 and "--compile cannot be combined with --adaptive" in capsys.readouterr().err
    assert gen.main([str(tiny_llama_dir), "--prompt", "x", "--compile"]) == 2
    assert "need a recurrent checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_shell_wrapper(recurrent_dir):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "shells" / "generate.sh"), str(recurrent_dir), "Q: 2 + 3?",
                             "--max_new_tokens", "4", "--num_steps", "2"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "mean depth 2.00" in result.stderr


@pytest.mark.slow
def test_generate_without_a_terminal_never_asks_to_run_checkpoint_code(recurrent_dir):
    """stdin closed, no controlling terminal (a batch job): the tokenizer of a freshly converted
    checkpoint loads without transformers' remote-code prompt, and stderr is clean."""
    from tiny_components import stderr_noise

    result = subprocess.run([sys.executable, str(ROOT / "generate.py"), str(recurrent_dir), "--prompt", "Q: 2 + 3?",
                             "--max_new_tokens", "4", "--num_steps", "2"], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, start_new_session=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert stderr_noise(result.stderr) == []
    assert "mean depth 2.00" in result.stderr


def test_generate_runs_this_repos_model_code_unless_asked(recurrent_dir, tmp_path, capsys):
    """The modeling file copied beside the weights is not executed by default (a checkpoint from
    someone else could put anything there); --trust_remote_code runs it."""
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(recurrent_dir, tampered)
    marker = tmp_path / "checkpoint_code_ran"
    with open(tampered / "modeling_raven.py", "a") as handle:
        handle.write(f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    gen = load_generate()
    args = [str(tampered), "--prompt", "Ava", "--max_new_tokens", "2", "--num_steps", "2", "--no_chat"]
    assert gen.main(args) == 0 and not marker.exists()
    assert "mean depth 2.00" in capsys.readouterr().err
    assert gen.main(args + ["--trust_remote_code"]) == 0 and marker.read_text() == "ran"


def test_generate_cuda_without_a_gpu_is_a_one_line_error(recurrent_dir, capsys):
    """--device follows the one rule of every script here (retrofit.train.distributed.resolve_device)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    gen = load_generate()
    assert gen.main([str(recurrent_dir), "--prompt", "x", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "error: --device=cuda but no CUDA device is visible; use --device=cpu (or auto)\n"


@pytest.mark.parametrize("args, message", [
    (["--num_steps", "100000000"], "--num_steps must be in [1, 1024]"),
    (["--adaptive", "-1"], "--adaptive must be a threshold >= 0, got -1.0"),
    (["--dtype", "float128"], "invalid choice: 'float128'"),
    (["--sample", "--temperature", "0"], "--temperature must be > 0"),
    (["--sample", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
])
def test_generate_refuses_values_out_of_range(recurrent_dir, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        load_generate().main([str(recurrent_dir), "--prompt", "x", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_generate_devices_and_models_that_cannot_run_are_one_line_errors(recurrent_dir, tmp_path, capsys):
    import shutil

    gen = load_generate()
    assert gen.main([str(recurrent_dir), "--prompt", "x", "--device", "meta"]) == 2
    assert capsys.readouterr().err.startswith("error: --device=meta is not a device")
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(recurrent_dir, no_tokenizer)
    for path in no_tokenizer.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            path.unlink()
    assert gen.main([str(no_tokenizer), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {no_tokenizer} does not load") and err.count("\n") == 1, err
