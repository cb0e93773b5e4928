import subprocess
import sys

import pytest

from lightning_quant.cli import main


def test_recipes_command_lists_descriptions(capsys):
    main(["recipes"])
    out = capsys.readouterr().out
    assert "lsq_w4a4" in out
    assert "LSQ fine-tuning at 4-bit" in out


def test_help_on_every_command():
    for args in ([], ["fit"], ["recipes"]):
        proc = subprocess.run(
            [sys.executable, "-m", "lightning_quant", *args, "--help"], capture_output=True, text=True
        )
        assert proc.returncode == 0
        assert "usage: lightning-quant" in proc.stdout


def run_quick_fit(tmp_path, recipe, *extra):
    """The main job with one fine-tuning epoch and a 2-epoch float baseline cached under tmp_path/c."""
    args = ["fit", "--recipe", recipe, "--epochs", "1", "--float-epochs", "2"]
    main([*args, "--cache-dir", str(tmp_path / "c"), "--output-dir", str(tmp_path / "logs"), *extra])


def test_fit_main_job_prints_result_table(tmp_path, capsys):
    run_quick_fit(tmp_path, "minmax_w8a8")
    out = capsys.readouterr().out
    assert "test accuracy" in out
    assert "compression" in out
    assert "quantized (minmax_w8a8)" in out
    assert list((tmp_path / "c").glob("*.pt"))
    # second run loads the cached float baseline
    run_quick_fit(tmp_path, "minmax_w8a8", "--set", "weights.bits=6")
    out = capsys.readouterr().out
    assert "loaded from" in out
    assert "6/8" in out


def test_fit_with_bad_recipe_fails_before_training(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("description: x\nactivations:\n  granularity: per_channel\n")
    with pytest.raises(SystemExit, match=r"bad\.yaml: activations\.granularity='per_channel'"):
        main(["fit", "--recipe", str(bad), "--cache-dir", str(tmp_path)])


def test_fit_with_user_model_and_data_by_import_path(tmp_path, capsys):
    model, data = "lightning_quant.examples:ImageClassifier", "lightning_quant.examples.digits:DigitsDataModule"
    run_quick_fit(tmp_path, "lsq_w8a8", "--model", model, "--data", data)
    assert "quantized (lsq_w8a8)" in capsys.readouterr().out
