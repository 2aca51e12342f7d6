"""The demo student's optimizer groups: the projector at the demo's learning rate, the LLM at `LLM_LR_FACTOR` of
it, the frozen vision tower in neither, every trainable parameter in exactly one; its learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from regate_plugin.demo.models import (
    LLM_LR_FACTOR,
    build_student,
    student_lr_scheduler,
    student_parameter_groups,
)


class _Tokenizer:
    def convert_tokens_to_ids(self, token: str) -> int:
        return 4


def _student() -> torch.nn.Module:
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    return build_student(base, _Tokenizer(), seed=0, image_size=16, patch=8)


def test_groups_partition_the_trainable_parameters() -> None:
    student = _student()
    projector, llm = student_parameter_groups(student, 1e-3)
    assert projector["lr"] == 1e-3
    assert llm["lr"] == 1e-3 * LLM_LR_FACTOR
    names = {id(p): n for n, p in student.named_parameters()}
    projector_names = {names[id(p)] for p in projector["params"]}
    llm_names = {names[id(p)] for p in llm["params"]}
    assert projector_names == {n for n in names.values() if n.startswith("model.multi_modal_projector.")}
    assert not projector_names & llm_names
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert projector_names | llm_names == trainable
    assert not any("vision_tower" in n for n in trainable)
    assert "lm_head.weight" in llm_names or student.lm_head.weight is student.get_input_embeddings().weight


def test_one_adamw_step_moves_the_projector_ten_times_the_llm() -> None:
    # Adam's first step moves every parameter by its group's learning rate (times the gradient's sign)
    student = _student()
    optimizer = torch.optim.AdamW(student_parameter_groups(student, 1e-3), weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    pixels = torch.rand(1, 3, 16, 16)
    ids = torch.tensor([[1, 4, 4, 4, 4, 5, 6, 7]])
    student(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
    optimizer.step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in student.named_parameters()}
    assert abs(moved["model.multi_modal_projector.linear_2.weight"] - 1e-3) < 1e-6
    assert abs(moved["model.language_model.layers.0.mlp.down_proj.weight"] - 1e-3 * LLM_LR_FACTOR) < 1e-7
    assert moved["model.vision_tower.embeddings.patch_embedding.weight"] == 0.0


@pytest.mark.parametrize("steps", [200, 2000])
def test_cosine_schedule_warms_up_over_3_percent_then_decays_to_zero(steps: int) -> None:
    # both groups follow the closed form, each at its own peak: linear to the peak over ceil(0.03 * steps), then
    # half a cosine down to zero at the last step; `constant` keeps the peak
    student = _student()
    for schedule in ("cosine", "constant"):
        optimizer = torch.optim.AdamW(student_parameter_groups(student, 1e-3))
        scheduler = student_lr_scheduler(optimizer, schedule, steps)
        warmup = math.ceil(0.03 * steps)
        for step in range(steps + 1):
            if schedule == "constant":
                factor = 1.0
            elif step < warmup:
                factor = step / warmup
            else:
                factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
            lrs = [group["lr"] for group in optimizer.param_groups]
            assert lrs == pytest.approx([1e-3 * factor, 1e-3 * LLM_LR_FACTOR * factor], abs=1e-12), (schedule, step)
            optimizer.step()
            scheduler.step()
