"""The exact GGUF importer: block formats decoded bit for bit, tiny GGUFs of every supported type
(llama with a tied head, qwen2 with biases) imported and compared with the numpy reference,
LoRA kept unmerged, the CLI's errors. Torch-free except where PEFT is the independent witness."""

import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFReader, GGUFWriter, dequantize

from attar.runtime.gguf_import import import_gguf
from attar.runtime.modeldir import ExportDir
from attar.runtime.parity import OnnxScorer
from attar.runtime.quants import SUPPORTED, block_quant
from attar.runtime.reference import GGUFScorer
from conftest import needs_torch

SCALE_FIELDS = {  # byte ranges of the f16 scales in each block, set to sane values in random blocks
    Q.Q8_0: [(0, 2)], Q.Q4_0: [(0, 2)], Q.Q5_0: [(0, 2)], Q.Q4_1: [(0, 2), (2, 4)], Q.Q5_1: [(0, 2), (2, 4)],
    Q.Q4_K: [(0, 2), (2, 4)], Q.Q5_K: [(0, 2), (2, 4)], Q.Q6_K: [(208, 210)],
}


# Roughly the spread of (code − centre) × sub-scale for random bytes, so a weight's spread can be set.
CODE_STD = {Q.Q8_0: 74, Q.Q4_0: 4.6, Q.Q4_1: 4.6, Q.Q5_0: 9.2, Q.Q5_1: 9.2, Q.Q4_K: 4.6 * 32, Q.Q5_K: 9.2 * 32,
            Q.Q6_K: 18 * 64}


def random_blocks(qtype, n, k, rng, std=0.05):
    """Random bytes in the GGUF layout, with f16 scales that give weights a spread near `std`
    (a random model with unit-scale weights is chaotic: any rounding difference explodes)."""
    per_block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n * k // per_block, size), dtype=np.uint8)
    for lo, hi in SCALE_FIELDS[qtype]:
        values = (rng.uniform(0.5, 1.0, len(blocks)) * std / CODE_STD[qtype]).astype(np.float16)
        blocks[:, lo:hi] = values.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda q: q.name)
def test_block_formats_decode_bit_for_bit(qtype):
    rng = np.random.default_rng(int(qtype))
    n, k = 8, 512
    data = random_blocks(qtype, n, k, rng)
    bq = block_quant(qtype, data, n, k)
    assert bq.codes.max() < 2 ** bq.bits
    reference = dequantize(data, qtype).reshape(n, k)
    # s·(code − zero) + o' against gguf's own w = s·q + o: equal up to float32 rounding
    assert np.abs(bq.dequantize() - reference).max() <= 1e-6 * np.abs(reference).max()


def smollm_tokenizer_fields(gguf: Path) -> dict:
    reader = GGUFReader(gguf)
    return {k: reader.fields[k].contents() for k in reader.fields if k.startswith("tokenizer.")}


def write_tiny_gguf(path: Path, arch: str, tok: dict, seed: int = 0) -> Path:
    """A 2-layer model whose weights use every supported block type, in fusable and unfusable mixes."""
    rng = np.random.default_rng(seed)
    hidden, heads, kv, ffn, vocab = 256, 4, 2, 512, len(tok["tokenizer.ggml.tokens"])
    w = GGUFWriter(str(path), arch)
    w.add_block_count(2), w.add_context_length(512), w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn), w.add_head_count(heads), w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0), w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(tok["tokenizer.ggml.model"]), w.add_tokenizer_pre(tok["tokenizer.ggml.pre"])
    w.add_token_list(tok["tokenizer.ggml.tokens"]), w.add_token_types(tok["tokenizer.ggml.token_type"])
    w.add_token_merges(tok["tokenizer.ggml.merges"])
    w.add_bos_token_id(tok["tokenizer.ggml.bos_token_id"]), w.add_eos_token_id(tok["tokenizer.ggml.eos_token_id"])
    w.add_chat_template(tok["tokenizer.chat_template"])

    def quant(name, qtype, n, k, std):
        w.add_tensor(name, random_blocks(qtype, n, k, rng, std), raw_dtype=qtype)

    def f32(name, array):
        w.add_tensor(name, array.astype(np.float32))

    quant("token_embd.weight", Q.Q8_0, vocab, hidden, std=0.5)
    layers = [  # q, k, v, o, gate, up, down
        (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q4_K, Q.Q6_K),
        (Q.Q8_0, Q.Q8_0, Q.Q8_0, Q.Q5_K, Q.Q4_1, Q.Q4_1, Q.Q4_K),
    ]
    for i, types in enumerate(layers):
        shapes = [(hidden, hidden), (kv * 64, hidden), (kv * 64, hidden), (hidden, hidden), (ffn, hidden),
                  (ffn, hidden), (hidden, ffn)]
        names = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
        for name, qtype, (n, k) in zip(names, types, shapes):
            quant(f"blk.{i}.{name}.weight", qtype, n, k, std=k ** -0.5)
        if arch == "qwen2":
            for name, n in (("attn_q", hidden), ("attn_k", kv * 64), ("attn_v", kv * 64)):
                f32(f"blk.{i}.{name}.bias", rng.normal(0, 0.1, n))
        f32(f"blk.{i}.attn_norm.weight", rng.uniform(0.5, 1.5, hidden))
        f32(f"blk.{i}.ffn_norm.weight", rng.uniform(0.5, 1.5, hidden))
    f32("output_norm.weight", rng.uniform(0.5, 1.5, hidden))
    if arch == "qwen2":
        quant("output.weight", Q.Q6_K, vocab, hidden, std=hidden ** -0.5)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tok_fields():
    from attar.runtime.models import gguf_path

    return smollm_tokenizer_fields(gguf_path("smollm2-135m"))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_gguf(request, tmp_path_factory, tok_fields):
    return write_tiny_gguf(tmp_path_factory.mktemp(request.param) / "tiny.gguf", request.param, tok_fields)


PROBE_TEXT = "Thought: I will compute 17 * 23 = 391 with code.\nCode:\n```py\nprint(17 * 23)\n```<end_code>"


def probe_ids(model_dir: Path) -> list[int]:
    import onnxruntime_genai as og

    return [int(t) for t in og.Tokenizer(og.Model(str(model_dir))).encode(PROBE_TEXT)]


def test_attars_reader_reads_what_ggufs_own_reads(tiny_gguf):
    """Over a plain view of the map instead of an np.memmap: the same fields, values and tensors."""
    from attar.runtime.gguf_import import Reader

    theirs, ours = GGUFReader(tiny_gguf), Reader(tiny_gguf)
    assert list(ours.fields) == list(theirs.fields) and len(ours.fields["tokenizer.ggml.tokens"].data) > 1000
    for key, field in theirs.fields.items():
        mine = ours.fields[key]
        assert mine.types == field.types and mine.data == field.data and mine.contents() == field.contents(), key
    assert [(t.name, t.tensor_type, t.data.tobytes()) for t in ours.tensors] == \
        [(t.name, t.tensor_type, t.data.tobytes()) for t in theirs.tensors]
    assert type(ours.tensors[0].data) is np.ndarray  # not a memmap, yet the file's own bytes
    assert np.shares_memory(ours.tensors[0].data, ours.data)


def test_tiny_gguf_import_matches_the_numpy_reference(tmp_path, tiny_gguf):
    out = tmp_path / "onnx"
    out.mkdir()
    summary = import_gguf(tiny_gguf, out, log=lambda m: None)
    assert set(summary["gguf_types"]) >= {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}
    ids = probe_ids(out)
    exported = OnnxScorer(ExportDir.open(out)).logits([ids])[0]
    reference = GGUFScorer(tiny_gguf).logits([ids])[0]
    assert close(exported, reference)


def close(exported, reference) -> bool:
    """Activations are int8 per block in the fast kernels (as in llama.cpp), and a random model
    amplifies that at a few positions: typical positions must be close and most argmaxes equal.
    A wrong weight, offset or row order moves every position by about the logits' own scale."""
    per_position = np.abs(exported - reference).max(-1)
    return (np.median(per_position) < 0.02 * np.abs(reference).max()
            and (exported.argmax(-1) == reference.argmax(-1)).mean() >= 0.85)


def test_import_runs_in_onnxruntime_genai_with_the_gguf_chat_template(tmp_path, tiny_gguf):
    import onnxruntime_genai as og

    out = tmp_path / "onnx"
    out.mkdir()
    import_gguf(tiny_gguf, out, log=lambda m: None)
    model = og.Model(str(out))
    tok = og.Tokenizer(model)
    prompt = tok.apply_chat_template(messages=json.dumps([{"role": "user", "content": "hi"}]), add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in prompt and prompt.rstrip().endswith("<|im_start|>assistant")
    params = og.GeneratorParams(model)
    ids = tok.encode(prompt)
    params.set_search_options(max_length=len(ids) + 8, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    steps = 0
    while not gen.is_done():
        gen.generate_next_token()
        steps += 1
    assert steps == 8


def test_tokenizer_follows_llama_cpp_smollm_pretokenizer(tmp_path, tok_fields):
    from tokenizers import Tokenizer

    from attar.runtime.gguf_tokenizer import write_tokenizer

    write_tokenizer(tok_fields, tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert len(tok.encode("12345", add_special_tokens=False).ids) == 5  # llama.cpp's smollm: one digit each
    text = "Größe: naïve café — 北京 ✓\n\tdef f(x):\n        return x**2  # ok"
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.encode("<|im_start|>user").ids[0] == tok_fields["tokenizer.ggml.tokens"].index("<|im_start|>")


def write_peft_adapter(path: Path, hidden=256, kv=2, ffn=512, rank=4, layers=2, seed=1) -> Path:
    """A PEFT-format LoRA adapter (bf16 safetensors), written with numpy as PEFT lays it out."""
    rng = np.random.default_rng(seed)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv * 64, hidden),
              "self_attn.v_proj": (kv * 64, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (ffn, hidden), "mlp.up_proj": (ffn, hidden), "mlp.down_proj": (hidden, ffn)}
    tensors = {}
    for i in range(layers):
        for module, (n, k) in shapes.items():
            base = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{base}.lora_A.weight"] = rng.normal(0, 0.3, (rank, k)).astype(np.float32)
            tensors[f"{base}.lora_B.weight"] = rng.normal(0, 0.3, (n, rank)).astype(np.float32)
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        raw = (array.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # bf16, truncated
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    path.mkdir(parents=True)
    head = json.dumps(header).encode()
    (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                          "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                             "gate_proj", "up_proj", "down_proj"]}))
    return path


def test_lora_stays_unmerged_and_matches_the_merged_reference(tmp_path, tiny_gguf):
    first, second = write_peft_adapter(tmp_path / "first"), write_peft_adapter(tmp_path / "second", rank=8, seed=2)
    base, students = tmp_path / "base", tmp_path / "students"
    base.mkdir(), students.mkdir()
    import_gguf(tiny_gguf, base, log=lambda m: None)
    summary = import_gguf(tiny_gguf, students, log=lambda m: None, adapters={"first": first, "second": second})
    assert summary["adapters"] == ["first", "second"]
    assert (students / "adapters" / "first.onnx_adapter").is_file()
    ids = probe_ids(students)
    for name, folder in (("first", first), ("second", second)):
        merged = GGUFScorer(tiny_gguf, folder).logits([ids])[0]
        exported = OnnxScorer(ExportDir.open(students), adapter=name).logits([ids])[0]
        assert close(exported, merged), name
    untouched = OnnxScorer(ExportDir.open(base)).logits([ids])[0]
    assert not close(untouched, GGUFScorer(tiny_gguf, first).logits([ids])[0])  # the adapter does change the model
    # With no adapter active the graph is the base: the LoRA inputs default to rank 0 (kernels
    # may be scheduled differently around the extra nodes, so equal up to float rounding).
    assert close(OnnxScorer(ExportDir.open(students), adapter="base").logits([ids])[0], untouched)


def test_runtime_picks_an_adapter_and_refuses_unknown_ones(tmp_path, tiny_gguf):
    from attar.runtime.llm import EngineBackend, Sampling
    from attar.runtime.modeldir import ModelError

    out = tmp_path / "students"
    out.mkdir()
    import_gguf(tiny_gguf, out, log=lambda m: None, adapters={"first": write_peft_adapter(tmp_path / "a"),
                                                              "second": write_peft_adapter(tmp_path / "b", seed=7)})
    messages = [{"role": "user", "content": "Say something."}]
    texts = {name: EngineBackend(out, adapter=name).generate(messages, sampling=Sampling(max_new_tokens=12)).text
             for name in (None, "first", "second", "base")}
    assert texts[None] == texts["first"]  # the default adapter is the first one
    assert len({texts["first"], texts["second"], texts["base"]}) == 3
    with pytest.raises(ModelError, match="has no adapter 'third'"):
        EngineBackend(out, adapter="third")
    proc = attar("chat", "hi", "--model", str(out), "--adapter", "third")
    assert proc.returncode == 1 and "has no adapter 'third'" in proc.stderr and "Traceback" not in proc.stderr


def attar(*args, timeout=600, env=None):
    exe = shutil.which("attar")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_exports_a_gguf_and_prints_its_parity(tmp_path, tiny_gguf):
    out = tmp_path / "model"
    proc = attar("export", str(tiny_gguf), "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "top-1 next-token agreement" in proc.stderr and "GGUF (numpy" in proc.stderr
    report = json.loads((out / "parity.json").read_text())
    assert report["precision"] == "gguf (exact)" and report["top1_agreement"] >= 0.9
    assert not list(tmp_path.glob(".model.partial-*"))


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00garbage", b"not a gguf at all"])
def test_cli_refuses_a_bad_gguf_in_one_line(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    proc = attar("export", str(bad), "-o", str(tmp_path / "out"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: cannot read")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


@needs_torch
def test_lora_row_order_matches_peft_on_the_real_model(tmp_path):
    """PEFT on transformers' own load of the GGUF is the independent witness that Q/K rows of a
    llama adapter are permuted as llama.cpp permutes the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from attar.runtime.models import gguf_path

    gguf = gguf_path("smollm2-135m")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft.save_pretrained(tmp_path / "adapter")
    ids = [1, 9690, 198, 2683, 314, 253, 5356, 30, 2, 198, 1, 4093, 198, 1780, 314, 216, 33, 39, 1792, 216, 34, 35]
    with torch.no_grad():
        witness = peft(torch.tensor([ids])).logits[0].numpy()
    base, with_lora = tmp_path / "base", tmp_path / "lora"
    base.mkdir(), with_lora.mkdir()
    import_gguf(gguf, with_lora, log=lambda m: None, adapters={"student": tmp_path / "adapter"})
    import_gguf(gguf, base, log=lambda m: None)
    agree = (OnnxScorer(ExportDir.open(with_lora)).logits([ids])[0].argmax(-1) == witness.argmax(-1)).mean()
    agree_base = (OnnxScorer(ExportDir.open(base)).logits([ids])[0].argmax(-1) == witness.argmax(-1)).mean()
    assert agree >= 0.6 and agree_base <= 0.3, (agree, agree_base)
