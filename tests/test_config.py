from pathlib import Path

import pytest

from pipeline.config import load_config, parse_override
from stages.errors import InvalidConfig
from stages.targets import TargetsConfig
from tests.conftest import run_cli

CONFIGS = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))


def test_configs_folder_is_not_empty():
    assert {p.name for p in CONFIGS} >= {"default.yaml", "tiny.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads_and_validates(path):
    config = load_config(path)
    assert isinstance(config.targets, TargetsConfig)
    assert config.targets.store  # the shared top-level store reached the stage config


def test_cli_overrides_beat_file_which_beats_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("targets:\n  top_k: 64\n  seed: 7\n")
    config = load_config(path, {"targets.top_k": 8}).targets
    assert config.top_k == 8  # CLI
    assert config.seed == 7  # file
    assert config.max_seq_length == TargetsConfig().max_seq_length  # default


def test_every_problem_is_reported_in_one_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "colour: red\ntargets:\n  top_k: 0\n  seed: abc\n  wat: 1\n  logits_dtype: int8\n"
    )
    with pytest.raises(InvalidConfig) as caught:
        load_config(path)
    message = str(caught.value)
    for fragment in (
        "colour",
        "top_k must be >= 1",
        "seed must be int",
        "targets.wat",
        "logits_dtype",
    ):
        assert fragment in message
    assert "\n" not in message


def test_types_are_checked_not_coerced(tmp_path):
    with pytest.raises(InvalidConfig, match="batch_size must be int"):
        load_config(None, {"targets.batch_size": True})
    with pytest.raises(InvalidConfig, match="valid_share must be strictly between"):
        load_config(None, {"targets.valid_share": 1})
    assert load_config(None, {"targets.valid_share": 0.5}).targets.valid_share == 0.5


def test_parse_override_reads_yaml_values():
    assert parse_override("targets.lse_temperatures=[1, 2.5]") == (
        "targets.lse_temperatures",
        [1, 2.5],
    )
    assert parse_override("store=a/b.zarr") == ("store", "a/b.zarr")
    with pytest.raises(InvalidConfig):
        parse_override("no-equals-sign")


def test_missing_and_malformed_files_are_config_errors(tmp_path):
    with pytest.raises(InvalidConfig, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets: [unclosed\n")
    with pytest.raises(InvalidConfig, match="not valid YAML"):
        load_config(bad)


def test_config_command_shows_resolved_values_with_help():
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(
        app, ["config", "-c", "configs/tiny.yaml", "--set", "tune.loss=js"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "tune.loss" in line)
    assert "'js'" in row and "distillation loss" in row
    bad = CliRunner().invoke(app, ["config", "--set", "tune.wat=1"])
    assert bad.exit_code == 2 and "unknown key tune.wat" in bad.output


@pytest.mark.parametrize(
    "override, expected",
    [
        ("tune.learning_rate=.nan", "tune.learning_rate must be a finite number"),
        ("tune.temperature=.inf", "tune.temperature must be a finite number"),
        ("tune.wait_timeout_s=-.inf", "tune.wait_timeout_s must be a finite number"),
        ("targets.lse_temperatures=[1.0, .nan]", "lse_temperatures must be a finite number"),
        ("tune.max_steps=100000000000000000000", "tune.max_steps must fit in 64 bits"),
        ("tune.max_steps=1000000001", "tune.max_steps must be <= 1,000,000,000"),
        ("targets.top_k=100000000", "targets.top_k must be <= "),
        ("targets.logit_step=0", "targets.logit_step must be in [0.001, 1.0]"),
        ("targets.logit_step=1e-46", "targets.logit_step must be in [0.001, 1.0]"),
        ("tune.seed=-1", "tune.seed must be >= 0"),
        ("eval.num_sequences=1000000000000", "eval.num_sequences must be <= "),
    ],
)
def test_numbers_no_run_could_use_are_refused(override, expected):
    with pytest.raises(InvalidConfig, match=expected.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, dict([parse_override(override)]))


def test_a_float_nan_from_a_cli_flag_is_refused():
    with pytest.raises(InvalidConfig, match="tune.learning_rate must be a finite number"):
        load_config(None, {"tune.learning_rate": float("nan")})


@pytest.mark.parametrize(
    "content, expected",
    [(b"", "is empty"), (b"\xff\xfe\x00garbage", "not a text"), (b"[1, 2]", "mapping")],
)
def test_a_config_file_that_is_no_config_is_one_problem(tmp_path, content, expected):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(InvalidConfig, match=expected):
        load_config(path)
    with pytest.raises(InvalidConfig, match="is a folder"):
        load_config(tmp_path)


def test_the_built_in_targets_defaults_are_the_default_config():
    """No --config means configs/default.yaml's targets settings, which fit the built-in data
    (its 26 validation windows of 256 tokens once failed the 32 the defaults asked for)."""
    import yaml

    default = yaml.safe_load((Path(__file__).parent.parent / "configs/default.yaml").read_text())
    built_in = vars(TargetsConfig())
    assert {k: v for k, v in default["targets"].items() if built_in[k] != v} == {}


@pytest.mark.parametrize("section", ["targets", "tune", "eval"])
def test_every_flag_a_field_names_is_an_option_of_its_command(section):
    import typer.main

    from pipeline.cli import app
    from pipeline.config import SECTIONS
    from stages.settings import flag_keys

    command = typer.main.get_command(app).commands[section]
    options = {option for param in command.params for option in param.opts}
    assert flag_keys(SECTIONS[section]) and set(flag_keys(SECTIONS[section])) <= options


@pytest.mark.parametrize(
    "sets, expected",
    [
        (["targets=1"], "override targets=... must name a key: targets.KEY=value"),
        (["tune.batch_size="], "override 'tune.batch_size=' has no value"),
        (["targets.lse_temperatures=[nan]"], "lse_temperatures must be a finite number"),
        (["tune.learning_rate=nan"], "tune.learning_rate must be a finite number"),
        (["tune.learning_rate=fast"], "tune.learning_rate must be float, got 'fast'"),
        (["targets.valid_share=0"], "valid_share must be strictly between 0 and 1"),
        (["tune.group_size=7"], "tune.group_size must be one of 32, 64, 128 (got 7)"),
    ],
)
def test_odd_override_values_are_one_config_error(sets, expected):
    result = run_cli("config", *[arg for s in sets for arg in ("--set", s)])
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: config:") and expected in line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["config", "tune", "targets"])
def test_a_null_section_is_a_config_error_for_every_command(tmp_path, command):
    path = tmp_path / "nulls.yaml"
    path.write_text("targets: null\ntune:\n")
    result = run_cli(command, "-c", str(path), "--set", "tune.max_steps=1")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "section 'targets' must be a mapping of keys or left out (got None)" in line
    assert "section 'tune' must be a mapping" in line


def test_floats_written_without_a_dot_are_floats(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("tune:\n  learning_rate: 1e-4\n  temperature: 2\n")
    assert load_config(path).tune.learning_rate == 1e-4
    config = load_config(None, dict([parse_override("tune.learning_rate=3E-5")]))
    assert config.tune.learning_rate == 3e-5 and isinstance(config.tune.learning_rate, float)
    result = run_cli("config", "-c", str(path), "--set", "targets.lse_temperatures=[1, 2e0]")
    assert result.returncode == 0, result.stderr
