"""Method registries and per-method options: a recipe's flat section takes the common keys and the selected
method's own keys only; a new quantizer or algorithm is one decorated class or function with its options."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer
from torch import nn

from lightning_quant import PostTrainingQuantization, list_recipes, load_recipe, quantize_model
from lightning_quant.cli import main
from lightning_quant.examples import DigitsCNN, DigitsDataModule, ImageClassifier
from lightning_quant.ptq import ALGORITHMS, PTQConfig, register_algorithm
from lightning_quant.quantizers import (
    QUANTIZERS,
    LSQOptions,
    PACTOptions,
    Quantizer,
    QuantizerConfig,
    build_quantizer,
    register_quantizer,
)
from lightning_quant.recipes import RecipeError, recipe_methods
from lightning_quant.registry import OptionError, Registry


@pytest.mark.parametrize(
    ("recipe", "override", "match"),
    [
        ("lsq_w4a4", "weights.clip_init=3", r"weights\.clip_init=3 does not apply to weights\.method='lsq'.*pact"),
        ("adaround_w4a8", "ptq.damp=0.1", r"ptq\.damp=0\.1 does not apply to ptq\.algorithm='adaround'.*gptq"),
        ("qdrop_w4a4", "ptq.act_iters=5", r"ptq\.act_iters=5 does not apply to ptq\.algorithm='qdrop'.*only to brecq"),
        ("mse_w4a8", "ptq.iters=5", r"ptq\.iters=5 does not apply to ptq\.algorithm='none'.*none takes: no options"),
    ],
)
def test_a_key_of_another_method_is_refused_naming_key_and_method(recipe, override, match):
    with pytest.raises(RecipeError, match=match) as err:
        load_recipe(recipe, [override])
    assert str(err.value).startswith(str(Path(load_recipe(recipe).source)))


def test_changing_the_method_drops_the_keys_of_the_method_it_replaces_but_refuses_new_ones():
    """A base recipe's observer keys belonged to the observer: ``weights.method=lsq`` replaces them. A key given
    with or after the new method is the user's and must apply to it."""
    recipe = load_recipe("minmax_w8a8", ["weights.method=lsq"])
    assert recipe.weights.method == "lsq" and recipe.weights.options == LSQOptions()
    assert load_recipe({"base": "pact_w4a4", "activations": {"method": "observer"}}).activations.method == "observer"
    with pytest.raises(RecipeError) as err:
        load_recipe("minmax_w8a8", ["weights.method=lsq", "weights.observer=ema"])
    msg = str(err.value)
    assert "override 'weights.observer=ema': weights.observer='ema' does not apply to weights.method='lsq'" in msg
    assert "(set in " in msg and "override 'weights.method=lsq'" in msg and "lsq takes: learn_offset" in msg
    with pytest.raises(RecipeError, match=r"weights\.clip_init=3\.0 does not apply to weights\.method='lsq'"):
        load_recipe({"base": "minmax_w8a8", "weights": {"clip_init": 3.0, "method": "lsq"}})  # one source: refused


@pytest.mark.parametrize(
    ("recipe", "override", "match"),
    [
        ("pact_w4a4", "activations.clip_init=-1", r"activations\.clip_init=-1\.0 is not allowed; must be positive"),
        ("gptq_w4g128", "ptq.damp=-0.5", r"ptq\.damp=-0\.5 is not allowed; must be >= 0"),
        ("normtweak_w4g128", "ptq.norm_epochs=-1", r"ptq\.norm_epochs=-1 is not allowed"),
        ("brecq_w4a4", "ptq.act_iters=-2", r"ptq\.act_iters=-2 is not allowed"),
        ("minmax_w8a8", "activations.momentum=2", r"activations\.momentum=2\.0 is not allowed; allowed: 0 < momentum"),
        ("bitsplit_w4a8", "ptq.sweeps=0", r"ptq\.sweeps=0 is not allowed; must be >= 1"),
    ],
)
def test_an_out_of_range_option_names_the_file_and_key(recipe, override, match):
    with pytest.raises(RecipeError, match=match) as err:
        load_recipe(recipe, [override])
    assert f"override '{override}'" in str(err.value)


def test_options_are_typed_per_method_and_round_trip_flat(tmp_path):
    r = load_recipe("pact_w4a4", ["activations.clip_init=6"])
    assert r.activations.options == PACTOptions(clip_init=6.0, clip_decay=1e-4)
    assert r.weights.options == QUANTIZERS["dorefa"].options()
    text = r.to_yaml()
    assert "options" not in text and "clip_init: 6.0" in text  # flat, as a recipe is written
    path = tmp_path / "pact.yaml"
    path.write_text(text)
    again = load_recipe(path)
    assert again.activations == r.activations and again.fingerprint() == r.fingerprint()


def test_python_configs_take_the_method_keys_flat_and_refuse_others():
    assert QuantizerConfig(method="lsq", bits=4, learn_offset=True).options == LSQOptions(learn_offset=True)
    assert PTQConfig(algorithm="gptq", damp=0.1).options.damp == 0.1
    with pytest.raises(TypeError, match=r"clip_init does not apply to lsq; lsq takes: learn_offset"):
        QuantizerConfig(method="lsq", clip_init=1.0)
    with pytest.raises(ValueError, match=r"unknown quantizer method 'lqs'.*did you mean 'lsq'"):
        QuantizerConfig(method="lqs")
    with pytest.raises(OptionError, match=r"clip_decay=-1\.0 is not allowed"):
        build_quantizer(QuantizerConfig(method="pact", bits=4, clip_decay=-1.0), "activation")


def _used_methods():
    quantizers, algorithms = set(), set()
    for name in list_recipes():
        r = load_recipe(name)
        quantizers |= {r.weights.method, r.activations.method}
        algorithms.add(r.ptq.algorithm)
    return quantizers, algorithms


def test_registries_list_exactly_the_methods_the_recipes_use():
    quantizers, algorithms = _used_methods()
    assert set(QUANTIZERS.names()) == quantizers
    assert set(ALGORITHMS.names()) == algorithms


def test_a_recipe_leads_to_the_file_of_its_method(capsys):
    files = {key: Path(file) for key, _, file in recipe_methods(load_recipe("pact_w4a4"))}
    assert files["activations.method"].parts[-2:] == ("quantizers", "pact.py")
    assert files["weights.method"].parts[-2:] == ("quantizers", "dorefa.py")
    assert ALGORITHMS["gptq"].file.endswith(str(Path("ptq", "gptq.py")))
    main(["recipes", "gptq_w4g128"])
    out = capsys.readouterr().out
    assert "ptq.algorithm" in out and str(Path("ptq", "gptq.py")) in out and "damp: 0.01" in out


def test_discovery_imports_every_module_of_the_package():
    seen = Registry("test method", "lightning_quant.quantizers")
    assert seen.names() == []  # quantizers register into QUANTIZERS, not into this one
    assert "pact" in QUANTIZERS and QUANTIZERS["pact"].options is PACTOptions


# -- a new quantizer and a new algorithm, defined here and used by a recipe -----------------------------------
@dataclass
class HalfStepOptions:
    """Options of the test quantizer."""

    shrink: float = 1.0  # the step is max|w| / qmax times this

    def check(self) -> None:
        if not 0 < self.shrink <= 1:
            raise OptionError("shrink", self.shrink, "allowed: 0 < shrink <= 1")


@dataclass
class ScaleWeightsOptions:
    """Options of the test algorithm."""

    factor: float = 1.0  # every quantized layer's weight is multiplied by this before its grid is fixed


RUNS: list[float] = []


@pytest.fixture
def new_methods():
    @register_quantizer("test_halfstep", options=HalfStepOptions)
    class HalfStepQuantizer(Quantizer):
        """Symmetric rounding with a step of ``shrink * max|w| / qmax`` set from the first tensor."""

        roles = ("weight",)
        granularities = ("per_tensor",)

        def __init__(self, cfg, role, num_groups=1):
            super().__init__(cfg, role, num_groups)
            self.register_buffer("scale", torch.ones(()))

        def initialize(self, x):
            self.scale.fill_(float(x.abs().max()) * self.cfg.options.shrink / self.qmax)

        def quantize(self, x):
            q = torch.clamp(torch.round(x / self.scale), self.qmin, self.qmax) * self.scale
            return x + (q - x).detach()

    @register_algorithm("test_scale_weights", options=ScaleWeightsOptions)
    def scale_weights(model, batches, run_batch, ptq, progress):
        RUNS.append(ptq.options.factor)
        return {"all": [float(len(batches))]}

    yield HalfStepQuantizer
    QUANTIZERS.unregister("test_halfstep")
    ALGORITHMS.unregister("test_scale_weights")
    RUNS.clear()


def test_a_quantizer_and_an_algorithm_registered_in_a_test_module_run_from_a_recipe(new_methods):
    assert QUANTIZERS["test_halfstep"].file == __file__
    qat = load_recipe(
        {"description": "new quantizer", "weights": {"method": "test_halfstep", "bits": 4, "shrink": 0.5}},
        ["layers.first_layer=same", "layers.last_layer=same"],
    )
    assert qat.weights.options == HalfStepOptions(shrink=0.5)
    net = nn.Sequential(nn.Linear(8, 4))
    quantize_model(net, qat.weights, qat.activations, qat.layers)
    net(torch.randn(2, 8))
    q = net[0].weight_quantizer
    assert isinstance(q, new_methods)
    assert float(q.scale) == pytest.approx(float(net[0].weight.detach().abs().max()) * 0.5 / 7)
    with pytest.raises(RecipeError, match=r"<dict>: weights\.shrink=2\.0 is not allowed; allowed: 0 < shrink"):
        load_recipe({"description": "x", "weights": {"method": "test_halfstep", "shrink": 2.0}})
    with pytest.raises(RecipeError, match=r"weights\.learn_offset=True does not apply to weights\.method='test_half"):
        load_recipe({"description": "x", "weights": {"method": "test_halfstep", "learn_offset": True}})

    ptq = {"description": "new algorithm", "kind": "ptq", "ptq": {"algorithm": "test_scale_weights", "factor": 0.5}}
    recipe = load_recipe(ptq, ["ptq.num_samples=64"])
    assert recipe.ptq.options == ScaleWeightsOptions(factor=0.5)
    model = ImageClassifier(DigitsCNN(width=8))
    cb = PostTrainingQuantization(recipe)
    quiet_trainer([cb]).validate(model, datamodule=DigitsDataModule(batch_size=64))
    assert RUNS == [0.5] and cb.curves == {"all": [1.0]}  # 64 samples: one calibration batch of 64


def test_the_iters_shortcut_sets_the_reconstruction_iterations_and_skips_algorithms_without_them():
    """``iters=`` is a run-length knob: calibration-only, GPTQ and Bit-Split recipes have no iterations to set."""
    assert PostTrainingQuantization("adaround_w4a8", iters=7).recipe.ptq.options.iters == 7
    for name in ("minmax_w8a8", "gptq_w4g128", "bitsplit_w4a8"):
        assert "iters" not in vars(PostTrainingQuantization(name, iters=7).recipe.ptq.options)
    with pytest.raises(RecipeError, match=r"ptq\.iters=7 does not apply to ptq\.algorithm='none'"):
        load_recipe("minmax_w8a8", ["ptq.iters=7"])  # given as a recipe key, it is refused
