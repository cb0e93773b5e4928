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


def test_fit_main_job_runs_a_ptq_recipe_with_tensorboard(tmp_path, capsys):
    run_quick_fit(
        tmp_path, "qdrop_w4a4", "--set", "ptq.iters=5", "--set", "ptq.num_samples=128", "--logger", "tensorboard"
    )
    out = capsys.readouterr().out
    assert "quantized (qdrop_w4a4)" in out
    assert "4/4" in out
    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "ptq_test/top1_agreement" in acc.Tags()["scalars"]


def test_fit_main_job_logs_to_wandb_offline(tmp_path, capsys):
    from pathlib import Path

    from wandb_records import history_keys

    run_quick_fit(tmp_path, "minmax_w8a8", "--logger", "wandb")
    assert "quantized (minmax_w8a8)" in capsys.readouterr().out
    run_file = next(Path(tmp_path).rglob("wandb/offline-run-*/run-*.wandb"))
    keys = history_keys(run_file)
    assert "model/compression" in keys
    assert any(k.startswith("quant/") and k.endswith("weight_sqnr_db") for k in keys)


def test_callback_declared_in_a_lightning_cli_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    from lightning_quant import QuantizationAwareTraining
    from lightning_quant.examples import DigitsDataModule, ImageClassifier

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_epochs: 1\n"
        "  limit_train_batches: 2\n"
        "  limit_val_batches: 1\n"
        "  logger: false\n"
        "  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n"
        "  callbacks:\n"
        "    - class_path: lightning_quant.QuantizationAwareTraining\n"
        "      init_args:\n"
        "        recipe: lsq_w4a4\n"
        "        weight_bits: 3\n"
        "        overrides: [diagnostics.summary=false]\n"
    )
    cli = LightningCLI(
        ImageClassifier, DigitsDataModule, args=["fit", "--config", str(config)], save_config_callback=None
    )
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, QuantizationAwareTraining))
    assert callback.recipe.weights.bits == 3
    assert callback.quant_steps == 2
    assert cli.model.net.features[3].weight_quantizer.bits == 3
