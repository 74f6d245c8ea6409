"""The ablation script's --quick modes: the CI-sized grid and the gradient-variance analysis."""

import csv
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from reward_ablation import main, make_parser  # noqa: E402


def run(tmp_path, *flags):
    (args,) = make_parser().parse_args_and_config(
        args=["--quick", "true", "--workers", "1", "--output_dir", str(tmp_path), *flags]
    )
    return main(args)


def test_quick_grid_writes_csv_table_and_curves(tmp_path):
    results = run(tmp_path)
    assert [r["name"] for r in results] == ["dro_baseline/-", "rloo/log_likelihood"]
    assert all(len(r["curve"]) == 2 and 0.0 <= r["support_recall"] <= 1.0 for r in results)
    rows = list(csv.DictReader(open(tmp_path / "grid.csv")))
    assert len(rows) == 2 and rows[0]["name"] == "dro_baseline/-"
    assert "| rloo/log_likelihood |" in (tmp_path / "grid.md").read_text()
    assert (tmp_path / "grid.png").stat().st_size > 10_000


def test_variance_analysis_separates_dro_from_its_baseline(tmp_path):
    rows = run(tmp_path, "--analysis", "variance")
    by = {(r["estimator"], r["m"]): r for r in rows}
    assert {m for _, m in by} == {1, 2, 4, 8, 16}
    # with m = 1 the baselined estimators have nothing to compare against: zero gradient, zero variance
    assert by[("dro_baseline", 1)]["variance"] == 0.0 and by[("rloo", 1)]["variance"] == 0.0
    # subtracting 1/m removes the part of the dro gradient that is pure sampling noise
    assert by[("dro_baseline", 4)]["variance"] < by[("dro", 4)]["variance"]
    assert (tmp_path / "variance.png").exists()



def test_quick_keeps_the_flags_given_with_it():
    from reward_ablation import apply_quick

    (args,) = make_parser().parse_args_and_config(
        args=["--quick", "true", "--num_train", "16", "--max_steps", "5", "--seeds", "3"]
    )
    assert apply_quick(args) == ["estimators", "rewards", "eval_every", "num_eval", "variance_repeats"]
    assert (args.num_train, args.max_steps, args.seeds, args.num_eval) == (16, 5, [3], 32)


@pytest.mark.slow  # two task builds (warm-up SFT each)
def test_a_task_folder_is_reused_only_while_its_settings_match(tmp_path):
    import json

    from reward_ablation import AblationArguments, prepare

    args = AblationArguments(quick=True, num_train=16, num_eval=4, output_dir=str(tmp_path))
    rows = Path(prepare(args, 0)) / "rows.json"
    built = rows.stat().st_mtime_ns
    prepare(args, 0)  # the same settings: reused
    assert rows.stat().st_mtime_ns == built
    args.num_train = 24  # other settings: rebuilt, never silently reused
    prepare(args, 0)
    assert [len(v) for v in json.loads(rows.read_text()).values()] == [24, 4]
