"""Property-based fuzzing of recipes (hypothesis): every mutated shipped recipe is either refused by a
``RecipeError`` naming the file and the key's full path, or accepted and runnable (its callback builds and it
quantizes a small model whose outputs stay finite). Derandomized, so CI sees the same variants every run."""

import copy
import dataclasses
import math
import re
import typing

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_quant import (
    Binarization,
    IncrementalQuantization,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    list_recipes,
    load_recipe,
    quantize_model,
)
from lightning_quant.recipes import Recipe, RecipeError, recipes_dir

NAMES = list_recipes()
RAW = {n: yaml.safe_load((recipes_dir() / f"{n}.yaml").read_text()) for n in NAMES}
SECTIONS = [f.name for f in dataclasses.fields(Recipe) if f.name != "source"]
# a key path in a message: a section, then .key or [i] segments, then what is said about it
KEY_IN_MESSAGE = re.compile(
    rf"(?<![\w.])({'|'.join(SECTIONS)})(\.[A-Za-z_]\w*|\[[0-9]+\])*(=| is | has | cannot| \(line|'? is required)"
)
RUNNERS = {
    "qat": QuantizationAwareTraining,
    "ptq": PostTrainingQuantization,
    "binary": Binarization,
    "inq": IncrementalQuantization,
}
# a deliberate few covering every kind and the recipes with extra sections or modules (ReActNet's RPReLU,
# sketch bases, ELQ levels, GPTQ groups, dynamic activations); all 42 shipped recipes take ~30 s here
ROUND_TRIP = ["lsq_w4a4", "bnn", "reactnet", "sketch_m3", "elq_binary", "gptq_w2g64", "w8a8_dynamic"]
SHIPPED_FILES = [str(recipes_dir() / f"{n}.yaml") for n in NAMES]
COUNTS = {"tried": 0, "accepted": 0, "refused": 0, "model_mismatch": 0}


def _leaf_paths(cls, prefix=""):
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        if name == "source":
            continue
        path = f"{prefix}.{name}" if prefix else name
        out += _leaf_paths(tp, path) if dataclasses.is_dataclass(tp) else [path]
    return out


LEAVES = _leaf_paths(Recipe) + ["layers.overrides[0].pattern", "layers.overrides[0].weight_bits"]
NUMBERS = [-1, 0, 1, 2, 3, 4, 8, 9, 16, 64, 128, 0.5, 0.999, 1e-3, 1e30, math.nan, math.inf, -math.inf, 10**20, 1.5]
WORDS = ["per_channel", "per_group", "per_token", "float", "same", "8bit", "lsq", "observer", "pact", "dorefa", "dsq"]
WORDS += ["bnn", "xnor", "twn", "sketch", "rsign", "dynamic", "mse", "minmax", "ema", "percentile", "ternary", "adam"]
WORDS += ["gptq", "none", "train", "Linear", "Conv2d", "*", "net.*", "qat", "ptq", "binary", "inq"]
JUNK = ["", "x", "???", "${oc.env:HOME}", "${kind}", None, [], [["a"]], {}, {"a": 1}, True, False, "1e-3", "nan"]
VALUES = st.sampled_from(NUMBERS + WORDS + JUNK).map(copy.deepcopy)  # fresh objects: mutations stay local
OVERRIDE_VALUES = ["3", "8", "-1", "0", "1e-3", ".nan", ".inf", "true", "[a]", "{a: 1}", "x", "'???'", "per_channel"]
OVERRIDE_VALUES += ["float", "", "[4", "!!python/name:os.system", "${oc.env:HOME}", "[[a]]", "lsq", "1"]
SPECIAL_OVERRIDES = [
    "layers.overrides.0.skip=true",
    "layers.overrides={pattern: a}",
    "layers.overrides=[{pattern: '*', skip: true}]",
    "weights.bits=[4",
    "weights.bits",
    "=3",
    "weights..bits=1",
    "base=bnn",
    "layers.include=[[a]]",
    "inq.levels=ternary",
    "ptq.num_samples=64",
    "activations.enabled=false",
    "weights.enabled=false",
    "kind=binary",
]
VALID = {  # values that some recipes take: they make accepted variants common enough to exercise running them
    "weights.bits": [2, 3, 4, 8],
    "activations.bits": [2, 4, 8],
    "weights.granularity": ["per_channel", "per_tensor"],
    "weights.symmetric": [False, True],
    "weights.observer": ["mse", "percentile", "minmax"],
    "activations.observer": ["minmax", "percentile", "ema"],
    "activations.momentum": [0.1],
    "layers.first_layer": ["float", "same"],
    "layers.last_layer": ["float", "same"],
    "layers.include": [["*"], ["1*", "0"]],
    "layers.exclude": [["2"]],
    "layers.fold_bn": [True],
    "training.lr": [0.1, 1e-3],
    "training.epochs": [1, 3],
    "diagnostics.summary": [False],
    "diagnostics.every_n_steps": [0, 5],
}
WRONG_KIND = [{"inq": {"levels": "ternary"}}, {"ptq": {"num_samples": 64}}, {"schedule": {"start_epoch": 1}}]
BASES = ["lsq_w4a5", "nope", "", ["lsq_w4a4"], 5, "../x.yaml", "lsq_w4a4", "bnn", "inq_5bit", "mse_w4a8"]


def _paths(data, prefix=""):
    """(path, container, key) for every key and list item of the raw YAML data."""
    out = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
    for key, value in items:
        path = f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}" if prefix else str(key)
        out.append((path, data, key))
        out += _paths(value, path)
    return out


def _typo(key, draw):
    i = draw(st.integers(0, len(key)))
    return draw(st.sampled_from([key[:i] + "z" + key[i:], key[:i] + key[i + 1 :], key.upper(), key + "s"])) or "k"


def _set(data, path, value):
    """Set a dotted path (creating mappings on the way; ``[0]`` makes a one-item list)."""
    parts = path.replace("[0]", "").split(".")
    node = data
    for part in parts[:-1]:
        if part == "overrides":
            node = node.setdefault("overrides", [{}])
            node = node[0] if isinstance(node, list) and node and isinstance(node[0], dict) else {}
            continue
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


@st.composite
def variants(draw):
    """A shipped recipe with 1-3 mutations, and 0-2 override strings; also the key paths that were touched."""
    name = draw(st.sampled_from(NAMES))
    data = copy.deepcopy(RAW[name])
    touched = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["valid", "valid", "set", "set", "typo", "nest", "base", "kind", "section", "drop"]))
        op = draw(st.sampled_from([op, "interp"])) if op == "drop" else op
        paths = _paths(data)
        if op == "valid":
            path = draw(st.sampled_from(sorted(VALID)))
            _set(data, path, copy.deepcopy(draw(st.sampled_from(VALID[path]))))
            touched.append(path)
        elif op == "set":
            path = draw(st.sampled_from(LEAVES))
            _set(data, path, draw(VALUES))
            touched.append(path)
        elif op == "typo" and paths:
            path, parent, key = draw(st.sampled_from(paths))
            if isinstance(key, str):
                new = _typo(key, draw)
                parent[new] = parent.pop(key)
                touched.append(path.rsplit(".", 1)[0] + "." + new if "." in path else new)
        elif op == "nest" and paths:
            path, parent, key = draw(st.sampled_from(paths))
            parent[key] = draw(st.sampled_from([[[parent[key]]], {"k": parent[key]}, [parent[key]]]))
            touched.append(path)
        elif op == "base":
            data["base"] = copy.deepcopy(draw(st.sampled_from(BASES)))
            touched.append("base")
        elif op == "kind":
            data["kind"] = draw(st.sampled_from(["qat", "ptq", "binary", "inq", "magic"]))
            touched.append("kind")
        elif op == "section":
            extra = draw(st.sampled_from(WRONG_KIND))
            data.update(copy.deepcopy(extra))
            touched.append(next(iter(extra)))
        elif op == "drop" and paths:
            path, parent, key = draw(st.sampled_from(paths))
            parent.pop(key)
            touched.append(path)
        elif op == "interp":
            strings = [(p, c, k) for p, c, k in paths if isinstance(c[k], str)]
            if strings:
                path, parent, key = draw(st.sampled_from(strings))
                parent[key] = "${oc.env:HOME}"
                touched.append(path)
    overrides = []
    for _ in range(draw(st.integers(0, 2))):
        if draw(st.booleans()):
            overrides.append(draw(st.sampled_from(SPECIAL_OVERRIDES)))
        else:
            overrides.append(f"{draw(st.sampled_from(LEAVES))}={draw(st.sampled_from(OVERRIDE_VALUES))}")
    return name, data, overrides, touched


class Tile(nn.Module):
    """Flatten and repeat the features to 128, so that small layers still have rows of 128 inputs."""

    def forward(self, x):
        return x.flatten(1).repeat(1, 128 // x.flatten(1).shape[1])


def _model():
    """Every weight row has 128 values (any power-of-two group size up to 128 fits), with few rows (cheap)."""
    return nn.Sequential(
        nn.Conv2d(128, 4, 1), nn.ReLU(), Tile(), nn.Linear(128, 4), nn.ReLU(), Tile(), nn.Linear(128, 10)
    )


def _run(recipe):
    """Build the recipe's callback and quantize a small model with it; outputs and weights must stay finite."""
    callback = RUNNERS[recipe.kind](recipe)
    model = _model()
    x = torch.randn(4, 128, 1, 1)
    if recipe.kind == "inq":
        assert callback.layers(model)
        for stage in range(len(recipe.inq.portions)):
            callback._quantize_stage(model, stage)
    else:
        try:
            quantize_model(model, recipe.weights, recipe.activations, recipe.layers)
        except ValueError as err:  # the model, not the recipe: a group size that does not divide a row, or a glob
            if "multiple of group_size" not in str(err) and "matches no module" not in str(err):  # naming no module
                raise
            COUNTS["model_mismatch"] += 1
            return
    out = model(x)
    assert torch.isfinite(out).all(), f"{recipe.name}: non-finite output"
    out.square().mean().backward()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _check(variant, folder):
    name, data, overrides, touched = variant
    COUNTS["tried"] += 1
    path = folder / f"{COUNTS['tried']}" / f"{name}_mutant.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    try:
        recipe = load_recipe(path, overrides)
    except RecipeError as err:
        COUNTS["refused"] += 1
        msg = str(err)
        assert msg.startswith((str(path), *SHIPPED_FILES)), f"no file named first: {msg}"
        assert KEY_IN_MESSAGE.search(msg) or any(t and t in msg for t in touched), f"no key path named: {msg}"
        return
    COUNTS["accepted"] += 1
    _run(recipe)


def test_mutated_recipes_are_refused_clearly_or_run(tmp_path):
    COUNTS.update(dict.fromkeys(COUNTS, 0))

    @settings(
        max_examples=350,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(variants())
    def check(variant):
        _check(variant, tmp_path)

    check()
    print(f"recipe fuzz: {COUNTS}")  # for BENCHMARKS.md "Robustness"
    assert COUNTS["tried"] >= 300 and COUNTS["accepted"] >= 30 and COUNTS["refused"] >= 150


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_shipped_recipes_survive_a_round_trip_through_their_own_yaml(tmp_path, name):
    recipe = load_recipe(name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(recipe.to_yaml())
    again = load_recipe(path)
    assert again.fingerprint() == recipe.fingerprint()
    assert dataclasses.replace(again, source="") == dataclasses.replace(recipe, source="")
