# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done
SAMPLE := build/sample_drive

.PHONY: setup test lint pytest demo sample bench soak fuzz gpu-check clean

setup: $(STAMP)

# Re-runs only when a requirements file or the package metadata changes (idempotent, ~1 s).
$(STAMP): setup.py setup.cfg package.xml requirements-torch.txt requirements-ros.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -r requirements-torch.txt
	$(BIN)/python -m pip install -q -r requirements-ros.txt -r requirements-dev.txt
	$(BIN)/python -m pip install -q -e '.[clip,export,pointclip,report,train]'
	touch $@

# mypy reads its settings from setup.cfg [mypy]; clip2scene_ros.training comes in through the
# clip2scene_ros/training link to training/.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy -p clip2scene_ros

pytest: setup
	$(BIN)/python -m pytest

test: lint pytest

sample: setup
	$(BIN)/clip2scene sample --out $(SAMPLE) --frames 60 --seed 0

# Sample drives -> simulated teacher -> annotation-free distillation -> export -> evaluation
# -> the node on a replay of the held-out drive.
demo: setup
	$(BIN)/clip2scene demo --out demo-report --work build/demo

bench: setup
	$(BIN)/clip2scene bench codecs --json build/bench_codecs.json

# The node process on the sample drive looped for SOAK_FRAMES frames: RSS, latency, drops over
# time -> build/soak/soak.json + soak.png (random weights; ~21 min on 2 idle cores).
SOAK_FRAMES ?= 10000
soak: setup
	$(BIN)/clip2scene soak --frames $(SOAK_FRAMES) --out build/soak

# Malformed sensor messages through the codecs and the node: FUZZ_CASES per message type ->
# fuzz-report.json (per type cases, crashes, hangs, rejected); fails on any crash, hang or
# oversized allocation (~14 min on 2 busy cores at the default).
FUZZ_CASES ?= 10000
fuzz: setup
	$(BIN)/clip2scene fuzz --cases $(FUZZ_CASES) --json fuzz-report.json

# The GPU path in one command on a machine with an NVIDIA GPU: the GPU-marked tests, `clip2scene
# bench predictor` and end-to-end latency on the nuScenes keyframe and a 3-sweep input, fp32 and
# fp16, torch and TensorRT (when it imports) -> $(GPU_CHECK_OUT)/summary.json. Needs only torch,
# numpy, onnx, onnxruntime, safetensors, pyyaml, pytest and hypothesis (no setup, no network);
# rosbags and Pillow (to read the bag) come from wheels/ when missing (see
# clip2scene_ros/tools/gpu_check.py).
# DEVICE=cpu is the quick dry run (under a minute on 2 cores).
DEVICE ?= cuda
GPU_CHECK_OUT ?= build/gpu-check
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) -m clip2scene_ros.tools.gpu_check --device $(DEVICE) --out $(GPU_CHECK_OUT)

clean:
	rm -rf build .pytest_cache
