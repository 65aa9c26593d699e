# instructsam: set-up, demo and tests on a fresh Linux x86_64 machine with Python 3.11.
#
#   make demo   the perception node on procedural sample frames, embedded tiny model
#   make test   the whole test suite (core, evaluation, ROS 2 node over real DDS)
#
# Everything lands in .venv (the ROS 2 Kilted wheels included: the venv is the ROS
# underlay) and install/ (this package built by CMake, as colcon does on a robot).

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build that pip finds on the CI machines; on a GPU box choose your CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup setup-core setup-ros demo test test-core segment clean

setup: setup-ros

setup-core: $(VENV)/.core-stamp

$(VENV)/.core-stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip
	$(PY) -m pip install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test,training,eval,export]"
	touch $@

# The ros2 CLI and launch system have no wheels; on a robot apt provides them. Test
# machines install them from ../shared/ros2_cli when it is there (CI has it beside the
# checkout); they are never part of this repository.
ROS2_CLI ?= ../shared/ros2_cli

setup-ros: setup-core
	scripts/install_ros.sh $(VENV)
	scripts/build_ros.sh $(VENV) install
	@if [ -x "$(ROS2_CLI)/install.sh" ]; then "$(ROS2_CLI)/install.sh" $(VENV); \
	else echo "setup-ros: no $(ROS2_CLI)/install.sh: the ros2 CLI and launch tests will skip"; fi

demo: setup-ros
	. scripts/ros_env.sh && $(PY) -m instructsam_ros.demo

# --durations: the slowest tests are printed, so a slow one shows up where it lands.
test: setup-ros
	. scripts/ros_env.sh && $(PY) -m pytest tests -q -p no:cacheprovider -rs --durations=15

# Core only (no ROS): what a training cluster or GPU server needs.
test-core: setup-core
	$(PY) -m pytest tests/core tests/training -q -p no:cacheprovider -rs --durations=15

segment: setup-core
	$(VENV)/bin/instructsam segment --instruction "the red mug" --out out/overlay.png

clean:
	rm -rf build install log out
