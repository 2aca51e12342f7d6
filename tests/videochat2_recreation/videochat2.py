"""A re-creation, in our own words, of VideoChat2's instruction-tuning model and prompt building
(OpenGVLab/Ask-Anything, `video_chat2/`, commit 4dd8210b030374bb0c510a57dfbe916f70d3ef71): README.md in this folder
traces each behaviour to its upstream file and lines. The UMT ViT and the BERT Q-Former are small stand-ins of
the same shapes; the LLM call, its inputs and the answer masking are VideoChat2's."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

IGNORE = -100


def process_qa(
    qa: list[dict[str, str]],
    system: str = "",
    start_token: str = "<Video>",
    end_token: str = "</Video>",
    msg: str = "",
    shuffle: bool = False,
) -> tuple[str, str]:
    """`ITImgTrainDataset_mistral.process_qa` (dataset/it_dataset_mistral.py): the Mistral conversation string and
    the instruction; each answer is followed by ` </s>`, each question wrapped in `[INST] ... [/INST]`."""
    if shuffle and len(qa) > 1:
        random.shuffle(qa)
    instruction = qa[0]["i"] + " " if qa[0].get("i") else ""
    text = system + instruction + "[INST] " + start_token + end_token + msg.rstrip() + " [/INST]"
    for turn in qa:
        if turn["q"]:
            text += " [INST] " + turn["q"] + " [/INST]"
        text += " " + turn["a"] + " </s>"
    return text.strip(), instruction.strip()


class TinyUMT(nn.Module):
    """Stand-in for `build_vit(config)` (models/blip2/vit.py): [B, C, T, H, W] -> [B, T, patches, C]."""

    def __init__(self, width: int, patch: int) -> None:
        super().__init__()
        self.patch_embed = nn.Conv3d(3, width, kernel_size=(1, patch, patch), stride=(1, patch, patch))

    def forward(self, video: torch.Tensor, use_image: bool) -> torch.Tensor:
        x = self.patch_embed(video)  # [B, C, T, h, w]
        return x.flatten(3).permute(0, 2, 3, 1)


class TinyQformer(nn.Module):
    """Stand-in for the Q-Former's `bert(query_embeds=..., encoder_hidden_states=...)`: one cross-attention block
    whose output keeps one row per query."""

    def __init__(self, hidden: int, vision_width: int) -> None:
        super().__init__()
        self.cross = nn.MultiheadAttention(hidden, 2, kdim=vision_width, vdim=vision_width, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.hidden_size = hidden

    def forward(self, queries: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        x = queries + self.cross(queries, image_embeds, image_embeds, need_weights=False)[0]
        return x + self.mlp(x)


class VideoChat2_it_mistral(nn.Module):  # noqa: N801 (upstream's class name: the adapter registry matches it)
    """models/videochat_mistra/videochat2_it_mistral.py, `VideoChat2_it_mistral(Blip2Base)`."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.human_start, self.human_end, self.assist_end = "[INST]", "[/INST]", "</s>"
        self.start_token = config.get("start_token", "<Video>")
        self.end_token = config.get("end_token", "</Video>")
        self.img_start_token = config.get("img_start_token", "<Image>")
        self.img_end_token = config.get("img_end_token", "</Image>")
        self.use_lora = config.get("use_lora", False)
        self.max_txt_len = config.get("max_txt_len", 32)
        width = config["vision_width"]
        self.vision_encoder = TinyUMT(width, config.get("patch", 4))
        self.vision_layernorm = nn.LayerNorm(width, eps=1e-12)
        self.qformer = TinyQformer(config.get("qformer_hidden", 24), width)
        self.query_tokens = nn.Parameter(torch.randn(1, config["num_query_token"], self.qformer.hidden_size) * 0.02)
        self.extra_num_query_token = config.get("extra_num_query_token", 32)
        if self.extra_num_query_token > 0:
            self.extra_query_tokens = nn.Parameter(torch.zeros(1, self.extra_num_query_token, self.qformer.hidden_size))

        path = config["mistral_model_path"]
        self.mistral_tokenizer = AutoTokenizer.from_pretrained(path)
        self.mistral_tokenizer.padding_side = "left"
        if not self.mistral_tokenizer.pad_token:
            self.mistral_tokenizer.pad_token = self.mistral_tokenizer.eos_token
        dtype = config.get("torch_dtype", torch.float16)
        self.mistral_model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
        for parameter in self.mistral_model.parameters():
            parameter.requires_grad = False
        if self.use_lora:
            from peft import LoraConfig, TaskType, get_peft_model

            lora = LoraConfig(
                task_type=TaskType.CAUSAL_LM,
                inference_mode=False,
                r=config.get("lora_r", 8),
                lora_alpha=config.get("lora_alpha", 32),
                lora_dropout=config.get("lora_dropout", 0.05),
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
            )
            self.mistral_model = get_peft_model(self.mistral_model, lora)
        self.mistral_proj = nn.Linear(self.qformer.hidden_size, self.mistral_model.config.hidden_size)

    def maybe_autocast(self) -> contextlib.AbstractContextManager:
        """Blip2Base.maybe_autocast: fp16 autocast off the CPU only."""
        on_cpu = next(self.parameters()).device.type == "cpu"
        return contextlib.nullcontext() if on_cpu else torch.autocast("cuda", dtype=torch.float16)

    def encode_img(self, image: torch.Tensor, instruction: list[str]) -> tuple[torch.Tensor, bool]:
        with self.maybe_autocast():
            use_image = image.shape[1] == 1
            frames = self.vision_encoder(image.permute(0, 2, 1, 3, 4), use_image)  # [B, T, L, C]
            frames = self.vision_layernorm(frames.reshape(frames.shape[0], -1, frames.shape[-1]))
            queries = self.query_tokens
            if self.extra_num_query_token > 0:
                queries = torch.cat([queries, self.extra_query_tokens], dim=1)
            queries = queries.expand(frames.shape[0], -1, -1)
            out = self.qformer(queries, frames)
            return self.mistral_proj(out[:, : queries.shape[1]]), use_image

    def _embed(self) -> nn.Module:
        llm = self.mistral_model.base_model.model if self.use_lora else self.mistral_model
        return llm.model.embed_tokens

    def _ids(self, text: str) -> torch.Tensor:
        return self.mistral_tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids

    def _count(self, text: str) -> int:
        return self._ids(text).shape[1]

    def _answer_targets(self, after: str, after_ids: torch.Tensor) -> torch.Tensor:
        """Only the answers (and their `</s>`) of the text after the visual block are supervised."""
        sep_q, sep_a = self.human_start + " ", " " + self.human_end + " "
        rounds = after.split(sep_a)
        rounds = [text + sep_a for text in rounds[:-1]] + rounds[-1:]
        targets = after_ids.clone()
        position = self._count(rounds[0].rstrip())
        targets[:, :position] = IGNORE
        for text in rounds[1:-1]:
            total = self._count(text.rstrip())
            answer = self._count(text.split(sep_q)[0].rstrip())
            targets[:, position + answer : position + total] = IGNORE
            position += total
        position += self._count(rounds[-1].rstrip())
        assert position == targets.shape[1], f"masked length {position} != prompt length {targets.shape[1]}: {after}"
        return targets

    def forward(self, image: torch.Tensor, text_input: list[str], instruction: list[str]) -> dict[str, torch.Tensor]:
        visual, use_image = self.encode_img(image, instruction)
        batch, rows, _ = visual.shape
        end = self.img_end_token if use_image else self.end_token
        embed = self._embed()
        samples = []
        for b, prompt in enumerate(text_input):
            before, after = prompt.split(end)
            after = end + after
            before_ids, after_ids = self._ids(before).to(visual.device), self._ids(after).to(visual.device)
            sequence = torch.cat([embed(before_ids), visual[b : b + 1], embed(after_ids)], dim=1)
            samples.append((sequence, before_ids.shape[1], self._answer_targets(after, after_ids)))
        length = min(max(s.shape[1] for s, _, _ in samples) + 1, self.max_txt_len + rows)  # +1 for BOS
        pad = torch.full((batch, length), self.mistral_tokenizer.pad_token_id, dtype=torch.long, device=visual.device)
        inputs_embeds = embed(pad)
        inputs_embeds[:, :1] = self.mistral_tokenizer.bos_token_id  # upstream writes the id into the embedding
        attention_mask = torch.zeros(batch, length, dtype=torch.long, device=visual.device)
        targets = torch.full((batch, length), IGNORE, dtype=torch.long, device=visual.device)
        for b, (sequence, before_len, answer) in enumerate(samples):
            n = min(sequence.shape[1], length - 1)
            inputs_embeds[b, 1 : n + 1] = sequence[:, :n]
            attention_mask[b, : n + 1] = 1
            targets[b, before_len + rows + 1 : n + 1] = answer[0, : n - before_len - rows]
        with self.maybe_autocast():
            outputs = self.mistral_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                return_dict=True,
                labels=targets,
                use_cache=False,
            )
        return dict(loss=outputs.loss)
