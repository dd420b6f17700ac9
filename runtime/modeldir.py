"""An exported model folder, read once: the one place that knows its layout.

    model.onnx (+ model.onnx.data)    the decoder graph and its weights
    model.int8.onnx (+ .data)         optional: the same decoder with int8 projections (`--int8-graph`)
    genai_config.json                 shapes, input/output names, EOS ids, context (onnxruntime-genai's format)
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    attar.json                        the LoRA adapters it carries and the default one (optional)
    adapters/NAME.onnx_adapter        each adapter's tensors (onnxruntime's LoRA format)

The folder is untrusted input (a download, a colleague's export): every path in its metadata must
name a file inside it, and every declared size is checked before anything is allocated by it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from attar.runtime.turns import Renderer, TemplateError, renderer

GENAI_CONFIG = "genai_config.json"
INT8_FILE = "model.int8.onnx"  # optional: the decoder with int8 projections, on the CPU's matrix units
# attar's graphs keep only the last positions for the LM head with this Slice node; the parity
# check widens it to every position, the engine to the positions it verifies.
LAST_POSITION = "/model/last_position"
ADAPTERS_FILE = "attar.json"
ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
MAX_METADATA_BYTES = 4 << 20  # a config or tokenizer_config larger than this is not one
MAX_TOKENIZER_BYTES = 64 << 20
MAX_CONTEXT = 1 << 20  # tokens; KV buffers are sized by it
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # an adapter name: a plain file stem


class ModelError(Exception):
    """A model is missing, unknown, malformed, or cannot be run here; the message is one line."""


def read_json(path: Path, what: str) -> dict:
    """A small JSON object from a file of the folder, or a ModelError naming the file."""
    try:
        if path.stat().st_size > MAX_METADATA_BYTES:
            raise ModelError(f"{path}: {what} is larger than {MAX_METADATA_BYTES >> 20} MiB")
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ModelError(f"{path}: {what} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{path}: {what} is not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: {what} is not a JSON object")
    return data


def inside(folder: Path, name: object, what: str) -> Path:
    """`folder / name` when it is a plain file inside `folder` (no `..`, no absolute path, no link
    out of it), else a ModelError: metadata never makes attar open a file elsewhere."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ModelError(f"{folder}: {what} {name!r} is not a file name")
    path = folder / name
    root = folder.resolve()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        raise ModelError(f"{folder}: {what} {name!r} cannot be resolved") from None
    if os.path.isabs(name) or root not in resolved.parents:
        raise ModelError(f"{folder}: {what} {name!r} points outside the model folder")
    return path


def edited_session(model_file: Path, edit: Callable, options=None):
    """An onnxruntime session of `model_file` as `edit` changes its graph (an onnx.ModelProto;
    `edit` says whether it changed anything). A changed graph is loaded from memory with its
    external weights resolved in the graph's own folder (onnxruntime still refuses any outside
    it): nothing is written beside the model."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_file), load_external_data=False)
    if not edit(model):
        return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    options = options or ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_file.parent))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def keep_last_positions(model, positions: int | None) -> bool:
    """Edit an attar graph so that its LM head sees the last `positions` positions (None: every
    one) instead of the last only; False for a graph without attar's LAST_POSITION node."""
    import numpy as np
    from onnx import numpy_helper

    node = next((n for n in model.graph.node if n.name == LAST_POSITION), None)
    if node is None:
        return False
    if positions is None:
        node.op_type = "Identity"
        del node.input[1:]
    else:
        start = f"{LAST_POSITION}/start"
        model.graph.initializer.append(numpy_helper.from_array(np.array([-positions], np.int64), start))
        node.input[1] = start
    logits = next(o for o in model.graph.output if o.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "positions"
    return True


def _count(config: dict, key: str, where: Path, low: int = 1, high: int = 1 << 16) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ModelError(f"{where}: {key} is {value!r}, not a whole number from {low} to {high}")
    return value


@dataclass(frozen=True)
class ExportDir:
    """What the runtime, the exporter and the parity check need to know of an exported folder."""

    path: Path
    decoder: Path  # the ONNX graph
    layers: int
    kv_heads: int
    head: int
    context: int
    io_names: dict  # genai_config's decoder input/output names
    eos: frozenset[int]
    adapters: tuple[str, ...]
    default_adapter: str | None
    int8_decoder: Path | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def tokenizer_file(self) -> Path:
        """tokenizer.json, inside the folder and of a sane size."""
        file = inside(self.path, "tokenizer.json", "tokenizer")
        if not file.is_file():
            raise ModelError(f"{self.path}: tokenizer.json is missing")
        if file.stat().st_size > MAX_TOKENIZER_BYTES:
            raise ModelError(f"{file}: larger than {MAX_TOKENIZER_BYTES >> 20} MiB; not a tokenizer")
        return file

    def graph(self, int8: bool = True) -> Path:
        """The decoder a CPU engine runs: the int8 graph where the folder has one and it is wanted."""
        return self.int8_decoder if int8 and self.int8_decoder is not None else self.decoder

    def graph_bytes(self, graph: Path) -> int:
        """A graph's size with its external weights (GRAPH.data, as attar writes them)."""
        return sum(f.stat().st_size for f in (graph, graph.with_name(graph.name + ".data")) if f.is_file())

    @classmethod
    def open(cls, path: str | os.PathLike) -> ExportDir:
        path = Path(path).expanduser()
        if not path.exists():
            raise ModelError(f"model folder not found: {path}")
        if not path.is_dir() or not (path / GENAI_CONFIG).is_file():
            raise ModelError(f"not an ONNX GenAI model folder (no {GENAI_CONFIG}): {path}")
        config_file = inside(path, GENAI_CONFIG, "config")
        model = read_json(config_file, GENAI_CONFIG).get("model")
        decoder = model.get("decoder") if isinstance(model, dict) else None
        if not isinstance(decoder, dict):
            raise ModelError(f"{config_file}: no model.decoder section")
        graph = inside(path, decoder.get("filename", "model.onnx"), "decoder filename")
        if not graph.is_file():
            raise ModelError(f"{config_file}: the decoder graph {graph.name} is missing")
        names = {**(decoder.get("inputs") or {}), **(decoder.get("outputs") or {})}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
            raise ModelError(f"{config_file}: decoder input/output names must be strings")
        eos = model.get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos]
        if not eos or not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < 1 << 24 for e in eos):
            raise ModelError(f"{config_file}: eos_token_id {model.get('eos_token_id')!r} is not a token id")
        adapters, default = cls._adapters(path)
        return cls(path, graph, _count(decoder, "num_hidden_layers", config_file, high=1024),
                   _count(decoder, "num_key_value_heads", config_file, high=1024),
                   _count(decoder, "head_size", config_file, high=4096),
                   _count(model, "context_length", config_file, high=MAX_CONTEXT) if "context_length" in model else 2048,
                   names, frozenset(eos), adapters, default, cls._int8(path))

    @staticmethod
    def _int8(path: Path) -> Path | None:
        graph = inside(path, INT8_FILE, "int8 graph")
        return graph if graph.is_file() else None

    @staticmethod
    def _adapters(path: Path) -> tuple[tuple[str, ...], str | None]:
        if not (path / ADAPTERS_FILE).is_file():
            return (), None
        info = read_json(path / ADAPTERS_FILE, ADAPTERS_FILE)
        names, default = info.get("adapters", []), info.get("default_adapter")
        if not isinstance(names, list) or not all(isinstance(n, str) and _NAME.fullmatch(n) for n in names):
            raise ModelError(f"{path / ADAPTERS_FILE}: adapter names must be plain names "
                             f"(letters, digits, '.', '_', '-'), got {names!r}"[:300])
        if default is not None and default not in names:
            raise ModelError(f"{path / ADAPTERS_FILE}: the default adapter {default!r} is not one of {names}")
        return tuple(names), default

    def choose_adapter(self, adapter: str | None) -> str | None:
        """Which adapter runs: the default for None, none for "base", else the one named."""
        chosen = self.default_adapter if adapter is None else (None if adapter == "base" else adapter)
        if chosen is not None and chosen not in self.adapters:
            raise ModelError(f"{self.name} has no adapter {chosen!r}; it has: "
                             f"{', '.join(self.adapters) or 'none'} (and `base`, none at all)")
        return chosen

    def adapter_file(self, name: str) -> Path:
        path = inside(self.path, f"{ADAPTERS_DIR}/{name}{ADAPTER_SUFFIX}", "adapter")
        if not path.is_file():
            raise ModelError(f"{self.name}: the adapter file {ADAPTERS_DIR}/{name}{ADAPTER_SUFFIX} is missing")
        return path

    def adapter_params(self, name: str) -> dict:
        """An adapter's tensors (graph input name -> numpy array)."""
        import numpy as np
        import onnxruntime as ort

        try:
            adapter = ort.AdapterFormat.read_adapter(str(self.adapter_file(name)))
            return {k: np.array(v.numpy(), copy=True) for k, v in adapter.get_parameters().items()}  # outlives `adapter`
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"{self.name}: cannot read adapter {name!r}: {str(exc).splitlines()[0][:200]}") from None

    def chat_template(self) -> str:
        """The model's chat template ("" when it has none)."""
        config = inside(self.path, "tokenizer_config.json", "tokenizer config")
        template = read_json(config, "tokenizer_config.json").get("chat_template") if config.is_file() else None
        file = inside(self.path, "chat_template.jinja", "chat template")
        if not template and file.is_file():
            if file.stat().st_size > MAX_METADATA_BYTES:
                raise ModelError(f"{file}: larger than {MAX_METADATA_BYTES >> 20} MiB")
            template = file.read_text(errors="replace")
        if template is not None and not isinstance(template, str):
            raise ModelError(f"{config}: chat_template is not text")
        return template or ""

    def renderer(self) -> Renderer:
        """How the model's conversations become text: attar's ChatML, or its own template."""
        try:
            return renderer(self.chat_template())
        except TemplateError as exc:
            raise ModelError(f"{self.path}: {exc}") from None


def check_adapter_name(name: str) -> str:
    """An adapter name becomes a file name: letters, digits, '.', '_' and '-' only."""
    if not _NAME.fullmatch(name) or name == "base":
        raise ModelError(f"adapter name {name!r}: use up to 64 letters, digits, '.', '_' and '-' "
                         "(not starting with '.' or '-', and not `base`)")
    return name


def write_adapters_file(folder: Path, names: list[str], sources: dict[str, str]) -> None:
    """The importer's side of attar.json: the adapters written, the first one the default."""
    for name in names:
        check_adapter_name(name)
    (folder / ADAPTERS_FILE).write_text(json.dumps({"adapters": names, "default_adapter": names[0],
                                                    "sources": sources}, indent=2))
