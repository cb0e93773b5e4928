"""Run post-training calibration under DDP with two CPU processes (gloo); save each rank's quantizer state.

Each rank calibrates on its own half of the same fixed batches (rank r takes batches r, r+2, ...), so the
merged statistics can be compared with a single process that sees all of them.
Usage: python ddp_ptq_script.py RECIPE FLOAT_STATE BATCHES OUT_DIR [OVERRIDE ...]
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from lightning_quant import PostTrainingQuantization
from lightning_quant.examples import DigitsCNN, DigitsDataModule, ImageClassifier


class RankShard:
    """The batches of this rank: every other batch, starting at the rank."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches[dist.get_rank() :: dist.get_world_size()])


if __name__ == "__main__":
    recipe, float_state, batches, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    torch.set_num_threads(1)
    model = ImageClassifier(DigitsCNN(width=8))
    model.load_state_dict(torch.load(float_state))
    cb = PostTrainingQuantization(
        recipe,
        overrides=["diagnostics.summary=false", *sys.argv[5:]],
        iters=10,
        num_samples=10_000,
        calibration_dataloader=RankShard(torch.load(batches)),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    trainer.validate(model, datamodule=DigitsDataModule())
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if "quantizer" in k}
    torch.save(state, out / f"rank{trainer.global_rank}.pt")
