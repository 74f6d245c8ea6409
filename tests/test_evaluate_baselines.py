"""Bootstrap intervals over questions, and scripts/evaluate.py's closed-book strategy, intervals and throughput."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model
from peft import LoraConfig, get_peft_model
from test_data import SHARED, needs_shared

from dro_rl.evaluation import bootstrap_interval, score_picks
from dro_rl.pipeline_config import PipelineConfig
from dro_rl.selector import left_pad

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from evaluate import EvaluateArguments, count_tokens  # noqa: E402
from evaluate import main as evaluate_main  # noqa: E402

HOTPOT = SHARED / "hotpotqa_dev300" / "hotpotqa_distractor_dev300.jsonl"


def test_interval_of_a_proportion_matches_the_normal_approximation():
    values = [1.0] * 200 + [0.0] * 200  # mean 0.5, standard error sqrt(0.25 / 400) = 0.025
    low, high = bootstrap_interval(values, resamples=4000)
    assert low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006) and high == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)


def test_interval_narrows_with_level_and_collapses_on_constant_values():
    values = list(np.random.default_rng(1).random(100))
    wide, narrow = bootstrap_interval(values, 0.95), bootstrap_interval(values, 0.5)
    assert wide[0] < narrow[0] < np.mean(values) < narrow[1] < wide[1]
    assert bootstrap_interval([0.3] * 10) == pytest.approx((0.3, 0.3))
    assert bootstrap_interval(values) == bootstrap_interval(values)  # seeded


def test_rows_without_a_value_are_left_out():
    assert bootstrap_interval([None, None]) is None
    assert bootstrap_interval([1.0, None, 1.0]) == (1.0, 1.0)


def test_score_picks_keeps_one_value_per_question():
    rows = [{"question": "q", "answers": ["paris"], "gold": [True, False],
             "passages": [{"title": "", "text": "paris"}, {"title": "", "text": "rome"}]},
            {"question": "q", "answers": ["rome"], "gold": [],
             "passages": [{"title": "", "text": "paris"}, {"title": "", "text": "rome"}]}]
    scores = score_picks(rows, [[0], [0]])
    assert scores["per_question"] == {"support_recall_at_k": [1.0, None], "answer_recall_at_k": [1.0, 0.0]}
    assert scores["support_recall_at_k"] == 1.0 and scores["answer_recall_at_k"] == 0.5


def test_count_tokens_counts_non_padding_tokens_also_through_peft_generate(bpe_tok):
    model = make_model(bpe_tok)
    ids, mask = left_pad([[5, 6, 7], [8]], bpe_tok.pad_token_id)
    with count_tokens(model) as tokens, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert tokens == [4]
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with count_tokens(peft) as tokens, torch.no_grad():
        peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                      pad_token_id=bpe_tok.pad_token_id)
    assert tokens == [4 + 2 * 2]  # the prompts, then two decoding steps of one token for each row


def test_unknown_strategy_is_refused_before_loading_models(tmp_path):
    with pytest.raises(ValueError, match="strategies: unknown \\['closed_books'\\]"):
        evaluate_main(EvaluateArguments(datasets=["x"], selector="missing", generator="missing",
                                        strategies=["closed_books"], output_dir=str(tmp_path)), PipelineConfig())


def test_the_selector_strategy_without_a_selector_is_refused_before_loading_models(tmp_path):
    """Only the `selector` strategy reads a selector: without --selector (or --run_dir) it is refused by name."""
    with pytest.raises(ValueError, match="--strategies selector scores a selector's picks: give --selector"):
        evaluate_main(EvaluateArguments(datasets=["x"], generator="missing", output_dir=str(tmp_path)),
                      PipelineConfig())
    with pytest.raises(ValueError, match=r"give --run_dir, or --generator \(and --selector"):
        evaluate_main(EvaluateArguments(datasets=["x"], selector="missing", output_dir=str(tmp_path)),
                      PipelineConfig())


def test_an_output_dir_that_is_a_model_or_run_folder_is_refused(tmp_path):
    """Metrics and predictions were written among a run's or a model's files without a word."""
    (tmp_path / "selector").mkdir()
    (tmp_path / "selector" / "config.json").write_text("{}")
    (tmp_path / "d.jsonl").write_text('{"question": "q?", "answers": ["a"]}\n')
    with pytest.raises(ValueError, match=r"selector is a model or run folder \(it holds config.json\)"):
        evaluate_main(EvaluateArguments(datasets=[str(tmp_path / "d.jsonl")], selector="tiny:minilm",
                                        generator="tiny:minilm",
                                        output_dir=str(tmp_path / "selector")), PipelineConfig())


def test_run_dir_with_other_models_is_refused(tmp_path):
    """--run_dir evaluates the run's pair: a --selector beside it would be scored under the run's name."""
    with pytest.raises(ValueError, match="drop --selector/--generator"):
        evaluate_main(EvaluateArguments(datasets=["x"], run_dir=str(tmp_path), selector="tiny:minilm",
                                        output_dir=str(tmp_path)), PipelineConfig())


def test_two_datasets_with_one_file_name_are_refused_before_loading_models(tmp_path):
    """Results are named after the file: a/dev.jsonl and b/dev.jsonl would overwrite each other's predictions."""
    with pytest.raises(ValueError, match=r"names repeat: dev \(a/dev.jsonl, hotpotqa:b/dev.jsonl\)"):
        evaluate_main(EvaluateArguments(datasets=["a/dev.jsonl", "hotpotqa:b/dev.jsonl", "c/test.jsonl"],
                                        selector="missing", generator="missing", output_dir=str(tmp_path)),
                      PipelineConfig())


def test_an_earlier_evaluation_is_refused_before_loading_models_unless_overwrite(tmp_path, capsys):
    """Another evaluation into the same folder would replace metrics.json and the predictions of the same names."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "dev.retrieval.predictions.jsonl").write_text("earlier\n")
    data = tmp_path / "dev.jsonl"
    data.write_text(json.dumps({"question": "q?", "answers": ["paris"], "passages": [{"text": "paris"}]}) + "\n")
    args = EvaluateArguments(datasets=[str(data)], selector="missing", generator="missing", output_dir=str(out))
    with pytest.raises(FileExistsError, match=r"holds an earlier evaluation's dev.retrieval.predictions.jsonl, "
                                              r"metrics.json: pass --overwrite true"):
        evaluate_main(args, PipelineConfig())
    assert (out / "metrics.json").read_text() == "{}"
    (out / "other.selector.predictions.jsonl").write_text("another dataset's\n")
    (out / "other.ranked.jsonl").write_text("a retrieval cache\n")
    args.overwrite, args.selector, args.generator = True, "tiny:minilm", "tiny:minilm"
    args.datasets = ["d/dev.jsonl"]
    with pytest.raises(FileNotFoundError, match="d/dev.jsonl"):  # a typo in a path costs nothing: nothing removed
        evaluate_main(args, PipelineConfig(retriever="bm25"))
    assert len(list(out.iterdir())) == 4
    args.datasets, args.strategies, args.disable_tqdm = [str(data)], ["retrieval"], True
    capsys.readouterr()
    evaluate_main(args, PipelineConfig(retriever="none", num_docs_selected=1, max_answer_tokens=2))
    assert "answer:" not in capsys.readouterr().err  # --disable_tqdm: no progress bar
    assert sorted(p.name for p in out.iterdir()) == [  # the earlier evaluation gone, whole; the rest kept
        "dev.retrieval.predictions.jsonl", "metrics.json", "metrics.md", "other.ranked.jsonl"]
    assert json.loads((out / "metrics.json").read_text())["dev"]["n"] == 1


def test_data_files_are_checked_before_models_load_and_skipped_strategies_say_why(tmp_path, capsys):
    """A mistyped path fails in a second, not after the models load (the model path here does not exist, so
    loading first would fail on it instead); no labels: the missing oracle row is explained, and so are rows with
    fewer than K candidates."""
    args = EvaluateArguments(datasets=[str(tmp_path / "nosuch.jsonl")], selector="/no/such/model",
                             generator="/no/such/model", output_dir=str(tmp_path / "eval"))
    with pytest.raises(FileNotFoundError, match="data file not found: .*nosuch.jsonl"):
        evaluate_main(args, PipelineConfig())
    assert not (tmp_path / "eval").exists()  # no empty output folder left behind
    args.datasets = [str(tmp_path)]
    with pytest.raises(FileNotFoundError, match="is a folder, not a data file"):
        evaluate_main(args, PipelineConfig())
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}?", "answers": ["x"], "passages": [
        {"text": f"passage {j}"} for j in range(1 + i)]}) + "\n" for i in range(3)))
    args = EvaluateArguments(datasets=[str(data)], selector="tiny:minilm", generator="tiny:minilm",
                             output_dir=str(tmp_path / "eval"), strategies=["retrieval", "oracle"])
    table = evaluate_main(args, PipelineConfig(retriever="none", num_docs_selected=2, max_passage_tokens=8,
                                               generator_max_passage_tokens=8, max_answer_tokens=2,
                                               use_chat_template=False))["plain"]
    out = capsys.readouterr().out
    assert "plain: no question has gold passage labels: no oracle row" in out and "oracle" not in table
    assert "plain: 1 of 3 questions have fewer than K = 2 candidates" in out


def test_the_oracle_is_scored_on_the_labelled_rows_only(tmp_path):
    """A row without gold labels has no oracle pick: scoring its retrieval picks under "oracle" lowered the oracle.
    Neither strategy reads a selector: none is given, and the generator alone loads."""
    passages = [{"id": f"p{i}", "text": f"passage {i} about things"} for i in range(3)]
    rows = [{"id": "a", "question": "q a ?", "answers": ["x"], "passages": [{**p, "gold": i == 1}
                                                                          for i, p in enumerate(passages)]},
            {"id": "b", "question": "q b ?", "answers": ["y"], "passages": passages},
            {"id": "c", "question": "q c ?", "answers": ["z"], "passages": [{**p, "gold": i == 2}
                                                                          for i, p in enumerate(passages)]}]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = EvaluateArguments(datasets=[str(data)], generator="tiny:minilm",
                             output_dir=str(tmp_path / "eval"), strategies=["retrieval", "oracle"])
    table = evaluate_main(args, PipelineConfig(retriever="none", num_docs_selected=1, max_passage_tokens=8,
                                               generator_max_passage_tokens=8, max_answer_tokens=2,
                                               use_chat_template=False))["mixed"]
    assert (table["n"], table["oracle"]["n"], "n" in table["retrieval"]) == (3, 2, False)
    assert table["oracle"]["support_recall_at_k"] == 1.0
    oracle = [json.loads(line) for line in (tmp_path / "eval" / "mixed.oracle.predictions.jsonl").read_text()
              .splitlines()]
    assert [(r["id"], r["selected"]) for r in oracle] == [("a", ["p1"]), ("c", ["p2"])]
    md = (tmp_path / "eval" / "metrics.md").read_text()
    assert md.startswith("generator tiny:minilm; K = 1") and "| mixed (n=2) | oracle |" in md


def test_group_by_scores_each_value_of_a_metadata_field_on_its_own(tmp_path):
    """--group_by hops: what split the demo's one-hop and two-hop questions (README, seed 1) — each group's means are
    those of its rows' per-question scores."""
    passages = [{"id": f"p{i}", "text": f"passage {i} about x{i}"} for i in range(3)]
    rows = [{"id": str(i), "question": f"q {i} ?", "answers": [f"x{i % 3}"], "metadata": {"hops": 1 + i % 2},
             "passages": [{**p, "gold": j == i % 3} for j, p in enumerate(passages)]} for i in range(6)]
    rows.append({**rows[0], "id": "no-hops", "metadata": {}})
    data = tmp_path / "grouped.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pipeline = PipelineConfig(retriever="none", num_docs_selected=1, max_passage_tokens=8,
                              generator_max_passage_tokens=8, max_answer_tokens=2, use_chat_template=False)
    args = EvaluateArguments(datasets=[str(data)], selector="tiny:minilm", generator="tiny:minilm", group_by="hops",
                             output_dir=str(tmp_path / "eval"), strategies=["retrieval", "oracle"], disable_tqdm=True)
    table = evaluate_main(args, pipeline)["grouped"]
    for strategy in ("retrieval", "oracle"):
        groups = table[strategy]["by_hops"]
        assert {value: g["n"] for value, g in groups.items()} == {"1": 3, "2": 3, "missing": 1}
        scored = [json.loads(line) for line in
                  (tmp_path / "eval" / f"grouped.{strategy}.predictions.jsonl").read_text().splitlines()]
        for value, ids in (("1", {"0", "2", "4"}), ("2", {"1", "3", "5"})):
            recall = [r["scores"]["support_recall_at_k"] for r in scored if r["id"] in ids]
            assert groups[value]["support_recall_at_k"] == pytest.approx(sum(recall) / 3), (strategy, value)
    # retrieval takes passage 0, the gold one of rows 0 and 3 (and of "no-hops", a copy of row 0)
    assert table["retrieval"]["by_hops"]["1"]["support_recall_at_k"] == pytest.approx(1 / 3)
    assert table["oracle"]["by_hops"]["2"]["support_recall_at_k"] == 1.0
    md = (tmp_path / "eval" / "metrics.md").read_text()
    assert "| grouped [hops=2] (n=3) | oracle | 1.000 [1.000, 1.000] |" in md
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["grouped"]["oracle"]["by_hops"]["1"]["n"] == 3

    args.group_by, args.overwrite = "hop", True  # a typo: every row would be "missing"
    with pytest.raises(ValueError, match=r"--group_by hop: no row of grouped has it in its metadata \(its rows' "
                                         r"metadata fields: \['hops'\]\)"):
        evaluate_main(args, pipeline)


@needs_shared
def test_closed_book_intervals_and_throughput_on_hotpotqa(tmp_path):
    args = EvaluateArguments(datasets=[f"hotpotqa:{HOTPOT}"], selector="tiny:minilm", generator="tiny:minilm",
                             output_dir=str(tmp_path), limit=6,
                             strategies=["closed_book", "retrieval", "oracle", "best_reward"])
    pipeline = PipelineConfig(retriever="bm25", num_docs_selected=2, max_passage_tokens=16,
                              generator_max_passage_tokens=16, max_answer_tokens=2, use_chat_template=False)
    table = evaluate_main(args, pipeline)["hotpotqa_distractor_dev300"]
    assert set(table) == {"closed_book", "retrieval", "oracle", "best_reward", "n"}
    closed, oracle = table["closed_book"], table["oracle"]
    assert closed["support_recall_at_k"] is closed["answer_recall_at_k"] is None  # it reads nothing: not applicable
    assert oracle["support_recall_at_k"] == 1.0 and oracle["ci95"]["support_recall_at_k"] == (1.0, 1.0)
    # 6 prompts, then one decoding step per row: two passages of 16 tokens more than closed-book for each question
    assert closed["tokens"] < table["retrieval"]["tokens"] - 6 * 2 * 10
    for m in table.values():
        if isinstance(m, dict):
            assert m["wall_seconds"] > 0 and m["tokens_per_second"] == pytest.approx(m["tokens"] / m["wall_seconds"])
            for metric, ci in m["ci95"].items():
                assert (ci is m[metric] is None) or ci[0] - 1e-9 <= m[metric] <= ci[1] + 1e-9
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["hotpotqa_distractor_dev300"]["closed_book"]["ci95"]["answer_f1"] is not None
    # what made the figures: the models, the limit and the pipeline (they were only in the command line)
    setup = saved["evaluated_with"]
    assert (setup["selector"], setup["generator"], setup["limit"]) == ("tiny:minilm", "tiny:minilm", 6)
    assert setup["pipeline"]["num_docs_selected"] == 2 and setup["pipeline"]["retriever"] == "bm25"
    assert (tmp_path / "metrics.md").read_text().startswith("selector tiny:minilm, generator tiny:minilm; K = 2, "
                                                            "retriever bm25; at most 6 questions per dataset\n")
    record = json.loads((tmp_path / "hotpotqa_distractor_dev300.closed_book.predictions.jsonl").read_text()
                        .splitlines()[0])
    assert record["selected"] == [] and set(record["scores"]) >= {"answer_em", "support_recall_at_k"}
    md = (tmp_path / "metrics.md").read_text()
    assert "| hotpotqa_distractor_dev300 (n=6) | closed_book | – | – |" in md
    best = [json.loads(line) for line in (tmp_path / "hotpotqa_distractor_dev300.best_reward.predictions.jsonl")
            .read_text().splitlines()]
    assert len(best) == 6 and all(len(set(r["selected"])) == 2 for r in best)
    assert "| support R@2 | answer R@2 |" in md  # the K picked, not the 10 candidates
