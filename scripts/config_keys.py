"""Write tests/fixtures/config_keys.json: for each model_type routelm loads, every key of
transformers' config class for it, with transformers' default value. tests/config_keys.rs
checks that routelm honours or refuses each one.

    /root/venv-ref/bin/python scripts/config_keys.py     # needs transformers
"""
import dataclasses
import json
import pathlib

import transformers

MODEL_TYPES = [
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "phi",
    "gpt2", "deepseek_v3", "mixtral", "phimoe", "qwen2_moe", "qwen3_moe", "olmoe", "bloom",
    "gpt_neox", "t5",
]

out = {"transformers": transformers.__version__, "model_types": {}}
for mt in MODEL_TYPES:
    cls = transformers.CONFIG_MAPPING[mt]
    d = cls().to_dict()
    fields = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else list(d)
    out["model_types"][mt] = {k: d.get(k) for k in sorted(fields) if k in d}
path = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/config_keys.json"
path.write_text(json.dumps(out, indent=1, sort_keys=True, default=str) + "\n")
print(f"wrote {path}")
