"""NudgedChatModel used as a LangChain user would, on the bundled pair.

LCEL chains streamed sync and async, a RAG pipeline over a BM25 retriever, a LangGraph graph
streamed token by token, ``astream_events`` with provenance, the event loop staying responsive
while an answer streams, and leaving a stream early. docs/cookbook.md shows the same code.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.messages import AIMessageChunk, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnablePassthrough
from langgraph.graph import START, MessagesState, StateGraph
from rank_bm25 import BM25Okapi

from langchain_nudging import NudgedChatModel, NudgingPair
from langchain_nudging.serving.engine import NudgingEngine
from langchain_nudging.serving.handle import RequestHandle
from langchain_nudging.serving.shared import shared_engine

# Several answers of the bundled pair per test on two shared cores (the first test of the
# session also loads the pair).
pytestmark = pytest.mark.timeout(600)

# -- the model -------------------------------------------------------------------------------


@pytest.fixture
def model(pair: NudgingPair) -> NudgedChatModel:
    # dtype and device as in the session's pair: the registry hands out the same models.
    return NudgedChatModel(max_tokens=32, dtype="float32", device="cpu")


@pytest.fixture
def engine(pair: NudgingPair) -> Iterator[NudgingEngine]:
    engine = shared_engine(pair.base, pair.nudging)
    yield engine
    assert engine.wait_idle(timeout=60)


async def await_idle(engine: NudgingEngine) -> None:
    """``engine.wait_idle`` off the event loop."""
    assert await asyncio.to_thread(engine.wait_idle, 60)


def test_the_chat_model_uses_the_sessions_pair(model: NudgedChatModel, engine: NudgingEngine):
    assert model.get_engine() is engine


# -- an LCEL chain ---------------------------------------------------------------------------

PROMPT = ChatPromptTemplate.from_messages(
    [("system", "You are a helpful assistant."), ("human", "{question}")]
)
QUESTION = {"question": "Name three colours of the rainbow."}


def test_lcel_chain_streams_sync_and_async(model: NudgedChatModel) -> None:
    chain = PROMPT | model | StrOutputParser()
    pieces = list(chain.stream(QUESTION))
    assert len([p for p in pieces if p]) > 1
    answer = "".join(pieces)
    assert answer.strip()
    assert "Question:" not in answer  # the prompt is not echoed, the base stops at its markers

    async def astream() -> list[str]:
        return [piece async for piece in chain.astream(QUESTION)]

    assert "".join(asyncio.run(astream())) == answer  # greedy: the same answer


# -- RAG over BM25 ---------------------------------------------------------------------------

DOCUMENTS = [
    Document("The annual Zorblat Festival is held in the mountain town of Quendale every October."),
    Document("Paris is the capital of France and is known for the Eiffel Tower."),
    Document("Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen."),
    Document("The Pacific Ocean is the largest and deepest ocean on Earth."),
    Document("Mount Everest, in the Himalayas, is the highest mountain above sea level."),
    Document("Honey bees communicate the location of flowers with a waggle dance."),
]


class BM25Retriever(BaseRetriever):
    """The ``k`` documents that best match the query under BM25 (rank-bm25)."""

    documents: list[Document]
    k: int = 2

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        index = BM25Okapi([_words(d.page_content) for d in self.documents])
        scores = index.get_scores(_words(query))
        ranked = sorted(range(len(self.documents)), key=lambda i: -scores[i])
        return [self.documents[i] for i in ranked[: self.k]]


def _words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() else " " for c in text).split()


def format_documents(documents: list[Document]) -> str:
    return "\n".join(d.page_content for d in documents)


RAG_PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "Answer the question using only the context below.\n\nContext:\n{context}"),
        ("human", "{question}"),
    ]
)


def test_rag_answer_uses_the_retrieved_context(model: NudgedChatModel) -> None:
    retriever = BM25Retriever(documents=DOCUMENTS)
    question = "Where is the Zorblat Festival held?"
    assert retriever.invoke(question)[0] is DOCUMENTS[0]

    rag = (
        {"context": retriever | format_documents, "question": RunnablePassthrough()}
        | RAG_PROMPT
        | model
        | StrOutputParser()
    )
    assert "Quendale" in rag.invoke(question)  # a made-up fact found only in the documents

    no_context = RAG_PROMPT | model | StrOutputParser()
    assert "Quendale" not in no_context.invoke({"context": "", "question": question})


# -- LangGraph -------------------------------------------------------------------------------


def test_langgraph_streams_tokens_while_the_node_runs(model: NudgedChatModel) -> None:
    finished: dict[str, float] = {}

    def chat(state: MessagesState) -> dict[str, Any]:
        reply = model.invoke(state["messages"])
        finished["node"] = time.monotonic()
        return {"messages": [reply]}

    builder = StateGraph(MessagesState)
    builder.add_node("chat", chat)
    builder.add_edge(START, "chat")
    graph = builder.compile()

    arrivals: list[float] = []
    chunks: list[AIMessageChunk] = []
    inputs = {"messages": [HumanMessage("Say hello to my friend Ana.")]}
    for message, metadata in graph.stream(inputs, stream_mode="messages"):
        assert metadata["langgraph_node"] == "chat"
        assert isinstance(message, AIMessageChunk)
        arrivals.append(time.monotonic())
        chunks.append(message)
    assert sum(t < finished["node"] for t in arrivals) > 1  # tokens arrive while generated
    texts = [c for c in chunks if c.content]
    assert {c.response_metadata["segments"][0]["source"] for c in texts} <= {"base", "nudge"}
    assert chunks[-1].usage_metadata is not None


# -- astream_events --------------------------------------------------------------------------


async def test_astream_events_carry_provenance(model: NudgedChatModel) -> None:
    events = []
    question = "Give me three tips for staying healthy."
    async for event in model.astream_events(question, version="v2", max_tokens=48):
        if event["event"] == "on_chat_model_stream":
            events.append(event["data"]["chunk"])
    segments = [s for chunk in events for s in chunk.response_metadata.get("segments", [])]
    assert len(segments) > 1
    assert {s["source"] for s in segments} == {"base", "nudge"}
    assert segments[0]["source"] == "nudge"  # the base model is never sure of the first word
    for segment in segments:
        prob = segment["base_top1_prob"]
        if segment["source"] == "base":
            assert isinstance(prob, float)
        assert prob is None or 0.0 <= prob <= 1.0
    assert events[-1].response_metadata["finish_reason"] in ("stop", "length")


# -- the event loop stays free ---------------------------------------------------------------


class ForwardTimer:
    """The duration of every forward pass of the given models (on whatever thread runs it)."""

    def __init__(self, *models: torch.nn.Module) -> None:
        self.durations: list[float] = []
        self._started = threading.local()
        self._hooks = []
        for module in models:
            self._hooks.append(module.register_forward_pre_hook(self._start))
            self._hooks.append(module.register_forward_hook(self._stop))

    def _start(self, *_: Any) -> None:
        self._started.at = time.perf_counter()

    def _stop(self, *_: Any) -> None:
        self.durations.append(time.perf_counter() - self._started.at)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


async def test_event_loop_stays_responsive_while_an_answer_streams(
    model: NudgedChatModel, pair: NudgingPair
) -> None:
    timer = ForwardTimer(pair.base.model, pair.nudging.model)
    gaps: list[float] = []
    streaming = True

    async def ticker() -> None:
        last = time.perf_counter()
        while streaming:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    try:
        question = "Write a long story about a dragon who learns to bake bread."
        chunks = [c async for c in model.astream(question, max_tokens=64)]
    finally:
        streaming = False
        await task
        timer.remove()
    longest_forward = max(timer.durations)
    largest_gap = max(gaps)
    print(
        f"\nticker: largest gap {largest_gap * 1000:.1f} ms over {len(gaps)} ticks; "
        f"longest forward step {longest_forward * 1000:.1f} ms over {len(timer.durations)} "
        f"forward passes; {len(chunks)} chunks"
    )
    assert len(chunks) > 5
    assert largest_gap < 2 * longest_forward
    assert largest_gap < 0.25


# -- leaving early ---------------------------------------------------------------------------


@pytest.fixture
def handles(monkeypatch: pytest.MonkeyPatch) -> list[RequestHandle]:
    submitted: list[RequestHandle] = []
    submit = NudgingEngine.submit

    def recording(self: NudgingEngine, *args: Any, **kwargs: Any) -> RequestHandle:
        handle = submit(self, *args, **kwargs)
        submitted.append(handle)
        return handle

    monkeypatch.setattr(NudgingEngine, "submit", recording)
    return submitted


LONG_QUESTION = "Write a long story about a dragon who learns to bake bread."


async def test_leaving_astream_early_frees_everything(
    model: NudgedChatModel, engine: NudgingEngine, handles: list[RequestHandle]
) -> None:
    long_model = model.model_copy(update={"max_tokens": 256})

    async for _chunk in long_model.astream(LONG_QUESTION):
        assert engine.live_requests == 1
        break
    await await_idle(engine)

    stream = long_model.astream(LONG_QUESTION)
    await stream.__anext__()
    await stream.aclose()
    await await_idle(engine)

    first = asyncio.Event()

    async def consume() -> None:
        async for _chunk in long_model.astream(LONG_QUESTION):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await await_idle(engine)

    assert [h.result().stats.finish_reason for h in handles] == ["cancelled"] * 3
    assert (await model.ainvoke("Say hi.", max_tokens=8)).content


def test_leaving_stream_early_frees_everything(
    model: NudgedChatModel, engine: NudgingEngine, handles: list[RequestHandle]
) -> None:
    for _chunk in model.stream(LONG_QUESTION, max_tokens=256):
        break
    assert engine.wait_idle(timeout=60)
    assert handles[0].result().stats.finish_reason == "cancelled"
    assert model.invoke("Say hi.", max_tokens=8).content
