# fastpred: `make test` and `make run` set themselves up on a fresh machine.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
# Re-install when the packaging or the compiled sources change.
STAMP   := .venv/.fastpred-installed
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h)
# Facts of this machine's CUDA 13 toolkit (see README "Building the extension").
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 9.0

.PHONY: test run bench gpu-check figures clean

$(PY):
	python3 -m venv .venv

$(STAMP): $(PY) $(SOURCES)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q 'setuptools>=77' wheel pybind11 ninja  # --no-build-isolation ignores pyproject's
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

# The built-in default end to end: BYOL + DirectPred on scikit-learn's digits (CPU, minutes).
run: $(STAMP)
	$(PY) -m train.pretrain --out runs/digits
	$(PY) -m train.linear_eval --ckpt runs/digits/last.pt --random-init-baseline
	@echo "plots: runs/digits/diagnostics.png   metrics: runs/digits/metrics.jsonl   (rm -rf runs/digits to start over)"

# CPU benchmark report: bench/report.md, bench/report.json, bench/*.png (about 2 minutes on 2 cores).
bench: $(STAMP)
	$(PY) -m bench.report --out bench

# The theory figures (PNG) into docs/figures/, where the README shows them (20-40 s).
figures: $(STAMP)
	$(PY) -m fastpred.theory.figures --out docs/figures

# On a machine with an NVIDIA GPU: build fastpred._C in place, then the GPU tests and
# benchmarks, into gpu-report/ (report.md, report.json, logs), in under 8 minutes.
#   make gpu-check PYTHON=python3            that interpreter and its torch; no venv, no install
#                                            (the fake-CUDA tier runs first, in seconds; it stops the check if it fails)
#   make gpu-check PYTHON=python3 DRY_RUN=1  the same steps without a GPU (build, test collection, report)
# Without PYTHON= it uses the project venv (set up as for `make test`).
PYTHON ?= $(PY)
GPU_CHECK_DEPS := $(if $(filter command line environment,$(origin PYTHON)),,$(STAMP))
gpu-check: $(GPU_CHECK_DEPS)
	$(PYTHON) -m bench.gpu_check --build --out gpu-report $(if $(DRY_RUN),--dry-run)

clean:
	rm -rf build *.egg-info fastpred/*.so $(STAMP)

# Fashion-MNIST (the fashion_mnist preset, the study): Debian's package dataset-fashion-mnist,
# installed when missing and apt-get is usable; otherwise how to get the files.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
.PHONY: data
data:
	@if [ -f $(FASHION_MNIST)/t10k-labels-idx1-ubyte.gz ]; then \
		echo "data: Fashion-MNIST is in $(FASHION_MNIST)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y dataset-fashion-mnist || { apt-get update && apt-get install -y dataset-fashion-mnist; }; \
	else \
		echo "data: $(FASHION_MNIST) is missing and apt-get cannot be used here (needs root)."; \
		echo "  Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist"; \
		echo "  elsewhere: put {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] in a folder and run with"; \
		echo "  data.root=<folder> (torchvision's FashionMNIST(root, download=True) layout root/FashionMNIST/raw/ works too)"; \
		exit 1; \
	fi
