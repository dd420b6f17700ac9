"""The student-side prompts of the CodeAct format (smolagents CodeAgent, as in the agent
distillation paper). Students are trained on exactly these strings, so change them with care."""

from __future__ import annotations

from attar.runtime import toolbox

SYSTEM = """You are an expert assistant who can solve any task using code blobs. You have access to a list of tools: Python functions which you can call with code.
To solve the task, proceed in a cycle of 'Thought:', 'Code:', and 'Observation:' steps.
At each step, in the 'Thought:' part, explain your reasoning and which tools you want to use.
Then in the 'Code:' part, write simple Python code. The code must start with '```py' and end with '```<end_code>'.
Use print() to save whatever you need for the next step; it will appear in the 'Observation:' field.
Finally, return the answer with the `final_answer` tool, as soon as you know it.

For example:
Task: What is 12 * 7 + 5?
Thought: I will compute it with Python and return the result.
Code:
```py
result = 12 * 7 + 5
final_answer(result)
```<end_code>

You can use these tools:
{tools}

Variables, imports and functions persist between steps. {modules}
Never write 'Observation:' yourself: it comes back after your code runs.""".replace("{modules}", toolbox.PROMPT)



def system(tools: str, template: str = SYSTEM) -> str:
    """A system prompt with the tools' descriptions in place of `{tools}` (a plain replace, so
    the rest of the template may hold braces: code examples do)."""
    return template.replace("{tools}", tools)


TASK = "New task:\n{question}\nAnswer with 'Thought:' then 'Code:'."

OBSERVATION = "Observation:\nExecution logs:\n{logs}Last output from code snippet:\n{output}"

ERROR = (
    "Observation:\nError:\n{error}\n"
    "Now let's retry: take care not to repeat previous errors! "
    "If you have retried several times, try a completely different approach."
)

PARSE_ERROR = (
    "Your code snippet is invalid, because the pattern ```py ... ``` was not found in it. "
    "Write 'Thought:' then 'Code:' and a ```py block ending with ```<end_code>."
)

# An observation left out of the conversation because it no longer fits the model's context.
ELIDED = "Observation:\n[left out: the conversation no longer fits the model's context]"

# After the last step, one more turn asks for the answer from the memory. It is appended to the
# conversation (not a new system prompt) so the model's cache of the conversation still applies.
FINAL_USER = ("You have used all your steps. Based on the above, give your best final answer to the following "
              "request. Reply with the answer alone, no code and no explanation:\n{question}")

# "```output" is how Qwen-family models begin to invent a code block's result themselves.
STOP = ["<end_code>", "Observation:", "```output"]


def as_written(text: str, stopped_by: str | None) -> str:
    """A step's output as the conversation keeps it: generation stops at `<end_code>` and drops
    it, but the format students learn ends each code block with it. Trailing white space goes: it
    says nothing, and a model often writes it as tokens ("\n", "\n") that read back as others
    ("\n\n"), which would cost the next step its cached prefix."""
    return text.rstrip() + ("<end_code>" if stopped_by == "<end_code>" else "")
