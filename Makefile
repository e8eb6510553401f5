# Everything a newcomer needs: `make demo` and `make test` install what they use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup reference test test-slow test-arm64 fuzz demo bench results parity speculative tune-bench lint clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml tools/install-llama-cpp.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	PYTHON=$(BIN)/python tools/install-llama-cpp.sh
	$(BIN)/python -m pip install -q -e '.[gguf,onnx,serve,dev,mlx]'
	touch $@

# What the tests compare against (Hugging Face transformers, onnxruntime-genai's builder). Optional:
# those tests skip without it. torch is pinned to the CPU build (TORCH=... to change).
TORCH ?= torch==2.13.0
reference: $(VENV)/.reference-done

$(VENV)/.reference-done: $(VENV)/.setup-done
	$(BIN)/python -m pip install -q '$(TORCH)'
	$(BIN)/python -m pip install -q -e '.[gguf,onnx,serve,dev,mlx,reference]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q

# The fuzz suite with many more examples than make test runs, and the hostile inputs found by hand.
fuzz: setup
	EDGEQWEN_FUZZ_EXAMPLES=5000 $(BIN)/python -m pytest -q tests/test_hardening.py tests/test_serve_hostile.py \
	  tests/test_mlx.py tests/test_survey.py -k "fuzzed or hostile"

# The arm64-marked tests in an emulated Raspberry Pi 5 (qemu-user, Cortex-A76); root, Debian's qemu-user-static,
# debootstrap and gcc-aarch64-linux-gnu. Cached under ~/.cache/edgeqwen/arm64. EDGEQWEN_ARM64_TABLE=bench/ARM64.md
# also writes the x86-vs-arm64 agreement table there.
test-arm64: setup
	bash tools/test-arm64.sh

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# The main job on an embedded default, offline: a synthetic 0.5B build, a short generation and
# a benchmark row. Synthetic weights speak gibberish; the speed and memory are real.
DEMO_OUT ?= demo-results.jsonl
demo: setup
	$(BIN)/edgeqwen build 0.5b q4 --synthetic
	$(BIN)/edgeqwen run qwen2-0.5b-q4_k_m-synthetic "Hello! Who are you?" -n 32 -t 0 -v
	$(BIN)/edgeqwen bench qwen2-0.5b-q4_k_m-synthetic --repeats 1 --prompt-tokens 128 --gen-tokens 32 --out $(DEMO_OUT)
	$(BIN)/edgeqwen plan 0.5b q4 --device raspberry-pi-5-8gb

# Measures this machine (conversion, then the results matrix) and regenerates bench/RESULTS.md.
bench: setup
	$(BIN)/python -m bench.convert_bench
	bench/run_matrix.sh

# Runner speed against llama-bench (built from the same sources) and a plain genai loop -> bench/PARITY.md.
PARITY_BUILDS ?= qwen2-0.5b-real-q4_0 qwen2-0.5b-real-q8_0 qwen2-0.5b-real-q4_k_m qwen2-1.5b-q4_k_m-synthetic qwen2-0.5b-real-int4
parity: setup
	$(BIN)/python -m bench.parity $(PARITY_BUILDS)

# Speculative decoding against the target alone and llama-speculative-simple -> bench/SPECULATIVE.md. The real
# 1.5B target and 0.5B drafts come from ../shared/models/make_real.py; the worst case pairs synthetic weights.
SPEC_TARGETS ?= qwen2-1.5b-real-q8_0 qwen2-1.5b-real-q4_k_m
SPEC_DRAFTS ?= qwen2-0.5b-real-q4_0 qwen2-0.5b-real-q8_0 lookup
SPEC_WORST ?= qwen2-7b-q4_k_m-synthetic=qwen2-0.5b-q4_0-synthetic
speculative: setup
	real=$$($(BIN)/python ../shared/models/make_real.py 1.5b | tail -n1) && for q in q8_0 q4_k_m; do \
	  $(BIN)/edgeqwen build 1.5b $$q --source "$$real" --name qwen2-1.5b-real-$$q; done
	real=$$($(BIN)/python ../shared/models/make_real.py 0.5b | tail -n1) && for q in q4_0 q8_0; do \
	  $(BIN)/edgeqwen build 0.5b $$q --source "$$real" --name qwen2-0.5b-real-$$q; done
	$(BIN)/edgeqwen build 7b q4_k_m --synthetic --tokenizer ../shared/fixtures/qwen2-tokenizer
	$(BIN)/edgeqwen build 0.5b q4_0 --synthetic --tokenizer ../shared/fixtures/qwen2-tokenizer
	$(BIN)/python -m bench.speculative $(foreach t,$(SPEC_TARGETS),--target $(t)) \
	  $(foreach d,$(SPEC_DRAFTS),--draft $(d)) $(foreach w,$(SPEC_WORST),--worst $(w))

# `edgeqwen tune`'s winner against llama.cpp's defaults at tg128@d4096 and decode beside a busy process -> bench/TUNE.md.
TUNE_BUILDS ?= qwen2-0.5b-real-q4_k_m qwen2-1.5b-real-q8_0
tune-bench: setup
	real=$$($(BIN)/python ../shared/models/make_real.py 0.5b | tail -n1) && \
	  $(BIN)/edgeqwen build 0.5b q4_k_m --source "$$real" --name qwen2-0.5b-real-q4_k_m
	real=$$($(BIN)/python ../shared/models/make_real.py 1.5b | tail -n1) && \
	  $(BIN)/edgeqwen build 1.5b q8_0 --source "$$real" --name qwen2-1.5b-real-q8_0
	$(BIN)/python -m bench.tune $(foreach b,$(TUNE_BUILDS),--build $(b) --kv-eval $(b))

# Only regenerate bench/RESULTS.md and bench/results.png from the committed rows.
results: setup
	$(BIN)/python -m bench.make_results

lint: setup
	$(BIN)/ruff check edgeqwen tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
