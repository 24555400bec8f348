"""Whole agent loops on the nudged bundled pair, streamed: LangChain's ``create_agent`` and
LangGraph's prebuilt ReAct agent, each with a real tool.

A loop: the model calls the tool with valid arguments, the tool's result is fed back, the model
answers. The small pair would call the tool again and again after a result, so each agent sets
``tool_choice`` per step as a user would: a call while the user's question is unanswered, an
answer once a tool's result is in (middleware for ``create_agent``, a model-choosing function
for the ReAct agent).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, ModelResponse, wrap_model_call
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.prebuilt import create_react_agent
from pydantic import BaseModel, Field

from langchain_nudging import NudgedChatModel, NudgingPair

# A loop is three to four answers of the bundled pair, the first constrained by a grammar
# built for its tools: minutes on two shared cores.
pytestmark = pytest.mark.timeout(600)

CITIES: list[str] = []


@tool
def get_weather(location: str) -> str:
    """Get the current weather at a location."""
    CITIES.append(location)
    return f"It is sunny and 21 degrees in {location}."


QUESTION = "What is the weather in Paris?"


@pytest.fixture
def llm(pair: NudgingPair) -> NudgedChatModel:
    CITIES.clear()
    return NudgedChatModel(max_tokens=64, max_json_string_length=32, dtype="float32", device="cpu")


def choice_for(messages: list[BaseMessage]) -> str:
    """A call while the question is unanswered, an answer once a tool's result is in."""
    return "none" if isinstance(messages[-1], ToolMessage) else "any"


@wrap_model_call
def call_then_answer(
    request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
) -> ModelResponse:
    choice = choice_for(request.messages)
    if request.response_format is None:
        return handler(request.override(tool_choice=choice))
    # With a response format the agent binds tools without a tool_choice of its own, passing
    # the model settings on to bind_tools.
    settings = {**request.model_settings, "tool_choice": choice}
    return handler(request.override(model_settings=settings))


def check_loop(messages: list[BaseMessage], streamed: list[AIMessageChunk]) -> AIMessage:
    calls = [m for m in messages if isinstance(m, AIMessage) and m.tool_calls]
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert len(calls) == 1, messages
    (call,) = calls[0].tool_calls
    assert call["name"] == "get_weather"
    assert isinstance(call["args"]["location"], str)
    assert call["args"]["location"].strip()
    assert [call["args"]["location"]] == CITIES  # the tool ran, with the model's arguments
    assert len(results) == 1
    assert results[0].tool_call_id == call["id"]
    assert "sunny" in results[0].content
    final = messages[-1]
    assert isinstance(final, AIMessage)
    assert not final.tool_calls
    # Streamed: the call arrived as tool-call chunks, the answer as text chunks.
    assert any(chunk.tool_call_chunks for chunk in streamed)
    assert any(chunk.content for chunk in streamed)
    return final


def run_streamed(agent: Any) -> tuple[dict[str, Any], list[AIMessageChunk]]:
    streamed: list[AIMessageChunk] = []
    state: dict[str, Any] = {}
    for mode, data in agent.stream(
        {"messages": [("user", QUESTION)]}, stream_mode=["messages", "values"]
    ):
        if mode == "messages":
            chunk, _metadata = data
            if isinstance(chunk, AIMessageChunk):
                streamed.append(chunk)
        else:
            state = data
    return state, streamed


def test_create_agent_loop_streamed(llm: NudgedChatModel) -> None:
    agent = create_agent(llm, tools=[get_weather], middleware=[call_then_answer])
    state, streamed = run_streamed(agent)
    final = check_loop(state["messages"], streamed)
    assert final.text.strip()


# The issue asks for LangGraph's prebuilt agent too, deprecated in favour of create_agent.
@pytest.mark.filterwarnings("ignore:create_react_agent has been moved")
def test_langgraph_react_agent_loop_streamed(llm: NudgedChatModel) -> None:
    with_call = llm.bind_tools([get_weather], tool_choice="any")
    with_answer = llm.bind_tools([get_weather], tool_choice="none")

    def choose_model(state: dict[str, Any], runtime: Any) -> Any:
        return with_answer if choice_for(state["messages"]) == "none" else with_call

    agent = create_react_agent(choose_model, tools=[get_weather])
    state, streamed = run_streamed(agent)
    final = check_loop(state["messages"], streamed)
    assert final.text.strip()


class Weather(BaseModel):
    """The weather report."""

    city: str = Field(description="the city")
    sunny: bool = Field(description="whether it is sunny")


def test_create_agent_with_a_response_format_binds_it_through_bind_tools(
    llm: NudgedChatModel,
) -> None:
    """The model's profile says it supports structured output, so ``create_agent`` binds the
    schema as ``bind_tools(..., response_format=...)`` (its provider strategy); the final
    answer is JSON constrained to the schema."""
    agent = create_agent(
        llm, tools=[get_weather], response_format=Weather, middleware=[call_then_answer]
    )
    state, streamed = run_streamed(agent)
    check_loop(state["messages"], streamed)
    report = state["structured_response"]
    assert isinstance(report, Weather)
    assert isinstance(report.sunny, bool)


# -- without middleware: the calibrated call decision ------------------------------------------
@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression, such as 12 * (3 + 4)."""
    from benchmarks.tool_decisions import evaluate

    result = evaluate(expression)
    return str(int(result)) if result == int(result) else str(result)


def test_create_agent_calls_its_tool_then_answers_with_the_result(llm: NudgedChatModel) -> None:
    """No middleware: the decision calls the calculator for the question, then answers from
    its result instead of calling again (the loop ends well inside the recursion limit)."""
    agent = create_agent(llm, tools=[calculator])
    question = "What is 1234 * 5678? Use the calculator tool."
    state = agent.invoke({"messages": [("user", question)]}, {"recursion_limit": 8})
    messages = state["messages"]
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    assert [c["name"] for c in calls] == ["calculator"], messages
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert [r.content for r in results] == ["7006652"], messages
    final = messages[-1]
    assert isinstance(final, AIMessage)
    assert not final.tool_calls
    assert "7006652" in final.text.replace(",", ""), final.text


def test_a_request_that_needs_no_tool_answers_as_without_tools(llm: NudgedChatModel) -> None:
    """A weather tool bound, "auto": the decision says "no call" and the greedy answer is the
    one with no tools bound (it used to repeat `A: "A: ...` until a loop breaker ended it)."""
    question = "Tell me a joke."
    bound = llm.bind_tools([get_weather]).invoke(question)
    plain = llm.invoke(question)
    assert not bound.tool_calls
    assert bound.response_metadata["nudging_stats"]["call_decision"] == "answer"
    assert bound.content == plain.content
