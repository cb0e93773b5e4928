import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lightning_quant
from lightning_quant.cli import main

CLI = str(Path(sys.executable).with_name("lightning-quant"))  # the console script: no working directory on sys.path


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
    assert "reused from the cache" in out
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
        "        overrides: diagnostics.summary=false\n"  # one string is one override
    )
    cli = LightningCLI(
        ImageClassifier, DigitsDataModule, args=["fit", "--config", str(config)], save_config_callback=None
    )
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, QuantizationAwareTraining))
    assert callback.recipe.weights.bits == 3
    assert callback.quant_steps == 2
    assert cli.model.net.features[3].weight_quantizer.bits == 3


def run_cli(cwd, *args):
    """The installed ``lightning-quant`` command in a fresh process, run from ``cwd``."""
    return subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_version():
    proc = run_cli(".", "--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"lightning-quant {lightning_quant.__version__}"


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appears if the loader runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_export_refuses_a_checkpoint_with_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "lightning_quant": {"recipe": _Payload(marker)}}, tmp_path / "evil.ckpt")
    proc = run_cli(tmp_path, "export", "--checkpoint", "evil.ckpt", "--recipe", "minmax_w8a8", "--output", "m.onnx")
    assert not marker.exists()  # nothing ran
    assert proc.returncode != 0
    assert "evil.ckpt' holds objects that are not allowed" in proc.stderr
    assert "(io.open)" in proc.stderr  # what was refused
    assert "Traceback" not in proc.stderr


def test_bad_model_path_and_export_suffix_fail_before_training(tmp_path):
    common = ["fit", "--cache-dir", str(tmp_path / "c"), "--output-dir", str(tmp_path / "logs")]
    with pytest.raises(SystemExit, match=r"'\./nope\.py:Net': there is no file './nope\.py'"):
        main([*common, "--model", "./nope.py:Net"])
    with pytest.raises(SystemExit, match=r"cannot tell the export format of 'out\.xyz'"):
        main([*common, "--export", "out.xyz"])
    assert not (tmp_path / "c").exists()  # no float baseline was trained


_USER_MODULE = """
from lightning_quant.examples import DigitsCNN, ImageClassifier


class SmallCNN(ImageClassifier):
    def __init__(self):
        super().__init__(DigitsCNN(width=8), epochs=1)
"""


def test_user_model_module_file_edits_and_pt2_deployment(tmp_path):
    """A user's model next to them (module or file path), edited between runs; the .pt2 exports load elsewhere."""
    (tmp_path / "mymod.py").write_text(_USER_MODULE)
    fit = ["fit", "--recipe", "minmax_w8a8", "--epochs", "1", "--float-epochs", "1", "--cache-dir", "c"]
    proc = run_cli(tmp_path, *fit, "--model", "mymod:SmallCNN", "--checkpoint", "q.ckpt", "--export", "fit.pt2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training the float baseline" in proc.stdout
    # export finds the recipe in the checkpoint; the model comes from a file path
    proc = run_cli(tmp_path, "export", "--checkpoint", "q.ckpt", "--model", "./mymod.py:SmallCNN", "--output", "e.pt2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported minmax_w8a8 (torch)" in proc.stdout
    proc = run_cli(tmp_path, "export", "--checkpoint", "q.ckpt", "--recipe", "lsq_w4a4", "--output", "x.pt2")
    assert "quantized with recipe 'minmax_w8a8'" in proc.stderr and not (tmp_path / "x.pt2").exists()
    # an edit that keeps every shape (the forward doubles the logits) must not reuse the old float baseline
    edited = _USER_MODULE + "\n    def forward(self, x):\n        return 2 * self.net(x)\n"
    (tmp_path / "mymod.py").write_text(edited)
    proc = run_cli(tmp_path, *fit, "--model", "mymod:SmallCNN")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training the float baseline" in proc.stdout and "reused" not in proc.stdout
    assert len(list((tmp_path / "c").glob("mymod.SmallCNN-*.pt"))) == 2
    # both programs (exported from a batch of one) load in a fresh process and run any batch size
    script = textwrap.dedent("""
        import sys, torch
        import lightning_quant
        from lightning_quant.export import compile_int8
        from lightning_quant.examples import DigitsDataModule
        for path in sys.argv[1:]:
            program = lightning_quant.load_program(path)
            plain = torch.export.load(path)  # importing lightning_quant registered the ops
            for batch in (1, 5):
                x = torch.randn(batch, 1, 8, 8)
                assert program.module()(x).shape == (batch, 10)
                assert torch.equal(plain.module()(x), program.module()(x))
        # oneDNN requantizes int32 sums where the program sums dequantized floats, so a code may move one step:
        # compare on real digits with a continuous measure (noise input gives near-tied logits whose arg-max flips)
        data = DigitsDataModule()
        data.setup("test")
        x = torch.cat([batch[0] for batch in data.test_dataloader()])
        with torch.no_grad():
            got, ref = compile_int8(program)(x), program.module()(x)
        sqnr = 10 * torch.log10(ref.pow(2).mean() / (got - ref).pow(2).mean().clamp_min(1e-12))
        assert sqnr > 25, sqnr
        assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.99
        print("ok")
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script, "fit.pt2", "e.pt2"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.stdout.strip() == "ok", proc.stderr[-3000:]
