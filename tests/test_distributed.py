"""Two processes (torchrun, gloo, CPU) through the real HF Trainer: DDP, DeepSpeed ZeRO-2 and ZeRO-3, and FSDP2
through accelerate (which shards on CPU only as the worker's `_fsdp_on_cpu` lets it; see docs/DISTRIBUTED.md).

The reference is one process fed the same global batches: per-device batch 2 x 2 ranks against batch 4 in one
process. The data order is the same because the Trainer's sampler is seeded by `args.seed` (the same permutation
in every process), and the ranks take its consecutive batches in rank order, so one process's batch of 4 is rank
0's 2 rows followed by rank 1's: the global order in which the ranks fold the EMA (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from accelerate import FullyShardedDataParallelPlugin

from regate_plugin.training.fsdp import unsupported_fsdp

from . import distributed_worker as worker
from .trainer_helpers import make_trainer, samples

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(out: Path, mode: str, phase: str, timeout: float = 240, ranks: int = 2) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(ranks),
        "-m",
        "tests.distributed_worker",
        str(out),
        mode,
        phase,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_DEEPSPEED": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _ranks(out: Path, phase: str) -> list[dict]:
    return [torch.load(out / f"{phase}-rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The single-process run over the same global batches (batch 4), recorded like a rank."""
    root = tmp_path_factory.mktemp("one")
    torch.set_num_threads(1)  # as each rank runs: CPU sums depend on the thread count
    try:
        args = {**worker.training_args("ddp"), "per_device_train_batch_size": 2 * worker.PER_RANK_BATCH}
        trainer = make_trainer(
            root, samples(worker.SAMPLES), worker.elision_flags(root), model=worker.student(), **args
        )
        trainer.train()
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    return worker.record(trainer)


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory) -> Callable[[str], Path]:
    """Uninterrupted two-rank runs (their stdout in `stdout.txt`), made once per mode when a test first asks."""
    made: dict[str, Path] = {}

    def run(mode: str) -> Path:
        if mode not in made:
            out = tmp_path_factory.mktemp(mode)
            done = _torchrun(out, mode, "train")
            assert done.returncode == 0, done.stderr[-4000:]
            (out / "stdout.txt").write_text(done.stdout)
            made[mode] = out
        return made[mode]

    return run


def _assert_same_tables(got: dict, want: dict, atol: float) -> None:
    for table in ("values", "per_token"):
        torch.testing.assert_close(got["ema"][table], want["ema"][table], atol=atol, rtol=0, equal_nan=True)


def _assert_one_process(ranks: list[dict], one: dict) -> None:
    rank0, rank1 = ranks
    for table in ("values", "per_token"):  # bit for bit on every rank
        assert torch.equal(rank0["state"]["ema"][table].nan_to_num(-7), rank1["state"]["ema"][table].nan_to_num(-7))
    _assert_same_tables(rank0["state"], one["state"], atol=1e-5)
    assert (~torch.isnan(rank0["state"]["ema"]["values"])).sum() > 0
    # global sums: every rank logs the one-process count
    for name in ("regate/candidates", "regate/kept", "regate/missing_reference", "regate/nonfinite"):
        want = [entry[name] for entry in one["logs"]]
        assert [entry[name] for entry in rank0["logs"]] == [entry[name] for entry in rank1["logs"]] == want
    assert [e["loss"] for e in rank0["logs"]] == pytest.approx([e["loss"] for e in one["logs"]], rel=1e-4)
    sparse = [e for e in one["logs"] if not e["regate/dense"]]
    assert len(sparse) >= 8 and all(e["regate/kept"] < e["regate/candidates"] for e in sparse)


@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3", "fsdp2"])
def test_ranks_hold_the_one_process_ema_and_log_global_counts(straight_runs, one_process, mode):
    ranks = _ranks(straight_runs(mode), "train")
    _assert_one_process(ranks, one_process)
    assert [rank["fsdp"] for rank in ranks] == [mode == "fsdp2"] * 2  # FSDP2 sharded it, and only in that mode


def test_only_rank_0_prints_the_startup_summary(straight_runs):
    printed = (straight_runs("ddp") / "stdout.txt").read_text()
    assert printed.count("token elision 'regate', starting at optimizer step 0") == 1, printed[-2000:]


@pytest.mark.parametrize("mode", ["ddp", "zero2", "fsdp2"])
def test_resuming_inside_the_sparse_phase_continues_identically(straight_runs, tmp_path, mode):
    done = _torchrun(tmp_path, mode, "resume")
    assert done.returncode == 0, done.stderr[-4000:]
    straight, resumed = _ranks(straight_runs(mode), "train"), _ranks(tmp_path, "resume")
    for rank in (0, 1):
        assert resumed[rank]["state"]["step"] == straight[rank]["state"]["step"] == worker.STEPS - 1  # last computed
        _assert_same_tables(resumed[rank]["state"], straight[rank]["state"], atol=1e-6)
        after = [e for e in resumed[rank]["logs"] if e["step"] > worker.SAVE_AT]
        want = [e for e in straight[rank]["logs"] if e["step"] > worker.SAVE_AT]
        assert [e["regate/kept"] for e in after] == [e["regate/kept"] for e in want]
        assert [e["loss"] for e in after] == pytest.approx([e["loss"] for e in want], rel=1e-5)
    assert not any(e["regate/dense"] for e in straight[0]["logs"] if e["step"] > worker.SAVE_AT)


def test_fsdp_that_accelerate_leaves_off_is_refused_before_any_step(tmp_path):
    done = _torchrun(tmp_path, "fsdp2-as-is", "train", ranks=1)  # accelerate leaves FSDP off on CPU
    assert done.returncode != 0
    assert "FSDP is asked for (--fsdp, or accelerate's use_fsdp), but accelerate did not shard" in done.stderr, (
        done.stderr[-3000:]
    )
    assert not (tmp_path / "train-rank0.pt").exists()


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        ({"fsdp_version": 2}, None),
        ({"fsdp_version": 2, "reshard_after_forward": False}, None),
        ({"fsdp_version": 1, "sync_module_states": False}, "FSDP1 (fsdp_config version 1"),
        ({"fsdp_version": 2, "cpu_offload": True}, "fsdp_config cpu_offload"),
    ],
)
def test_fsdp_settings_token_elision_does_not_run_under_are_refused(settings, refused):
    problem = unsupported_fsdp(True, FullyShardedDataParallelPlugin(**settings))  # accelerate's own plugin
    assert problem is None if refused is None else problem.startswith(refused), problem
    assert unsupported_fsdp(False, None) is None


def test_a_non_finite_loss_on_one_rank_is_dropped_on_every_rank_and_logged_once(tmp_path):
    done = _torchrun(tmp_path, "ddp", "nonfinite")
    assert done.returncode == 0, done.stderr[-4000:]
    rank0, rank1 = _ranks(tmp_path, "nonfinite")
    for table in ("values", "per_token"):  # still bit for bit on every rank, and nothing infinite
        assert torch.equal(rank0["state"]["ema"][table].nan_to_num(-7), rank1["state"]["ema"][table].nan_to_num(-7))
        assert not torch.isinf(rank0["state"]["ema"][table]).any()
    logged = [[entry["regate/nonfinite"] for entry in rank["logs"]] for rank in (rank0, rank1)]
    assert logged[0] == logged[1] == [int(step == worker.FAULT_AT) for step in range(worker.STEPS)]
    assert (rank0["state"]["stats"]["nonfinite"], rank1["state"]["stats"]["nonfinite"]) == (0, 1)  # counted where seen


def test_a_killed_rank_ends_the_job_with_an_error(tmp_path):
    started = time.monotonic()
    done = _torchrun(tmp_path, "ddp", "kill", timeout=180)
    assert done.returncode != 0
    assert "SIGKILL" in done.stderr or "Signal 9" in done.stderr, done.stderr[-3000:]
    assert time.monotonic() - started < 120
    assert not (tmp_path / "kill-rank0.pt").exists()
