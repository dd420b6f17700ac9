"""The code's shape, checked: the packages form layers (runtime at the bottom; export and distill
above it; no arrow back down-up), and a conversation reaches the model as the same token ids in
training and at run time."""

import ast
from pathlib import Path

import pytest

from conftest import TRAJECTORY

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "export", "distill")
# Who may import whom (module top and function-local imports alike).
ALLOWED = {"runtime": set(), "export": {"runtime"}, "distill": {"runtime", "export"}}


def imports_of(package: str) -> dict[str, set[str]]:
    """module -> the attar packages it imports, anywhere in the module."""
    found = {}
    for file in sorted((ROOT / package).glob("*.py")):
        targets = set()
        for node in ast.walk(ast.parse(file.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                parts = name.split(".")
                if parts[0] == "attar" and len(parts) > 1:
                    targets.add(parts[1])
        found[f"{package}/{file.name}"] = targets - {package}
    return found


def test_packages_import_only_the_layers_below_them():
    wrong = [f"{module} imports attar.{target}" for package in PACKAGES
             for module, targets in imports_of(package).items() for target in targets
             if target not in ALLOWED[package]]
    assert not wrong, "; ".join(wrong)


def test_the_package_graph_has_no_cycle():
    graph = {p: set().union(*imports_of(p).values()) & set(PACKAGES) for p in PACKAGES}
    done, stack = set(), []

    def visit(p: str) -> None:
        assert p not in stack, "import cycle: " + " -> ".join([*stack, p])
        if p in done:
            return
        stack.append(p)
        for q in graph[p]:
            visit(q)
        stack.pop()
        done.add(p)

    for p in PACKAGES:
        visit(p)


@pytest.fixture(scope="module")
def smollm2():
    from attar.runtime.llm import EngineBackend
    from attar.runtime.models import pull

    return EngineBackend(pull("smollm2-135m", log=lambda m: None, check=False))


def test_training_and_runtime_render_a_conversation_to_the_same_ids(smollm2):
    pytest.importorskip("trl")
    from attar.distill.train import runtime_tokenizer, tokenized
    from attar.runtime.models import gguf_path

    row = tokenized(TRAJECTORY, runtime_tokenizer(str(gguf_path("smollm2-135m", log=lambda m: None))), 4096)
    ids, labels = row["input_ids"], row["labels"]
    for turn in (2, 4):  # what the runtime prompts with before each assistant turn is what training saw
        prompt = smollm2.encode(TRAJECTORY[:turn])
        assert ids[:len(prompt)] == prompt
        trained = [i for i in labels[len(prompt):] if i != -100]
        reply = smollm2.tokenizer.encode(TRAJECTORY[turn]["content"] + "<|im_end|>", add_special_tokens=False).ids
        assert trained[:len(reply)] == reply  # and the loss is on the reply the model writes
    assert all(label == -100 for label in labels[:len(smollm2.encode(TRAJECTORY[:2]))])  # no loss on the prompt


def test_a_generated_step_re_renders_to_the_ids_the_model_produced(smollm2):
    from attar.runtime import prompts
    from attar.runtime.engine import Request
    from attar.runtime.llm import cut_at_stop

    for question in ("What is 12 * 7 + 5?", "Write Python that prints the first 5 squares."):
        messages = [TRAJECTORY[0], {"role": "user", "content": prompts.TASK.format(question=question)}]
        prompt = smollm2.encode(messages)
        produced = smollm2.engine.run(Request(prompt, 48, eos=smollm2.eos)).out
        text, stopped_by = cut_at_stop(smollm2.tokenizer.decode(produced, skip_special_tokens=False), prompts.STOP)
        step = prompts.as_written(text, stopped_by)
        again = smollm2.encode([*messages, {"role": "assistant", "content": step}])
        # The next step's prompt is this step's prompt, then the very ids the model generated (up
        # to where a stop string cut them): the engine's prefix cache holds all of it.
        kept = smollm2.tokenizer.encode(step, add_special_tokens=False).ids
        assert again[:len(prompt)] == prompt
        assert again[len(prompt):len(prompt) + len(kept)] == kept
        assert produced[:len(kept)] == kept, (question, step)
