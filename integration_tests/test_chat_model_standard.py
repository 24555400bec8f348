"""langchain-tests' integration suite for NudgedChatModel, on the bundled pair.

Tool calling, tool choice, structured output and JSON mode are on. The suite skips the tests for
image, audio and PDF input (text only) and the VCR timing test (no HTTP here).
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.load import dumps, loads
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_nudging import BUNDLED_NUDGING_ID, NudgedChatModel, NudgingPair

# Answers of up to 96 tokens (some constrained by a grammar built for the test's tools) on two
# shared cores; the first test of the session also loads the pair.
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(autouse=True)
def _bundled_pair(pair: NudgingPair) -> NudgingPair:
    """The session's bundled pair: loaded once (the chat models share it through the registry),
    with torch on 2 threads."""
    return pair


class TestNudgedChatModelIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[NudgedChatModel]:
        return NudgedChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # The same dtype and device as the session's pair: the registry hands out those models.
        # Structured answers (two joke strings) need more room than 32 tokens; strings are
        # capped at 64 characters so that a looping small model still closes its JSON.
        return {
            "max_tokens": 96,
            "max_json_string_length": 64,
            # With tool_choice="auto" the small pair starts a call with probability ~0.002-0.01
            # when a bound tool fits the question and ~0.0002-0.0006 when none does
            # (docs/tools.md): decide up front at 0.001.
            "tool_call_threshold": 0.001,
            "dtype": "float32",
            "device": "cpu",
        }

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        # A per-call `model` replaces the base model: SmolLM2 (already loaded) nudged by itself.
        return BUNDLED_NUDGING_ID


# -- beyond the suite: serialization and a chat-template override, on the bundled pair ---------

PARAMS = {"max_tokens": 4, "dtype": "float32", "device": "cpu"}
# SmolLM2's ChatML without its default system message.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
    "{% if not loop.last or not continue_final_message %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_model_loaded_back_from_json_answers_on_the_same_pair(pair: NudgingPair) -> None:
    llm = NudgedChatModel(gamma=0.4, **PARAMS)
    back = loads(
        dumps(llm), valid_namespaces=["langchain_nudging"], allowed_objects=[NudgedChatModel]
    )
    assert back.get_engine() is llm.get_engine()
    assert back.invoke("What is the capital of France?").content.strip()


def test_a_nudging_chat_template_override_shares_the_weights(pair: NudgingPair) -> None:
    llm = NudgedChatModel(nudging_chat_template=CHATML, **PARAMS)
    nudging = llm.get_engine().pair.nudging
    assert nudging.model is pair.nudging.model  # type: ignore[attr-defined]
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]
    prompt = nudging.chat_template.render(chat, None)  # no default system message
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    llm.unload()  # the override's engine; the session's pair keeps its own models
    assert pair.nudging.model is nudging.model  # type: ignore[attr-defined]
