"""Distributed training on two CPU processes (gloo) under torchrun: DDP and FSDP2 give the
gradients of one process on the whole batch; `instructsam-train` runs, stops and resumes
under torchrun, DDP and FSDP2 train alike, and only the first process logs and writes.

Everything stays on this machine: where unprivileged network namespaces exist (`unshare
-rn`), torchrun runs in one that has only a loopback interface; elsewhere it is pointed at
127.0.0.1 (torch's rendezvous store listens on all interfaces and has no option to bind
one, for the seconds a test runs).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.eval.synthetic import write_roborefit_scenes

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "training" / "configs"
WORKER = Path(__file__).with_name("dist_grad_worker.py")


@lru_cache(maxsize=1)
def _loopback_namespace() -> bool:
    if not (shutil.which("unshare") and shutil.which("ip")):
        return False
    probe = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True)
    return probe.returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 ARGS` on the CPU, loopback only; fails with its output."""
    isolated = _loopback_namespace()
    port = 29500 if isolated else _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(port), *args]
    if isolated:
        command = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]
    env = {**os.environ, "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_data") / "rr"
    write_roborefit_scenes(root, n=4, size=(64, 64))
    return root


def test_ddp_and_fsdp_give_one_process_gradients_on_the_whole_batch(data, tmp_path):
    """Real model and loss code; only the random point sampling of the mask losses is
    replaced by a fixed grid, the same in both runs (see dist_grad_worker.py)."""
    spec = importlib.util.spec_from_file_location("dist_grad_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    import training.losses

    real_points = training.losses.uncertain_points
    try:
        model, tokenizer, cfg, samples = worker.setup(data)
        lengths = [len(worker.collate([s], tokenizer, model.token_ids, model.config, 32).input_ids[0]) for s in samples]
        # equal halves (token and instance counts), so the two means average to the batch's
        assert lengths[0] == lengths[1] and [len(s.phrases[0].masks) for s in samples] == [1, 1]
        losses = functools.partial(worker.forward_losses, model)
        reference = worker.gradients(model, losses, tokenizer, cfg, samples)
        model.zero_grad(set_to_none=True)
        first_only = worker.gradients(model, losses, tokenizer, cfg, samples[:1])
    finally:
        training.losses.uncertain_points = real_points
    torchrun(str(WORKER), str(data), str(tmp_path))
    assert max((first_only[n] - reference[n]).abs().max() for n in reference) > 1e-3  # halves differ: a real test
    for strategy in worker.RUNS:  # DDP and FSDP2, with and without activation checkpointing
        grads = load_file(str(tmp_path / f"{strategy}.safetensors"))
        assert grads.keys() == reference.keys(), strategy
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-6, msg=f"{strategy}: {name}")


def _entry() -> list[str]:
    """The installed `instructsam-train` (what users run under torchrun), else its module."""
    script = Path(sys.executable).with_name("instructsam-train")
    return [str(script)] if script.is_file() else ["-m", "training.train"]


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIGS / "tiny_stage1.yaml"), f"data.train=[{{kind: roborefit, path: {data}}}]",
            f"loop.out_dir={out}", "loop.max_steps=4", "loop.batch_size=1", "loop.grad_accum=2",
            "loop.checkpoint_every=2", "loop.log_every=1", "loop.progress=false", "loss.num_points=64",
            "model.lora_dropout=0.1", *extra]


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)), steps  # one line per step: one writer
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_instructsam_train_under_torchrun_stops_resumes_across_strategies_and_ddp_equals_fsdp(data, tmp_path):
    from instructsam_core.engine import Segmenter

    resumed, ddp = tmp_path / "resumed", tmp_path / "ddp"
    first = torchrun(*_entry(), *_train_args(data, resumed, "loop.stop_after=2"))  # DDP, stopped after step 2
    assert first.stdout.count("[stage1] step 1/4") == 1  # the console line, from the first process only
    assert "stopped after step 2" in first.stdout and not (resumed / "final").exists()
    torchrun(*_entry(), *_train_args(data, resumed, "loop.strategy=fsdp"))  # resumed at step 2, sharded
    torchrun(*_entry(), *_train_args(data, ddp, "loop.tensorboard=false"))  # DDP, uninterrupted

    a, b = _losses(resumed), _losses(ddp)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:  # the same data, seeds and averaged gradients: the same run
        assert a[step] == pytest.approx(b[step], rel=1e-5), step
    assert len(list((resumed / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per start, one writer
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == 4 and summary["skipped"] == {}

    # FSDP2 and DDP write one process's checkpoint layout, the full tensors and every process's state
    ckpt_a, ckpt_b = resumed / "checkpoints" / "step-000004", ddp / "checkpoints" / "step-000004"
    assert sorted(p.name for p in ckpt_a.iterdir()) == sorted(p.name for p in ckpt_b.iterdir()) == [
        "optimizer.safetensors", "rng.safetensors", "state.json", "trainable.safetensors"]
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(ckpt_a / name)), load_file(str(ckpt_b / name))
        assert all(ta[k].shape == tb[k].shape for k in tb), name
        for key in tb:
            torch.testing.assert_close(ta[key], tb[key], rtol=1e-3, atol=1e-5, msg=f"{name}: {key}")
        # FSDP2 gives the parameters no forward uses (SAM3's geometry encoder) zero gradients
        # where DDP gives none, so AdamW keeps (zero) moments for them: no update either way
        extra = set(ta) - set(tb)
        assert tb.keys() <= ta.keys() and all(not ta[k].any() for k in extra if not k.endswith(".step")), name
    meta_a, meta_b = (json.loads((c / "state.json").read_text()) for c in (ckpt_a, ckpt_b))
    assert meta_a["optimizer_param_groups"] == meta_b["optimizer_param_groups"]
    assert meta_a["world_size"] == 2 and len(meta_a["ranks"]) == 1
    # 4 samples, 2 per process and step: every step an epoch; each process at its own position
    assert meta_a["sampler"] == {"epoch": 3, "position": 4}
    assert meta_a["ranks"][0]["sampler"] == {"epoch": 3, "position": 5}
    assert "rank1.torch_cpu" in load_file(str(ckpt_a / "rng.safetensors"))

    for run in (resumed, ddp):  # the stage's result (FSDP2: from the checkpoint; DDP: the replica) loads
        assert not Segmenter.from_pretrained(str(run / "final"), device="cpu").is_untrained
    finals = [load_file(str(run / "final" / "model.safetensors")) for run in (resumed, ddp)]
    assert finals[0].keys() == finals[1].keys()
    for key, tensor in finals[0].items():  # the same weights, LoRA merged either way
        torch.testing.assert_close(tensor, finals[1][key], rtol=1e-3, atol=1e-5, msg=key)

    # a resume on another number of processes is refused, saying why
    single = subprocess.run([sys.executable, "-m", "training.train", *_train_args(data, ddp)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 2 and "resume it on 2" in single.stderr


def test_an_unknown_strategy_is_refused_on_one_process_too(tiny_model):
    from training import distributed
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="loop.strategy must be one of ddp, fsdp, got 'fdsp'"):
        distributed.wrap(tiny_model[0], "fdsp", distributed.Processes(), torch.device("cpu"), False, print)
