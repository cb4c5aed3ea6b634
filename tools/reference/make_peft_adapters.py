"""PEFT adapters on the tiny seeded models, with PEFT's own logits (fp32, CPU, eval mode).

Run:  ~/.cache/qlora/venv/bin/python tools/reference/make_peft_adapters.py
Writes tests/fixtures/peft/<case>/: the adapter directory exactly as PEFT's save_pretrained wrote
it (`adapter/`, or several under it), case.json (base model, its quantization, which adapters to
apply, the token ids) and expected.safetensors (`logits`). Adapter weights are random (seeded), so
every delta is visible in the logits; DoRA magnitudes are perturbed away from their init.

Bases: the dense tiny models (tests/fixtures/tiny/<name>, rebuilt in Rust by the same formula) and
llama-64 quantized at load by transformers + bitsandbytes (NF4, with and without double quant),
which `qlora --quantize` reproduces bit for bit.
"""
import json
import os
import shutil
import sys
import tempfile

import torch
import transformers
import peft
import bitsandbytes
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

sys.path.insert(0, os.path.dirname(__file__))
from make_tiny_models import MODELS, TORCH, TOKENS, build  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "peft")
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# case, tiny base, base quantization (None | "nf4" | "nf4-dq"), [(adapter name, LoraConfig kwargs)], save options
CASES = [
    ("basic-qv", "llama-gqa", None, [("default", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8))], {}),
    ("rslora-patterns", "llama-64", None,
     [("default", dict(target_modules=ALL7, r=8, lora_alpha=16, use_rslora=True,
                       rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 4}, alpha_pattern={"v_proj": 3}))], {}),
    ("regex-target", "llama-64", None,
     [("default", dict(target_modules=r".*\.layers\.1\.mlp\.(gate|up)_proj", r=4, lora_alpha=4))], {}),
    ("all-linear", "llama-64", None, [("default", dict(target_modules="all-linear", r=4, lora_alpha=8))], {}),
    ("layers-to-transform", "llama-64", None,
     [("default", dict(target_modules=["q_proj", "k_proj", "o_proj"], layers_to_transform=[1], layers_pattern="layers",
                       r=4, lora_alpha=8))], {}),
    ("exclude-modules", "llama-64", None,
     [("default", dict(target_modules=["q_proj", "v_proj", "down_proj"], exclude_modules=["model.layers.0.mlp.down_proj"],
                       r=4, lora_alpha=8))], {}),
    ("dora", "llama-64", None, [("default", dict(target_modules=ALL7, r=4, lora_alpha=8, use_dora=True))], {}),
    ("embedding-lora", "llama-64", None, [("default", dict(target_modules=["embed_tokens", "q_proj"], r=4, lora_alpha=8))], {}),
    ("embedding-dora", "llama-64", None, [("default", dict(target_modules=["embed_tokens"], r=4, lora_alpha=8, use_dora=True))], {}),
    ("lm-head-target", "llama-64", None, [("default", dict(target_modules=["lm_head", "v_proj"], r=4, lora_alpha=8))], {}),
    ("modules-to-save", "llama-64", None,
     [("default", dict(target_modules=["q_proj"], modules_to_save=["lm_head"], r=4, lora_alpha=8))], {}),
    ("lora-bias", "llama3-rope-bias", None,
     [("default", dict(target_modules=["o_proj", "up_proj", "q_proj"], lora_bias=True, r=4, lora_alpha=8))], {}),
    ("brev", "llama-64", None,
     [("default", dict(target_modules=ALL7 + ["lm_head"], r=32, lora_alpha=64, lora_dropout=0.05, bias="none"))], {}),
    ("multi-adapter", "llama-64", None,
     [("default", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)),
      ("second", dict(target_modules=["v_proj", "down_proj"], r=2, lora_alpha=4, use_rslora=True))], {}),
    ("old-bin", "llama-gqa", None, [("default", dict(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16))],
     dict(safe_serialization=False, old_config=True)),
    ("nf4-brev", "llama-64", "nf4", [("default", dict(target_modules=ALL7 + ["lm_head"], r=16, lora_alpha=32))], {}),
    ("nf4-dq-dora", "llama-64", "nf4-dq", [("default", dict(target_modules=ALL7, r=4, lora_alpha=8, use_dora=True))], {}),
    ("nf4-dq-rslora", "llama-64", "nf4-dq",
     [("default", dict(target_modules=["q_proj", "v_proj", "up_proj"], r=8, lora_alpha=8, use_rslora=True,
                       rank_pattern={"up_proj": 2}))], {}),
]

# The fields a 2023 (PEFT ~0.6) adapter_config.json has.
OLD_FIELDS = ["alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
              "init_lora_weights", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout",
              "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern", "revision",
              "target_modules", "task_type"]


def base_model(tiny, quant, tmp):
    models = {m[0]: m for m in MODELS}
    name, kind, cfg, dtype, _ = models[tiny]
    config, dense = build(kind, cfg, dtype)
    ids = torch.tensor([[t % cfg["vocab_size"] for t in TOKENS]])
    if quant is None:
        return dense, ids
    d = os.path.join(tmp, "base")
    dense.to(TORCH[dtype]).save_pretrained(d)
    q = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=quant.endswith("-dq"),
                                               bnb_4bit_compute_dtype=torch.float32))
    for m in q.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False  # keep bitsandbytes' CPU compute in fp32
    return q.eval(), ids


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                if "magnitude" in n:
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
                elif "modules_to_save" in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))


def main():
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "bitsandbytes": bitsandbytes.__version__}
    for i, (case, tiny, quant, adapters, save) in enumerate(CASES):
        with tempfile.TemporaryDirectory() as tmp:
            base, ids = base_model(tiny, quant, tmp)
            name0, kw0 = adapters[0]
            model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kw0),
                                   adapter_name=name0)
            for name, kw in adapters[1:]:
                model.add_adapter(name, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kw))
            randomize(model, 1000 + i)
            model.base_model.set_adapter([a for a, _ in adapters])
            model.eval()
            with torch.no_grad():
                logits = model(ids).logits[0].float().contiguous()
            d = os.path.join(ROOT, case)
            shutil.rmtree(d, ignore_errors=True)
            out = os.path.join(d, "adapter")
            model.save_pretrained(out, safe_serialization=save.get("safe_serialization", True))
            if save.get("old_config"):
                p = os.path.join(out, "adapter_config.json")
                c = json.load(open(p))
                json.dump({k: c.get(k) for k in OLD_FIELDS}, open(p, "w"), indent=2, sort_keys=True)
        dirs = ["adapter" if a == "default" else f"adapter/{a}" for a, _ in adapters]
        meta = {"base": tiny, "quantize": quant, "adapters": dirs, "tokens": ids[0].tolist(), "versions": versions,
                "command": "python tools/reference/make_peft_adapters.py"}
        json.dump(meta, open(os.path.join(d, "case.json"), "w"), indent=1, sort_keys=True)
        save_file({"logits": logits}, os.path.join(d, "expected.safetensors"))
        files = sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)
        print(case, files)


if __name__ == "__main__":
    main()
