"""One request's engine events -> ``ChatGenerationChunk`` objects (docs/chat_model.md, Output).

One chunk per segment with its provenance, then a last, empty chunk with the usage and the
response metadata. With tools bound, :class:`~.tools.ToolCallStream` turns the text into
content or tool call chunks.
"""

from __future__ import annotations

from langchain_core.messages import AIMessageChunk, UsageMetadata
from langchain_core.outputs import ChatGenerationChunk

from ..backends.registry import spec_label
from ..serving.events import Event, Failed, Finished, SegmentEvent
from ..serving.handle import RequestHandle
from ..structured import IncompleteAnswerError
from .options import Call
from .tools import ToolCallStream

#: The engine's finish reasons -> LangChain's usual ``finish_reason`` values.
FINISH_REASONS: dict[str, str] = {
    "stop": "stop",  # the nudging model ended the answer, or a stop string was reached
    "length": "length",  # max_tokens
    "round_cap": "length",  # max_rounds: a budget, like max_tokens
    "repetition": "stop",  # a loop breaker ended the answer
}


def finish_reason_for(reason: str | None) -> str:
    """LangChain's ``finish_reason`` for an engine finish reason (``None`` counts as ``stop``)."""
    return FINISH_REASONS.get(reason or "stop", reason or "stop")


class Answer:
    """Maps one call's engine events to chunks."""

    def __init__(self, call: Call, nudging_name: str) -> None:
        self.call = call
        self.nudging_name = nudging_name
        self.timed_out = False
        self.calls = ToolCallStream(call.request.output)

    def chunks(self, event: Event) -> list[ChatGenerationChunk]:
        """The chunks an event releases; a failure is raised here."""
        if isinstance(event, SegmentEvent):
            segment = event.segment
            if not segment.text:
                return []
            provenance = {
                "text": segment.text,
                "source": segment.source,
                "base_top1_prob": segment.base_top1_prob,
            }
            content, calls = self.calls.add(segment.text)
            message = AIMessageChunk(
                content=content,
                tool_call_chunks=calls,
                response_metadata={"segments": [provenance]},
            )
            return [ChatGenerationChunk(message=message)]
        if isinstance(event, Failed):
            raise event.error
        return self._last(event)

    def expire(self, handle: RequestHandle) -> None:
        """The call's time limit passed: cancel its request (the end then raises)."""
        if not handle.done:
            self.timed_out = True
            handle.cancel()

    def _last(self, finished: Finished) -> list[ChatGenerationChunk]:
        stats = finished.stats
        if stats.finish_reason == "cancelled":
            if self.timed_out:
                raise TimeoutError(
                    f"the answer took longer than timeout={self.call.timeout}s; the request "
                    "was cancelled in the engine"
                )
            raise RuntimeError("the request was cancelled in the engine (was it shut down?)")
        try:
            content, calls = self.calls.finish()
        except IncompleteAnswerError as error:
            raise IncompleteAnswerError(
                f"{error} (finish_reason={stats.finish_reason!r}; raise max_tokens "
                f"(now {self.call.request.config.max_tokens}) or lower max_json_string_length)"
            ) from None
        rest = (
            [ChatGenerationChunk(message=AIMessageChunk(content=content, tool_call_chunks=calls))]
            if content or calls
            else []
        )
        output = stats.base_tokens + stats.nudge_tokens  # the answer's base-tokenizer count
        usage = UsageMetadata(
            input_tokens=stats.prompt_tokens,
            output_tokens=output,
            total_tokens=stats.prompt_tokens + output,
        )
        info = {
            "model_name": spec_label(self.call.base),
            "model_provider": "nudging",
            "nudging_model_name": self.nudging_name,
            "mode": self.call.request.mode,
            "finish_reason": (
                "tool_calls" if self.calls.is_call else finish_reason_for(stats.finish_reason)
            ),
            "nudging_finish_reason": stats.finish_reason,
            "nudging_stats": stats.as_dict(),
        }
        message = AIMessageChunk(
            content="", usage_metadata=usage, response_metadata=info, chunk_position="last"
        )
        return [*rest, ChatGenerationChunk(message=message, generation_info=dict(info))]
