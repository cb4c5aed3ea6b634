"""Step-0 loss, every adapter gradient, and 10 AdamW steps of PyTorch + PEFT on the tiny llama-64
model (dense, and NF4 with double quant quantized at load by transformers + bitsandbytes), from
a saved initial adapter and fixed batches.

Run:  ~/.cache/qlora/venv/bin/python tools/reference/make_training_reference.py
Writes tests/fixtures/train/<case>/: adapter/ (the initial adapter, PEFT format), case.json
(sequences, labels, hyperparameters, the losses of the 10 steps) and expected.safetensors
(`grad.<key>` for every lora_A/lora_B at step 0, key as in adapter_model.safetensors).

Loss: Σ over the batch of token cross-entropies / number of predicted tokens (each sequence
run on its own, no padding). AdamW: torch.optim.AdamW(lr, weight_decay, default betas/eps),
clip_grad_norm_(max_norm) before each step.
"""
import json
import os
import shutil
import sys

import torch
import transformers
import peft
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_peft_adapters import base_model, randomize  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "train")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
SEQS = [
    [1, 5, 17, 3, 42, 8, 8, 23, 60, 11, 0, 33, 7, 19, 50, 2, 44, 12, 9, 31],
    [1, 99, 4, 4, 70, 120, 3, 15, 88, 27, 64, 2, 101],
]
# Positions whose next token is not trained (the prompt of a prompt/completion example).
IGNORED = [[], [0, 1, 2, 3, 4]]
HP = dict(lr=1e-2, weight_decay=0.01, max_grad_norm=1.0, steps=10, r=4, lora_alpha=8)


def labels_for(seq, ignored):
    # labels[i] = the token predicted at position i (seq[i+1]), or -100.
    return [(-100 if (i in ignored or i + 1 >= len(seq)) else seq[i + 1]) for i in range(len(seq))]


def batch_loss(model):
    total, n = 0.0, 0
    for seq, ign in zip(SEQS, IGNORED):
        logits = model(torch.tensor([seq])).logits[0].float()
        lab = torch.tensor(labels_for(seq, ign))
        total = total + torch.nn.functional.cross_entropy(logits, lab, ignore_index=-100, reduction="sum")
        n += int((lab != -100).sum())
    return total / n


def write_case(d, base, dora, meta):
    """Puts a seeded adapter on `base`, then writes d/{adapter/, case.json, expected.safetensors}:
    the step-0 loss and gradients and 10 AdamW steps' losses. `meta` is merged into case.json."""
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    targets = [t for t in TARGETS if not (dora and t == "lm_head")]
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", target_modules=targets, r=HP["r"],
                                            lora_alpha=HP["lora_alpha"], lora_dropout=0.0,
                                            init_lora_weights=False, use_dora=dora))
    randomize(model, 77)
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(os.path.join(d, "adapter"))
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = batch_loss(model)
    loss.backward()
    grads = {}
    for n, p in params.items():
        key = n.replace(".default", "")
        grads["grad." + key] = p.grad.detach().float().contiguous().clone()
    loss0 = loss.item()
    model.zero_grad()
    opt = torch.optim.AdamW(list(params.values()), lr=HP["lr"], weight_decay=HP["weight_decay"])
    losses, norms = [], []
    for _ in range(HP["steps"]):
        opt.zero_grad()
        loss = batch_loss(model)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), HP["max_grad_norm"])))
        opt.step()
        losses.append(loss.item())
    meta = {"base": "llama-64", "quantize": None, **meta, "sequences": SEQS, "ignored": IGNORED, "hp": HP,
            "loss0": loss0, "losses": losses, "grad_norms": norms, "versions": versions,
            "command": "python tools/reference/make_training_reference.py"}
    json.dump(meta, open(os.path.join(d, "case.json"), "w"), indent=1)
    save_file(grads, os.path.join(d, "expected.safetensors"))
    print(os.path.basename(d), "loss0", loss0, "losses", [round(x, 5) for x in losses], "grads", len(grads))


def main():
    torch.manual_seed(0)
    for case, quant, dora in [("dense", None, False), ("nf4-dq", "nf4-dq", False), ("dense-dora", None, True),
                              ("nf4-dq-dora", "nf4-dq", True)]:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            base, _ = base_model("llama-64", quant, tmp)
            write_case(os.path.join(ROOT, case), base, dora, {"quantize": quant})


if __name__ == "__main__":
    main()
