"""Reference logits and losses for tiny seeded Llama/Mistral models, from transformers (fp32, CPU).

Run:  ~/.cache/qlora/venv/bin/python tools/reference/make_tiny_models.py
Writes tests/fixtures/tiny/<name>/{spec.json,expected.safetensors}; the Rust tests rebuild the
weights from spec.json with the same formula (weights.py) and compare. One model is also saved
with transformers' own save_pretrained (sharded, bf16) to test reading files transformers wrote.
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from weights import tensor  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "tiny")

BASE = dict(rms_norm_eps=1e-5, max_position_embeddings=64, hidden_act="silu", bos_token_id=1, eos_token_id=2)

MODELS = [
    # name, class, config, stored dtype, sharded
    ("llama-gqa", "llama", dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False,
                                 rope_theta=10000.0), "f32", False),
    ("llama-mqa-headdim-tied", "llama", dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                              vocab_size=97, tie_word_embeddings=True, rope_theta=10000.0),
     "f32", False),
    ("mistral-window", "mistral", dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                       num_attention_heads=6, num_key_value_heads=2, head_dim=8, vocab_size=101,
                                       sliding_window=5, tie_word_embeddings=False, rope_theta=10000.0),
     "bf16", True),
    ("llama3-rope-bias", "llama", dict(hidden_size=32, intermediate_size=56, num_hidden_layers=3,
                                       num_attention_heads=2, num_key_value_heads=2, head_dim=16, vocab_size=90,
                                       tie_word_embeddings=False, rope_theta=500000.0, attention_bias=True,
                                       rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                         high_freq_factor=4.0,
                                                         original_max_position_embeddings=32)),
     "f16", False),
    ("llama-linear-rope", "llama", dict(hidden_size=36, intermediate_size=50, num_hidden_layers=2,
                                        num_attention_heads=3, num_key_value_heads=1, vocab_size=64,
                                        tie_word_embeddings=True, rope_theta=1000.0,
                                        rope_scaling=dict(rope_type="linear", factor=2.0)), "f32", False),
    # Every linear dimension a multiple of 64: the shapes of real models, for 4-bit bases (PEFT on
    # bitsandbytes layers) without blocks crossing rows.
    ("llama-64", "llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=32, vocab_size=128, tie_word_embeddings=False,
                               rope_theta=10000.0), "bf16", False),
]

LEGACY_ROPE_KEYS = {"llama-gqa", "llama-linear-rope"}

TOKENS = [1, 5, 17, 3, 42, 8, 8, 23, 60, 11, 0, 33, 7, 19, 50, 2, 44, 12, 9, 31]

TORCH = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def build(kind, cfg, dtype):
    cls_cfg, cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (MistralConfig, MistralForCausalLM)
    config = cls_cfg(**BASE, **cfg)
    config._attn_implementation = "eager"
    model = cls(config).eval()
    sd = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        v = torch.from_numpy(tensor(name, tuple(p.shape)))
        # The stored dtype rounds the weights; the reference computes with the rounded values.
        sd[name] = v.to(TORCH[dtype]).to(torch.float32)
    model.load_state_dict(sd, strict=not config.tie_word_embeddings)
    if config.tie_word_embeddings:
        model.tie_weights()
    return config, model


def main():
    torch.manual_seed(0)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__}
    for name, kind, cfg, dtype, sharded in MODELS:
        config, model = build(kind, cfg, dtype)
        ids = torch.tensor([[t % cfg["vocab_size"] for t in TOKENS]])
        with torch.no_grad():
            out = model(ids, labels=ids)
        d = os.path.join(ROOT, name)
        os.makedirs(d, exist_ok=True)
        conf = config.to_dict()
        keep = {k: conf[k] for k in ["architectures", "model_type", *BASE.keys(), *cfg.keys()] if k in conf}
        keep["architectures"] = ["LlamaForCausalLM" if kind == "llama" else "MistralForCausalLM"]
        keep["model_type"] = kind
        keep.pop("rope_theta", None)
        keep.pop("rope_scaling", None)
        rope = dict(conf["rope_parameters"])
        if name in LEGACY_ROPE_KEYS:
            # Written the transformers 4.x way: top-level rope_theta and rope_scaling.
            keep["rope_theta"] = rope.pop("rope_theta")
            if rope.get("rope_type", "default") != "default":
                keep["rope_scaling"] = rope
        else:
            keep["rope_parameters"] = rope
        spec = {"config": keep, "dtype": dtype, "sharded": sharded, "tokens": ids[0].tolist(),
                "loss": out.loss.item(), "versions": versions,
                "command": "python tools/reference/make_tiny_models.py"}
        with open(os.path.join(d, "spec.json"), "w") as f:
            json.dump(spec, f, indent=1, sort_keys=True)
        save_file({"logits": out.logits[0].contiguous()}, os.path.join(d, "expected.safetensors"),
                  metadata={"versions": json.dumps(versions)})
        print(name, "loss", out.loss.item())

    # A directory written by transformers itself: sharded bf16 safetensors + index.
    config, model = build("mistral", MODELS[2][2], "bf16")
    d = os.path.join(ROOT, "hf-saved-mistral-bf16")
    shutil.rmtree(d, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(d, max_shard_size="20KB")
    print("saved", sorted(os.listdir(d)))


if __name__ == "__main__":
    main()
