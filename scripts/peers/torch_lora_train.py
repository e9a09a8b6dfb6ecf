"""PyTorch + peft LoRA fine-tuning throughput, the baseline for `routelm train --lora`.

    /root/venv-ref/bin/python scripts/peers/torch_lora_train.py BASE DATA \
        [--r 16 --alpha 32 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj] \
        [--batch 8 --seq 128 --steps 12 --lr 5e-4 --threads 2]

BASE: a Hugging Face folder or a GGUF file (transformers dequantizes it to float32).
DATA: a text file, tokenized with the base's tokenizer. The recipe is routelm's: AdamW
(betas 0.9/0.99, weight decay 0.1 on the adapters), gradients clipped to norm 1.0, batches of
random windows, float32 on the CPU. The first two steps are warm-up and not timed; the
script prints the median step time, tokens/s, trainable parameters and peak resident
memory.
"""

import argparse
import resource
import statistics
import time
from pathlib import Path

import peft
import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("data")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument(
        "--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    base = Path(a.base)
    if base.suffix == ".gguf":
        kw = dict(gguf_file=base.name)
        where = str(base.parent)
    else:
        kw = {}
        where = str(base)
    tok = transformers.AutoTokenizer.from_pretrained(where, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        where, dtype=torch.float32, attn_implementation="sdpa", **kw
    )
    cfg = peft.LoraConfig(
        r=a.r,
        lora_alpha=a.alpha,
        target_modules=a.targets.split(","),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, cfg)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    ids = torch.tensor(tok(Path(a.data).read_text())["input_ids"], dtype=torch.long)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=a.lr,
        betas=(0.9, 0.99),
        weight_decay=0.1,
    )
    gen = torch.Generator().manual_seed(1)
    times, losses = [], []
    for step in range(a.steps):
        starts = torch.randint(0, len(ids) - a.seq - 1, (a.batch,), generator=gen)
        x = torch.stack([ids[s : s + a.seq] for s in starts])
        y = torch.stack([ids[s + 1 : s + a.seq + 1] for s in starts])
        t0 = time.perf_counter()
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if step >= 2:
            times.append(dt)
        print(f"step {step}: loss {loss.item():.4f}  {dt * 1000:.0f} ms", flush=True)
    med = statistics.median(times)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"torch {torch.__version__} peft {peft.__version__}: batch {a.batch} x seq {a.seq}, "
        f"median step {med * 1000:.0f} ms, {a.batch * a.seq / med:.0f} tokens/s; "
        f"trainable {trainable} of {total} parameters; peak RSS {rss:.0f} MB"
    )


if __name__ == "__main__":
    main()
