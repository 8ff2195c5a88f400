"""TrainingConfig / EvaluationConfig validation, YAML loading and dotted overrides."""

from __future__ import annotations

import math

import pytest
import yaml

from traineval import EvaluationConfig, TrainingConfig
from traineval.config import apply_overrides

# field, bad value, words the error must contain
BAD_TRAINING_VALUES = [
    ("learning_rate", -1e-3, "learning_rate=-0.001"),
    ("learning_rate", 0.0, "> 0"),
    ("learning_rate", math.nan, "finite"),
    ("learning_rate", math.inf, "finite"),
    ("learning_rate", "fast", "number"),
    ("batch_size", 0, "batch_size=0"),
    ("batch_size", 2.5, "integer"),
    ("batch_size", True, "integer"),
    ("num_epochs", -1, "num_epochs=-1"),
    ("gradient_accumulation_steps", 0, "gradient_accumulation_steps=0"),
    ("gradient_accumulation_steps", 1.5, "integer"),
    ("optimizer_type", "adamww", "did you mean 'adamw'"),
    ("scheduler_type", "cosin", "'cosine'"),
    ("scheduler_type", "exponential", "expected one of"),
    ("weight_decay", -0.1, "weight_decay"),
    ("max_grad_norm", 0.0, "max_grad_norm"),
    ("warmup_steps", -5, "warmup_steps"),
    ("warmup_ratio", 1.0, "expected a number in [0, 1)"),
    ("warmup_ratio", -0.1, "warmup_ratio"),
    ("device", "tpu", "'cuda'"),
    ("device", "gpu", "did you mean 'cuda'"),
    ("device", "cuda:x", "'cuda:<index>' (one GPU, e.g. 'cuda:1')"),
    ("precision", "int8", "'bf16'"),
    ("monitor_metric", "accuracy", "val_<metric>"),
    ("monitor_metric", "train_accuracy", "train_loss"),
    ("monitor_mode", "up", "'max'"),
    ("eval_batch_size", 0, "eval_batch_size"),
    ("log_frequency", 0, "log_frequency"),
    ("early_stopping_patience", -1, "early_stopping_patience"),
    ("mixed_precision", "yes", "true or false"),
    ("momentum", 1.0, "[0, 1)"),
    ("max_steps", 0, "max_steps"),
]


@pytest.mark.parametrize(("field", "value", "expected"), BAD_TRAINING_VALUES)
def test_bad_training_value_names_field_value_and_rule(field, value, expected):
    with pytest.raises(ValueError, match=r".*") as info:
        TrainingConfig(**{field: value})
    message = str(info.value)
    assert field in message
    assert repr(value) in message or str(value) in message
    assert expected in message


def test_warmup_longer_than_max_steps_is_accepted():
    # shortened when the run starts, with a warning (test_schedulers)
    assert TrainingConfig(warmup_steps=100, max_steps=50).warmup_steps == 100


def test_precision_needs_mixed_precision():
    with pytest.raises(ValueError, match="precision='bf16'"):
        TrainingConfig(mixed_precision=False, precision="bf16")


@pytest.mark.parametrize(
    ("given", "precision", "mixed"),
    [
        ({}, "auto", True),
        ({"mixed_precision": False}, "fp32", False),
        ({"precision": "fp32"}, "fp32", False),
        ({"precision": "bf16"}, "bf16", True),
    ],
)
def test_the_saved_config_says_precision_once(given, precision, mixed, tmp_path):
    """`mixed_precision` is shorthand for a precision other than fp32: the two never
    disagree, the saved record holds only `precision`, and loading it gives the same config."""
    config = TrainingConfig(**given)
    assert (config.precision, config.mixed_precision) == (precision, mixed)
    assert "mixed_precision" not in config.to_dict()
    config.save_yaml(tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "mixed_precision" not in text
    assert f"precision: {precision}" in text
    assert TrainingConfig.from_yaml(tmp_path / "config.yaml") == config


def test_overriding_mixed_precision_lets_precision_follow_it_again():
    """Was: on a config saved with precision fp32 (mixed precision off), the override
    mixed_precision=true silently changed nothing."""
    off = TrainingConfig(mixed_precision=False)
    assert off.with_overrides(["mixed_precision=true"]).precision == "auto"
    assert off.with_overrides(["mixed_precision=true", "precision=bf16"]).precision == "bf16"
    assert TrainingConfig(precision="bf16").with_overrides(["mixed_precision=false"]).precision == (
        "fp32"
    )


def test_spec_defaults():
    c = TrainingConfig()
    assert (c.num_epochs, c.batch_size, c.learning_rate, c.weight_decay) == (100, 32, 1e-4, 1e-5)
    assert (c.optimizer_type, c.scheduler_type, c.warmup_steps) == ("adamw", "cosine", 1000)
    assert (c.mixed_precision, c.gradient_accumulation_steps) == (True, 1)
    assert (c.early_stopping_patience, c.checkpoint_save_frequency) == (10, 5)
    assert (c.log_frequency, c.eval_frequency) == (100, 500)
    assert (c.tensorboard_logging, c.wandb_logging, c.save_best_model) == (True, False, True)
    assert c.effective_eval_batch_size == 32


def test_monitor_direction_is_inferred_from_the_name():
    assert TrainingConfig(monitor_metric="val_loss").minimize_monitor
    assert not TrainingConfig(monitor_metric="val_accuracy").minimize_monitor
    assert TrainingConfig(monitor_metric="val_my_score", monitor_mode="min").minimize_monitor


@pytest.mark.parametrize(
    ("metric", "mode", "expected"),
    [
        ("val_loss", "max", "val_loss is better when lower: set 'min', or 'auto'"),
        ("train_loss", "max", "train_loss is better when lower"),
        ("val_mse", "max", "val_mse is better when lower"),
        ("val_log_loss", "max", "val_log_loss is better when lower"),
        ("val_accuracy", "min", "val_accuracy is better when higher: set 'max', or 'auto'"),
        ("val_f1", "min", "val_f1 is better when higher"),
    ],
)
def test_a_monitor_mode_against_a_built_in_metrics_direction_is_refused(metric, mode, expected):
    """monitor_mode='max' on val_loss was accepted: early stopping and best.pt then kept
    the worst epoch. A built-in metric's direction is known; your own metric's is yours."""
    with pytest.raises(ValueError, match=f"monitor_mode='{mode}' is invalid") as info:
        TrainingConfig(monitor_metric=metric, monitor_mode=mode)
    assert expected in str(info.value)
    agreeing = "min" if mode == "max" else "max"
    assert TrainingConfig(monitor_metric=metric, monitor_mode=agreeing).monitor_mode == agreeing
    assert TrainingConfig(monitor_metric="val_margin", monitor_mode=mode).monitor_mode == mode


def test_a_gpu_index_is_a_device():
    assert TrainingConfig(device="cuda:1").device == "cuda:1"
    assert TrainingConfig(device="cuda:01").device == "cuda:1"
    assert TrainingConfig.from_dict({"device": "cuda:0"}).device == "cuda:0"


def test_warmup_ratio_with_a_warmup_steps_of_its_own_is_refused():
    """Both were accepted and the ratio silently won. The default warmup_steps stays
    (a saved config.yaml holds every field), and the ratio replaces it."""
    with pytest.raises(ValueError, match=r"warmup_steps=50 is invalid: warmup_ratio=0\.1 sets"):
        TrainingConfig(warmup_ratio=0.1, warmup_steps=50)
    with pytest.raises(ValueError, match="warmup_steps=30 is invalid"):
        TrainingConfig.from_dict({"warmup_ratio": 0.1, "warmup_steps": 30})
    assert TrainingConfig(warmup_ratio=0.1, warmup_steps=0).warmup_ratio == 0.1  # the examples'
    saved = TrainingConfig(warmup_ratio=0.1).to_dict()
    assert TrainingConfig.from_dict(saved).warmup_ratio == 0.1


def test_a_config_remembers_which_fields_were_given():
    """A value equal to the default must count as chosen where that matters (a warmup_steps
    of 1000 shortened on a short run is worth a warning); copies keep what was given."""
    import copy
    import pickle

    config = TrainingConfig(num_epochs=3, warmup_steps=1000)
    assert config.given_fields == {"num_epochs", "warmup_steps"}
    assert TrainingConfig().given_fields == frozenset()
    assert TrainingConfig.from_dict({"seed": 1}).given_fields == {"seed"}
    assert config.replace(seed=3).given_fields == {"num_epochs", "warmup_steps", "seed"}
    overridden = config.with_overrides(["seed=4", "lr_multipliers.head=2"])
    assert overridden.given_fields == {"num_epochs", "warmup_steps", "seed", "lr_multipliers"}
    assert overridden.lr_multipliers == {"head": 2}
    for twin in (pickle.loads(pickle.dumps(config)), copy.deepcopy(config)):
        assert twin == config
        assert twin.given_fields == config.given_fields
    with pytest.raises(ValueError, match="batch_size=0 is invalid"):
        config.replace(batch_size=0)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ValueError, match=r"no field 'learning_rte' \(did you mean 'learning_rate'"):
        TrainingConfig.from_dict({"learning_rte": 0.1})


def test_yaml_reads_exponent_floats_and_applies_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-3\nbatch_size: 8\n")
    c = TrainingConfig.from_yaml(path, ["batch_size=16", "scheduler_type=step"])
    assert c.learning_rate == 1e-3
    assert (c.batch_size, c.scheduler_type) == (16, "step")


def test_bad_override_value_is_validated():
    with pytest.raises(ValueError, match="batch_size=0"):
        TrainingConfig().with_overrides(["batch_size=0"])


def test_nested_overrides():
    data = apply_overrides({"training": {"seed": 1}}, ["training.seed=2", "model.name=cnn"])
    assert data == {"training": {"seed": 2}, "model": {"name": "cnn"}}
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides({}, ["seed"])


def test_config_round_trips_through_yaml(tmp_path):
    c = TrainingConfig(learning_rate=3e-4, output_dir="x", eval_batch_size=64)
    c.save_yaml(tmp_path / "c.yaml")
    assert TrainingConfig.from_dict(yaml.safe_load((tmp_path / "c.yaml").read_text())) == c


def test_missing_yaml_file():
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        TrainingConfig.from_yaml("nope.yaml")


def test_evaluation_config_validates_metric_names():
    with pytest.raises(ValueError, match=r"classification_metrics\[1\]='acc'"):
        EvaluationConfig(classification_metrics=["f1", "acc"])  # the entry's place named
    with pytest.raises(ValueError, match="average='mean'"):
        EvaluationConfig(average="mean")
    assert EvaluationConfig(regression_metrics=["mse"]).regression_metrics == ("mse",)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_modes_with_cuda_graphs_are_refused_with_the_reason(mode):
    with pytest.raises(ValueError, match=rf"compile_mode='{mode}' is invalid: modes with CUDA"):
        TrainingConfig(compile_mode=mode)


def test_unknown_compile_mode_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"compile_mode='fast'.*max-autotune-no-cudagraphs"):
        TrainingConfig(compile_mode="fast")


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("training.seed=4294967296", "seed=4294967296"),
        ("data.split_seed=4294967296", "data.split_seed=4294967296"),
        ("evaluation.bootstrap_seed=18446744073709551616", "bootstrap_seed="),
    ],
)
def test_seeds_beyond_32_bits_are_refused_before_any_work(override, field, capsys):
    from traineval.cli import main

    assert main(["demo", "-q", override]) == 2
    err = capsys.readouterr().err
    assert field in err
    assert "[0, 4294967295]" in err


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    """YAML requires unique keys; PyYAML kept the last, so a pasted second `training:`
    section dropped the first one's num_epochs and output_dir without a word."""
    from traineval.config.training_config import load_yaml

    path = tmp_path / "c.yaml"
    path.write_text("training: {num_epochs: 1}\ndata: {name: iris}\ntraining: {seed: 3}\n")
    with pytest.raises(ValueError, match=r"the key 'training' is given twice in one mapping "):
        load_yaml(path)
    path.write_text("training:\n  num_epochs: 2\n  seed: 1\n  num_epochs: 50\n")
    with pytest.raises(ValueError, match=r"\(first on line 2\); keep one \(line 4, column 3\)"):
        load_yaml(path)
    path.write_text("base: &b {num_epochs: 1, seed: 3}\ntraining:\n  <<: *b\n  seed: 4\n")
    assert load_yaml(path)["training"] == {"num_epochs": 1, "seed": 4}  # a merge may override


def test_an_override_fills_a_section_whose_keys_are_commented_out():
    """`training:` with every key commented out reads as null: the file was taken, but any
    override of the section said "'training' is not a section"."""
    assert apply_overrides({"training": None}, ["training.num_epochs=1"]) == {
        "training": {"num_epochs": 1}
    }
    with pytest.raises(ValueError, match="'training' is not a section"):
        apply_overrides({"training": 3}, ["training.num_epochs=1"])


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("calibration_bins", 2**31 - 1, r"\[1, 10000\]"),
        ("bootstrap_samples", 2**31 - 1, r"\[0, 100000\]"),
    ],
)
def test_evaluation_sizes_are_bounded_before_any_work(field, value, allowed):
    """2^31 - 1 resamples ran out of memory after training (and held off a SIGTERM); as many
    calibration bins asked for 16 GiB at the first validation."""
    with pytest.raises(ValueError, match=rf"{field}={value} is invalid: .*{allowed}"):
        EvaluationConfig(**{field: value})


def test_a_path_no_file_system_allows_is_refused_by_name_in_one_short_line():
    """A 5000-character output_dir failed at the first write ('File name too long (aaaa...'),
    naming no field and printing the whole path."""
    with pytest.raises(
        ValueError, match=r"output_dir='a{100,}\.\.\.a+' \(5002 characters\)"
    ) as said:
        TrainingConfig(output_dir="a" * 5000)
    assert "names of 255 bytes" in str(said.value)
    assert len(str(said.value)) < 300
    TrainingConfig(output_dir="runs/" + "b" * 200)  # long, but allowed
