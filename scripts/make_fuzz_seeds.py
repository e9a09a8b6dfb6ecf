#!/usr/bin/env python3
"""Write the fuzz targets' seed inputs into fuzz/seeds/TARGET/ (small files, committed).

The model folders are tiny models that transformers itself builds and saves, so their
tensor names and shapes are those published checkpoints use; the rest comes from the
repository's fixtures and presets. Needs torch, transformers and tokenizers (the reference
venv). Run from the repository root: python scripts/make_fuzz_seeds.py
"""
import glob
import io
import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import save, save_file

SEP = b"\n--routelm-fuzz-part--\n"
OUT = "fuzz/seeds"


def put(target, name, data):
    os.makedirs(f"{OUT}/{target}", exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(f"{OUT}/{target}/{name}", "wb") as f:
        f.write(data)


def tiny_models():
    import transformers as tf

    common = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    yield "llama", tf.LlamaConfig(**common)
    yield "mistral", tf.MistralConfig(**common, sliding_window=8)
    yield "mixtral", tf.MixtralConfig(**common, num_local_experts=2, num_experts_per_tok=1)
    yield "qwen3", tf.Qwen3Config(**common, head_dim=4)
    yield "qwen2_moe", tf.Qwen2MoeConfig(**common, num_experts=2, num_experts_per_tok=1,
                                          moe_intermediate_size=8,
                                          shared_expert_intermediate_size=8)
    yield "gemma3", tf.Gemma3TextConfig(**common, head_dim=4, sliding_window=8)
    yield "phi3", tf.Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    yield "gpt2", tf.GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=32,
                                 bos_token_id=1, eos_token_id=2)
    yield "gpt_neox", tf.GPTNeoXConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       max_position_embeddings=32, bos_token_id=1, eos_token_id=2)


def saved(cfg):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        config = open(f"{d}/config.json", "rb").read()
        weights = open(f"{d}/model.safetensors", "rb").read()
    return config, weights


def main():
    shutil.rmtree(OUT, ignore_errors=True)

    # safetensors: dtypes, shapes, metadata
    put("safetensors", "f32.safetensors", save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}))
    put("safetensors", "mixed.safetensors", save({
        "a": torch.ones(4, dtype=torch.bfloat16), "b": torch.zeros(2, 2, dtype=torch.float16),
        "c": torch.arange(3, dtype=torch.int64), "d": torch.tensor(1.5, dtype=torch.float64),
    }, metadata={"format": "pt"}))

    # model folders: config | weights; config.json alone
    for name, cfg in tiny_models():
        config, weights = saved(cfg)
        put("hf_folder", f"{name}.bin", config + SEP + weights)
        put("config_json", f"tiny-{name}.json", config)
    for path in sorted(glob.glob("tests/fixtures/hf/*/config.json")):
        put("config_json", os.path.basename(os.path.dirname(path)) + ".json", open(path, "rb").read())

    # a sharded folder: the fixed part (config | shard 1 | shard 2 | ...) and index seeds
    import transformers as tf
    config, weights = saved(dict(tiny_models())["llama"])
    from safetensors.torch import load
    tensors = load(weights)
    names = sorted(tensors)
    first = {n: tensors[n] for n in names[: len(names) // 2]}
    second = {n: tensors[n] for n in names[len(names) // 2:]}
    put("sharded_index", "folder.bin", config + SEP + save(first) + SEP + save(second))
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())},
             "weight_map": {**{n: "model-00001-of-00002.safetensors" for n in first},
                            **{n: "model-00002-of-00002.safetensors" for n in second}}}
    put("sharded_index", "index.json", json.dumps(index, indent=2))
    put("sharded_index", "index-one-shard.json",
        json.dumps({"weight_map": {n: "model-00001-of-00002.safetensors" for n in first}}))

    # tokenizer.json: the fixture and small trained tokenizers of each model kind
    put("tokenizer_json", "fixture.json", open("tests/fixtures/tokenizer/tokenizer.json", "rb").read())
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    text = ["Hello, world! The quick brown fox jumps over the lazy dog.", "ünïcödé 123 456",
            "def f(x):\n    return x * 2"] * 4
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A </s> $B",
                                                       special_tokens=[("<s>", 1), ("</s>", 2)])
    put("tokenizer_json", "bytelevel-bpe.json", bpe.to_str())
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    wp.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[UNK]", "[CLS]", "[SEP]"]))
    put("tokenizer_json", "wordpiece.json", wp.to_str())
    uni = Tokenizer(models.Unigram())
    uni.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" ", "▁")])
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.decoder = decoders.Metaspace()
    uni.train_from_iterator(text, trainers.UnigramTrainer(vocab_size=60, special_tokens=["<unk>"], unk_token="<unk>"))
    put("tokenizer_json", "unigram.json", uni.to_str())

    # GGUF: the small fixtures (a model with its tokenizer, and tokenizers of each kind)
    for path in ["tiny.gguf", "llama3.q8_0.gguf", "tokenizer-llama-bpe.gguf", "tokenizer-llama-spm.gguf",
                 "tokenizer-gemma.gguf", "tokenizer-phi3-spm.gguf", "tokenizer-default.gguf"]:
        put("gguf", path, open(f"tests/fixtures/gguf/{path}", "rb").read())

    # run files: the presets
    for path in sorted(glob.glob("configs/*.toml") + glob.glob("configs/**/*.toml", recursive=True)):
        put("run_config", path.replace("/", "_"), open(path, "rb").read())

    # chat templates: each published template with one of its test conversations
    for t in json.load(open("tests/fixtures/chat/templates.json")):
        for case in t["cases"][:3]:
            extra = case.get("kwargs", {})
            if case.get("tools"):
                extra = {**extra, "tools": case["tools"]}
            put("chat_template", f"{t['name']}-{case['id']}.bin",
                t["template"].encode() + SEP + json.dumps(case["messages"]).encode() + SEP
                + json.dumps(extra).encode())

    # request bodies (first byte: even = chat, odd = completion)
    chat = [{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
             "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.7, "top_p": 0.9,
             "logprobs": True, "top_logprobs": 3, "stop": ["\n", "."], "seed": 1, "routelm": {"routes": True}},
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}],
             "chat_template_kwargs": {"enable_thinking": False}, "max_completion_tokens": 2, "n": 1}]
    completion = [{"prompt": "Once upon a time", "max_tokens": 3},
                  {"prompt": [1, 2, 3], "logprobs": 2, "echo": False, "ignore_eos": True, "top_k": 5},
                  {"prompt": ["one"], "stream": True, "repetition_penalty": 1.1, "presence_penalty": 0}]
    for i, body in enumerate(chat):
        put("serve_request", f"chat-{i}.bin", b"\x00" + json.dumps(body).encode())
    for i, body in enumerate(completion):
        put("serve_request", f"completion-{i}.bin", b"\x01" + json.dumps(body).encode())


if __name__ == "__main__":
    main()
