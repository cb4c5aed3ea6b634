"""GPTQ and AWQ checkpoints of the tiny seeded models, written by GPTQModel on CPU, with the
library's own dequantized weights and reference logits (with and without a PEFT adapter).

Run:  GPTQMODEL_CPU_WORKERS=2 ~/peers/venv-torch/bin/python tools/reference/make_gptq_awq_models.py [CASE...]
Writes tests/fixtures/gptq/<case>/: the checkpoint as GPTQModel's `save` wrote it (config.json
with its quantization_config, model.safetensors, tokenizer), case.json (the tiny model, the
QuantizeConfig, versions) and expected.safetensors:
  deq.<module>     f32 [out, in]: the weight the library computes with, from its own code
                   (GPTQ: TorchQuantLinear.dequantize_weight after GPTQModel.load; AWQ:
                   packing_utils.dequantize_gemm), in f32 so that no fp16 rounding is added;
  logits           f32 [tokens, vocab]: transformers (eager, fp32) with those weights;
  logits_adapter   the same with the case's PEFT LoRA adapter (adapter/), if it has one.
Also writes tests/fixtures/train/gptq-<case>/ for the training case: the step-0 loss and every
adapter gradient of PyTorch + PEFT on the dequantized base, as make_training_reference.py does.
"""
import json
import os
import random
import shutil
import sys
import tempfile

import torch
import transformers
import peft
import gptqmodel
from gptqmodel import GPTQModel, QuantizeConfig, BACKEND
from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(__file__))
from make_tiny_models import MODELS, TOKENS, build  # noqa: E402
from make_peft_adapters import randomize  # noqa: E402
import make_training_reference as tr  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures")
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

CASES = [
    # case, tiny model, QuantizeConfig kwargs, adapter?, training case?
    ("gptq-llama64-g32-descact-asym", "llama-64",
     dict(bits=4, group_size=32, desc_act=True, sym=False), True, True),
    ("gptq-gqa-g16-sym", "llama-gqa", dict(bits=4, group_size=16, desc_act=False, sym=True), False, False),
    ("gptq-gqa-8bit-nogroup-descact", "llama-gqa", dict(bits=8, group_size=-1, desc_act=True, sym=False),
     False, False),
    ("gptq-llama3-bias-g16-v2", "llama3-rope-bias",
     dict(bits=4, group_size=16, desc_act=False, sym=False, format="gptq_v2"), False, False),
    # A quantized lm_head, and GPTQModel's per-module `dynamic` overrides: one down_proj left
    # dense ("-:"), the gate projections at 8 bits with another group size.
    ("gptq-llama64-lmhead-dynamic", "llama-64",
     dict(bits=4, group_size=32, desc_act=False, sym=False, lm_head=True,
          dynamic={r"-:model\.layers\.1\.mlp\.down_proj": {}, r".*gate_proj": {"bits": 8, "group_size": 64}}),
     True, False),
    ("awq-llama64-g32", "llama-64", dict(bits=4, group_size=32, quant_method="awq", format="gemm"), True, False),
    # AWQ's clip search needs output dims that are multiples of 64: the llama-64 shapes only.
    ("awq-llama64-g64-zeropoint", "llama-64",
     dict(bits=4, group_size=64, quant_method="awq", format="gemm", sym=False), False, False),
]


def word_tokenizer(vocab, path):
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t1", eos_token="t2", unk_token="t0",
                            pad_token="t0").save_pretrained(path)


def dequantized(qdir, qcfg, n_layers):
    """module name -> f32 [out, in], by the library's own code."""
    out = {}
    if qcfg.get("quant_method") == "awq":
        sd = load_file(os.path.join(qdir, "model.safetensors"))
        for i in range(n_layers):
            for lin in LINEARS:
                p = f"model.layers.{i}.{lin}"
                w = dequantize_gemm(sd[p + ".qweight"], sd[p + ".qzeros"], sd[p + ".scales"].float(),
                                    qcfg["bits"], qcfg["group_size"])
                out[p] = w.T.contiguous().float()
        return out
    # Loaded in the scales' stored type (fp16): GPTQModel's default, the config's bf16, would
    # round every scale on the way in.
    m = GPTQModel.load(qdir, device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16)
    for name, mod in m.model.named_modules():
        if hasattr(mod, "qweight") and hasattr(mod, "dequantize_weight"):
            mod.scales = mod.scales.float()
            out[name] = mod.dequantize_weight().T.contiguous().float()
    return out


def dense_from(qdir, deq):
    """A transformers fp32 model with the checkpoint's dense tensors and the dequantized linears."""
    cfg = AutoConfig.from_pretrained(qdir)
    del cfg.quantization_config
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    sd = load_file(os.path.join(qdir, "model.safetensors"))
    state = {}
    for k, v in sd.items():
        if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
            continue
        state[k] = v.float()
    for p, w in deq.items():
        state[p + ".weight"] = w
    if "lm_head.weight" in state and cfg.tie_word_embeddings:
        del state["lm_head.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


def main():
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "gptqmodel": gptqmodel.__version__}
    models_by_name = {m[0]: m for m in MODELS}
    only = sys.argv[1:]  # case names to (re)write; all when none are given
    for case, tiny, qkw, with_adapter, train_case in CASES:
        if only and case not in only:
            continue
        _, kind, cfg, _, _ = models_by_name[tiny]
        d = os.path.join(ROOT, "gptq", case)
        shutil.rmtree(d, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            _, dense = build(kind, cfg, "f32")
            dense.save_pretrained(os.path.join(tmp, "dense"))
            word_tokenizer(cfg["vocab_size"], os.path.join(tmp, "dense"))
            q = GPTQModel.load(os.path.join(tmp, "dense"), QuantizeConfig(**qkw), device="cpu")
            rng = random.Random(0)
            cal = [{"input_ids": torch.tensor([[rng.randrange(cfg["vocab_size"]) for _ in range(32)]]),
                    "attention_mask": torch.ones(1, 32, dtype=torch.long)} for _ in range(16)]
            q.quantize(cal)
            q.save(d)
            del q
        for junk in ["quant_log.csv"]:
            if os.path.exists(os.path.join(d, junk)):
                os.remove(os.path.join(d, junk))
        qcfg = json.load(open(os.path.join(d, "config.json")))["quantization_config"]
        n_layers = cfg["num_hidden_layers"]
        deq = dequantized(d, qcfg, n_layers)
        model = dense_from(d, deq)
        ids = torch.tensor([[t % cfg["vocab_size"] for t in TOKENS]])
        expected = {"deq." + k: v for k, v in deq.items()}
        with torch.no_grad():
            expected["logits"] = model(ids).logits[0].float().contiguous()
        if with_adapter:
            pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                  target_modules="all-linear", init_lora_weights=False))
            randomize(pm, 13)
            pm.eval()
            with torch.no_grad():
                expected["logits_adapter"] = pm(ids).logits[0].float().contiguous()
            pm.save_pretrained(os.path.join(d, "adapter"))
            model = pm.unload()
        save_file(expected, os.path.join(d, "expected.safetensors"))
        json.dump({"tiny": tiny, "quantize_config": qkw, "tokens": TOKENS, "versions": versions,
                   "command": "python tools/reference/make_gptq_awq_models.py"},
                  open(os.path.join(d, "case.json"), "w"), indent=1)
        print(case, "written:", len(deq), "linears")
        if train_case:
            torch.manual_seed(0)
            tr.write_case(os.path.join(ROOT, "train", case), model, dora=False,
                          meta={"base_dir": f"tests/fixtures/gptq/{case}"})


if __name__ == "__main__":
    main()
