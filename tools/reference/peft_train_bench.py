"""The PyTorch + PEFT + bitsandbytes side of the training benchmark (CPU): the same base (NF4 with
double quant, fp32 compute), LoRA r=16 alpha=32 on all linear layers (dropout 0.05), AdamW
lr 2e-4, batch 1, the same JSONL lines tokenized the same way (BOS, EOS, truncation to 512).

Usage: ~/.cache/qlora/venv/bin/python tools/reference/peft_train_bench.py MODEL_DIR TRAIN.jsonl STEPS THREADS
Prints tokens/s over the steps after the first, and peak RSS.
"""
import json
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

model_dir, data, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(
    model_dir, dtype=torch.float32, device_map="cpu",
    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05,
                                         target_modules="all-linear"))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
lines = [json.loads(l)["text"] for l in open(data)]
seqs = []
for t in lines[:steps]:
    ids = tok(t)["input_ids"] + [tok.eos_token_id]
    seqs.append(ids[:512])
times, toks = [], []
for ids in seqs:
    t0 = time.time()
    x = torch.tensor([ids])
    out = model(x, labels=x)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad()
    times.append(time.time() - t0)
    toks.append(len(ids))
    print(f"step loss {out.loss.item():.4f} {len(ids) / times[-1]:.1f} tok/s", flush=True)
tps = sum(toks[1:]) / sum(times[1:])
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"PyTorch+PEFT+bitsandbytes: {tps:.1f} tok/s (steps 2..{len(seqs)}), peak RSS {rss:.0f} MB")
