"""Fixtures for the GGUF reader and the dequantization kernels, made with gguf-py (the
reference implementation of the format's Python side). Run from the repository root with
a Python that has `gguf` and `numpy`:

    python scripts/make_gguf_fixtures.py

Writes tests/fixtures/gguf/:
  blocks.safetensors  for each quant type T: `T.blocks` (raw block bytes, u8) and `T.f32`
                      (gguf-py's dequantization of them); random bytes with finite f16
                      scales, so every bit pattern of the quants is exercised.
  tiny.gguf           metadata of every value type and tensors of several types, and
  tiny.json           what gguf-py reads back from it (metadata values, tensor shapes,
                      types and dequantized values), the reference for the reader.
  llama3.*.gguf, gemma*.f32.gguf, qwen*.f32.gguf, mixtral.f32.gguf, olmoe.q8_0.gguf, phi3.q8_0.gguf
                      GGUF twins of tests/fixtures/hf checkpoints, written as llama.cpp's
                      converter writes them.
  tokenizer-*.gguf    tokenizers in GGUF metadata (byte-level BPE with two splits, Gemma's
                      SentencePiece, scored SentencePiece for Llama and Phi-3; trained here on README.md and
  tokenizer_expect.json  ARCHITECTURE.md, so a rerun may train a different vocabulary) and
                      what transformers' tokenizer built from each file gives on a text set.
Needs transformers, tokenizers and safetensors too.
"""
import json, os
import numpy as np
import gguf
from gguf.quants import dequantize
from safetensors.numpy import save_file

rng = np.random.default_rng(0)
out = "tests/fixtures/gguf"
os.makedirs(out, exist_ok=True)
T = gguf.GGMLQuantizationType
types = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# byte offsets of the f16 scales inside each block (made finite: random bits could be NaN)
f16_at = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
          "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
tensors = {}
for name in types:
    qt = T[name]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    n_blocks = 6
    if name == "F32":
        raw = rng.standard_normal(n_blocks * 8).astype(np.float32).view(np.uint8)
    elif name in ("F16", "BF16"):
        vals = rng.standard_normal(n_blocks * 8).astype(np.float32)
        raw = (vals.astype(np.float16).view(np.uint8) if name == "F16"
               else (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8))
    else:
        raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
        for at in f16_at[name]:
            scale = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
            raw[:, at:at + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
        raw = raw.reshape(-1)
    n = raw.size // size * block
    shape = (n,)
    vals = dequantize(raw.reshape(-1, size) if block > 1 else raw, qt).reshape(-1).astype(np.float32)
    tensors[f"{name}.blocks"] = np.ascontiguousarray(raw)
    tensors[f"{name}.f32"] = vals
save_file(tensors, f"{out}/blocks.safetensors")

# a tiny GGUF file: every metadata value type, tensors of several types and shapes
w = gguf.GGUFWriter(f"{out}/tiny.gguf", "llama")
w.add_uint8("test.u8", 200)
w.add_int8("test.i8", -100)
w.add_uint16("test.u16", 60000)
w.add_int16("test.i16", -30000)
w.add_uint32("test.u32", 4000000000)
w.add_int32("test.i32", -2000000000)
w.add_float32("test.f32", 0.25)
w.add_uint64("test.u64", 2**60)
w.add_int64("test.i64", -(2**60))
w.add_float64("test.f64", 1e-300)
w.add_bool("test.bool", True)
w.add_string("test.string", "héllo ✓")
w.add_array("test.array_i32", [1, -2, 3])
w.add_array("test.array_str", ["a", "bc", ""])
expect = {"tensors": {}}
for name, qt, shape in [("f32_matrix", "F32", (3, 5)), ("f16_vector", "F16", (7,)),
                        ("q8_matrix", "Q8_0", (2, 64)), ("q4k_matrix", "Q4_K", (2, 256)),
                        ("q6k_matrix", "Q6_K", (1, 512))]:
    x = rng.standard_normal(shape).astype(np.float32)
    if qt in ("F32",):
        q = x
    elif qt in ("F16", "Q8_0"):
        q = gguf.quants.quantize(x, T[qt])
    else:
        # gguf-py has no K-quant quantizer: random blocks with finite scales
        block, size = gguf.GGML_QUANT_SIZES[T[qt]]
        rows = int(np.prod(shape[:-1]))
        q = rng.integers(0, 256, size=(rows * shape[-1] // block, size), dtype=np.uint8)
        for at in f16_at[qt]:
            q[:, at:at + 2] = (rng.standard_normal(q.shape[0]) * 0.05).astype(np.float16).view(np.uint8).reshape(-1, 2)
        q = q.reshape(shape[:-1] + (shape[-1] // block * size,))
    w.add_tensor(name, q, raw_dtype=T[qt])
    deq = dequantize(q, T[qt]).reshape(shape)
    expect["tensors"][name] = {"type": qt, "shape": list(shape),
                               "values": [float(v) for v in deq.reshape(-1)]}
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
r = gguf.GGUFReader(f"{out}/tiny.gguf")
expect["metadata"] = {}
for f in r.fields.values():
    if f.name.startswith("test."):
        expect["metadata"][f.name] = f.contents()
expect["alignment"] = r.alignment
with open(f"{out}/tiny.json", "w") as fh:
    json.dump(expect, fh, indent=1, ensure_ascii=False)
print("wrote", out, os.path.getsize(f"{out}/tiny.gguf"), "bytes gguf")

# --- GGUF twins of two Hugging Face fixtures, written the way llama.cpp's converter
# writes them: llama's q/k rows permuted for pairwise rotary, Gemma's norms stored as 1 + w.
from safetensors.numpy import load_file

def permute(w, heads):
    # Hugging Face's rotate-half rows → llama.cpp's interleaved pairs, per head
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)

def gguf_name(hf):
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")
    layer, rest = parts[2], ".".join(parts[3:])
    table = {"input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "attn_q",
             "self_attn.k_proj.weight": "attn_k", "self_attn.v_proj.weight": "attn_v",
             "self_attn.o_proj.weight": "attn_output", "self_attn.q_norm.weight": "attn_q_norm",
             "self_attn.k_norm.weight": "attn_k_norm", "post_attention_layernorm.weight": "ffn_norm",
             "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up",
             "mlp.down_proj.weight": "ffn_down", "self_attn.q_proj.bias": "attn_q.bias",
             "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
             # Phi-3's fused projections
             "self_attn.qkv_proj.weight": "attn_qkv", "mlp.gate_up_proj.weight": "ffn_up"}
    name = table[rest]
    return f"blk.{layer}.{name}" if name.endswith(".bias") else f"blk.{layer}.{name}.weight"

def gemma_name(hf):
    if hf.endswith("post_attention_layernorm.weight"):
        return gguf_name(hf).replace("ffn_norm", "post_attention_norm")
    if hf.endswith("pre_feedforward_layernorm.weight"):
        return gguf_name(hf.replace("pre_feedforward_layernorm", "post_attention_layernorm"))
    if hf.endswith("post_feedforward_layernorm.weight"):
        return hf.replace("model.layers.", "blk.").replace("post_feedforward_layernorm", "post_ffw_norm")
    return gguf_name(hf)

def write_twin(src, dst, arch, qtype):
    cfg = json.load(open(f"{src}/config.json"))
    w = gguf.GGUFWriter(dst, arch)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    if arch == "llama":
        rope = cfg.get("rope_parameters") or {}
        w.add_rope_freq_base(cfg.get("rope_theta") or rope.get("rope_theta", 500000.0))
    elif arch in ("qwen2", "qwen3", "qwen2moe", "qwen3moe", "olmoe"):
        w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    elif arch == "phi3":
        rope = cfg["rope_parameters"]
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        w.add_sliding_window(cfg.get("sliding_window") or 0)
    elif arch == "gemma":
        pass
    elif arch == "gemma2":
        # as llama.cpp's converter: softcaps and window, no rotary base (10000 by default)
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        w.add_sliding_window(cfg["sliding_window"])
    else:
        w.add_rope_freq_base(cfg["rope_parameters"]["full_attention"]["rope_theta"])
        w.add_sliding_window(cfg["sliding_window"])
        # the fixture's pattern (every third layer global); llama.cpp's default is 6
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", len(cfg["layer_types"]) if "full_attention" in cfg["layer_types"][-1:] else 6)
    weights = load_file(f"{src}/model.safetensors")
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if "moe_intermediate_size" in cfg:
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("shared_expert_intermediate_size"):
            w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
        # experts stacked (E, out, in) under llama.cpp's names, routers and shared experts renamed
        for l in range(cfg["num_hidden_layers"]):
            moe = f"model.layers.{l}.mlp" if arch != "llama" else f"model.layers.{l}.block_sparse_moe"
            parts = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
            if arch == "llama":
                parts = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
            if f"{moe}.gate.weight" not in weights:
                continue
            w.add_tensor(f"blk.{l}.ffn_gate_inp.weight", weights.pop(f"{moe}.gate.weight").astype(np.float32))
            for hf, gg in parts.items():
                stack = np.stack([weights.pop(f"{moe}.experts.{e}.{hf}.weight") for e in range(experts)])
                stack = stack.astype(np.float32)
                if qtype != "F32":
                    w.add_tensor(f"blk.{l}.{gg}.weight", gguf.quants.quantize(stack, T[qtype]), raw_dtype=T[qtype])
                else:
                    w.add_tensor(f"blk.{l}.{gg}.weight", stack)
            for hf, gg in {"gate_proj": "ffn_gate_shexp", "up_proj": "ffn_up_shexp", "down_proj": "ffn_down_shexp"}.items():
                key = f"{moe}.shared_expert.{hf}.weight"
                if key in weights:
                    w.add_tensor(f"blk.{l}.{gg}.weight", weights.pop(key).astype(np.float32))
            key = f"{moe}.shared_expert_gate.weight"
            if key in weights:
                # llama.cpp keeps the shared expert's gate as a vector
                w.add_tensor(f"blk.{l}.ffn_gate_inp_shexp.weight", weights.pop(key).astype(np.float32).reshape(-1))
    for name, x in sorted(weights.items()):
        x = x.astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            x = permute(x, heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            x = permute(x, kv)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            x = x + 1
        gname = gemma_name(name) if arch in ("gemma2", "gemma3") else gguf_name(name)
        if x.ndim == 2 and qtype != "F32":
            w.add_tensor(gname, gguf.quants.quantize(x, T[qtype]), raw_dtype=T[qtype])
        else:
            w.add_tensor(gname, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

write_twin("tests/fixtures/hf/llama3", f"{out}/llama3.f32.gguf", "llama", "F32")
write_twin("tests/fixtures/hf/llama3", f"{out}/llama3.q8_0.gguf", "llama", "Q8_0")
write_twin("tests/fixtures/hf/gemma3", f"{out}/gemma3.f32.gguf", "gemma3", "F32")
write_twin("tests/fixtures/hf/gemma", f"{out}/gemma.f32.gguf", "gemma", "F32")
write_twin("tests/fixtures/hf/gemma2", f"{out}/gemma2.f32.gguf", "gemma2", "F32")
write_twin("tests/fixtures/hf/phi3", f"{out}/phi3.q8_0.gguf", "phi3", "Q8_0")
write_twin("tests/fixtures/hf/olmoe", f"{out}/olmoe.q8_0.gguf", "olmoe", "Q8_0")
write_twin("tests/fixtures/hf/qwen2", f"{out}/qwen2.f32.gguf", "qwen2", "F32")
write_twin("tests/fixtures/hf/qwen3", f"{out}/qwen3.f32.gguf", "qwen3", "F32")
write_twin("tests/fixtures/hf/qwen2_moe", f"{out}/qwen2_moe.f32.gguf", "qwen2moe", "F32")
write_twin("tests/fixtures/hf/qwen3_moe", f"{out}/qwen3_moe.f32.gguf", "qwen3moe", "F32")
write_twin("tests/fixtures/hf/mixtral", f"{out}/mixtral.f32.gguf", "llama", "F32")
print("wrote the GGUF twins")

# --- tokenizers in GGUF metadata: a tiny byte-level BPE written as llama.cpp writes one
# (`tokenizer.ggml.*`), and what transformers builds from that file encodes a text set to.
from tokenizers import Tokenizer as HfTok, models, trainers, pre_tokenizers as pt, decoders
from transformers import AutoTokenizer

corpus = [open("README.md").read(), open("ARCHITECTURE.md").read()]
bpe = HfTok(models.BPE())
bpe.pre_tokenizer = pt.ByteLevel(add_prefix_space=False)
bpe.decoder = decoders.ByteLevel()
specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                     initial_alphabet=pt.ByteLevel.alphabet()))
spec = json.loads(bpe.to_str())
vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
tokens = [t for t, _ in vocab]
merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
texts = ["Hello, world!", "  two  spaces and\ttabs\nnew lines\n\n", "numbers 12345 and 3.14159",
         "fn main() { println!(\"hi\"); }", "héllo wörld ✓ 日本語 🙂", "<|im_start|>user\nhi<|im_end|>",
         "don't won't I'll we're", ""]
expect = {}
for pre in ["default", "llama-bpe"]:
    path = f"{out}/tokenizer-{pre}.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = AutoTokenizer.from_pretrained(out, gguf_file=os.path.basename(path))
    expect[pre] = [{"text": t, "ids": tok.encode(t), "decoded": tok.decode(tok.encode(t), skip_special_tokens=True)}
                   for t in texts]
with open(f"{out}/tokenizer_expect.json", "w") as fh:
    json.dump(expect, fh, indent=1, ensure_ascii=False)
print("wrote the tokenizer GGUFs")

# --- a SentencePiece-style (Gemma) vocabulary in GGUF metadata: no merges in the file
# (they are rebuilt from the vocabulary's order), byte-fallback tokens, a token of plain
# spaces (stored as spaces, looked up as ▁▁), control and user-defined tokens.
sp = HfTok(models.BPE())
sp.pre_tokenizer = pt.Split(" ", "merged_with_previous")
sp_corpus = [c.replace(" ", "\u2581") for c in corpus]
sp.train_from_iterator(sp_corpus, trainers.BpeTrainer(vocab_size=500, special_tokens=[]))
pieces = [t for t, _ in sorted(json.loads(sp.to_str())["model"]["vocab"].items(), key=lambda kv: kv[1])]
head = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<mask>"]
byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
sp_tokens = head + byte_tokens + ["  ", "   "] + [p for p in pieces if p not in head]
sp_types = [3, 3, 3, 2, 3, 3, 4] + [6] * 256 + [1] * (len(sp_tokens) - len(head) - 256)
path = f"{out}/tokenizer-gemma.gguf"
w = gguf.GGUFWriter(path, "gemma3")
w.add_tokenizer_model("llama")
w.add_tokenizer_pre("default")
w.add_token_list(sp_tokens)
w.add_token_scores([0.0] * len(sp_tokens))
w.add_token_types(sp_types)
w.add_bos_token_id(2)
w.add_eos_token_id(1)
w.add_unk_token_id(3)
w.add_pad_token_id(0)
w.add_add_bos_token(True)
w.add_add_space_prefix(False)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
tok = AutoTokenizer.from_pretrained(out, gguf_file=os.path.basename(path))
sp_texts = texts + ["<start_of_turn>user\nhi<end_of_turn>\n", "x  y   z", "<mask> and ☃ (not in the vocabulary)"]
expect["gemma"] = [{"text": t, "ids": tok.encode(t), "decoded": tok.decode(tok.encode(t), skip_special_tokens=True)}
                   for t in sp_texts]
with open(f"{out}/tokenizer_expect.json", "w") as fh:
    json.dump(expect, fh, indent=1, ensure_ascii=False)
print("wrote the sentencepiece tokenizer GGUF")

# --- SentencePiece vocabularies with scores (Llama 2 / Mistral style, and Phi-3's): no
# merges in the file (rebuilt from the scores), byte-fallback tokens, a control and a
# user-defined token; BOS added.
spm = HfTok(models.BPE())
spm.pre_tokenizer = pt.Split(" ", "merged_with_previous")
spm_corpus = [("\u2581" + c).replace(" ", "\u2581") for c in corpus]
spm.train_from_iterator(spm_corpus, trainers.BpeTrainer(vocab_size=500, special_tokens=[]))
pieces = [t for t, _ in sorted(json.loads(spm.to_str())["model"]["vocab"].items(), key=lambda kv: kv[1])]
head = ["<unk>", "<s>", "</s>"]
extra = ["<|user|>", "<|end|>"]
spm_tokens = head + byte_tokens + [p for p in pieces if p not in head] + extra
spm_types = [2, 3, 3] + [6] * 256 + [1] * (len(spm_tokens) - 3 - 256 - len(extra)) + [3, 4]
# the merge priority as SentencePiece scores, best (highest) first; bytes and specials 0
spm_scores = [0.0] * 259 + [-float(i) for i in range(len(spm_tokens) - 259 - len(extra))] + [0.0, 0.0]
for arch, key in [("llama", "llama-spm"), ("phi3", "phi3-spm")]:
    path = f"{out}/tokenizer-{key}.gguf"
    w = gguf.GGUFWriter(path, arch)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(spm_tokens)
    w.add_token_scores(spm_scores)
    w.add_token_types(spm_types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = AutoTokenizer.from_pretrained(out, gguf_file=os.path.basename(path))
    cases = texts + ["<|user|>\nhi<|end|>\n", " leading space", "x  y   z", "☃ (not in the vocabulary)"]
    expect[key] = [{"text": t, "ids": tok.encode(t), "decoded": tok.decode(tok.encode(t), skip_special_tokens=True)}
                   for t in cases]
with open(f"{out}/tokenizer_expect.json", "w") as fh:
    json.dump(expect, fh, indent=1, ensure_ascii=False)
print("wrote the SentencePiece (scored) tokenizer GGUFs")
