"""The ablation script's --quick modes (the CI-sized grid and the gradient-variance analysis), and its refusals at
start-up: bad settings and earlier results stop it before any task is built."""

import csv
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import reward_ablation  # noqa: E402
from reward_ablation import main, make_parser  # noqa: E402

from dro_rl.cli import refusals_in_one_line  # noqa: E402


def run(tmp_path, *flags):
    (args,) = make_parser().parse_args_and_config(
        args=["--quick", "true", "--workers", "1", "--output_dir", str(tmp_path), *flags]
    )
    return main(args)


def test_quick_grid_writes_csv_table_and_curves(tmp_path, monkeypatch):
    import matplotlib.figure

    titles, savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (titles.append(fig.axes[0].get_title()), savefig(fig, *a, **k)))
    results = run(tmp_path)
    assert [r["name"] for r in results] == ["dro_baseline/-", "rloo/log_likelihood"]
    assert all(len(r["curve"]) == 2 and 0.0 <= r["support_recall"] <= 1.0 for r in results)
    rows = list(csv.DictReader(open(tmp_path / "grid.csv")))
    assert len(rows) == 2 and rows[0]["name"] == "dro_baseline/-"
    assert "| rloo/log_likelihood |" in (tmp_path / "grid.md").read_text()
    assert (tmp_path / "grid.png").stat().st_size > 10_000
    steps = max(s for s, _, _ in results[0]["curve"])  # the figure says what it shows (it was untitled)
    assert len(titles) == 1 and titles[0].startswith(f"grid analysis: {steps} DRO steps,"), titles


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


def refusal(capsys, call, prog: str = "reward_ablation.py") -> str:
    """The one line the script ``prog`` prints when ``call`` refuses (status 1, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        with refusals_in_one_line(prog):
            call()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("flags, message", [
    (["--estimators", "dro_baseline", "foo"], "--estimators: unknown ['foo']"),  # was refused after dro_baseline ran
    (["--rewards", "bogus"], "--rewards: unknown reward 'bogus'"),
    (["--seeds", "0", "0"], "--seeds: [0] repeated"),  # one world counted twice, a spread of 0
    (["--analysis", "variance", "--variance_repeats", "1"], "--variance_repeats must be >= 2"),  # variance 0
    (["--max_steps", "0"], "--max_steps must be >= 1, got 0"),
    (["--num_train", "0"], "--num_train must be >= 1, got 0"),  # was an IndexError
    (["--recall_threshold", "2"], "--recall_threshold is a support recall, within [0, 1]; got 2.0"),
])
def test_a_setting_no_run_can_use_is_refused_in_one_line_when_parsed(capsys, flags, message):
    err = refusal(capsys, lambda: make_parser().parse_args_and_config(args=["--quick", "true", *flags]))
    assert err.startswith(f"reward_ablation.py: error: {message}")


@pytest.fixture
def no_task(monkeypatch):
    """Fail the test if a task is built: every refusal here must come before any work."""
    def prepare(args, seed):
        raise AssertionError("a task was built before the refusal")

    monkeypatch.setattr(reward_ablation, "prepare", prepare)


@pytest.mark.parametrize("flags, message", [
    (["--num_train", "5"], "the training set has 5 questions, fewer than the 16 that one step samples"),
    (["--seeds", "-1"], "seed must be between 0 and 2**32 - 1"),
])
def test_a_setting_a_run_would_refuse_stops_the_ablation_before_any_task(tmp_path, capsys, no_task, flags, message):
    assert refusal(capsys, lambda: run(tmp_path, *flags)).startswith(f"reward_ablation.py: error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_an_earlier_result_is_refused_unless_overwrite_and_a_file_as_output_dir_in_one_line(tmp_path, capsys, no_task):
    (tmp_path / "grid.md").write_text("| an earlier table |\n")
    assert refusal(capsys, lambda: run(tmp_path, "--seeds", "1")) == (
        f"reward_ablation.py: error: {tmp_path / 'grid.md'} already exists: pass --overwrite true to replace it, or "
        "write elsewhere\n")
    assert (tmp_path / "grid.md").read_text() == "| an earlier table |\n"
    for flags in (["--analysis", "variance"], ["--seeds", "1", "--overwrite", "true"]):
        with pytest.raises(AssertionError, match="a task was built"):  # another analysis's, or replaced: to the work
            run(tmp_path, *flags)
    output_file = tmp_path / "grid.md"
    assert refusal(capsys, lambda: run(output_file)) == (
        f"reward_ablation.py: error: {output_file} is a file, not a folder: nothing can be written under it\n")
