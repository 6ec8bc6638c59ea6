"""Typed config loading: files, overrides, and errors that name the key (through the CLI: exit code 2)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Literal

import numpy
import pytest
import yaml

from common.cli import config_main
from common.config import ConfigError, load_config, save_resolved_config, to_dict


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "plateau"] = "cosine"


@dataclasses.dataclass
class DataConfig:
    path: Path = Path("data")
    columns: list[str] = dataclasses.field(default_factory=lambda: ["a", "b"])
    max_rows: int | None = None


@dataclasses.dataclass
class ExampleConfig:
    name: str = "run"
    epochs: int = 3
    """Passes over the training set."""
    debug_checks: bool = False
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    lr_mults: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_file_and_overrides_merge(tmp_path: Path) -> None:
    path = _write(tmp_path, "c.yaml", "epochs: 5\noptim:\n  lr: 3e-4\ndata:\n  max_rows: 10\n")
    cfg = load_config(ExampleConfig, path, ["optim.schedule=plateau", "data.columns=[x, y, z]", "lr_mults.enc=0.1"])
    assert cfg.epochs == 5 and cfg.name == "run"
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)  # YAML 1.1 "3e-4" is a float
    assert cfg.optim.schedule == "plateau" and cfg.optim.betas == (0.9, 0.999)
    assert cfg.data.columns == ["x", "y", "z"] and cfg.data.max_rows == 10 and cfg.data.path == Path("data")
    assert cfg.lr_mults == {"enc": 0.1}


def test_toml_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "c.toml", 'name = "t"\n[optim]\nlr = 0.5\nbetas = [0.8, 0.9]\n')
    cfg = load_config(ExampleConfig, path)
    assert (cfg.name, cfg.optim.lr, cfg.optim.betas) == ("t", 0.5, (0.8, 0.9))


def test_int_is_accepted_for_float_but_not_the_reverse() -> None:
    assert load_config(ExampleConfig, None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"'epochs': expected int, got 2.5"):
        load_config(ExampleConfig, None, ["epochs=2.5"])


@pytest.mark.parametrize(("text", "message"), [
    ("epoch: 4\n", r"unknown config key 'epoch'; did you mean 'epochs'\?"),
    ("optim:\n  lrr: 0.1\n", r"unknown config key 'optim.lrr'; did you mean 'optim.lr'\?"),
    ("optim:\n  lr: fast\n", r"config key 'optim.lr': expected float, got 'fast'"),
    ("debug_checks: 1\n", r"config key 'debug_checks': expected bool, got 1"),
    ("optim:\n  schedule: linear\n", r"config key 'optim.schedule': expected one of \['cosine', 'plateau'\]"),
    ("data: 3\n", r"config key 'data': expected a mapping"),
    ("optim:\n  betas: [0.9]\n", r"config key 'optim.betas': expected 2 items, got 1"),
    ("epochs: 0\n", r"epochs must be >= 1, got 0"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(ExampleConfig, path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("name", "text", "message"), [
    ("broken.yaml", "optim:\n  lr: [1, 2\n", r"malformed YAML at line \d+"),
    ("broken.toml", "name = \n", r"malformed TOML"),
    ("list.yaml", "- 1\n- 2\n", r"top level must be a mapping"),
    ("c.json", "{}", r"unsupported config extension '.json'"),
])
def test_malformed_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(ExampleConfig, _write(tmp_path, name, text))


def test_missing_file_and_bad_override() -> None:
    with pytest.raises(ConfigError, match=r"nope.yaml: config file not found"):
        load_config(ExampleConfig, "nope.yaml")
    with pytest.raises(ConfigError, match=r"override 'epochs': expected dotted.key=value"):
        load_config(ExampleConfig, None, ["epochs"])
    with pytest.raises(ConfigError, match=r"config key 'name': expected str, got {'x': 1}"):
        load_config(ExampleConfig, None, ["name.x=1"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(ExampleConfig, None, ["epochs=7", "optim.lr=0.25"])
    path = save_resolved_config(cfg, tmp_path / "run")
    written = yaml.safe_load(path.read_text())
    meta = written.pop("_meta")
    assert meta["package_version"] and "git_commit" in meta
    env = meta["environment"]  # the versions the run used, for comparing a run with the lock (constraints.txt)
    import importlib.metadata

    import torch
    assert env["packages"]["torch"] == importlib.metadata.version("torch") and env["packages"]["numpy"] == numpy.__version__
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["python"]
    assert written == to_dict(cfg)
    assert load_config(ExampleConfig, _write(tmp_path, "again.yaml", yaml.safe_dump(written))) == cfg


def test_cli_turns_config_errors_into_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seen = []
    main = config_main(ExampleConfig, lambda cfg: seen.append(cfg) or 0, "example")
    assert main(["epochs=4"]) == 0 and seen[0].epochs == 4
    path = _write(tmp_path, "bad.yaml", "optim:\n  lrr: 1\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: ") and "optim.lrr" in err and "did you mean 'optim.lr'" in err
    assert main(["--config", str(path), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_cli_internal_errors_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    def boom(cfg: ExampleConfig) -> int:
        raise RuntimeError("kaboom")

    assert config_main(ExampleConfig, boom)([]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "kaboom" in err


def test_from_dict_and_resolved_config_reload(tmp_path: Path) -> None:
    from common.config import from_dict

    cfg = from_dict(ExampleConfig, {"epochs": 2, "optim": {"lr": "1e-2"}, "_meta": {"git_commit": "x"}})
    assert cfg.epochs == 2 and cfg.optim.lr == 0.01
    with pytest.raises(ConfigError, match="unknown config key 'epoch'"):
        from_dict(ExampleConfig, {"epoch": 2})
    path = save_resolved_config(cfg, tmp_path)
    assert load_config(ExampleConfig, path) == cfg  # a run's config.yaml loads back despite its _meta block


def test_errors_from_overrides_name_the_override(tmp_path: Path) -> None:
    path = _write(tmp_path, "c.yaml", "epochs: 5\noptim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(ExampleConfig, path, ["optim.lr=fast"])
    assert str(info.value).startswith("override 'optim.lr=fast' (command line): ") and str(path) not in str(info.value)
    with pytest.raises(ConfigError, match=r"^override 'epochs=0' \(command line\): config section"):
        load_config(ExampleConfig, path, ["epochs=0"])  # __post_init__ validation of an overridden key
    bad_file = _write(tmp_path, "bad.yaml", "optim:\n  lr: fast\n")
    with pytest.raises(ConfigError) as info:
        load_config(ExampleConfig, bad_file, ["epochs=2"])
    assert str(info.value).startswith(f"{bad_file}: config key 'optim.lr'")


def test_help_lists_every_key_and_print_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[ExampleConfig] = []
    main = config_main(ExampleConfig, seen.append, "example stage")
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("name", "epochs", "debug_checks", "optim.lr", "optim.betas", "optim.schedule", "data.path",
                "data.columns", "data.max_rows", "lr_mults"):
        assert f"\n  {key} " in out, key
    assert re.search(r"\n  epochs +int = 3\n +Passes over the training set\.\n", out)
    assert re.search(r"\n  optim\.schedule +Literal\['cosine', 'plateau'\] = cosine\n", out)
    assert main(["--print-config", "optim.lr=0.5", "epochs=9"]) == 0
    assert not seen  # the stage itself did not run
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config(ExampleConfig, None, ["optim.lr=0.5", "epochs=9"]))


def test_a_field_can_take_a_keyword_as_its_config_key() -> None:
    @dataclasses.dataclass
    class WithGlobal:
        global_: OptimConfig = dataclasses.field(default_factory=OptimConfig, metadata={"key": "global"})

    cfg = load_config(WithGlobal, None, ["global.lr=0.5"])
    assert cfg.global_.lr == 0.5 and to_dict(cfg)["global"]["lr"] == 0.5
    with pytest.raises(ConfigError, match="unknown config key 'global_'"):
        load_config(WithGlobal, None, ["global_.lr=0.5"])
