"""Write PEFT LoRA adapters for some fixture models, with the logits transformers + peft
compute through them: tests/fixtures/lora/NAME/.

    /root/venv-ref/bin/python scripts/make_lora_fixtures.py

Needs torch, transformers and peft. For each base in tests/fixtures/hf/ listed in FIXTURES,
peft adds adapters to the listed modules with random A and B (`init_lora_weights=False`, so
the adapters change the outputs), saves them (`adapter_config.json`,
`adapter_model.safetensors`, as `save_pretrained` writes them) and computes the adapted
model's logits on the base fixture's `input_ids`: `reference.safetensors` holds
`input_ids`, `logits` (adapted) and `base_logits` (without adapters). The folder is then
loaded again with `PeftModel.from_pretrained` on a fresh base and must reproduce `logits`
bit for bit. `meta.json` records versions, r, alpha and how far the adapters move the
logits. tests/lora.rs loads each adapter with routelm and compares.

A second use, `--check BASE ADAPTER [--ids 1,2,3] [--out DIR]`, loads a base (a folder or a
GGUF file, which transformers dequantizes) with an adapter (one routelm trained, say) and
writes DIR (default /tmp/peft_check) with reference.safetensors and meta.json, which
`routelm verify BASE --lora ADAPTER --reference DIR` compares with routelm.
"""

import argparse
import json
import sys
from pathlib import Path

import peft
import torch
import transformers
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
HF = ROOT / "tests" / "fixtures" / "hf"
OUT = ROOT / "tests" / "fixtures" / "lora"

# base fixture -> (modules to adapt, r, alpha, why this one)
FIXTURES = {
    "llama3": (
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        4,
        8,
        "every projection of a Llama block; module names equal routelm's canonical names",
    ),
    "phi2": (
        ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
        4,
        16,
        "Phi-2 names its output and MLP projections dense, fc1, fc2 (routelm: o_proj, up_proj, down_proj); projections with biases",
    ),
    "deepseek_v3": (
        ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
        2,
        3,
        "latent attention; routelm reorders the rotary rows of q_b_proj and kv_a_proj_with_mqa, so lora_B's rows must follow",
    ),
}


def load_base(path):
    path = Path(path)
    if path.suffix == ".gguf":
        # transformers dequantizes a GGUF file's weights to float32
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation="eager"
        )
    model.eval()
    return model


def make(name):
    modules, r, alpha, why = FIXTURES[name]
    base_dir = HF / name
    ref = load_file(str(base_dir / "reference.safetensors"))
    ids = ref["input_ids"]
    torch.manual_seed(1234)
    model = load_base(base_dir)
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits
    cfg = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=modules,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    pm = peft.get_peft_model(model, cfg)
    # peft's random B is small; scale the adapters up so they move the logits clearly
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(5.0)
    pm.eval()
    with torch.no_grad():
        logits = pm(input_ids=ids).logits
    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    pm.save_pretrained(str(out))
    cfgj = json.loads((out / "adapter_config.json").read_text())
    cfgj["base_model_name_or_path"] = f"tests/fixtures/hf/{name}"
    (out / "adapter_config.json").write_text(json.dumps(cfgj, indent=2, sort_keys=True) + "\n")
    # reload on a fresh base: the saved folder must give the same logits
    again = peft.PeftModel.from_pretrained(load_base(base_dir), str(out))
    again.eval()
    with torch.no_grad():
        logits2 = again(input_ids=ids).logits
    assert torch.equal(logits, logits2), "reloaded adapter differs"
    save_file(
        {"input_ids": ids, "logits": logits.contiguous(), "base_logits": base_logits.contiguous()},
        str(out / "reference.safetensors"),
    )
    moved = (logits - base_logits).abs().max().item()
    meta = {
        "base": f"tests/fixtures/hf/{name}",
        "target_modules": modules,
        "r": r,
        "lora_alpha": alpha,
        "why": why,
        "adapter_moves_logits_by": round(moved, 4),
        "atol": 1e-4,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{name}: {len(modules)} module kinds, adapters move the logits by {moved:.3f}")


def check(base, adapter, ids, out):
    """transformers + peft's logits for `ids` through `adapter` on `base`, written as a
    reference folder that `routelm verify BASE --lora ADAPTER --reference OUT` compares."""
    model = load_base(base)
    with torch.no_grad():
        ids_t = torch.tensor([ids], dtype=torch.long)
        base_logits = model(input_ids=ids_t).logits
    pm = peft.PeftModel.from_pretrained(model, adapter)
    pm.eval()
    with torch.no_grad():
        logits = pm(input_ids=ids_t).logits
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {"input_ids": ids_t, "logits": logits.contiguous(), "base_logits": base_logits.contiguous()},
        str(out / "reference.safetensors"),
    )
    meta = {
        "base": str(base),
        "adapter": str(adapter),
        "atol": 1e-4,
        "adapter_moves_logits_by": (logits - base_logits).abs().max().item(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{out}: logits {tuple(logits.shape)}, the adapter moves them by {meta['adapter_moves_logits_by']:.4f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--check", nargs=2, metavar=("BASE", "ADAPTER"))
    ap.add_argument("--ids", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--out", default="/tmp/peft_check")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.check:
        check(a.check[0], a.check[1], [int(x) for x in a.ids.split(",")], a.out)
        return
    for name in a.names or FIXTURES:
        make(name)


if __name__ == "__main__":
    sys.exit(main())
