import subprocess
import sys
import time
import zipfile

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf
from torch import nn

from lightning_quant import (
    Binarization,
    IncrementalQuantization,
    PostTrainingQuantization,
    QuantizationAwareTraining,
    list_recipes,
    load_recipe,
)
from lightning_quant.examples import DigitsCNN
from lightning_quant.nn import quantize_model
from lightning_quant.recipes import RecipeError, describe_recipes, recipes_dir

# the recipes the project promises to ship (a fixed list on purpose: dropping one must fail)
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
            r"bad\.yaml: weights\.bitz is not a recipe key; did you mean weights\.bits\?",
        ),
        ("description: x\nweights:\n  bits: 9\n", r"bad\.yaml: weights\.bits=9 is not allowed; allowed: 1 to 8"),
        ("description: x\nweights:\n  bits: eight\n", r"bad\.yaml: weights\.bits='eight' is not allowed; an integer"),
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
        ("description: x\ndorefa: 1\n", r"bad\.yaml: dorefa is not a recipe key"),
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
    with pytest.raises(RecipeError, match=r"override 'weights\.bitz=3': weights\.bitz is not a recipe key"):
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


# -- issue 14: interpolation, malformed input, kinds, bombs ------------------------------------------------------------
def _bad(tmp_path, text, name="bad.yaml"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_interpolations_are_refused_and_never_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("LQ_TEST_SECRET", "hunter2")
    path = _bad(tmp_path, "base: lsq_w4a4\ndescription: ${oc.env:LQ_TEST_SECRET}\n")
    match = r"bad\.yaml: description='\$\{oc\.env:LQ_TEST_SECRET\}'.*interpolations"
    with pytest.raises(RecipeError, match=match) as err:
        load_recipe(path)
    assert "hunter2" not in str(err.value)
    nested = _bad(tmp_path, "description: x\nlayers:\n  include: ['${oc.env:LQ_TEST_SECRET}']\n", "nested.yaml")
    with pytest.raises(RecipeError, match=r"nested\.yaml: layers\.include\[0\]="):
        load_recipe(nested)
    with pytest.raises(RecipeError, match=r"override 'description=\$\{oc\.env:LQ_TEST_SECRET\}': description="):
        load_recipe("lsq_w4a4", ["description=${oc.env:LQ_TEST_SECRET}"])
    for data in ({"description": "${oc.env:LQ_TEST_SECRET}"}, OmegaConf.create({"description": "${kind}"})):
        with pytest.raises(RecipeError, match=r"<dict>: description="):
            load_recipe(data)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("description: x\nlayers:\n  include: [[net.*]]\n", r"layers\.include\[0\]=\['net\.\*'\].*a string is"),
        ("description: x\nweights: {bits: '???'}\n", r"weights\.bits='\?\?\?'.*missing value"),
        ("description: x\nlayers: {overrides: [{skip: true}]}\n", r"layers\.overrides\[0\]\.pattern=.*glob is"),
        ("description: x\nlayers:\n  types: [{a: 1}]\n", r"layers\.types\[0\]=\{'a': 1\}.*a string is expected"),
        (
            "description: x\nlayers:\n  overrides:\n    - {pattern: a}\n    - {pattern: b, wbits: 3}\n",
            r"layers\.overrides\[1\]\.wbits is not a recipe key",
        ),
        ("description: x\nweights: x\n", r"weights='x' is not allowed; a mapping of QuantizerConfig keys is expected"),
        ("description: x\nweights:\n  bits: 8\n  bits: 2\n", r"bad\.yaml: weights\.bits \(line 4\): duplicate key"),
        ("description: x\ndescription: y\n", r"duplicate key 'description'"),
        ("description: !!python/object/apply:os.getcwd []\n", r"bad\.yaml: not valid YAML"),
        ("description: x\nweights: {bits: [4}\n", r"bad\.yaml: not valid YAML"),
        ("- description\n", r"bad\.yaml: a recipe must be a mapping"),
        ("description: x\n1: 2\n", r"bad\.yaml: key 1 in the recipe is not a name"),
        ("base: lsq_w4a5\ndescription: x\n", r"bad\.yaml: base='lsq_w4a5': recipe not found; did you mean 'lsq_w4a4'"),
        ("base: [lsq_w4a4]\ndescription: x\n", r"bad\.yaml: base=\['lsq_w4a4'\] is not allowed"),
        ("description: x\ntraining: {lr: .inf}\n", r"training\.lr=inf.*finite"),
        ("description: x\ntraining: {lr: .nan}\n", r"training\.lr=nan.*finite"),
        ("description: x\ntraining: {lr: 0}\n", r"training\.lr=0\.0.*positive"),
        ("description: x\ntraining: {weight_decay: -1.0e-4}\n", r"training\.weight_decay=-0\.0001"),
        ("description: x\ntraining: {momentum: -0.5}\n", r"training\.momentum=-0\.5"),
        ("description: x\ntraining: {epochs: 1.5}\n", r"training\.epochs=1\.5.*an integer"),
        ("description: x\ndiagnostics: {summary: 2}\n", r"diagnostics\.summary=2.*true or false"),
        ("description: x\nweights: {percentile: 100.5}\n", r"weights\.percentile=100\.5"),
        ("description: x\nweights: {axis: 9}\n", r"weights\.axis=9"),
        ("description: x\nweights: {bits: 100000000000000000000}\n", r"weights\.bits=.*below 2\^63"),
        ("description: x\ninq: {seed: -1}\n", r"inq\.seed=-1"),
    ],
)
def test_malformed_recipes_name_file_and_key_path(tmp_path, text, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(_bad(tmp_path, text))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("gptq_block_size", "0"),
        ("damp", "-0.1"),
        ("norm_epochs", "-1"),
        ("norm_lr", "-1.0e-5"),
        ("reg_weight", "-1"),
        ("num_samples", "0"),
        ("iters", "-1"),
        ("batch_size", "0"),
        ("seed", "-1"),
        ("beta_end", "0"),
        ("cache_limit_mb", "-5"),
        ("blocks", "''"),
    ],
)
def test_ptq_numbers_are_range_checked(tmp_path, key, value):
    base = "adaround_w4a8" if key in ("reg_weight", "iters", "beta_end") else "normtweak_w4g128"  # whose key it is
    path = _bad(tmp_path, f"base: {base}\ndescription: x\nptq:\n  {key}: {value}\n")
    with pytest.raises(RecipeError, match=rf"bad\.yaml: ptq\.{key}=.* is not allowed"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"description: caf\xe9\n", r"bad\.yaml: not UTF-8 text \(byte 0xe9 at offset 16\)"),
        ("description: x\n".encode("utf-16"), r"bad\.yaml: UTF-16 text"),
        ("description: x\n".encode("utf-16-le"), r"bad\.yaml: contains NUL characters"),
        (b"description: x\nlayers:\n  include: " + b"[" * 1200 + b"]" * 1200, r"nested more than 32 levels"),
        (b"description: x\n#" + b"x" * 70000, r"bad\.yaml: larger than 64 KiB"),
    ],
)
def test_unreadable_files_are_refused(tmp_path, data, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(_bad(tmp_path, data))


def _bomb(levels, key="d"):
    lines = ["description: x", "a: &a [x,x,x,x,x,x,x,x,x,x]"]
    names = "abcdefghij"
    for i in range(1, levels):
        lines.append(f"{names[i]}: &{names[i]} [{','.join([f'*{names[i - 1]}'] * 10)}]")
    return "\n".join(lines) + "\n"


def test_alias_bombs_are_refused_fast(tmp_path):
    text = _bomb(4)
    assert len(text) <= 221
    start = time.perf_counter()
    with pytest.raises(RecipeError, match=r"bad\.yaml: .*more than 5000 values once aliases"):
        load_recipe(_bad(tmp_path, text))
    with pytest.raises(RecipeError, match=r"more than 5000 values"):  # 10^9 values if it were expanded
        load_recipe(_bad(tmp_path, _bomb(9), "nine.yaml"))
    in_exclude = "description: x\nlayers:\n  exclude: &c [&b [&a [x,x,x,x,x,x,x,x,x,x], *a,*a,*a,*a,*a,*a,*a], *b,*b]\n"
    with pytest.raises(RecipeError, match=r"bad3\.yaml: layers\.exclude\[0\]=.*a string is expected"):
        load_recipe(_bad(tmp_path, in_exclude, "bad3.yaml"))
    with pytest.raises(RecipeError, match=r"alias \*a refers to itself"):
        load_recipe(_bad(tmp_path, "description: x\nlayers: {exclude: &a [*a]}\n", "self.yaml"))
    assert time.perf_counter() - start < 10  # unbounded, the 9-level bomb takes about an hour


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["layers.overrides.0.skip=true"], r"layers\.overrides has 0 entries; set the whole list"),
        (["layers.overrides={pattern: a}"], r"layers\.overrides=\{'pattern': 'a'\} is not allowed; a list of mappings"),
        (["weights.bits=[4"], r"override 'weights\.bits=\[4': the value of weights\.bits: not valid YAML"),
        (["weights.bits=!!python/object/apply:os.getcwd []"], r"the value of weights\.bits: not valid YAML"),
        (["weights.bits.x=1"], r"weights\.bits=4 is not a mapping"),
        (["weights..bits=3"], r"'weights\.\.bits' is not a key path"),
        (["base=lsq_w2a2"], r"base cannot be overridden"),
        (["layers.include=[[a]]"], r"override 'layers\.include=\[\[a\]\]': layers\.include\[0\]="),
        ([5], r"overrides item=5 is not allowed"),
    ],
)
def test_bad_override_strings_are_recipe_errors(overrides, match):
    with pytest.raises(RecipeError, match=match) as err:
        load_recipe("lsq_w4a4", overrides)
    assert "lsq_w4a4.yaml" in str(err.value)


def test_override_strings_reach_list_items_and_one_string_is_one_override():
    data = {"base": "lsq_w4a4", "description": "d", "layers": {"overrides": [{"pattern": "a"}, {"pattern": "b"}]}}
    r = load_recipe(data, ["layers.overrides.0.skip=true", "layers.overrides[1].weight_bits=3"])
    assert r.layers.overrides[0].skip and r.layers.overrides[1].weight_bits == 3
    assert load_recipe("lsq_w4a4", "weights.bits=3").weights.bits == 3
    assert load_recipe("normtweak_w4g128", ["ptq.norm_lr=1e-3", "weights.bits=3"]).ptq.options.norm_lr == 1e-3
    assert QuantizationAwareTraining("lsq_w4a4", overrides="weights.bits=3").recipe.weights.bits == 3
    assert PostTrainingQuantization("minmax_w8a8", overrides="weights.bits=6").recipe.weights.bits == 6
    assert IncrementalQuantization("inq_5bit", overrides="weights.bits=4").recipe.weights.bits == 4


def test_errors_in_a_base_name_the_base_file(tmp_path):
    _bad(tmp_path, "description: parent\nweights:\n  bits: 12\n", "parent.yaml")
    child = _bad(tmp_path, "base: parent.yaml\ndescription: child\n", "child.yaml")
    with pytest.raises(RecipeError, match=r"parent\.yaml: weights\.bits=12 is not allowed"):
        load_recipe(child)
    _bad(tmp_path, "base: nowhere.yaml\ndescription: parent\n", "parent2.yaml")
    with pytest.raises(RecipeError, match=r"parent2\.yaml: base='nowhere\.yaml': recipe not found"):
        load_recipe(_bad(tmp_path, "base: parent2.yaml\ndescription: c\n", "child2.yaml"))


@pytest.mark.parametrize(
    ("recipe", "overrides", "match"),
    [
        ("bnn", ["weights.bits=4"], r"weights\.bits=4 is not allowed; kind: binary, bnn is binary \(1 bit\)"),
        ("twn", ["weights.bits=1"], r"weights\.bits=1.*kind: binary, twn is ternary \(2 bits\)"),
        ("bnn", ["layers.first_layer=8bit"], r"layers\.first_layer='8bit'.*kind: binary.*use float or same"),
        ("bnn", ["layers.overrides=[{pattern: a, weight_bits: 4}]"], r"layers\.overrides\[0\]\.weight_bits=4.*binary"),
        ("bnn", ["activations.method=lsq", "activations.bits=4"], r"activations\.method='lsq'.*kind: binary"),
        ("bnn", ["weights.method=lsq"], r"weights\.method='lsq'.*kind: binary needs a binary method"),
        ("bnn", ["ptq.num_samples=64"], r"ptq\.num_samples=64.*kind: binary does not use the ptq section"),
        ("lsq_w4a4", ["inq.levels=ternary"], r"inq\.levels='ternary'.*kind: qat does not use the inq section"),
        ("lsq_w4a4", ["ptq.num_samples=64"], r"ptq\.num_samples=64.*kind: qat.*observer methods"),
        ("lsq_w4a4", ["weights.enabled=false", "activations.enabled=false"], r"kind: qat with weights and .*nothing"),
        ("lsq_w4a4", ["weights.method=bnn", "weights.bits=1"], r"weights\.method='bnn'.*need kind: binary"),
        ("inq_5bit", ["weights.method=lsq"], r"weights\.method='lsq'.*kind: inq uses only weights\.bits"),
        ("inq_5bit", ["activations.enabled=true"], r"activations\.enabled=True.*kind: inq quantizes weights only"),
        ("inq_5bit", ["layers.first_layer=8bit"], r"layers\.first_layer='8bit'.*kind: inq"),
        ("inq_5bit", ["layers.fold_bn=true"], r"layers\.fold_bn=True.*kind: inq"),
        ("inq_5bit", ["schedule.start_epoch=1"], r"schedule\.start_epoch=1.*kind: inq does not use the schedule"),
        ("mse_w4a8", ["schedule.start_epoch=1"], r"schedule\.start_epoch=1.*kind: ptq does not use the schedule"),
        ("mse_w4a8", ["activations.enabled=false", "weights.enabled=false"], r"kind: ptq with weights and"),
        ("pact_w4a4", ["activations.bits=1"], r"activations\.bits=1.*PACT activations need 2 bits"),
        ("pact_w4a4", ["layers.overrides=[{pattern: a, activation_bits: 1}]"], r"activation_bits=1.*PACT"),
    ],
)
def test_keys_a_kind_does_not_use_are_refused(recipe, overrides, match):
    with pytest.raises(RecipeError, match=match) as err:
        load_recipe(recipe, overrides)
    assert f"{recipe}.yaml" in str(err.value)


def test_contradiction_fails_at_callback_construction():
    with pytest.raises(MisconfigurationException, match=r"weights\.bits=4.*kind: binary"):
        Binarization("bnn", ["weights.bits=4"])
    with pytest.raises(MisconfigurationException, match=r"inq\.portions=.*kind: qat"):
        QuantizationAwareTraining("lsq_w4a4", ["inq.portions=[0.5,1.0]", "inq.epochs=[0,1]"])


def test_documented_variants_load():
    readme = (recipes_dir().parent / "README.md").read_text()
    section = readme.split("## Recipes", 1)[1]
    snippet = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    r = load_recipe(OmegaConf.create(snippet))
    assert (r.weights.bits, r.layers.overrides[0].skip) == (3, True)
    assert load_recipe("lsq_w4a4", ["weights.granularity=per_channel"]).weights.granularity == "per_channel"
    assert load_recipe("minmax_w8a8", ["ptq.num_samples=64"]).ptq.num_samples == 64  # PTQ runs observer-only QAT
    assert load_recipe("binaryconnect").activations.enabled is False  # inherited bnn activation keys are fine
    assert load_recipe("pact_w4a4", ["activations.bits=2"]).activations.bits == 2


def test_misspelled_name_suggests_instead_of_listing_all():
    with pytest.raises(RecipeError) as err:
        load_recipe("lsq_w4a5")
    msg = str(err.value)
    assert "did you mean 'lsq_w4a4'" in msg
    assert "bnn" not in msg and len(msg) < 200


def test_derived_recipe_without_description_says_what_it_changes(tmp_path):
    path = _bad(tmp_path, "base: lsq_w4a4\nweights:\n  bits: 5\n", "mine.yaml")
    r = load_recipe(path)
    assert r.description == "lsq_w4a4 with weights.bits=5"
    assert load_recipe("lsq_w4a4", ["weights.bits=3"]).description.endswith("(overrides: weights.bits=3)")
    descriptions = describe_recipes()
    assert descriptions["lsq_w2a2"].startswith("LSQ fine-tuning at 2-bit")
    assert all("${" not in d and "(overrides" not in d for d in descriptions.values())


def test_kind_errors_say_where_the_kind_was_set(tmp_path):
    path = _bad(tmp_path, "base: adaround_w4a8\ndescription: x\nkind: qat\n", "mine.yaml")
    match = r"adaround_w4a8\.yaml: ptq\.algorithm='adaround'.*\(kind: qat is set in .*mine\.yaml\)"
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)
    match = r"bnn\.yaml: weights\.method='bnn'.*\(kind: qat is set in .*override 'kind=qat'\)"
    with pytest.raises(RecipeError, match=match):
        load_recipe("bnn", ["kind=qat"])


def test_python_inputs_are_plain_data_only():
    loop = {"description": "x"}
    loop["layers"] = loop
    with pytest.raises(RecipeError, match=r"<dict>: layers\.layers.*past the recipe limits"):
        load_recipe(loop)
    with pytest.raises(RecipeError, match=r"<dict>: weights\.bits=tensor\(4\).*a Tensor is not a recipe value"):
        load_recipe({"description": "x", "weights": {"bits": torch.tensor(4)}})
    recipe = load_recipe("lsq_w4a4")
    recipe.description = "${oc.env:HOME}"  # a Recipe object goes through the same checks
    with pytest.raises(MisconfigurationException, match=r"lsq_w4a4\.yaml: description=.*interpolations"):
        QuantizationAwareTraining(recipe)
