"""Every experiment's Hydra config composes at both scales, and bad configs are clear errors."""

import dataclasses
import importlib
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from fieldprint.experiments import common
from fieldprint.experiments.common import CONFIG_DIR, ExperimentConfig, compose

EXPERIMENTS = sorted(p.stem for p in CONFIG_DIR.glob("e*.yaml"))


def schema_of(name: str) -> type:
    module = importlib.import_module(f"fieldprint.experiments.{name}")
    (cls,) = {v for v in vars(module).values()
              if isinstance(v, type) and issubclass(v, ExperimentConfig) and v is not ExperimentConfig
              and v.__module__ == module.__name__}
    return cls


def test_every_experiment_has_both_scales():
    assert "e0_unfused" in EXPERIMENTS
    for name in EXPERIMENTS:
        for scale in ("smoke", "paper"):
            assert (CONFIG_DIR / name / f"{scale}.yaml").exists(), f"{name} lacks {scale}.yaml"


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("scale", ["smoke", "paper"])
def test_composes_to_typed_config(name, scale):
    cfg = compose(name, schema_of(name), [f"scale={scale}", "out_dir=/tmp/x"])
    assert dataclasses.is_dataclass(cfg) and cfg.scale == scale and cfg.out_dir == "/tmp/x"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_unknown_key_is_an_error(name):
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose(name, schema_of(name), ["no_such_key=1"])


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_bad_common_values_are_errors(name):
    with pytest.raises(ValueError, match="device"):
        compose(name, schema_of(name), ["device=tpu"])
    with pytest.raises(ConfigCompositionException):
        compose(name, schema_of(name), ["scale=huge"])  # no such option in the scale group


def test_bad_experiment_value_names_the_field():
    from fieldprint.experiments.e0_unfused import E0Config

    with pytest.raises(ValueError, match="heads_q must be a multiple of heads_kv"):
        compose("e0_unfused", E0Config, ["heads_kv=3"])
    with pytest.raises(ConfigCompositionException):
        compose("e0_unfused", E0Config, ["anchors=many"])  # type error from the schema


def test_command_line_error_exit_code(tmp_path):
    """The command line fails with a message and a non-zero status, and writes nothing."""
    done = subprocess.run([sys.executable, "-m", "fieldprint.experiments.e0_unfused", f"out_dir={tmp_path}/o",
                           "bogus=1"], capture_output=True, text=True)
    assert done.returncode != 0 and "bogus" in done.stderr
    assert not (tmp_path / "o" / "e0_unfused.csv").exists()


@pytest.mark.parametrize("value", ["", "'  '"])
def test_empty_out_dir_is_an_error(value):
    """``out_dir=`` (empty or blank) would write the results into the current directory."""
    with pytest.raises(ValueError, match="out_dir must name a directory"):
        compose("e0_unfused", schema_of("e0_unfused"), [f"out_dir={value}"])


def test_empty_out_dir_stops_the_command_line_before_it_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fieldprint.experiments.e0_unfused", "out_dir="],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0 and "out_dir must name a directory" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no CSV, manifest or Hydra folder in the current directory


def test_cpu_model_names_the_processor(monkeypatch, tmp_path):
    """The manifest's ``cpu`` is the model name from /proc/cpuinfo (host-bound rows depend on it),
    else what ``platform`` knows when the file is missing."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: real_open(cpuinfo if f == "/proc/cpuinfo" else f, *a, **k))
    assert common.cpu_model() == "AMD EPYC 9654 96-Core Processor"
    cpuinfo.unlink()
    monkeypatch.setattr(common.platform, "processor", lambda: "")
    assert common.cpu_model() == common.platform.machine()
