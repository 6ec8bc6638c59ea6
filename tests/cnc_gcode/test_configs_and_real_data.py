"""Every shipped config parses; the tokenizer and the UMich ingestion on the real shared data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from learning_seed import seed_args

from cnc_gcode import build_vocab
from cnc_gcode.__main__ import STAGES
from cnc_gcode.config import CncConfig
from cnc_gcode.tokenizer import REASON_H_CONFLICT
from common.config import describe_config, load_config, to_dict
from common.fingerprint import flatten
from studies.cnc_gcode import ingest_umich

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "cnc_gcode"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_parses(path):
    cfg = load_config(CncConfig, path)
    assert cfg.decoder.d_model % cfg.decoder.n_heads == 0
    # every value the file states reaches the config (none dropped or renamed on the way)
    stated = flatten(yaml.safe_load(path.read_text()))
    resolved = flatten(to_dict(cfg))
    assert stated and {key: resolved[key] for key in stated} == stated


def test_every_stage_of_the_readme_runs_as_a_module_with_a_main():
    import importlib

    readme = (Path(__file__).resolve().parents[2] / "cnc_gcode" / "README.md").read_text()
    described = set(re.findall(r"^\| `(\w+)[ `]", readme, flags=re.MULTILINE))
    assert described and described <= set(STAGES), described - set(STAGES)
    for stage in STAGES:
        module = importlib.import_module(f"cnc_gcode.{stage}")
        assert callable(module.main), stage
        assert 'if __name__ == "__main__":' in Path(module.__file__).read_text(), stage


def test_every_study_of_the_studies_readme_starts_and_none_is_a_package_stage(capsys):
    """Each `python -m studies.cnc_gcode.<study>` of studies/cnc_gcode/README.md answers --help with exit 0, each study
    script there exists and parses (`bash -n`), and `python -m cnc_gcode` lists none of them."""
    import importlib
    import subprocess

    root = Path(__file__).resolve().parents[2]
    readme = (root / "studies" / "cnc_gcode" / "README.md").read_text()
    modules = sorted(set(re.findall(r"python -m studies\.cnc_gcode\.(\w+)", readme)))
    scripts = sorted(set(re.findall(r"(studies/cnc_gcode/\w+\.sh)", readme)))
    assert {"measured_only", "umich_lines", "ingest_umich", "ablation_gamma"} <= set(modules), modules
    assert len(scripts) >= 5, scripts
    assert not set(modules) & set(STAGES) and "train" not in STAGES and "train_decoder" in STAGES
    for name in modules:
        module = importlib.import_module(f"studies.cnc_gcode.{name}")
        with pytest.raises(SystemExit) as info:
            module.main(["--help"])
        assert info.value.code == 0, name
        assert f"studies.cnc_gcode.{name}" in capsys.readouterr().out or name == "umich_phase_table", name
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(root / script)]).returncode == 0, script


def test_help_lists_every_config_key_with_its_docstring(capsys):
    from cnc_gcode import train_decoder

    with pytest.raises(SystemExit) as info:
        train_decoder.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert re.search(r"train\.focal_gamma +float = 3\.0\n +Focal-loss", text), text
    assert re.search(r"data\.nan_policy +str = skip\n +skip:", text)
    for key, _, _, doc in describe_config(CncConfig):
        assert f"  {key} " in text and doc, f"{key} has no docstring"


def test_print_config_prints_the_resolved_yaml(capsys):
    from cnc_gcode import train_decoder

    assert train_decoder.main(["--config", str(CONFIG_DIR / "sample.yaml"), "train.epochs=3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 3 and printed["run"]["name"] == "sample_full"
    assert printed["encoder_train"]["recon_weight"] == 5.0


@pytest.mark.real_data
def test_pygcode_corpus_round_trips_completely(real_data_dir, tmp_path):
    out = tmp_path / "vocab.json"
    assert build_vocab.main([f"build_vocab.corpus=[{real_data_dir / 'gcode_pygcode'}]", f"build_vocab.out={out}",
                             "build_vocab.max_tokens=16"]) == 0
    report = json.loads((tmp_path / "vocab_report.json").read_text())
    assert report["files"] == 42 and report["parse"]["executable"] == 7889 and report["n_digits"] == 10
    # every accepted line is representable and comes back with every value exact (the numbers of studies/cnc_gcode/RESULTS.md)
    assert report["tokenized_lines"] == report["round_trip_ok"] == report["values_exact"] == 7889
    assert not report["round_trip_failures"] and not report["not_representable"]
    # the seed's 4-digit mode on the same commands and letters: ids round-trip, values mostly do not
    assert report["other_mode"]["round_trip_ok"] == 7889 and report["other_mode"]["values_exact"] == 3087


@pytest.mark.real_data
def test_linuxcnc_corpus_never_crashes_and_counts_reasons(real_data_dir, tmp_path):
    out = tmp_path / "vocab.json"
    assert build_vocab.main([f"build_vocab.corpus=[{real_data_dir / 'gcode_linuxcnc'}]", f"build_vocab.out={out}",
                             "build_vocab.max_tokens=16"]) == 0
    report = json.loads((tmp_path / "vocab_report.json").read_text())
    reasons = report["parse"]["unsupported_by_reason"]
    assert report["files"] == 247
    assert reasons["[ ] expression"] > 1000 and reasons["# parameter"] > 100 and reasons["o-word subroutine/control flow"] > 100
    assert report["parse"]["lines"] == report["parse"]["executable"] + report["parse"]["empty"] + sum(reasons.values())
    assert report["parse"]["executable"] == 12600 and report["n_digits"] == 15  # R46.5833333333333 (G6.2 NURBS)
    assert report["not_representable"] == {REASON_H_CONFLICT: 2}  # lathe G76 ... h3 under a bare G43
    assert report["tokenized_lines"] == report["round_trip_ok"] == report["values_exact"] == 12598
    assert report["other_mode"]["values_exact"] == 3715


@pytest.mark.real_data
def test_umich_ingestion_splits_by_experiment(real_data_dir, tmp_path):
    out = tmp_path / "umich"
    assert ingest_umich.main([f"umich.data_dir={real_data_dir / 'cnc_umich_toolwear'}", f"umich.out_dir={out}",
                              "umich.stride=32"]) == 0
    experiments = {}
    for split in ("train", "val", "test"):
        with np.load(out / f"{split}.npz") as d:
            n, t, c = d["continuous"].shape
            assert (t, c) == (64, 45) and d["categorical"].shape == (n, 64, 4)
            assert d["categorical"].max() <= 2 and 0 <= d["operation_type"].min() and d["operation_type"].max() <= 8
            assert np.isfinite(d["continuous"]).all()
            experiments[split] = set(d["experiment"].tolist())
    assert experiments["test"] == {2, 9, 13, 17} and experiments["val"] == {3, 8, 14}
    assert not experiments["train"] & (experiments["val"] | experiments["test"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(c > 0 for c in manifest["splits"]["test"]["phase_counts"])
    # Only experiment 01 is one continuous recording; the others are shuffled in ~1 s blocks (see ingest_umich).
    checks = manifest["experiments"]
    assert len(checks) == 18 and not checks["1"]["shuffled"] and checks["1"]["median_segment_rows"] > 30
    assert all(checks[str(e)]["shuffled"] for e in range(2, 19))
    assert manifest["label_aliases"] == {"starting": "Prep", "end": "End"}


@pytest.mark.real_data
def test_umich_phase_labels_follow_z_only_in_the_continuous_run(real_data_dir):
    """Experiment 01: every 'Layer 3' row is cut at the lowest depths, 'Layer 1' above them; in a shuffled run the
    'Layer 1' label holds rows at all depths and above the part, which is why no model beats the majority there."""
    path = real_data_dir / "cnc_umich_toolwear"
    signals, phases, _ = ingest_umich.read_experiment(path / "experiment_01.csv")
    z = signals["Z1_ActualPosition"].to_numpy()
    layer1, layer3 = [ingest_umich.PHASES.index(f"Layer {k} Down") for k in (1, 3)]
    assert z[phases == layer3].max() < z[phases == layer1].min()
    signals, phases, _ = ingest_umich.read_experiment(path / "experiment_12.csv")
    z = signals["Z1_ActualPosition"].to_numpy()
    assert z[phases == layer1].min() <= z[phases == layer3].min() and z[phases == layer1].max() > 40


def test_umich_missing_folder_is_exit_2(tmp_path, capsys):
    assert ingest_umich.main([f"umich.data_dir={tmp_path}", f"umich.out_dir={tmp_path / 'o'}"]) == 2
    assert "no experiment_XX.csv" in capsys.readouterr().err


@pytest.mark.real_data
def test_umich_nan_in_a_csv_is_exit_2_naming_file_and_row(real_data_dir, tmp_path, capsys):
    import pandas as pd

    frame = pd.read_csv(real_data_dir / "cnc_umich_toolwear" / "experiment_01.csv")
    frame.loc[5, "X1_ActualPosition"] = np.nan
    frame["Y1_ActualPosition"] = frame["Y1_ActualPosition"].astype(object)
    frame.loc[9, "Y1_ActualPosition"] = "broken"  # a non-number reads as NaN
    folder = tmp_path / "umich"
    folder.mkdir()
    frame.to_csv(folder / "experiment_01.csv", index=False)
    argv = [f"umich.data_dir={folder}", f"umich.out_dir={tmp_path / 'o'}", "data.nan_policy=error"]
    assert ingest_umich.main(argv) == 2
    err = capsys.readouterr().err
    assert "experiment_01.csv: data row 5 holds NaN or inf (2 bad data rows" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.learning
def test_umich_tree_baselines_machine_state_at_majority_file_position_far_above(real_data_dir, tmp_path,
                                                                                learning_seed):
    """The UMich argument of studies/cnc_gcode/RESULTS.md: a tree model on each row's machine state does not beat the majority label on
    held-out experiments (measured 10.1 % vs 13.1 %), the row's position in its file alone does (55.6 %)."""
    from studies.cnc_gcode import baseline_umich

    argv = ["--config", str(CONFIG_DIR / "umich.yaml"), f"umich.data_dir={real_data_dir / 'cnc_umich_toolwear'}",
            f"run.out_dir={tmp_path}", *seed_args("run.seed", learning_seed)]
    assert baseline_umich.main(argv) == 0
    result = json.loads((tmp_path / "umich" / "reports" / "baseline_umich.json").read_text())
    acc = {r["features"]: r["accuracy"] for r in result["rows"]}
    assert result["test_windows"] == 819  # the windows ingest_umich makes of the test experiments (RESULTS.md)
    assert acc["-"] == pytest.approx(107 / 819)  # majority (the most frequent training phase): 107 test windows
    # measured, own seed / 1 / 2 / 3 (OMP_NUM_THREADS=1): machine_state 0.101 / 0.100 / 0.105 / 0.109,
    # file_position 0.556 / 0.554 / 0.563 / 0.563; majority 0.131
    assert acc["machine_state"] < acc["-"] + 0.05
    assert acc["file_position"] > 0.45 and acc["file_position"] > acc["machine_state"] + 0.3
