"""The one config.toml: shipped files parse, bad keys are exit 2 naming them, every key is documented; the stage
list; sample_data is deterministic."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

from building_embed import __main__ as package_main
from building_embed.config import SECTIONS, BuildingEmbedConfig
from building_embed.preprocess import merge_and_split, process_tar
from building_embed.sample_data import make_dataset
from common.config import describe_config, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "building_embed").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = load_config(BuildingEmbedConfig, path)
    raw = tomllib.loads(path.read_text())
    assert set(raw) <= set(SECTIONS)
    for section, values in raw.items():
        for key, value in values.items():
            assert getattr(cfg.section(section), key) == value, f"{section}.{key}"


def test_main_config_has_the_eight_sections_in_order():
    raw = tomllib.loads((CONFIGS[0].parent / "config.toml").read_text())
    assert list(raw) == list(SECTIONS) == ["global", "paths", "embedding_model", "training_model", "training", "data",
                                           "infrastructure", "logging"]


def test_every_config_key_has_a_docstring():
    rows = describe_config(BuildingEmbedConfig)
    assert len(rows) > 40
    assert [key for key, _, _, doc in rows if not doc] == []
    assert "global.resume" in [r[0] for r in rows]


def test_help_lists_keys_and_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        process_tar.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "data.place_radius_m" in out and "float = 25.0" in out and "share a place group" in out


def test_unknown_key_in_the_file_is_exit_2_naming_key_and_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[global]\nseed = 1\n[data]\nplace_radus_m = 10.0\n")
    assert merge_and_split.main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "data.place_radus_m" in err and "data.place_radius_m" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("override, key", [
    ("embedding_model.batch_size=many", "embedding_model.batch_size"),
    ("infrastructure.autocast=fp8", "infrastructure.autocast"),
    ("global.resume=maybe", "global.resume"),
    ("data.band_by=distance", "data.band_by"),
])
def test_bad_values_are_exit_2_naming_the_key(override, key, capsys):
    assert process_tar.main([override]) == 2
    assert key in capsys.readouterr().err


def test_resume_false_reads_as_text():
    assert load_config(BuildingEmbedConfig, None, ["global.resume=false"]).global_.resume == "false"


def test_stage_list_names_importable_stages(capsys):
    assert package_main.main() == 0
    out = capsys.readouterr().out
    for stage in package_main.STAGES:
        assert f"python -m building_embed.{stage}" in out
        assert callable(importlib.import_module(f"building_embed.{stage}").main)
    for sub in ("preprocess", "generate", "difficulty"):
        module = importlib.import_module(f"building_embed.{sub}")
        with pytest.raises(SystemExit) as info:
            module.main(["--help"])
        assert info.value.code == 0
        assert module.main([]) == 0


def test_sample_data_is_deterministic(tmp_path):
    a = make_dataset(tmp_path / "a", n_regions=1, targets_per_region=6, views_per_target=3, image_size=32, seed=5)
    b = make_dataset(tmp_path / "b", n_regions=1, targets_per_region=6, views_per_target=3, image_size=32, seed=5)
    assert a == b  # the same call twice: determinism
    assert (tmp_path / "a/tars/region_0.tar").read_bytes() == (tmp_path / "b/tars/region_0.tar").read_bytes()
    c = make_dataset(tmp_path / "c", n_regions=1, targets_per_region=6, views_per_target=3, image_size=32, seed=6)
    assert (tmp_path / "c/tars/region_0.tar").read_bytes() != (tmp_path / "a/tars/region_0.tar").read_bytes()
    assert c["expected_skips"] == a["expected_skips"]


def test_sample_data_refuses_sizes_its_traps_cannot_fit(tmp_path):
    from common.errors import UserError

    with pytest.raises(UserError, match="need at least 9 targets per region and 4 views"):
        make_dataset(tmp_path / "x", n_regions=3, targets_per_region=8, views_per_target=4, image_size=32)
    smallest = make_dataset(tmp_path / "y", n_regions=3, targets_per_region=9, views_per_target=4, image_size=32)
    assert len(smallest["cross_identity_copies"]) == 2  # region 0's targets 6 and 7, copied once into another region
