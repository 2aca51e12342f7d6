import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from regate_plugin.core import (
    ConfigError,
    ReGATEConfig,
    expected_keep_fraction,
    first_sparse_step,
    is_dense_step,
    keep_ratio_at,
)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("keep_ratio", 0.0, "(0, 1]"),
        ("keep_ratio", 1.5, "(0, 1]"),
        ("keep_ratio", float("nan"), "(0, 1]"),
        ("lam", -0.1, "[0, 1]"),
        ("ema_beta", 1.0, "[0, 1)"),
        ("warmup_steps", -1, ">= 0"),
        ("cycle_steps", 0, ">= 1"),
        ("dense_steps", 200, "[0, cycle_steps=128]"),
        ("dense_steps", -1, "[0, cycle_steps=128]"),
        ("score_norm", "minmax", "['none', 'zscore']"),
        ("missing_reference", "skip", "['error', 'ema']"),
        ("dense_tail", 1.0, "[0, 1)"),
        ("dense_tail", -0.1, "[0, 1)"),
    ],
)
def test_bad_values_name_the_field_and_range(field, value, allowed):
    with pytest.raises(ConfigError) as err:
        ReGATEConfig(**{field: value})
    assert f"ReGATEConfig.{field}=" in str(err.value) and allowed in str(err.value)


def test_integers_are_required_and_unknown_fields_refused():
    with pytest.raises(ConfigError, match="warmup_steps=1.5 must be an integer"):
        ReGATEConfig(warmup_steps=1.5)
    with pytest.raises(ConfigError, match="no field"):
        ReGATEConfig.from_dict({"keep_raito": 0.5})
    assert ReGATEConfig.from_dict(ReGATEConfig(lam=0.2).to_dict()) == ReGATEConfig(lam=0.2)


def _dense_brute_force(step: int, cfg: ReGATEConfig) -> bool:
    """Walk the schedule from step 0: W dense steps, then repeated [F dense, C - F sparse]."""
    phase = ["dense"] * cfg.warmup_steps
    while len(phase) <= step:
        phase += ["dense"] * cfg.dense_steps + ["sparse"] * (cfg.cycle_steps - cfg.dense_steps)
    return phase[step] == "dense"


configs = st.builds(
    lambda w, c, f, p: ReGATEConfig(warmup_steps=w, cycle_steps=c, dense_steps=min(f, c), keep_ratio=p),
    st.integers(0, 50),
    st.integers(1, 40),
    st.integers(0, 40),
    st.floats(0.05, 1.0),
)


@given(configs, st.integers(0, 400))
def test_schedule_matches_a_walk_through_the_cycles(cfg, step):
    assert is_dense_step(step, cfg) == _dense_brute_force(step, cfg)
    assert keep_ratio_at(step, cfg) == (1.0 if _dense_brute_force(step, cfg) else cfg.keep_ratio)


@given(configs, st.integers(1, 400), st.floats(0.01, 0.99), st.integers(0, 500))
def test_the_dense_tail_makes_the_runs_last_steps_dense_and_leaves_the_rest(cfg, total, tail, step):
    cfg = cfg.replace(dense_tail=tail).scaled_to(total)
    in_tail = step >= total - round(tail * total)  # the run's last round(tail * total) steps, and any after it
    assert is_dense_step(step, cfg) == (in_tail or _dense_brute_force(step, cfg))


def test_the_dense_tail_needs_the_runs_length_and_keeps_a_fixed_schedule():
    cfg = ReGATEConfig(warmup_steps=25, cycle_steps=64, dense_steps=8, keep_ratio=0.35, dense_tail=0.125)
    with pytest.raises(ConfigError, match=r"ReGATEConfig.dense_tail=0.125 needs the run's length: use cfg.scaled_to"):
        is_dense_step(0, cfg)
    run = cfg.scaled_to(4800)
    assert (run.warmup_steps, run.cycle_steps, run.dense_steps, run.total_steps) == (25, 64, 8, 4800)
    assert [is_dense_step(s, run) for s in (4199, 4200, 4799)] == [False, True, True]  # the last 600 steps
    assert (first_sparse_step(4185, run), first_sparse_step(4199, run), first_sparse_step(4200, run)) == (
        4193,
        4199,
        None,
    )


def test_paper_defaults_give_the_papers_kept_fraction():
    cfg = ReGATEConfig()
    # One cycle after warm-up: 16 dense + 112 at 0.5 = 0.5625 (docs/METHOD.md, "The dual-cycle schedule").
    assert expected_keep_fraction(100 + 128, cfg) == pytest.approx((100 + 16 + 112 * 0.5) / 228)
    assert is_dense_step(99, cfg) and is_dense_step(100 + 15, cfg) and not is_dense_step(100 + 16, cfg)
    assert is_dense_step(100 + 128, cfg)
    assert not is_dense_step(0, ReGATEConfig(warmup_steps=0, dense_steps=0))
    with pytest.raises(ValueError):
        is_dense_step(-1, cfg)


# One value per ReGATEConfig field, each different from the default: a new field must be added here.
_NON_DEFAULT = {
    "keep_ratio": ("0.25", 0.25),
    "lam": ("0.2", 0.2),
    "ema_beta": ("0.5", 0.5),
    "warmup_steps": ("3", 3),
    "cycle_steps": ("20", 20),
    "dense_steps": ("2", 2),
    "score_norm": ("zscore", "zscore"),
    "missing_reference": ("ema", "ema"),
    "ema_dtype": ("float16", "float16"),
    "seed": ("11", 11),
    "loss_chunk_size": ("64", 64),
    "elision_unit": ("loss_only", "loss_only"),
    "ema_observe": ("dense", "dense"),
    "ema_visual_slots": ("4", 4),
    "resume_without_state": ("fresh", "fresh"),
    "repeats": ("last", "last"),
    "schedule": ("auto", "auto"),
    "dense_tail": ("0.125", 0.125),
    "total_steps": ("600", 600),
    "keep_control": ("adaptive", "adaptive"),
    "keep_ratio_min": ("0.2", 0.2),
    "keep_ratio_max": ("0.9", 0.9),
    "keep_control_step": ("0.1", 0.1),
    "keep_control_interval": ("64", 64),
    "keep_control_gap": ("0.7", 0.7),
    "keep_control_low": ("0.1", 0.1),
    "keep_budget": ("reference", "reference"),
    "keep_budget_threshold": ("0.5", 0.5),
    "loss_normalization": ("all", "all"),
}
_OLD_FLAG_NAMES = {"lam": "--regate_lambda"}  # the names users have been passing; they must keep working


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ReGATEConfig)])
def test_every_config_field_is_a_training_flag(name):
    from transformers import HfArgumentParser

    from regate_plugin.training import TokenElisionArguments

    text, value = _NON_DEFAULT[name]
    flag = _OLD_FLAG_NAMES.get(name, f"--regate_{name}")
    (args,) = HfArgumentParser(TokenElisionArguments).parse_args_into_dataclasses([flag, text])
    assert args.regate_config() == ReGATEConfig(**{name: value})
    assert TokenElisionArguments().regate_config() == ReGATEConfig()


def test_a_bad_flag_value_names_the_flag():
    from regate_plugin.training import TokenElisionArguments

    with pytest.raises(ConfigError, match=r"^--regate_lambda: ReGATEConfig.lam=2"):
        TokenElisionArguments(regate_lambda=2).regate_config()
    with pytest.raises(ConfigError, match=r"^--regate_dense_steps: "):
        TokenElisionArguments(regate_dense_steps=9, regate_cycle_steps=4).regate_config()


@given(configs, st.integers(0, 400))
def test_first_sparse_step_is_the_first_step_the_walk_makes_sparse(cfg, start):
    horizon = start + cfg.warmup_steps + cfg.cycle_steps + 1  # one whole cycle past the warm-up holds a sparse step
    want = next((s for s in range(start, horizon) if not _dense_brute_force(s, cfg)), None)
    assert first_sparse_step(start, cfg) == want


@given(configs, st.integers(0, 400), st.integers(1, 400), st.floats(0.01, 0.99))
def test_first_sparse_step_stops_at_the_dense_tail(cfg, start, total, tail):
    run = cfg.replace(dense_tail=tail).scaled_to(total)
    horizon = start + cfg.warmup_steps + cfg.cycle_steps + 1
    tail_start = total - round(tail * total)
    want = next((s for s in range(start, horizon) if s < tail_start and not _dense_brute_force(s, cfg)), None)
    assert first_sparse_step(start, run) == want
