"""4-bit and 8-bit checkpoints of the tiny seeded models, written by transformers + bitsandbytes
(CPU), with reference logits.

Run:  ~/.cache/qlora/venv/bin/python tools/reference/make_bnb_models.py
Writes tests/fixtures/bnb/<case>/: the checkpoint exactly as `save_pretrained` wrote it, plus
case.json (the tiny model it came from, the BitsAndBytesConfig, the token ids) and
expected.safetensors (`logits` of the quantized model computed in fp32 on CPU).

The dense tiny models are rebuilt from tests/fixtures/tiny/<name>/spec.json by weights.py; the
Rust tests rebuild the same dense model, quantize it (`--quantize` or `qlora quantize`) and
compare bytes and logits with these.
"""
import json
import os
import shutil
import sys
import tempfile

import torch
import transformers
import bitsandbytes
import bitsandbytes.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

sys.path.insert(0, os.path.dirname(__file__))
from make_tiny_models import MODELS, TORCH, TOKENS, build  # noqa: E402

# The reference logits are those of the model with each quantized linear replaced by its
# dequantized weight, computed from bitsandbytes' own stored state with bitsandbytes' default
# (flat-index, fp32) dequantization, which is also what CUDA computes. bitsandbytes 0.50.2's
# CPU forward on an AVX-512 machine differs: its dequantize_4bit kernel indexes blocks per row
# (wrong when blocks cross rows, e.g. 48-wide rows with blocksize 64), and single-token inference
# runs in bf16. The script prints how far transformers' own CPU forward lands from the reference.
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402


def dequantized_weight(module):
    qs = module.weight.quant_state
    absmax = qs.absmax
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    packed = module.weight.data.view(torch.uint8).reshape(-1)
    return _dequantize_4bit_compute(packed, absmax.float(), qs.code, qs.blocksize, qs.shape, torch.float32)


ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "bnb")

CASES = [
    # case name, tiny model, bnb config kwargs, save_pretrained kwargs
    ("llama-gqa-nf4-dq", "llama-gqa", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True), {}),
    ("mistral-window-nf4-dq-bf16storage", "mistral-window",
     dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
          bnb_4bit_quant_storage=torch.bfloat16), dict(max_shard_size="20KB")),
    ("mqa-tied-fp4", "llama-mqa-headdim-tied", dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"), {}),
    ("llama3-bias-f16-fp4-dq", "llama3-rope-bias", dict(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                                        bnb_4bit_use_double_quant=True), {}),
    ("llama-gqa-int8", "llama-gqa", dict(load_in_8bit=True), {}),
]


def main():
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "bitsandbytes": bitsandbytes.__version__}
    models = {m[0]: m for m in MODELS}
    for case, tiny, bnb_kwargs, save_kwargs in CASES:
        name, kind, cfg, dtype, _ = models[tiny]
        config, dense = build(kind, cfg, dtype)
        ids = torch.tensor([[t % cfg["vocab_size"] for t in TOKENS]])
        with tempfile.TemporaryDirectory() as tmp:
            dense.to(TORCH[dtype]).save_pretrained(tmp)
            # Logits: fp32 compute. Saving: the model's own dtype (what the JSON records).
            q32 = AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.float32, device_map="cpu",
                quantization_config=BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.float32, **bnb_kwargs))
            qsave = AutoModelForCausalLM.from_pretrained(
                tmp, dtype=TORCH[dtype], device_map="cpu",
                quantization_config=BitsAndBytesConfig(bnb_4bit_compute_dtype=TORCH[dtype], **bnb_kwargs))
        for m in q32.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        # LLM.int8's forward quantizes activations too; qlora computes with the dequantized
        # weights (CB · SCB / 127), so its reference is also the dense model with those weights.
        sd = {}
        for n, m in q32.named_modules():
            if type(m).__name__ == "Linear8bitLt":
                sd[n + ".weight"] = F.int8_vectorwise_dequant(m.weight.CB, m.weight.SCB)
            elif type(m).__name__ == "Linear4bit":
                sd[n + ".weight"] = dequantized_weight(m)
        _, ref = build(kind, cfg, dtype)
        ref.load_state_dict(sd, strict=False)
        with torch.no_grad():
            logits = ref(ids).logits[0].float().contiguous()
            theirs = q32(ids).logits[0].float()
        print(f"{case}: transformers' own CPU forward differs from the reference by "
              f"{(theirs - logits).abs().max().item():.3g}")
        d = os.path.join(ROOT, case)
        shutil.rmtree(d, ignore_errors=True)
        qsave.save_pretrained(d, **save_kwargs)
        kinds = sorted({type(m).__name__ for m in qsave.modules() if "Linear" in type(m).__name__})
        meta = {"tiny": tiny, "bnb": {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
                                      for k, v in bnb_kwargs.items()},
                "tokens": ids[0].tolist(), "versions": versions, "linear_classes": kinds,
                "torch_threads": torch.get_num_threads(),
                "command": "python tools/reference/make_bnb_models.py"}
        with open(os.path.join(d, "case.json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        save_file({"logits": logits}, os.path.join(d, "expected.safetensors"))
        print(case, kinds, sorted(os.listdir(d)))


if __name__ == "__main__":
    main()
