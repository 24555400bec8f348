"""Answer browser: ``answers.html``, every example with the rows' answers side by side."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .numbers import ratio
from .rows import Record, Results, Row, task_title

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h2{border-bottom:2px solid #ccc;margin-top:2em}
article{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em .9em;margin:1em 0}
h3{font-size:13px;margin:0 0 .4em;color:#555}
.g{display:grid;gap:.5em}
.p,.r{grid-column:1/-1;white-space:pre-wrap;padding:.4em .6em;border-radius:4px}
.p{background:#eef3fb}.r{background:#eef8ee}
.a{border:1px solid #e3e3e3;border-radius:4px;padding:.4em .6em;min-width:0}
.t{white-space:pre-wrap;overflow-wrap:anywhere}
.h{font-size:12px;color:#555;margin-bottom:.3em}
.ok{color:#1a7f37;font-weight:bold}.no{color:#c62828;font-weight:bold}
mark{background:#ffe08a;padding:0}
"""


def _answer_html(turn: Mapping[str, Any]) -> str:
    segments = turn.get("segments") or []
    if not segments:
        return html.escape(str(turn.get("answer") or ""))
    return "".join(
        f"<mark>{html.escape(s['text'])}</mark>"
        if s.get("source") == "nudge"
        else html.escape(s["text"])
        for s in segments
    )


def _mark(ok: Any) -> str:
    return '<span class="ok">✓</span>' if ok else '<span class="no">✗</span>'


def _badge(record: Record, task: str) -> str:
    parts = []
    score = record.get("score") or {}
    if task == "ifeval" and score:
        strict = score.get("inst_level_strict_acc") or []
        parts.append(
            f"strict {_mark(score.get('prompt_level_strict_acc'))} "
            f"loose {_mark(score.get('prompt_level_loose_acc'))} "
            f"· {sum(map(bool, strict))}/{len(strict)} instructions"
        )
    elif record.get("primary") is not None:
        parts.append(_mark(float(record["primary"]) >= 1.0))
        if score.get("extracted") is not None:
            parts.append("answer " + html.escape(str(score["extracted"])))
    parts.append(f"{int(record.get('tokens') or 0)} tok")
    if record.get("mode") == "nudged":
        share = record.get("nudged_share")
        if share is None:
            share = ratio(record.get("nudge_tokens") or 0, record.get("tokens") or 0) or 0.0
        parts.append(f"{100 * share:.0f}% nudged")
    finish = record.get("finish_reason")
    if finish not in (None, "stop"):
        parts.append(html.escape(str(finish)))
    return " · ".join(parts)


def record_turns(record: Record) -> list[Mapping[str, Any]]:
    if record.get("turns"):
        return list(record["turns"])
    prompt = (record.get("meta") or {}).get("instruction") or ""
    return [{"prompt": prompt, "answer": record.get("answer") or "", "segments": []}]


def render_answers_html(records: Iterable[Record]) -> str:
    """``answers.html``: every example of every task, the rows' answers side by side.

    Self-contained (inline CSS, no script). Text written by the nudging model is in
    ``<mark>``; each answer's header gives its score, its tokens and, for a nudged row, the
    share nudged.
    """
    return answers_page(Results(records))


def _example_html(task: str, example_id: str, answers: Sequence[tuple[Row, Record | None]]) -> str:
    """One example: its prompt(s) and reference across the page, then a column per row."""
    first = next(record for _, record in answers if record is not None)
    turns = record_turns(first)
    references = (record.get("reference") for _, record in answers if record is not None)
    reference = next((r for r in references if r is not None), None)
    columns = f"grid-template-columns:repeat({len(answers)},minmax(0,1fr))"
    out = [f'<article><h3>{html.escape(example_id)}</h3><div class="g" style="{columns}">']
    for k, turn in enumerate(turns):
        prefix = f"Turn {k + 1}: " if len(turns) > 1 else ""
        out.append(f'<div class="p">{prefix}{html.escape(str(turn.get("prompt") or ""))}</div>')
        if k == 0 and reference is not None:
            out.append(f'<div class="r">Reference: {html.escape(str(reference))}</div>')
        for row, record in answers:
            head = f"<b>{html.escape(row.label)}</b>"
            if record is None:
                out.append(f'<div class="a"><div class="h">{head} · <i>not run</i></div></div>')
                continue
            own_turns = record_turns(record)
            body = _answer_html(own_turns[k]) if k < len(own_turns) else ""
            info = _badge(record, task) if k == 0 else f"turn {k + 1}"
            out.append(f'<div class="a"><div class="h">{head} · {info}</div>')
            out.append(f'<div class="t">{body}</div></div>')
    out.append("</div></article>")
    return "\n".join(out)


def answers_page(results: Results) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Answers</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Answers</h1>",
        "<p>Rows: "
        + ", ".join(html.escape(row.label) for row in results.rows)
        + ". <mark>Highlighted</mark> text was written by the nudging model.</p>",
        "<nav><ul>",
    ]
    anchors = {task: "task-" + re.sub(r"[^a-z0-9]+", "-", task.lower()) for task in results.tasks}
    for task in results.tasks:
        out.append(
            f'<li><a href="#{anchors[task]}">{html.escape(task_title(task))}</a> '
            f"({len(results.example_order[task])} examples)</li>"
        )
    out.append("</ul></nav>")

    for task in results.tasks:
        present = [row for row in results.rows if results.cell(row.slug, task)]
        out.append(f'<section id="{anchors[task]}"><h2>{html.escape(task_title(task))}</h2>')
        for example_id in results.example_order[task]:
            answers = [(row, results.cell(row.slug, task).get(example_id)) for row in present]
            out.append(_example_html(task, example_id, answers))
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)
