"""Post-training quantization: observers, AdaRound, QDrop's drop, Bit-Split, the callback and its checkpoints."""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import quiet_trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_quant import PostTrainingQuantization, QuantizationAwareTraining, load_recipe, quantize_model
from lightning_quant.examples import DigitsCNN, DigitsDataModule, ImageClassifier, resnet20
from lightning_quant.nn import LayerSelection
from lightning_quant.ptq import PTQConfig, calibrate, finalize, find_units, reconstruct, set_quant_state
from lightning_quant.ptq.bitsplit import bit_split_layer, split, stitch
from lightning_quant.ptq.capture import stored
from lightning_quant.quantizers import ObserverQuantizer, QuantizerConfig
from lightning_quant.quantizers.functional import qparams_from_range
from lightning_quant.quantizers.observers import HistogramObserver, MSEObserver, kl_divergences
from lightning_quant.recipes import RecipeError

QUICK = ["diagnostics.summary=false"]
_trainer = quiet_trainer


def _predict(model, callbacks=(), **kw):
    out = _trainer(callbacks).predict(model, datamodule=DigitsDataModule(shuffle=False), **kw)
    return torch.cat(out)


# -- observers --------------------------------------------------------------------------------------------
def test_kl_observer_clips_gaussian_tails_but_not_uniform():
    torch.manual_seed(0)
    gauss = HistogramObserver(bits=8)
    for _ in range(4):
        gauss(torch.randn(1, 50_000))
    gauss.finalize()
    assert 2.0 < float(gauss.max_val) < float(gauss.hist_max)  # tails clipped, bulk kept
    assert -float(gauss.max_val) <= float(gauss.min_val) < 0  # the same threshold on both sides
    uniform = HistogramObserver(bits=8)
    uniform(torch.rand(1, 100_000) * 2 - 1)
    uniform.finalize()
    assert float(uniform.max_val) > 0.97  # nothing worth clipping in a uniform distribution


def _kl_by_definition(hist, levels, i):
    """KL(P || Q) for ``i`` kept bins, built bin by bin as TensorRT's calibrator describes it."""
    ref = hist[:i].clone().double()
    ref[i - 1] += hist[i:].sum()
    cut = hist[:i].double()
    q = torch.zeros(i, dtype=torch.float64)
    for b in range(levels):
        members = [j for j in range(i) if min(j * levels // i, levels - 1) == b]
        filled = [j for j in members if cut[j] > 0]
        for j in filled:
            q[j] = cut[members].sum() / len(filled)
    p, q = ref / ref.sum(), q / q.sum()
    return float(sum(p[j] * math.log(p[j] / max(q[j], 1e-12)) for j in range(i) if p[j] > 0))


@pytest.mark.parametrize("seed", [0, 1])
def test_prefix_sum_kl_matches_the_definition(seed):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(0, 50, (96,), generator=g).float()
    hist[torch.rand(96, generator=g) < 0.3] = 0  # empty bins, including some last kept bins
    levels = 8
    kept = torch.arange(levels, 97)
    fast = kl_divergences(hist, levels, kept)
    slow = torch.tensor([_kl_by_definition(hist, levels, int(i)) for i in kept], dtype=torch.float64)
    assert torch.allclose(fast.double(), slow, rtol=1e-4, atol=1e-5)


def test_kl_observer_rebins_when_the_range_grows():
    obs = HistogramObserver(bits=8, bins=256)
    obs(torch.full((1, 100), 0.5))
    obs(torch.full((1, 100), 2.0))
    assert float(obs.hist_max) == pytest.approx(2.0)
    assert float(obs.histogram.sum()) == 200
    centers = (torch.arange(256) + 0.5) * 2.0 / 256
    assert float((obs.histogram * centers).sum() / 200) == pytest.approx(1.25, abs=0.02)


def test_deferred_mse_search_matches_a_direct_search_on_the_same_data():
    torch.manual_seed(0)
    data = [torch.randn(1, 4096) * (1 + i) for i in range(3)]
    deferred = MSEObserver(bits=4)
    deferred.deferred = True
    for d in data:
        deferred(d)
    deferred.finalize()
    direct = MSEObserver(bits=4)
    lo, hi = direct.batch_range(torch.cat(data, dim=1))
    torch.testing.assert_close(deferred.min_val, lo)
    torch.testing.assert_close(deferred.max_val, hi)
    assert float(hi) < float(torch.cat(data, dim=1).max())  # a 4-bit MSE clip is tighter than the max


def test_symmetric_mse_search_minimises_the_error_of_the_symmetric_grid():
    """The search must score the grid the quantizer will use: for a symmetric quantizer, the symmetric one."""
    torch.manual_seed(0)
    rows = torch.cat([torch.randn(1, 4000) * 0.3 + 0.5, torch.randn(1, 4000)], dim=0)  # skewed and centred rows
    q = ObserverQuantizer(QuantizerConfig(bits=2, observer="mse", symmetric=True), "weight", 2)
    q.granularity, q.axis = "per_channel", 0
    lo, hi = q.observer.batch_range(rows)
    scale, zp = qparams_from_range(lo, hi, q.qmin, q.qmax, symmetric=True)

    def error(scale):
        codes = torch.clamp(torch.round(rows / scale[:, None]), q.qmin, q.qmax)
        return (codes * scale[:, None] - rows).abs().pow(2.4).mean(dim=1)

    found = error(scale)
    top = rows.abs().amax(dim=1)
    for ratio in torch.linspace(0.01, 1, 100):  # every symmetric clip the search could have chosen
        assert (found <= error(top * ratio / 1.5) + 1e-6).all()


def test_calibration_uses_float_activations_and_observes_weights_once():
    net = DigitsCNN(width=8).eval()
    batches = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    with torch.no_grad():
        expected = torch.cat([net(b) for b in batches])
    r = load_recipe("mse_w4a8")
    quantize_model(net, r.weights, r.activations, r.layers)
    seen = []
    hook = net.features[0].register_forward_hook(lambda m, a, o: seen.append(o))
    calibrate(net, batches, lambda b: net(b))
    hook.remove()
    torch.testing.assert_close(torch.cat(seen), torch.cat([net.features[0](b) for b in batches]))
    q = net.features[0].input_quantizer
    assert q.observer.count == 3 and net.features[0].weight_quantizer.observer.count == 1
    finalize(net)
    set_quant_state(net, False, False)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([net(b) for b in batches]), expected)


# -- AdaRound, QDrop, Bit-Split ------------------------------------------------------------------------------
def _linear_problem(bits=3):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(32, 16))
    cfg = QuantizerConfig(method="observer", bits=bits, granularity="per_channel", symmetric=False, observer="mse")
    quantize_model(layer, cfg, QuantizerConfig(enabled=False), LayerSelection(first_layer="same", last_layer="same"))
    x = torch.randn(512, 32) @ torch.randn(32, 32)  # correlated inputs: rounding choices interact
    batches = list(x.split(64))
    layer.eval()
    calibrate(layer, batches, lambda b: layer(b))
    finalize(layer)
    set_quant_state(layer, True, True)
    return layer, x


def test_adaround_hardens_to_binary_rounding_and_beats_nearest():
    layer, x = _linear_problem()
    q = layer[0].weight_quantizer
    target = nn.functional.linear(x, layer[0].weight, layer[0].bias)
    with torch.no_grad():
        nearest_err = float((layer(x) - target).pow(2).mean())
        nearest_codes = q.integer_codes(layer[0].weight)
    seen_h = []

    def watch(step):
        if q.rounding is not None:
            seen_h.append(q.rounding.h().detach().clone())

    # a shorter schedule than the paper's 10k iterations, so a stronger regulariser and step size
    cfg = PTQConfig(algorithm="adaround", iters=3000, batch_size=64, warmup=0.2, weight_lr=1e-2, reg_weight=0.1)
    reconstruct(
        layer,
        list(x.split(64)),
        lambda b: layer(b),
        cfg,
        stage="weights",
        blocks=False,
        learn_weights=True,
        learn_activations=False,
        activations_on=True,
        progress=watch,
    )
    h_end = seen_h[-1]
    assert float(((h_end > 0.01) & (h_end < 0.99)).float().mean()) < 0.01  # converged to hard 0/1 decisions
    assert float(((seen_h[0] > 0.01) & (seen_h[0] < 0.99)).float().mean()) > 0.5  # ... from soft ones
    assert q.rounding is None and q.codes.numel() == layer[0].weight.numel()
    codes = q.codes.float()
    assert torch.equal(codes, codes.round()) and codes.min() >= q.qmin and codes.max() <= q.qmax
    assert (codes - nearest_codes).abs().max() <= 1  # only up or down from the float value
    assert bool((codes != nearest_codes).any())
    with torch.no_grad():
        assert float((layer(x) - target).pow(2).mean()) < 0.9 * nearest_err


def test_qdrop_drop_is_on_only_while_reconstructing():
    q = ObserverQuantizer(QuantizerConfig(bits=2), "activation")
    x = torch.randn(10_000)
    q(x)  # initialise
    q.drop_prob = 0.5
    q.train()
    mixed = q(x)
    frac_float = float((mixed == x).float().mean())
    assert 0.4 < frac_float < 0.75  # about half stay float (plus values already on the grid)
    q.eval()
    assert torch.equal(q(x), q.quantize(x))  # evaluation mode never drops

    net = DigitsCNN(width=8)
    r = load_recipe("qdrop_w2a4")
    quantize_model(net, r.weights, r.activations, r.layers)
    batches = [torch.randn(32, 1, 8, 8) for _ in range(4)]
    net.eval()
    calibrate(net, batches, lambda b: net(b))
    finalize(net)
    drops = []
    acts = [layer.input_quantizer for layer in (net.features[3], net.features[7])]

    def watch(step):
        drops.append([a.drop_prob for a in acts])

    reconstruct(
        net,
        batches,
        lambda b: net(b),
        PTQConfig(algorithm="qdrop", iters=20, drop_prob=0.5),
        stage="joint",
        blocks=True,
        learn_weights=True,
        learn_activations=True,
        activations_on=True,
        drop_prob=0.5,
        progress=watch,
    )
    assert any(0.5 in d for d in drops)
    assert all(a.drop_prob == 0.0 for a in acts)
    assert all(not isinstance(a.scale, nn.Parameter) for a in acts)  # steps frozen again
    with torch.no_grad():
        assert torch.equal(net(batches[0]), net(batches[0]))  # deterministic afterwards


def test_bitsplit_planes_roundtrip_and_fit_beats_nearest():
    codes = torch.tensor([[-7.0, -3, 0, 1, 5, 7]])
    planes = split(codes, 3)
    assert set(planes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(stitch(planes), codes)
    torch.manual_seed(0)
    w = torch.randn(8, 24)
    x = torch.randn(2000, 24) @ torch.randn(24, 24)
    y = x @ w.T
    scale = w.abs().amax(dim=1) / 3
    alpha, q = bit_split_layer(w, scale, bits=3, x=x, y=y, sweeps=2)
    assert q.abs().max() <= 3 and torch.equal(q, q.round()) and bool((alpha > 0).all())
    nearest = torch.clamp(torch.round(w / scale[:, None]), -3, 3) * scale[:, None]
    err_nearest = float((y - x @ nearest.T).pow(2).mean())
    err_split = float((y - x @ (alpha[:, None] * q).T).pow(2).mean())
    assert err_split < 0.8 * err_nearest


# -- units and caching -------------------------------------------------------------------------------------
def test_units_are_residual_blocks_or_layers():
    net = resnet20()
    r = load_recipe("qdrop_w4a4")
    quantize_model(net, r.weights, r.activations, r.layers)
    blocks = [u.name for u in find_units(net, blocks=True)]
    assert blocks == ["conv1", *[f"layers.{i}" for i in range(9)], "fc"]
    layers = [u.name for u in find_units(net, blocks=False)]
    assert len(layers) == len([n for n, m in net.named_modules() if hasattr(m, "weight_quantizer")])
    cnn = DigitsCNN()
    quantize_model(cnn, r.weights, r.activations, r.layers)
    units = find_units(cnn, blocks=True)
    assert [u.name for u in units] == ["features.0", "features.3", "features.7", "classifier"]
    assert [len(u.modules) for u in units] == [3, 4, 5, 1]  # each conv with its BN, ReLU and pooling


def test_large_caches_are_memory_mapped_from_disk():
    t = torch.randn(256, 1024)  # 1 MiB
    assert stored(t, limit_mb=2) is t
    mapped = stored(t, limit_mb=0.5)
    assert mapped is not t and torch.equal(mapped, t)


# -- the callback ----------------------------------------------------------------------------------------------
def test_validate_calibrates_reconstructs_and_logs(float_model, tmp_path):
    model = copy.deepcopy(float_model)
    cb = PostTrainingQuantization("qdrop_w4a4", overrides=QUICK, iters=30, num_samples=256)
    logger = pl.loggers.CSVLogger(tmp_path)
    trainer = pl.Trainer(logger=logger, enable_progress_bar=True, enable_model_summary=False, callbacks=[cb])
    metrics = trainer.validate(model, datamodule=DigitsDataModule(), verbose=False)[0]
    assert cb.calibrated and set(cb.timings) == {"calibration_s", "reconstruction_s"}
    assert metrics["val_acc"] > 0.5
    assert 0.5 < cb.last_comparison["top1_agreement"] <= 1.0
    assert all(len(c) > 1 for c in cb.curves.values()) and len(cb.curves) == 4
    layer = model.net.features[3]
    assert layer.weight_quantizer.codes.numel() == layer.weight.numel()  # rounding hardened into codes
    logger.save()
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    for key in ("ptq/calibration_s", "ptq_val/output_sqnr_db", "ptq_val/top1_agreement", "model/compression"):
        assert key in header, key
    assert "ptq_loss/net.features.3" in header
    # a second evaluation does not calibrate again
    before = layer.weight_quantizer.codes.clone()
    trainer.validate(model, datamodule=DigitsDataModule(), verbose=False)
    assert torch.equal(layer.weight_quantizer.codes, before)


def test_calibration_draws_a_fixed_seeded_sample(float_model):
    runs = []
    for _ in range(2):
        model = copy.deepcopy(float_model)
        cb = PostTrainingQuantization("minmax_w8a8", overrides=QUICK, num_samples=100, seed=3)
        _trainer([cb]).validate(model, datamodule=DigitsDataModule(), verbose=False)
        runs.append(model.net.features[3].input_quantizer.scale.clone())
    assert torch.equal(runs[0], runs[1])
    model = copy.deepcopy(float_model)
    cb = PostTrainingQuantization("minmax_w8a8", overrides=QUICK, num_samples=100, seed=4)
    _trainer([cb]).validate(model, datamodule=DigitsDataModule(), verbose=False)
    assert not torch.equal(model.net.features[3].input_quantizer.scale, runs[0])


def test_calibrated_checkpoint_reloads_with_identical_outputs(float_model, tmp_path):
    model = copy.deepcopy(float_model)
    cb = PostTrainingQuantization("adaround_w2a4", overrides=QUICK, iters=30, num_samples=128)
    trainer = _trainer([cb])
    trainer.validate(model, datamodule=DigitsDataModule(), verbose=False)
    expected = _predict(model, [cb])
    ckpt = tmp_path / "ptq.ckpt"
    trainer.save_checkpoint(ckpt)

    fresh = ImageClassifier(DigitsCNN(width=16))
    cb2 = PostTrainingQuantization("adaround_w2a4", overrides=QUICK, iters=30, num_samples=128)
    got = torch.cat(_trainer([cb2]).predict(fresh, datamodule=DigitsDataModule(shuffle=False), ckpt_path=ckpt))
    assert torch.equal(got, expected)
    assert cb2.calibrated and cb2.curves == {}  # restored, not re-calibrated
    float_out = _predict(float_model)
    assert not torch.equal(got, float_out)


class _Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


def _residual_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), _Residual(8), _Residual(8), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    )
    return ImageClassifier(net)


def test_block_input_and_output_quantizers_are_calibrated_and_restored_from_a_checkpoint(tmp_path):
    outputs = ["layers.quantize_outputs=['net.1','net.2','*.conv']", "layers.quantize_inputs=['net.1']", *QUICK]
    model = _residual_net()
    cb = PostTrainingQuantization("minmax_w8a8", overrides=outputs, num_samples=128)
    trainer = _trainer([cb])
    trainer.validate(model, datamodule=DigitsDataModule(), verbose=False)
    for block in (model.net[1].output_quantizer, model.net[1].input_quantizer):  # a block's output and input
        assert bool(block.initialized) and block.fake_quant_enabled and float(block.scale) > 0
    expected = _predict(model, [cb])
    ckpt = tmp_path / "blocks.ckpt"
    trainer.save_checkpoint(ckpt)
    cb2 = PostTrainingQuantization("minmax_w8a8", overrides=outputs, num_samples=128)
    got = torch.cat(
        _trainer([cb2]).predict(_residual_net(), datamodule=DigitsDataModule(shuffle=False), ckpt_path=ckpt)
    )
    assert torch.equal(got, expected)


def test_fit_validates_in_float_and_quantizes_at_fit_end(tmp_path):
    pl.seed_everything(0)
    model = ImageClassifier(DigitsCNN(width=8), epochs=1)
    cb = PostTrainingQuantization("mse_w4a8", overrides=QUICK, num_samples=64, at_fit_end=True)
    trainer = _trainer([cb], max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, datamodule=DigitsDataModule())
    assert cb.calibrated
    assert model.net.features[3].input_quantizer.fake_quant_enabled


def test_bad_ptq_recipes_fail_before_anything_runs(tmp_path):
    with pytest.raises(MisconfigurationException, match="weights.method='lsq' is learned during training"):
        PostTrainingQuantization("lsq_w4a4")
    with pytest.raises(MisconfigurationException, match="ptq.algorithm='magic' is not allowed"):
        PostTrainingQuantization("qdrop_w4a4", overrides=["ptq.algorithm=magic"])
    with pytest.raises(MisconfigurationException, match="bitsplit needs per_channel symmetric"):
        PostTrainingQuantization("bitsplit_w4a8", overrides=["weights.granularity=per_tensor"])
    with pytest.raises(RecipeError, match="ptq.drop_prob=1.5"):
        load_recipe("qdrop_w4a4", ["ptq.drop_prob=1.5"])
    with pytest.raises(MisconfigurationException, match="kind='ptq' is not allowed for QuantizationAwareTraining"):
        QuantizationAwareTraining("qdrop_w4a4")


def test_missing_calibration_data_is_a_clear_error(float_model):
    model = copy.deepcopy(float_model)
    cb = PostTrainingQuantization("minmax_w8a8", overrides=QUICK)
    loader = DigitsDataModule()
    loader.setup()
    with pytest.raises(MisconfigurationException, match="calibration needs data"):
        _trainer([cb]).validate(model, dataloaders=loader.val_dataloader(), verbose=False)
    cb = PostTrainingQuantization("minmax_w8a8", overrides=QUICK, calibration_dataloader=loader.train_dataloader())
    assert _trainer([cb]).validate(model, dataloaders=loader.val_dataloader(), verbose=False)[0]["val_acc"] > 0.5
    assert math.isfinite(cb.last_comparison["output_sqnr_db"])


def test_gptq_names_itself_in_the_layer_table_and_the_progress_bar(capsys):
    """The method column said 'observer' (GPTQ's grid comes from an observer, its values from GPTQ) and the
    progress bar read 'gptq gptq'."""
    pl.seed_everything(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    model = ImageClassifier(net)
    cb = PostTrainingQuantization("gptq_w4g128", overrides=["weights.group_size=16"], num_samples=64)
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=True, callbacks=[cb]
    )
    trainer.validate(model, datamodule=DigitsDataModule(), verbose=False)
    rows = {r.name: r for r in cb.report.layers}
    assert rows["net.1"].method == rows["net.3"].method == "gptq"
    assert "observer" not in cb.report.table()
    err = capsys.readouterr().err
    assert "lightning-quant gptq: 1/2" in err and "gptq gptq" not in err


def test_a_reused_callback_calibrates_a_new_model_like_a_fresh_one(float_model):
    """The same PTQ instance in a second Trainer must not think the new model is calibrated already."""
    reused = PostTrainingQuantization("minmax_w8a8", overrides=QUICK, num_samples=100)
    _trainer([reused]).validate(copy.deepcopy(float_model), datamodule=DigitsDataModule(), verbose=False)
    second = copy.deepcopy(float_model)
    _trainer([reused]).validate(second, datamodule=DigitsDataModule(), verbose=False)
    fresh = copy.deepcopy(float_model)
    _trainer([PostTrainingQuantization("minmax_w8a8", overrides=QUICK, num_samples=100)]).validate(
        fresh, datamodule=DigitsDataModule(), verbose=False
    )
    a, b = second.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
