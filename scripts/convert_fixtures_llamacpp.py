"""GGUF fixtures written by llama.cpp's own converter (`convert_hf_to_gguf.py`) from the
tests/fixtures/hf checkpoints of the architectures whose GGUF layout differs most from
the Hugging Face one (fused q/k/v, GPT-2's Conv1D, DeepSeek's split latent attention).

    python scripts/convert_fixtures_llamacpp.py PATH/TO/llama.cpp

PATH/TO/llama.cpp is llama.cpp's source (for instance `vendor/llama.cpp` inside the
`llama-cpp-python` sdist); run it with a Python that has torch, transformers, numpy and
safetensors. Writes tests/fixtures/gguf/converter/NAME.TYPE.gguf.

Three things are changed around the converter, none inside it:
  - the fixtures carry no tokenizer, so every model class's `set_vocab` is skipped (the
    files hold no vocabulary; routelm takes the vocabulary size from `token_embd`);
  - transformers 5 no longer returns some keys older config classes kept (`rotary_pct`,
    GPT-2's `n_ctx`), so keys of config.json missing from the converter's config are put
    back (`n_ctx` as `n_positions`);
  - DeepSeek-V3's published config.json names `scoring_func: sigmoid`, which the tiny
    fixture's (written by transformers 5) leaves out; it is put back, else the converter
    writes no gating function and llama.cpp would score the experts by softmax.
"""
import json, os, runpy, sys

lc = os.path.abspath(sys.argv[1])
sys.path.insert(0, lc)
sys.path.insert(0, os.path.join(lc, "gguf-py"))
import conversion
import conversion.base as base

conversion.load_all_models()


def no_vocab(self):
    pass


def subclasses(c):
    for s in c.__subclasses__():
        yield s
        yield from subclasses(s)


base.TextModel.set_vocab = no_vocab
for c in subclasses(base.TextModel):
    if "set_vocab" in c.__dict__:
        c.set_vocab = no_vocab

config_hparams = base.ModelBase.load_hparams


def load_hparams(dir_model, is_mistral_format):
    h = config_hparams(dir_model, is_mistral_format)
    with open(dir_model / "config.json") as f:
        for k, v in json.load(f).items():
            h.setdefault(k, v)
    if "n_positions" in h:
        h.setdefault("n_ctx", h["n_positions"])
    if h.get("model_type") == "deepseek_v3":
        h.setdefault("scoring_func", "sigmoid")
    return h


base.ModelBase.load_hparams = staticmethod(load_hparams)

out = "tests/fixtures/gguf/converter"
os.makedirs(out, exist_ok=True)
jobs = [("gpt_neox", "f32"), ("gpt_neox", "q8_0"), ("bloom", "f32"), ("gpt2", "f32"),
        ("gpt2", "q8_0"), ("phi2", "f32"), ("phi2", "q8_0"), ("deepseek_v3", "f32")]
for name, ty in jobs:
    sys.argv = ["convert_hf_to_gguf.py", f"tests/fixtures/hf/{name}", "--outtype", ty,
                "--outfile", f"{out}/{name}.{ty}.gguf"]
    runpy.run_path(os.path.join(lc, "convert_hf_to_gguf.py"), run_name="__main__")
    print("wrote", f"{out}/{name}.{ty}.gguf")
