"""Run a training callback (QAT, binarization, INQ/ELQ) under DDP with two CPU processes (gloo) and save
each rank's quantization state.

Launched by test_ddp.py as a separate script, because Lightning's DDP launcher re-runs the command line.
Usage: python ddp_qat_script.py RECIPE OUT_DIR
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_quant import load_recipe
from lightning_quant.cli import callback_for
from lightning_quant.examples import DigitsCNN, DigitsDataModule, ImageClassifier

if __name__ == "__main__":
    recipe, out = sys.argv[1], Path(sys.argv[2])
    loaded = load_recipe(
        recipe, ["diagnostics.summary=false"] + (["inq.epochs=[0,1,2,3]"] if "inq" in recipe or "elq" in recipe else [])
    )
    callback = callback_for(loaded)
    epochs = 2 if loaded.kind == "inq" else 1
    pl.seed_everything(0)
    torch.set_num_threads(1)
    model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", lr=0.05, epochs=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=epochs,
        limit_train_batches=4,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(model, datamodule=DigitsDataModule())
    if loaded.kind == "qat":
        state = {k: v.detach().cpu() for k, v in model.state_dict().items() if "quantizer" in k}
    else:  # binary layers' extra parameters and INQ masks must agree too: the whole model
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        state.update({f"mask.{k}": v.cpu() for k, v in getattr(callback, "masks", {}).items()})
    torch.save(state, out / f"rank{trainer.global_rank}.pt")
