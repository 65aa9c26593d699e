# instructsam: set-up, demo and tests on a fresh Linux x86_64 machine with Python 3.11.
#
#   make demo   the perception node on procedural sample frames, embedded tiny model
#   make test   the whole test suite (core, training, the ROS 2 node over real DDS on
#               Kilted, then the node again on the Jazzy LTS)
#
# Everything lands in .venv (the ROS 2 Kilted wheels included: the venv is the ROS
# underlay) and install/ (this package built by CMake, as colcon does on a robot); the
# Jazzy set-up in .venv-jazzy and install-jazzy/.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
JAZZY_VENV ?= .venv-jazzy
JAZZY_PREFIX ?= install-jazzy
# The CPU build that pip finds on the CI machines; on a GPU box choose your CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The ros2 CLI and launch system have no wheels; on a robot apt provides them. Test
# machines install them from ../shared/ros2_cli when it is there (CI has it beside the
# checkout); they are never part of this repository.
ROS2_CLI ?= ../shared/ros2_cli
PYTEST := -m pytest -q -p no:cacheprovider -rs --durations=15

.PHONY: setup setup-core setup-ros setup-ros-jazzy demo test test-kilted test-jazzy test-core segment clean \
	train-default train-default-pilot

setup: setup-ros

setup-core: $(VENV)/.core-stamp

# One rule for both venvs: the project (editable), torch and the test extras.
%/.core-stamp: pyproject.toml
	test -x $*/bin/python || $(PYTHON) -m venv $*
	$*/bin/python -m pip install --disable-pip-version-check -q --upgrade pip
	$*/bin/python -m pip install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$*/bin/python -m pip install --disable-pip-version-check -q -e ".[test,training,eval,export]"
	touch $@

setup-ros: setup-core
	scripts/install_ros.sh $(VENV) kilted
	scripts/build_ros.sh $(VENV) install
	@if [ -x "$(ROS2_CLI)/install.sh" ]; then "$(ROS2_CLI)/install.sh" $(VENV); \
	else echo "setup-ros: no $(ROS2_CLI)/install.sh: the ros2 CLI and launch tests will skip"; fi

# Jazzy (the LTS most robots run): its own venv, the same Python 3.11 and torch.
setup-ros-jazzy: $(JAZZY_VENV)/.core-stamp
	scripts/install_ros.sh $(JAZZY_VENV) jazzy
	scripts/build_ros.sh $(JAZZY_VENV) $(JAZZY_PREFIX)
	@if [ -d "$(ROS2_CLI)/src" ]; then scripts/install_ros2_cli_jazzy.sh $(JAZZY_VENV) "$(ROS2_CLI)/src"; \
	else echo "setup-ros-jazzy: no $(ROS2_CLI)/src: the ros2 CLI and launch tests will skip"; fi

demo: setup-ros
	. scripts/ros_env.sh && $(PY) -m instructsam_ros.demo

# --durations: the slowest tests are printed, so a slow one shows up where it lands.
test: test-kilted test-jazzy
	@echo "make test: Kilted (everything) and Jazzy (tests/ros) passed"

test-kilted: setup-ros
	. scripts/ros_env.sh && $(PY) $(PYTEST) tests

test-jazzy: setup-ros-jazzy
	INSTRUCTSAM_VENV="$(CURDIR)/$(JAZZY_VENV)" INSTRUCTSAM_ROS_PREFIX="$(CURDIR)/$(JAZZY_PREFIX)" . scripts/ros_env.sh \
	  && $(JAZZY_VENV)/bin/python $(PYTEST) tests/ros

# Core only (no ROS): what a training cluster or GPU server needs.
test-core: setup-core
	$(PY) $(PYTEST) tests/core tests/training

# The shipped default model: synthetic data, both training stages, held-out evaluation,
# model card, installed into instructsam_core/default_model (resumable: run it again to go
# on). Two torch threads, as the shipped model was trained: the thread count changes the
# order of float sums, and a run from scratch amplifies that, so the card's scores
# are meant to reproduce at the same count.
train-default: setup-core
	$(PY) -m training.default_model --out runs/default_model --threads 2 --ship instructsam_core/default_model

# A short pilot of the same (about 15 minutes): its learning curves in runs/default_model/pilot/model/curves.png.
train-default-pilot: setup-core
	$(PY) -m training.default_model --out runs/default_model --threads 2 --pilot

segment: setup-core
	$(VENV)/bin/instructsam segment --instruction "the red mug" --out out/overlay.png

clean:
	rm -rf build install $(JAZZY_PREFIX) log out
