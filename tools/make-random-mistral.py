#!/usr/bin/env python3
"""A Mistral-7B-shaped model directory with random weights and a word-level tokenizer, for
`tools/serve-load-test.py` on a GPU machine (which has torch and transformers but no network).

The weights are the architecture and initialisation `../shared/peers/h200_peer.py` uses
(MistralConfig at 7B size, seed 0, bf16, built on the GPU); the tokenizer is word-level over
w3 … w31999 with <unk>=0, <s>=1, </s>=2 and a ChatML-like template, as the tests'
`tiny_with_tokenizer` writes for its tiny model.

    python3 tools/make-random-mistral.py OUT_DIR [--layers 32]
"""
import argparse
import json
import os

import torch
from transformers import MistralConfig, MistralForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--layers", type=int, default=32)
args = ap.parse_args()

cfg = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=32768, rope_theta=1e6, sliding_window=None,
                    bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    m = MistralForCausalLM(cfg)
torch.set_default_dtype(torch.float32)
m.save_pretrained(args.out)

special = ["<unk>", "<s>", "</s>"]
vocab = {t: i for i, t in enumerate(special)}
vocab.update({f"w{i}": i for i in range(3, cfg.vocab_size)})
tok = {
    "version": "1.0", "truncation": None, "padding": None,
    "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True} for i, t in enumerate(special)],
    "normalizer": None,
    "pre_tokenizer": {"type": "WhitespaceSplit"},
    "post_processor": {"type": "TemplateProcessing",
                       "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                  {"Sequence": {"id": "A", "type_id": 0}}],
                       "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                {"Sequence": {"id": "B", "type_id": 1}}],
                       "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
    "decoder": None,
    "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
}
with open(os.path.join(args.out, "tokenizer.json"), "w") as f:
    json.dump(tok, f)
with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>",
               "chat_template": "{% for m in messages %}w10 {{ m['role'] }} {{ m['content'] }} </s> "
                                "{% endfor %}{% if add_generation_prompt %}w10 assistant {% endif %}"}, f)
print(json.dumps({"model_dir": args.out, "layers": args.layers}))
