"""Tests for keras_varinit.training.config: TrainConfig, the single schema of a run, and what
is derived from it (validation and its one message format, Problem, the slug, the
`keras-varinit train` options, the explorer's controls)."""
import argparse
import dataclasses
import pathlib
import re

import pytest

from explorer import presets
from keras_varinit import models
from keras_varinit.cli import train as cli_train
from keras_varinit.applications import APPLICATIONS
from keras_varinit.training.config import (NETWORK, TRAINING, Problem, TrainConfig, Widget,
                                           WidgetKind, fields, option)
from tests.test_training import tiny

REPO = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("overrides, match", [
    ({"depth": 1}, "depth=1"),
    ({"depth": 2.5}, "depth=2.5"),
    ({"init": "no_such_init"}, "init='no_such_init'"),
    ({"init": "normal:-1"}, "init='normal:-1'"),
    ({"activation": "bogus"}, "activation='bogus'"),
    ({"model": "resnet"}, "model='resnet'"),
    ({"normalization": "pooled"}, "normalization='pooled'"),
    ({"model": "mlp", "normalization": "batch_per_sample"}, "batch_per_sample"),
    ({"model": "mlp", "normalization": "instance"}, "normalization='instance'"),
    ({"normalization": "group", "width": 4, "groups": 8}, "groups=8. Allowed: 1, 2, 4"),
    ({"groups": 0}, "groups=0"),
    ({"optimizer": "lamb"}, "optimizer='lamb'"),
    ({"lr": 0.0}, "lr=0.0"),
    ({"lr": float("nan")}, "lr=nan"),
    ({"momentum": 1.0}, "momentum=1.0"),
    ({"epochs": 0}, "epochs=0"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"subset": -5}, "subset=-5"),
    ({"distribute": "tpu"}, "distribute='tpu'"),
    ({"stats_every_n_steps": -1}, "stats_every_n_steps=-1"),
])
def test_bad_config_raises_with_received_and_allowed(overrides, match):
    config = TrainConfig(**{**tiny().to_dict(), **overrides})
    with pytest.raises(ValueError, match="Received") as info:
        config.validate()
    assert match in str(info.value)
    assert "Allowed" in str(info.value)


def test_missing_data_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        tiny(data=str(tmp_path / "no_such_dir")).validate()


def test_config_roundtrip_and_slug():
    config = tiny(init="normal:0.01", normalization="batch", subset=0)
    assert config.subset is None  # 0 = all
    data = config.to_dict()
    assert TrainConfig.from_dict(dict(data, synthetic=True, device="CPU")) == config
    with pytest.raises(ValueError, match="depht"):
        TrainConfig.from_dict(dict(data, depht=3))
    slug = config.slug()
    assert slug.startswith("cnn-d3-w4-normal0.01-relu-norm_batch-sgd-lr0.01")
    assert "/" not in slug and ":" not in slug
    assert TrainConfig().slug() == "cnn-d30-w16-kaiming_normal-relu-sgd-lr0.01-s0"  # no "none"


@pytest.mark.parametrize("old, new", [(None, "none"), ("none", "none"), ("pooled", "batch"),
                                      ("per_sample", "batch_per_sample")])
def test_an_older_config_json_with_batch_norm_is_read(old, new):
    """Runs written before the normalization choice say batch_norm: from_dict maps it."""
    record = dict(tiny().to_dict(), synthetic=True, device="CPU", slug="x")
    del record["normalization"], record["groups"]
    record["batch_norm"] = old
    config = TrainConfig.from_dict(record)
    assert config.normalization == new and config.groups == models.DEFAULT_GROUPS
    config.validate()
    with pytest.raises(ValueError, match=r"Received: batch_norm='group'. Allowed: None, "
                                         r"'none', 'pooled', 'per_sample'"):
        TrainConfig.from_dict(dict(record, batch_norm="group"))


def test_problems_are_typed_blocking_or_advice():
    assert TrainConfig().problems() == []
    (blocking,) = TrainConfig(model="mlp", normalization="batch_per_sample").problems()
    assert blocking.blocking and "Per-sample batch normalization" in blocking.text
    assert "Allowed: 'none', 'batch', 'layer', 'group' for an MLP" in blocking.text
    (advice,) = TrainConfig(lr=3.0).problems()
    assert advice == Problem(blocking=False, text=advice.text) and "diverge" in advice.text
    TrainConfig(lr=3.0).validate()  # advice does not block


@pytest.mark.parametrize("kind, normalization, width, groups", [
    ("mlp", "batch_per_sample", 256, 8), ("mlp", "instance", 256, 8), ("cnn", "group", 12, 8)])
def test_the_normalization_refusals_are_the_models_rule(kind, normalization, width, groups):
    """One home: TrainConfig calls models.check_normalization, which the models also use."""
    with pytest.raises(ValueError) as from_models:
        models.check_normalization(kind, normalization, width, groups)
    with pytest.raises(ValueError) as from_config:
        TrainConfig(model=kind, normalization=normalization, width=width,
                    groups=groups).validate()
    assert str(from_config.value) == str(from_models.value)
    models.check_normalization("cnn", normalization, 16, groups)


def test_choices_are_the_models_own():
    specs = {spec.name: spec for spec in fields(TrainConfig)}
    assert specs["activation"].choices == models.ACTIVATIONS
    assert specs["normalization"].choices == models.NORMALIZATIONS
    assert specs["model"].choices == models.KINDS + ("file", "application")
    assert specs["application"].choices == (None, *APPLICATIONS)
    for spec in specs.values():  # what the explorer offers is allowed by the schema
        if spec.widget is not None and spec.choices:
            assert set(spec.widget.options) <= set(spec.choices), spec.name


# --------------------------------------------------------------------------- derived

@dataclasses.dataclass
class WithPrecision(TrainConfig):
    """The schema plus one field, declared as any field is: CLI and explorer must follow."""

    precision: str = option("float32", "compute dtype of the layers",
                            choices=("float32", "bfloat16"), slug="{}",
                            widget=Widget(WidgetKind.RADIO, "Precision", TRAINING))


def test_a_new_field_with_choices_reaches_the_cli_and_the_explorer(tmp_path):
    # the CLI: an option with its choices, parsed into the config, checked by the config
    parser = argparse.ArgumentParser(prog="keras-varinit")
    sub = cli_train.add_parser(parser.add_subparsers(dest="command"), schema=WithPrecision)
    assert re.search(r"--precision \{float32,bfloat16\}", sub.format_help())
    args = parser.parse_args(["train", "--precision", "bfloat16"])
    config = cli_train.config_from_args(args, WithPrecision)
    assert isinstance(config, WithPrecision) and config.precision == "bfloat16"
    assert config.slug().endswith("-bfloat16")
    assert cli_train.config_argv(config)[-2:] == ["--precision", "bfloat16"]
    with pytest.raises(ValueError, match="Received: precision='fp8'. Allowed: 'float32', "
                                         "'bfloat16'"):
        cli_train.config_from_args(parser.parse_args(["train", "--precision", "fp8"]),
                                   WithPrecision).validate()
    # the explorer: a control with the same choices, a default, URL round trip, validation
    control = presets.controls(WithPrecision)["precision"]
    assert presets.offered(control) == ["float32", "bfloat16"]
    assert presets.defaults(WithPrecision)["precision"] == "float32"
    assert presets.controls(TrainConfig).keys() < presets.controls(WithPrecision).keys()
    settings, notes = presets.from_query({"precision": "bfloat16"}, WithPrecision)
    assert settings["precision"] == "bfloat16" and notes == []
    assert presets.to_query(settings, WithPrecision) == {"precision": "bfloat16"}
    settings, notes = presets.from_query({"precision": "fp8"}, WithPrecision)
    assert settings["precision"] == "float32" and "precision" in notes[0]
    bad = presets.problems(dict(presets.defaults(WithPrecision), precision="fp8"),
                           WithPrecision)
    assert bad[0].blocking and "precision='fp8'" in bad[0].text
    assert presets.to_config(settings, WithPrecision).precision == "float32"


def test_explorer_settings_are_the_schema_fields_with_a_widget():
    """... and the fields the page sets itself (the stored upload of a "file" model)."""
    with_widget = [spec.name for spec in fields(TrainConfig) if spec.widget is not None]
    assert list(presets.DEFAULTS) == with_widget + ["model_file"]
    assert presets.PAGE_FIELDS == ("model_file",) and presets.DEFAULTS["model_file"] is None
    assert "model_file" not in presets.to_query({**presets.DEFAULTS, "model": "file",
                                                 "model_file": "/runs/uploads/a.keras"})
    assert {spec.widget.section for spec in fields(TrainConfig) if spec.widget} == \
        {NETWORK, TRAINING}
    config = presets.to_config(presets.DEFAULTS)
    assert config.normalization == "none" and config.epochs == 3  # the page's own default
    for name in presets.PROFILE_KEYS:
        assert next(s for s in fields(TrainConfig) if s.name == name).at_init


# --------------------------------------------------------------------------- one home each

def _definitions(pattern):
    """Where ``pattern`` (a regular expression) matches in the package and the explorer."""
    found = []
    sources = [*(REPO / "keras_varinit").rglob("*.py"), *(REPO / "explorer").glob("*.py")]
    for path in sorted(sources):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line):
                found.append(f"{path.relative_to(REPO)}:{number}")
    return found


@pytest.mark.parametrize("what, pattern, home", [
    ("choice validator", r"^def _?check_choice\(", "keras_varinit/checks.py"),
    ("utc_now", r"^def utc_now\(", "keras_varinit/run_files.py"),
    ("slug function", r"^\s*def slug\(", "keras_varinit/training/config.py"),
    ("layer-statistics fields", r'"step", "epoch", "layer", "layer_index"',
     "keras_varinit/run_files.py"),
    ("metrics columns", r'"train_eval_accuracy", "seconds"\)', "keras_varinit/run_files.py"),
    ("old batch_norm values", r"^LEGACY_BATCH_NORM = ", "keras_varinit/run_files.py"),
    ("normalization choices", r"^NORMALIZATIONS = ", "keras_varinit/net_options.py"),
    ("normalization rule", r"^def check_normalization\(", "keras_varinit/net_options.py"),
    ("initializer names", r"^(INITIALIZER_)?NAMES = \(", "keras_varinit/net_options.py"),
    ("model sources", r"^USER_MODELS = ", "keras_varinit/training/config.py"),
    ("applications offered", r"^APPLICATIONS = ", "keras_varinit/applications.py"),
    ("run-directory naming", r"strftime\(\"%Y%m%d-%H%M%S\"\)", "keras_varinit/run_files.py"),
])
def test_each_rule_and_format_has_one_home(what, pattern, home):
    found = _definitions(pattern)
    assert len(found) == 1 and found[0].startswith(home + ":"), (what, found)


def test_a_run_gets_only_its_models_settings():
    """The page keeps every control's value; a run's config only what its model uses."""
    page = {**presets.DEFAULTS, "model": "application", "application": "ResNet50",
            "depth": 12, "init": "xavier_normal", "model_file": "/r/uploads/a.keras"}
    config = presets.to_config(page)
    assert (config.model, config.application, config.model_file) == \
        ("application", "ResNet50", None)
    assert (config.depth, config.init) == (30, "kaiming_normal")     # the schema's defaults
    assert not presets.blocking_problems(page)
    cnn = presets.to_config({**page, "model": "cnn"})
    assert (cnn.application, cnn.depth, cnn.init) == (None, 12, "xavier_normal")
    assert presets.profile_key({**page, "depth": 40}) == presets.profile_key(page)
