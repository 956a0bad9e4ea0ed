"""Request bodies of the OpenAI-compatible API (pydantic; unknown fields are ignored) and the error type.

Every error the server returns has OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

Int64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat (vLLM's default for both endpoints)
MAX_STOP = 16  # stop strings per request (OpenAI takes 4): each is looked for in the answer at every token, on the
# event loop, so a list of a million would stall every other request


class ApiError(Exception):
    """An error answered as JSON with the given HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _check_text(value: Any, path: str) -> None:
    """Every string of a body must be encodable: JSON's "\\ud83d" escape is valid JSON but a lone UTF-16 surrogate,
    which no tokenizer or database can store."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{path} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)") from None
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, f"{path}[{i}]")


# each unsupported parameter's values that mean "off" (besides null), as OpenAI's and vLLM's SDKs send them
UNSUPPORTED: dict[str, tuple] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({}, []), "response_format": (),
    "tools": ([], {}), "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
    "best_of": (1,), "suffix": ("",), "repetition_penalty": (1,), "min_p": (0,), "min_tokens": (0,),
    "ignore_eos": (False,), "stop_token_ids": ([],), "continue_final_message": (False,),
    "add_generation_prompt": (True,), "prefix": (False,),
}


def _off(name: str, value) -> bool:
    """Whether an unsupported parameter's value asks for nothing: null, an "off" value of UNSUPPORTED (true is not
    1, nor false 0), or a response_format of type text."""
    if value is None or name == "response_format" and isinstance(value, dict) and value.get("type") == "text":
        return True
    return any(value == off and isinstance(value, bool) == isinstance(off, bool) for off in UNSUPPORTED[name])


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("*")
    @classmethod
    def _encodable_and_supported(cls, value, info):
        name = info.field_name
        _check_text(value, name)
        if name in UNSUPPORTED and not _off(name, value):
            raise ValueError(f"{name} is not supported by this server")
        return value


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    # reasoning_content / reasoning of earlier assistant turns are ignored (not fed back, as in R1)
    prefix: Any = None  # DeepSeek's "continue this assistant message": not supported


class _Sampling(_Body):
    """Fields shared by chat and plain completions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM extension; -1 or 0 = off
    n: int = Field(default=1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Parameters of OpenAI and vLLM that this server does not implement: accepted unset or at a value that means
    # "off" (UNSUPPORTED), refused otherwise (a client that asks for penalties must not silently get an answer
    # without them)
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None  # the legacy form of tools
    function_call: Any = None
    best_of: Any = None
    suffix: Any = None  # the text after a completion's insertion point
    repetition_penalty: Any = None  # vLLM's sampling extensions
    min_p: Any = None
    min_tokens: Any = None
    ignore_eos: Any = None
    stop_token_ids: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _few_stops(cls, value):  # before validation: a long list is refused without a look at its strings
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"stop takes at most {MAX_STOP} strings, not {len(value)}")
        return value

    @field_validator("n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, value, info):  # OpenAI's SDK sends n=None / stream=None for "not given"
        return {"n": 1, "stream": False}[info.field_name] if value is None else value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value, info):
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @property
    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # reasoning tokens before </think> is forced (up to 3 more where the budget ends inside a multi-byte character)
    thinking_token_budget: int | None = Field(default=None, ge=0)
    chat_template_kwargs: dict[str, Any] | None = None  # {"thinking": false} turns the <think> prefill off
    continue_final_message: Any = None  # vLLM's prefill of the last assistant message: not supported
    add_generation_prompt: Any = None
    logprobs: StrictBool | None = None  # each answer token's log-probability (logprobs.py)
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # and the k likeliest tokens'

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value, info):
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def logprobs_k(self) -> int | None:
        """The engine's setting: None (off) or how many alternatives to return per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # default: min(16, what the context leaves), as OpenAI;
    # 0 with echo: score the prompt only
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # k: each token's and the k likeliest
    echo: bool = False  # the prompt before the completion (with logprobs: the prompt tokens' too)

    @field_validator("echo", mode="before")
    @classmethod
    def _null_is_false(cls, value):
        return False if value is None else value

    @property
    def logprobs_k(self) -> int | None:
        return self.logprobs


class ConversationCreate(_Body):
    title: str = Field(default="New chat", max_length=500)


class ConversationUpdate(_Body):
    title: str = Field(max_length=500)


class MessageCreate(_Body):
    role: Literal["system", "user", "assistant"]
    content: str = ""
    reasoning: str | None = None
    finish: Literal["stopped", "length"] | None = None  # an answer the user stopped, or one cut off at its limit
