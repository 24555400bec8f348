"""The evaluation report: numbers, paired differences, and the files it writes."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from rich.console import Console

from langchain_nudging.evaluation.report import (
    build_report,
    find_rows,
    main_table,
    main_table_cells,
    paired_bootstrap_ci,
    render_markdown,
    scores_figure,
    signed_points,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(
    task: str,
    example_id: str,
    mode: str,
    *,
    gamma: float | None = None,
    primary: float | None = None,
    score: dict[str, Any] | None = None,
    tokens: int = 10,
    nudge_tokens: int = 0,
    wall_time: float = 1.0,
    prompts: tuple[str, ...] = ("What is 2 + 2?",),
    segments: list[dict[str, str]] | None = None,
    reference: str | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One record as the runner writes it; a turn's answer is its segments joined."""
    turns = []
    for k, prompt in enumerate(prompts):
        text = "Four." if len(prompts) == 1 else f"Four. (turn {k + 1})"
        parts = segments if segments is not None else [{"text": text, "source": "base"}]
        answer = "".join(s["text"] for s in parts)
        turns.append({"prompt": prompt, "answer": answer, "segments": parts})
    if score is None and primary is not None:
        score = {"exact_match": int(primary), "extracted": "4"}
    return {
        "task": task,
        "example_id": example_id,
        "mode": mode,
        "gamma": gamma,
        "turns": turns,
        "answer": turns[-1]["answer"],
        "reference": reference,
        "score": score,
        "primary": primary,
        "tokens": tokens,
        "nudge_tokens": nudge_tokens,
        "nudged_share": nudge_tokens / tokens if tokens else 0.0,
        "wall_time": wall_time,
        "finish_reason": "stop",
        "meta": meta or {},
    }


def gsm8k_run(
    base: list[int], nudged: list[int], nudging: list[int] | None = None, gamma: float = 0.4
) -> list[dict[str, Any]]:
    """GSM8K records: one per example and mode, primary scores as given."""
    records = [record("gsm8k", f"q{i}", "base", primary=p) for i, p in enumerate(base)]
    records += [
        record("gsm8k", f"q{i}", "nudged", gamma=gamma, primary=p) for i, p in enumerate(nudged)
    ]
    if nudging is not None:
        records += [record("gsm8k", f"q{i}", "nudging", primary=p) for i, p in enumerate(nudging)]
    return records


def paired_entry(report: dict[str, Any], baseline: str, task: str = "gsm8k") -> dict[str, Any]:
    (entry,) = [p for p in report["paired"] if p["baseline"] == baseline and p["task"] == task]
    return entry


# ----------------------------------------------------------------------------------------------
# Numbers


def test_cell_mean_share_and_speed_are_token_weighted():
    records = [
        record("gsm8k", "a", "nudged", gamma=0.4, primary=1, tokens=10, nudge_tokens=10),
        record("gsm8k", "b", "nudged", gamma=0.4, primary=0, tokens=90, nudge_tokens=0),
        record("gsm8k", "c", "nudged", gamma=0.4, primary=1, tokens=100, nudge_tokens=40),
        record("gsm8k", "a", "base", primary=0, tokens=30, wall_time=2.0),
        record("gsm8k", "b", "base", primary=0, tokens=50, wall_time=3.0),
    ]
    report = build_report(records, resamples=200)
    nudged = report["cells"]["nudged"]["gsm8k"]
    assert nudged["n"] == 3
    assert nudged["primary"] == pytest.approx(2 / 3)
    # 50 nudge tokens of 200, not the mean of the per-answer shares (1 + 0 + 0.4) / 3.
    assert nudged["nudged_share"] == pytest.approx(0.25)
    assert nudged["tokens_per_s"] == pytest.approx(200 / 3)
    base = report["cells"]["base"]["gsm8k"]
    assert base["primary"] == 0.0
    assert base["nudged_share"] == 0.0
    assert base["tokens_per_s"] == pytest.approx(80 / 5)
    assert report["average"]["nudged"] == {"primary": pytest.approx(2 / 3), "tasks": ["gsm8k"]}
    assert report["n_records"] == 5


def test_ifeval_instruction_level_flattens_the_lists():
    def ifeval(example_id: str, strict: list[bool], loose: list[bool]) -> dict[str, Any]:
        score = {
            "prompt_level_strict_acc": all(strict),
            "inst_level_strict_acc": strict,
            "prompt_level_loose_acc": all(loose),
            "inst_level_loose_acc": loose,
        }
        return record("ifeval", example_id, "base", primary=float(all(strict)), score=score)

    records = [
        ifeval("1", [True, True, True], [True, True, True]),
        ifeval("2", [False, True], [True, True]),
    ]
    cell = build_report(records, resamples=100)["cells"]["base"]["ifeval"]
    assert cell["primary"] == 0.5
    assert cell["ifeval"] == {
        "prompt_level_strict_acc": 0.5,
        "inst_level_strict_acc": pytest.approx(4 / 5),  # the mean of means would be 0.75
        "prompt_level_loose_acc": 1.0,
        "inst_level_loose_acc": 1.0,
    }
    markdown = render_markdown(build_report(records, resamples=100))
    assert "## IFEval" in markdown
    assert "| base | 50.0 | 80.0 | 100.0 | 100.0 | 2 |" in markdown


def test_paired_difference_of_hand_made_rows():
    # base right on 1 of 4, nudged right on 3 of 4: +50 points.
    records = gsm8k_run(base=[1, 0, 0, 0], nudged=[1, 1, 1, 0], nudging=[1, 1, 1, 0])
    report = build_report(records, resamples=2000)
    vs_base = paired_entry(report, "base")
    assert vs_base["row"] == "nudged"
    assert vs_base["n"] == 4
    assert vs_base["mean"] == pytest.approx(0.5)
    assert -1.0 <= vs_base["ci_low"] <= 0.5 <= vs_base["ci_high"] <= 1.0
    assert vs_base["ci_low"] < vs_base["ci_high"]
    vs_nudging = paired_entry(report, "nudging")  # identical rows
    assert (vs_nudging["mean"], vs_nudging["ci_low"], vs_nudging["ci_high"]) == (0.0, 0.0, 0.0)


def test_pairs_only_the_examples_both_rows_answered():
    records = gsm8k_run(base=[0, 0], nudged=[1, 1, 0, 0])
    entry = paired_entry(build_report(records, resamples=100), "base")
    assert entry["n"] == 2
    assert entry["mean"] == 1.0


def test_bootstrap_is_seeded():
    diffs = [0.13, -0.4, 0.7, 0.22, 0.05, -0.31, 0.9, 0.41]
    assert paired_bootstrap_ci(diffs, seed=3) == paired_bootstrap_ci(diffs, seed=3)
    assert paired_bootstrap_ci(diffs, seed=3) != paired_bootstrap_ci(diffs, seed=4)
    low, high = paired_bootstrap_ci(diffs, seed=0, resamples=5000)
    assert low < sum(diffs) / len(diffs) < high
    assert paired_bootstrap_ci([0.25] * 5) == (0.25, 0.25)
    with pytest.raises(ValueError, match="no paired"):
        paired_bootstrap_ci([])


def test_missing_cells_are_skipped():
    records = gsm8k_run(base=[1, 0], nudged=[1, 1])
    records += [record("strategyqa", "s1", "base", primary=1)]  # strategyqa: base only
    records += [record("just-eval", "0", "nudged", gamma=0.4)]  # open task: nudged only
    report = build_report(records, resamples=100)
    assert report["scored_tasks"] == ["gsm8k", "strategyqa"]
    assert report["open_tasks"] == ["just-eval"]
    assert "strategyqa" not in report["cells"]["nudged"]
    assert "just-eval" not in report["cells"]["base"]
    assert report["cells"]["nudged"]["just-eval"]["primary"] is None
    assert report["average"]["base"] == {"primary": 0.75, "tasks": ["gsm8k", "strategyqa"]}
    assert report["average"]["nudged"] == {"primary": 1.0, "tasks": ["gsm8k"]}
    assert [(p["baseline"], p["task"]) for p in report["paired"]] == [("base", "gsm8k")]

    header, _ = markdown_main_table(render_markdown(report))
    assert header == "| Row | GSM8K | StrategyQA | Avg | Just-Eval | Share nudged | Cut |"
    markdown = render_markdown(report)
    assert "| base | 50.0 | 100.0 | 75.0 | — | 0.0% | 0/3 |" in markdown
    assert "| nudged | 100.0 | — | 100.0* | 1 answer | 0.0% | 0/3 |" in markdown
    assert "nudged − nudging" in markdown  # the column exists, without a baseline to fill it


def test_rows_are_labelled_by_gamma_only_when_several():
    assert [r.label for r in find_rows(gsm8k_run([1], [1], [0]))] == ["base", "nudging", "nudged"]
    records = gsm8k_run([1], [1], gamma=0.5) + gsm8k_run([], [0], gamma=0.3)
    rows = find_rows(records)
    assert [r.label for r in rows] == ["base", "nudged γ=0.3", "nudged γ=0.5"]
    assert [r.slug for r in rows] == ["base", "nudged-gamma0.3", "nudged-gamma0.5"]


def test_a_duplicate_record_counts_once():
    records = gsm8k_run(base=[0, 1], nudged=[1, 1])
    records.append(record("gsm8k", "q0", "base", primary=1))  # a rerun of q0: the last wins
    cell = build_report(records, resamples=100)["cells"]["base"]["gsm8k"]
    assert (cell["n"], cell["primary"]) == (2, 1.0)


# ----------------------------------------------------------------------------------------------
# Text


def markdown_main_table(markdown: str) -> tuple[str, list[str]]:
    lines = markdown.split("## Scores\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return lines[0], lines[2:]


def test_markdown_tables():
    records = gsm8k_run(base=[1, 0, 0, 0], nudged=[1, 1, 1, 0], nudging=[1, 1, 0, 0])
    records += [
        record("mt-bench", "81", "base", prompts=("Q1", "Q2")),
        record("mt-bench", "81", "nudged", gamma=0.4, prompts=("Q1", "Q2")),
    ]
    markdown = render_markdown(build_report(records, resamples=500))
    assert "rows: base, nudging, nudged (γ=0.4);" in markdown
    header, rows = markdown_main_table(markdown)
    assert header == "| Row | GSM8K | Avg | MT-Bench | Share nudged | Cut |"
    assert rows == [
        "| base | 25.0 | 25.0 | 1 answer | 0.0% | 0/5 |",
        "| nudging | 50.0 | 50.0 | — | 0.0% | 0/4 |",
        "| nudged | 75.0 | 75.0 | 1 answer | 0.0% | 0/5 |",
    ]
    paired_table = markdown.split("## Paired differences", 1)[1].split("##", 1)[0]
    (paired,) = [line for line in paired_table.splitlines() if line.startswith("| nudged |")]
    assert "| +50.0 [" in paired
    assert "(n=4) | +25.0 [" in paired
    assert "## Share nudged and speed" in markdown
    assert "## IFEval" not in markdown


def ifeval_record(
    example_id: str,
    mode: str,
    strict: list[bool],
    loose: list[bool],
    *,
    tokens: int = 10,
    nudge_tokens: int = 0,
    cut: bool = False,
) -> dict[str, Any]:
    """An IFEval record: instruction-level lists as lm-eval gives them, primary prompt strict."""
    score = {
        "prompt_level_strict_acc": all(strict),
        "inst_level_strict_acc": strict,
        "prompt_level_loose_acc": all(loose),
        "inst_level_loose_acc": loose,
    }
    gamma = 0.4 if mode == "nudged" else None
    result = record(
        "ifeval",
        example_id,
        mode,
        gamma=gamma,
        primary=float(all(strict)),
        score=score,
        tokens=tokens,
        nudge_tokens=nudge_tokens,
    )
    if cut:
        result["finish_reason"] = "length"
    return result


def small_run() -> list[dict[str, Any]]:
    """Five IFEval prompts and two GSM8K questions on which every prompt-level score is 0 (as
    on a small sample of a weak pair), with instruction-level hits and nudged tokens."""
    records = []
    for i in range(5):
        records.append(ifeval_record(str(i), "base", [True, False], [True, False], cut=i < 4))
        records.append(
            ifeval_record(
                str(i), "nudging", [True, False, False][: 2 + i % 2], [True, True], nudge_tokens=10
            )
        )
        records.append(
            ifeval_record(str(i), "nudged", [True, False], [True, False], nudge_tokens=3)
        )
    for i in range(2):
        records.append(record("gsm8k", f"q{i}", "base", primary=0, tokens=20))
        records.append(record("gsm8k", f"q{i}", "nudging", primary=0, tokens=20, nudge_tokens=20))
        records.append(
            record("gsm8k", f"q{i}", "nudged", gamma=0.4, primary=0, tokens=20, nudge_tokens=5)
        )
    return records


def test_main_table_has_instruction_level_share_and_cut_columns():
    report = build_report(small_run(), resamples=100)
    header, rows = main_table_cells(report)
    assert header == [
        "Row",
        "IFEval",
        "GSM8K",
        "Avg",
        "IFEval inst. strict",
        "IFEval inst. loose",
        "Share nudged",
        "Cut",
    ]
    # base: 5 of 10 instructions; nudging: strict 5 of 12 (prompts of 2 and 3), loose 10 of 10;
    # nudged: 15 + 10 nudge tokens of 50 + 40.
    assert rows == [
        ["base", "0.0", "0.0", "0.0", "50.0", "50.0", "0.0%", "4/7"],
        ["nudging", "0.0", "0.0", "0.0", "41.7", "100.0", "100.0%", "0/7"],
        ["nudged", "0.0", "0.0", "0.0", "50.0", "50.0", "27.8%", "0/7"],
    ]
    assert report["totals"]["nudged"] == {
        "n": 7,
        "tokens": 90,
        "nudge_tokens": 25,
        "nudged_share": pytest.approx(25 / 90),
        "cut": 0,
    }
    markdown = render_markdown(report)
    assert "| nudged | 0.0 | 0.0 | 0.0 | 50.0 | 50.0 | 27.8% | 0/7 |" in markdown
    console = Console(file=io.StringIO(), width=200)
    console.print(main_table(report))
    assert "IFEval inst. loose" in console.file.getvalue()


def bar_heights(ax: Any) -> dict[str, list[float]]:
    """An axes' bars by legend label, in group order (NaN: no bar)."""
    return {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}


def test_scores_chart_shows_instruction_level_and_share_nudged():
    report = build_report(small_run(), resamples=100)
    score_ax, share_ax = scores_figure(report).axes
    assert [t.get_text() for t in score_ax.get_xticklabels()] == [
        "IFEval",
        "GSM8K",
        "Avg",
        "IFEval inst. strict",
        "IFEval inst. loose",
    ]
    scores = bar_heights(score_ax)
    assert scores["base"] == pytest.approx([0.0, 0.0, 0.0, 50.0, 50.0])
    assert scores["nudging"] == pytest.approx([0.0, 0.0, 0.0, 100 * 5 / 12, 100.0])
    assert scores["nudged"][3:] == pytest.approx([50.0, 50.0])  # non-empty bars
    assert score_ax.get_ylim()[1] >= 100.0  # the tallest bar fits
    assert [t.get_text() for t in share_ax.get_xticklabels()] == ["IFEval", "GSM8K", "All"]
    shares = bar_heights(share_ax)
    assert shares["base"] == [0.0, 0.0, 0.0]
    assert shares["nudging"] == [100.0, 100.0, 100.0]
    assert shares["nudged"] == pytest.approx([30.0, 25.0, 100 * 25 / 90])
    labels = [t.get_text() for t in share_ax.texts]
    assert "28%" in labels


def test_scores_chart_axis_follows_low_scores():
    report = build_report(gsm8k_run(base=[0] * 19 + [1], nudged=[0] * 20), resamples=100)
    score_ax, _ = scores_figure(report).axes
    assert bar_heights(score_ax)["base"] == pytest.approx([5.0, 5.0])
    assert score_ax.get_ylim()[1] == pytest.approx(10.0)  # a 5% bar is half the axis


def test_signed_points():
    assert signed_points(0.03) == "+3.0"
    assert signed_points(-0.01) == "−1.0"
    assert signed_points(0.0) == "+0.0"
    assert signed_points(-0.0004) == "+0.0"


def test_main_table_for_the_terminal():
    report = build_report(gsm8k_run(base=[1, 0], nudged=[1, 1]), resamples=100)
    console = Console(file=io.StringIO(), width=120)
    console.print(main_table(report))
    text = console.file.getvalue()
    assert "GSM8K" in text
    assert "Avg" in text
    assert "50.0" in text
    assert "100.0" in text


# ----------------------------------------------------------------------------------------------
# Files


def test_write_report_files(tmp_path):
    records = gsm8k_run(base=[1, 0], nudged=[1, 1], nudging=[0, 1])
    paths = write_report(records, tmp_path, seed=1, resamples=300)
    assert set(paths) == {"markdown", "json", "scores", "answers"}
    assert paths["scores"].read_bytes().startswith(PNG_SIGNATURE)
    assert not (tmp_path / "gamma_sweep.png").exists()
    assert json.loads(paths["json"].read_text()) == build_report(records, seed=1, resamples=300)
    markdown = paths["markdown"].read_text()
    assert "![scores](scores.png)" in markdown
    assert "seed 1" in markdown


def test_gamma_sweep_written_with_two_gammas(tmp_path):
    records = gsm8k_run(base=[1, 0], nudged=[1, 1], nudging=[0, 1], gamma=0.3)
    records += gsm8k_run(base=[], nudged=[0, 1], gamma=0.5)
    paths = write_report(records, tmp_path, resamples=100)
    assert paths["gamma_sweep"] == tmp_path / "gamma_sweep.png"
    assert paths["gamma_sweep"].read_bytes().startswith(PNG_SIGNATURE)
    report = json.loads(paths["json"].read_text())
    assert {p["row"] for p in report["paired"]} == {"nudged-gamma0.3", "nudged-gamma0.5"}


def test_answers_html_escapes_and_highlights(tmp_path):
    segments = [
        {"text": "Sure! ", "source": "nudge"},
        {"text": "2 + 2 = 4 <b>", "source": "base"},
        {"text": "& done", "source": "nudge"},
    ]
    records = [
        record("gsm8k", "x<1>", "base", primary=0, prompts=("<script>alert(1)</script>",)),
        record(
            "gsm8k",
            "x<1>",
            "nudged",
            gamma=0.4,
            primary=1,
            prompts=("<script>alert(1)</script>",),
            segments=segments,
            reference="4 & <5>",
            tokens=20,
            nudge_tokens=5,
        ),
        record("gsm8k", "y", "nudged", gamma=0.4, primary=1),
        record("mt-bench", "81", "nudged", gamma=0.4, prompts=("First question", "Second one")),
    ]
    page = write_report(records, tmp_path, resamples=100)["answers"].read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<mark>Sure! </mark>2 + 2 = 4 &lt;b&gt;<mark>&amp; done</mark>" in page
    assert "4 &amp; &lt;5&gt;" in page
    assert "x&lt;1&gt;" in page
    assert "25% nudged" in page
    assert '<a href="#task-gsm8k">' in page
    assert 'id="task-mt-bench"' in page
    assert "Turn 1: First question" in page
    assert "Turn 2: Second one" in page
    assert "Four. (turn 2)" in page
    assert page.count("not run") == 1  # base on example y; base has no MT-Bench column


def test_judge_exports(tmp_path):
    just_eval_meta = {
        "source_id": "alpaca_eval-0",
        "dataset": "helpful_base",
        "category": "info-seek",
        "instruction": "Name famous actors.",
    }
    records = [
        record("just-eval", "0", "base", prompts=("Name famous actors.",), meta=just_eval_meta),
        record("just-eval", "0", "nudged", gamma=0.3, meta=just_eval_meta),
        record("just-eval", "0", "nudged", gamma=0.5, meta=just_eval_meta),
        record(
            "mt-bench",
            "82",
            "base",
            prompts=("A", "B"),
            meta={"question_id": 82, "category": "writing"},
        ),
        record(
            "mt-bench",
            "81",
            "base",
            prompts=("C", "D"),
            meta={"question_id": 81, "category": "writing"},
        ),
    ]
    paths = write_report(records, tmp_path, resamples=100)
    assert "scores" not in paths  # no scored task
    assert paths["judge/just-eval/base"] == tmp_path / "judge" / "just-eval" / "base.json"
    assert (tmp_path / "judge" / "just-eval" / "nudged-gamma0.3.json").exists()
    (entry,) = json.loads(paths["judge/just-eval/nudged-gamma0.5"].read_text())
    assert entry == {
        "id": 0,
        "instruction": "Name famous actors.",
        "source_id": "alpaca_eval-0",
        "dataset": "helpful_base",
        "category": "info-seek",
        "output": "Four.",
        "generator": "nudged γ=0.5",
    }

    lines = paths["judge/mt-bench/base"].read_text().splitlines()
    answers = [json.loads(line) for line in lines]
    assert [a["question_id"] for a in answers] == [81, 82]
    first = answers[0]
    assert set(first) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert first["model_id"] == "base"
    assert first["choices"] == [{"index": 0, "turns": ["Four. (turn 1)", "Four. (turn 2)"]}]
    assert isinstance(first["tstamp"], float)
    again = write_report(records, tmp_path / "again", resamples=100)["judge/mt-bench/base"]
    assert [json.loads(line)["answer_id"] for line in again.read_text().splitlines()] == [
        a["answer_id"] for a in answers
    ]
    assert answers[0]["answer_id"] != answers[1]["answer_id"]
    assert "judge/mt-bench/nudged-gamma0.3" not in paths

    header, rows = markdown_main_table(paths["markdown"].read_text())
    assert header == "| Row | Just-Eval | MT-Bench | Share nudged | Cut |"
    assert rows[0] == "| base | 1 answer | 2 answers | 0.0% | 0/3 |"
