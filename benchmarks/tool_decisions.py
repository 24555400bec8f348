"""Tool decisions and agent loops on the bundled pair (docs/tools.md, "Choosing between a call
and an answer" and "Agents").

Decisions: each request of tests/data/tool_decisions.jsonl (labelled: needs a tool or not) is
asked with its tools bound and ``tool_choice="auto"``; the library's own decision is read from
``nudging_stats`` (``call_probability``, ``call_score``) and scored by precision and recall
against the labels, with the best threshold of each statistic on the set. Agents: each task of
tests/data/agent_tasks.jsonl runs in ``langchain.agents.create_agent`` and LangGraph's
prebuilt ReAct agent, with its one tool and with two tools bound; a run succeeds when it
makes a call of the right tool, then answers without a call, the answer holding the result.

    python -m benchmarks.tool_decisions [--json out.json] [--skip-agents] [--skip-decisions]
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import time
import warnings
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"

_OPS: dict[type, Any] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.Mod: operator.mod,
}


def evaluate(expression: str) -> float:
    """An arithmetic expression's value (numbers and + - * / ** % only)."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return float(_OPS[type(node.op)](value(node.left), value(node.right)))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return float(_OPS[type(node.op)](value(node.operand)))
        raise ValueError(f"not arithmetic: {expression!r}")

    return value(ast.parse(expression.replace("x", "*").replace("%", "/100*"), mode="eval").body)


def agent_tools() -> dict[str, Any]:
    """The agent tasks' tools, as LangChain tools."""
    from langchain_core.tools import tool

    @tool
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression, such as 12 * (3 + 4)."""
        try:
            result = evaluate(expression)
        except (ValueError, SyntaxError, ZeroDivisionError) as error:
            return f"Error: {error}"
        return str(int(result)) if result == int(result) else str(result)

    @tool
    def get_weather(location: str) -> str:
        """Get the current weather at a location."""
        return f"It is sunny and 21 degrees in {location}."

    return {"calculator": calculator, "get_weather": get_weather}


def rows(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line]


def scores(labels: list[bool], called: list[bool]) -> dict[str, float | int]:
    tp = sum(1 for label, call in zip(labels, called, strict=True) if label and call)
    fp = sum(1 for label, call in zip(labels, called, strict=True) if not label and call)
    fn = sum(1 for label, call in zip(labels, called, strict=True) if label and not call)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": round(precision, 3),
        "recall": round(recall, 3),
    }


def best_threshold(labels: list[bool], values: list[float]) -> dict[str, Any]:
    """The cut of ``values`` that gets most labels right (geometric midpoint of neighbours)."""
    ordered = sorted(set(values))
    best: tuple[int, float] | None = None
    for low, high in zip([0.0, *ordered], ordered, strict=False):
        cut = (low * high) ** 0.5 if low > 0 else high / 2
        right = sum(1 for label, v in zip(labels, values, strict=True) if (v >= cut) == label)
        if best is None or right > best[0]:
            best = (right, cut)
    assert best is not None
    called = [v >= best[1] for v in values]
    return {"threshold": float(f"{best[1]:.3g}"), **scores(labels, called)}


def decisions(pair: Any) -> dict[str, Any]:
    """The calibrated decision on the labelled set, and each statistic's best threshold."""
    from langchain_nudging import NudgingConfig
    from langchain_nudging.prompts import ChatMessage
    from langchain_nudging.request import Request
    from langchain_nudging.structured import CALIBRATED, OutputSpec, ToolSpec

    definitions = json.loads((DATA / "tool_definitions.json").read_text())
    labels, called, probability, score, out = [], [], [], [], []
    for row in rows("tool_decisions.jsonl"):
        functions = [definitions[name]["function"] for name in row["tools"]]
        tools = tuple(ToolSpec(f["name"], f["description"], f["parameters"]) for f in functions)
        spec = OutputSpec(tools, "auto", call_threshold=CALIBRATED)
        request = Request(
            [ChatMessage("user", row["user"])], NudgingConfig(max_tokens=1), output=spec
        )
        generation = pair.generate(request)
        list(generation)
        stats = generation.stats
        labels.append(bool(row["call"]))
        called.append(stats.call_decision == "call")
        probability.append(stats.call_probability)
        score.append(stats.call_score)
        out.append(
            {
                **row,
                "call_probability": stats.call_probability,
                "call_score": stats.call_score,
                "decision": stats.call_decision,
            }
        )
        print(
            row["call"],
            stats.call_decision,
            f"{stats.call_probability:.2e}",
            f"{stats.call_score:.3g}",
            row["user"],
            flush=True,
        )
    return {
        "calibrated": scores(labels, called),
        "best_call_score": best_threshold(labels, score),
        "best_call_probability": best_threshold(labels, probability),
        "rows": out,
    }


def run_agent(kind: str, llm: Any, tools: list[Any], question: str) -> dict[str, Any]:
    """One agent loop; what it did."""
    from langchain_core.messages import AIMessage, ToolMessage

    if kind == "create_agent":
        from langchain.agents import create_agent

        agent = create_agent(llm, tools=tools)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from langgraph.prebuilt import create_react_agent

            agent = create_react_agent(llm, tools=tools)
    start = time.perf_counter()
    try:
        state = agent.invoke({"messages": [("user", question)]}, {"recursion_limit": 12})
    except Exception as error:  # GraphRecursionError, a tool's error, ...
        return {
            "error": f"{type(error).__name__}: {error}"[:300],
            "seconds": time.perf_counter() - start,
        }
    messages = state["messages"]
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    results = [m.content for m in messages if isinstance(m, ToolMessage)]
    final = messages[-1]
    return {
        "calls": [(c["name"], c["args"]) for c in calls],
        "results": results,
        "answer": final.text if isinstance(final, AIMessage) and not final.tool_calls else None,
        "seconds": round(time.perf_counter() - start, 1),
    }


def agents(llm: Any) -> dict[str, Any]:
    """Each agent task in both agents, with its own tool and with both tools bound."""
    available = agent_tools()
    results: dict[str, Any] = {}
    for kind in ("create_agent", "create_react_agent"):
        for bound in ("one tool", "two tools"):
            runs = []
            for task in rows("agent_tasks.jsonl"):
                names = [task["tool"]] if bound == "one tool" else ["get_weather", "calculator"]
                run = run_agent(kind, llm, [available[n] for n in names], task["user"])
                answer = run.get("answer") or ""
                run["ok"] = bool(
                    run.get("calls")
                    and run["calls"][0][0] == task["tool"]
                    and task["expect"] in answer.replace(",", "")
                )
                runs.append({"task": task["user"], **run})
                print(kind, bound, json.dumps(runs[-1])[:400], flush=True)
            results[f"{kind}, {bound}"] = {
                "succeeded": sum(r["ok"] for r in runs),
                "runs": len(runs),
                "detail": runs,
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--skip-agents", action="store_true")
    parser.add_argument("--skip-decisions", action="store_true")
    args = parser.parse_args()
    import torch

    from langchain_nudging import NudgedChatModel, NudgingPair

    torch.set_num_threads(2)
    report: dict[str, Any] = {}
    if not args.skip_decisions:
        pair = NudgingPair.load(dtype="float32", device="cpu")
        print("nudging model:", pair.nudging.name)
        report["decisions"] = decisions(pair)
        summary = {k: v for k, v in report["decisions"].items() if k != "rows"}
        print(json.dumps(summary, indent=1), flush=True)
    if not args.skip_agents:
        llm = NudgedChatModel(max_tokens=64, dtype="float32", device="cpu")
        report["agents"] = agents(llm)
        print(json.dumps({k: f"{v['succeeded']}/{v['runs']}" for k, v in report["agents"].items()}))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
