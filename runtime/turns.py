"""The turn format: how a conversation becomes the text a model reads.

attar's students read ChatML (Qwen's and SmolLM2's format). `segments` is its one renderer: the
runtime's prompts, the teacher's completions endpoint, the parity check and training all render
through it, and training takes from it which characters carry loss (each assistant turn and its
`<|im_end|>`), so a student is trained on exactly the ids it later reads.

A model whose own chat template is not ChatML (a user's Llama-3 GGUF, say) is rendered by that
template instead, in jinja2's sandbox: a template is untrusted input, so it gets no access to
Python internals and a bounded amount of time and output.
"""

from __future__ import annotations

import time
from typing import Callable

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}
Renderer = Callable[[list[Message], str], str]  # (messages, prefix of the assistant turn) -> text

START, END = "<|im_start|>", "<|im_end|>"
TEMPLATE_SECONDS = 2.0  # a chat template that renders longer than this is refused
TEMPLATE_CHARS = 4 << 20  # ... or that writes more than this


class TemplateError(ValueError):
    """A model's chat template cannot render a conversation; the message is one line."""


def segments(messages: list[Message], prefix: str = "", generation_prompt: bool = True) -> list[tuple[str, bool]]:
    """The conversation in ChatML as (text, trained) pieces: `trained` marks what the model writes
    itself (an assistant turn's content and its end marker)."""
    out: list[tuple[str, bool]] = []
    for m in messages:
        if m["role"] == "assistant":
            out += [(f"{START}assistant\n", False), (m["content"] + END, True), ("\n", False)]
        else:
            out.append((f"{START}{m['role']}\n{m['content']}{END}\n", False))
    if generation_prompt:
        out.append((f"{START}assistant\n{prefix}", False))
    return out


def render(messages: list[Message], prefix: str = "") -> str:
    """The prompt for the model's next assistant turn, which starts with `prefix`."""
    return "".join(text for text, _ in segments(messages, prefix))


def encode_for_training(tokenizer, messages: list[Message]) -> tuple[list[int], list[bool]]:
    """A whole conversation's token ids (a `tokenizers.Tokenizer`, the one the runtime reads with)
    and which of them carry loss: those that start inside a trained piece of `segments`."""
    pieces = segments(messages, generation_prompt=False)
    spans, at = [], 0
    for text, trained in pieces:
        if trained:
            spans.append((at, at + len(text)))
        at += len(text)
    encoding = tokenizer.encode("".join(text for text, _ in pieces), add_special_tokens=False)
    return encoding.ids, [any(a <= start < b for a, b in spans) for start, _ in encoding.offsets]


def renderer(template: str) -> Renderer:
    """How to render for a model with this chat template: ChatML (or no template) through
    `render`, any other template through jinja2's sandbox."""
    if not template.strip() or START in template:
        return render
    return _JinjaRenderer(template)


class _JinjaRenderer:
    def __init__(self, template: str):
        from jinja2 import TemplateError as JinjaError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        deadline = [0.0]

        class Bounded(ImmutableSandboxedEnvironment):
            intercepted_binops = frozenset({"*", "**"})

            def call(self, context, obj, *args, **kwargs):
                _check(deadline[0])
                return super().call(context, obj, *args, **kwargs)

            def call_binop(self, context, operator, left, right):
                _check(deadline[0])
                result = super().call_binop(context, operator, left, right)
                if isinstance(result, (str, list, tuple)) and len(result) > TEMPLATE_CHARS:
                    raise TemplateError("the chat template builds a value too large to render")
                if isinstance(result, int) and result.bit_length() > 4096:
                    raise TemplateError("the chat template computes a number too large")
                return result

        self.deadline, self.errors = deadline, JinjaError
        try:
            self.template = Bounded(trim_blocks=True, lstrip_blocks=True).from_string(template)
        except JinjaError as exc:
            raise TemplateError(f"the model's chat template does not parse: {str(exc)[:200]}") from None

    def __call__(self, messages: list[Message], prefix: str = "") -> str:
        self.deadline[0] = time.monotonic() + TEMPLATE_SECONDS
        out, size = [], 0
        try:
            for chunk in self.template.generate(messages=messages, add_generation_prompt=True, bos_token="",
                                                eos_token=""):
                _check(self.deadline[0])
                out.append(chunk)
                size += len(chunk)
                if size > TEMPLATE_CHARS:
                    raise TemplateError("the model's chat template writes more than 4 MiB for one conversation")
        except TemplateError:
            raise
        except (self.errors, ArithmeticError, RecursionError, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise TemplateError(f"the model's chat template failed: {type(exc).__name__}: {str(exc)[:200]}") from None
        return "".join(out) + prefix


def _check(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise TemplateError(f"the model's chat template took longer than {TEMPLATE_SECONDS:.0f} s to render")
