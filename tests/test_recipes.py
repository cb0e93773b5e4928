import subprocess
import sys
import zipfile

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lightning_quant import list_recipes, load_recipe
from lightning_quant.examples import DigitsCNN
from lightning_quant.nn import quantize_model
from lightning_quant.recipes import RecipeError, describe_recipes, recipes_dir

REQUIRED = ["lsq_w8a8", "lsq_w4a4", "lsq_w3a3", "lsq_w2a2", "pact_w4a4", "dorefa_w4a4", "dsq_w4a4", "minmax_w8a8"]


def test_required_recipes_ship():
    assert set(REQUIRED) <= set(list_recipes())
    assert all(desc for desc in describe_recipes().values())


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_loads_and_builds(name):
    recipe = load_recipe(name)
    if recipe.layers.types == ["Linear"]:  # transformer recipes: Linear layers, groups of up to 128 features
        net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
        net[1] = nn.Linear(128, 128)
        x = torch.randn(4, 128)
        expected = 3 - sum(getattr(recipe.layers, k) == "float" for k in ("first_layer", "last_layer"))
    else:
        net = DigitsCNN(width=8)
        x = torch.randn(4, 1, 8, 8)
        edges_float = recipe.layers.first_layer == "float" and recipe.layers.last_layer == "float"
        expected = 2 if edges_float else 4  # binary recipes keep first and last in float
    report = quantize_model(net, recipe.weights, recipe.activations, recipe.layers)
    assert len(report.quantized) == expected
    out = net(x)
    out.sum().backward()
    assert torch.isfinite(out).all()


def test_base_inheritance_and_overrides():
    r = load_recipe("lsq_w2a2")
    assert r.weights.bits == 2
    assert r.weights.method == "lsq"
    assert r.training.weight_decay == 2.5e-5
    r = load_recipe("lsq_w4a4", overrides=["weights.bits=3", "layers.first_layer=float"])
    assert r.weights.bits == 3
    assert r.layers.first_layer == "float"


def test_load_by_path_dict_and_dictconfig(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: lsq_w4a4\ndescription: mine\nweights:\n  bits: 5\n")
    assert load_recipe(str(path)).weights.bits == 5
    assert load_recipe(path).name == "mine"
    assert load_recipe({"description": "d", "weights": {"bits": 6}}).weights.bits == 6
    assert load_recipe(OmegaConf.create({"description": "d", "base": "pact_w4a4"})).activations.method == "pact"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "description: x\nweights:\n  bitz: 4\n",
            r"bad\.yaml: Key 'bitz' not in 'QuantizerConfig'\. Did you mean: 'bits'\?",
        ),
        ("description: x\nweights:\n  bits: 9\n", r"bad\.yaml: weights\.bits=9 is not allowed; allowed: 1 to 8"),
        ("description: x\nweights:\n  bits: eight\n", r"bad\.yaml: .*'eight'.*weights\.bits"),
        (
            "description: x\nactivations:\n  granularity: per_channel\n",
            r"activations\.granularity='per_channel'.*quantized per_tensor, or per_token",
        ),
        ("description: x\nweights:\n  method: pact\n", r"weights\.method='pact'.*activation only"),
        ("description: x\nactivations:\n  observer: magic\n", r"activations\.observer='magic'.*allowed: \['ema'"),
        ("description: x\nlayers:\n  types: [LSTM]\n", r"layers\.types\[0\]='LSTM'.*allowed"),
        (
            "description: x\nlayers:\n  first_layer: sometimes\n",
            r"layers\.first_layer='sometimes'.*'float', '8bit', 'same'",
        ),
        ("weights:\n  bits: 4\n", r"bad\.yaml: key 'description' is required"),
        ("description: x\nkind: magic\n", r"kind='magic' is not allowed"),
        ("description: x\ndorefa: 1\n", r"Key 'dorefa' not in 'Recipe'"),
        (
            "description: x\nweights:\n  method: dorefa\n  granularity: per_channel\n",
            r"dorefa quantizer supports per_tensor",
        ),
        ("description: x\ntraining:\n  optimizer: rmsprop\n", r"training\.optimizer='rmsprop'"),
        ("description: x\nschedule:\n  start_epoch: -1\n", r"schedule\.start_epoch=-1"),
    ],
)
def test_bad_recipes_give_clear_errors(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)


def test_unknown_name_and_bad_override():
    with pytest.raises(RecipeError, match=r"recipe 'lsq_w5a5' not found.*lsq_w4a4"):
        load_recipe("lsq_w5a5")
    with pytest.raises(RecipeError, match=r"override 'weights\.bitz=3': Key 'bitz'"):
        load_recipe("lsq_w4a4", overrides=["weights.bitz=3"])
    with pytest.raises(RecipeError, match=r"must look like key\.path=value"):
        load_recipe("lsq_w4a4", overrides=["weights.bits"])


def test_base_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\ndescription: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ndescription: b\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_fingerprint_ignores_schedule_but_not_bits():
    a = load_recipe("lsq_w4a4")
    assert a.fingerprint() == load_recipe("lsq_w4a4", ["training.epochs=3", "schedule.start_epoch=1"]).fingerprint()
    assert a.fingerprint() != load_recipe("lsq_w4a4", ["weights.bits=3"]).fingerprint()


def test_recipes_are_packaged_in_the_wheel(tmp_path):
    root = recipes_dir().parent
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
    )
    wheel = next(tmp_path.glob("lightning_quant-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for name in REQUIRED:
        assert f"lightning_quant/_recipes/{name}.yaml" in names
