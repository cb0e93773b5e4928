"""Run QAT under DDP with two CPU processes (gloo) and save each rank's quantizer state.

Launched by test_ddp.py as a separate script, because Lightning's DDP launcher re-runs the command line.
Usage: python ddp_qat_script.py RECIPE OUT_DIR
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_quant import QuantizationAwareTraining
from lightning_quant.examples import DigitsCNN, DigitsDataModule, ImageClassifier

if __name__ == "__main__":
    recipe, out = sys.argv[1], Path(sys.argv[2])
    pl.seed_everything(0)
    torch.set_num_threads(1)
    model = ImageClassifier(DigitsCNN(width=8), optimizer="sgd", lr=0.05, epochs=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[QuantizationAwareTraining(recipe, overrides=["diagnostics.summary=false"])],
    )
    trainer.fit(model, datamodule=DigitsDataModule())
    if "DEBUG_DDP" in __import__("os").environ:
        print(
            trainer.global_rank,
            model.net.features[0].input_quantizer.scale.item(),
            model.net.features[3].input_quantizer.scale.item(),
        )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if "quantizer" in k}
    torch.save(state, out / f"rank{trainer.global_rank}.pt")
