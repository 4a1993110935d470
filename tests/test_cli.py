import subprocess
import sys

import pytest

import tformer
from tformer.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "'auto' runs 'sdpa' on cpu" in out
    for name in list(tformer.NORMS) + list(tformer.PLACEMENTS):
        assert name in out


def test_grid_runs_every_combination(capsys):
    assert main(["grid", "--d-model", "16", "--layers", "2"]) == 0
    out = capsys.readouterr().out
    n = len(tformer.NORMS) * len(tformer.PLACEMENTS)
    assert f"{n} of {n} combinations ran" in out
    header = next(line for line in out.splitlines() if line.startswith("| norm"))
    assert all(p in header for p in tformer.PLACEMENTS)
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| norm")]
    assert [r.split("|")[1].strip() for r in rows] == list(tformer.NORMS)
    post_layernorm = float(rows[0].split("|")[2])
    assert post_layernorm == pytest.approx(1.0, abs=0.01)  # Post-LN ends every block on a norm


def test_grid_with_rotary_positions_and_grouped_query_attention(capsys):
    assert main(["grid", "--d-model", "16", "--layers", "2", "--kv-heads", "1", "--qk-norm", "full", "--rope"]) == 0
    n = len(tformer.NORMS) * len(tformer.PLACEMENTS)
    assert f"{n} of {n} combinations ran" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["grid", "--help"]])
def test_help(argv):
    result = subprocess.run([sys.executable, "-m", "tformer", *argv], capture_output=True, text=True)
    assert result.returncode == 0
    assert "usage: tformer" in result.stdout


def test_missing_command_is_an_error():
    result = subprocess.run([sys.executable, "-m", "tformer"], capture_output=True, text=True)
    assert result.returncode == 2 and "required: COMMAND" in result.stderr


def test_generate_and_inspect_commands(capsys):
    from pathlib import Path

    run = Path(__file__).resolve().parent.parent / "checkpoints" / "lm_python_docs"
    assert main(["generate", str(run), "--prompt", "Class ", "--max-new-tokens", "40", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Class ")
    assert main(["inspect", str(run / "model.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "model:           LanguageModel" in out and "placement: pre" in out and "parameters:" in out


def test_inspect_reports_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    assert main(["inspect", str(bad)]) == 2
    assert "too short" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "study", "generate", "inspect"])
def test_every_command_has_help(command):
    result = subprocess.run([sys.executable, "-m", "tformer", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and f"usage: tformer {command}" in result.stdout


def test_version(capsys):
    import tformer
    from tformer.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"tformer {tformer.__version__}"
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert tomllib.loads(pyproject.read_text())["project"]["version"] == tformer.__version__
