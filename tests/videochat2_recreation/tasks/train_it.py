"""A re-creation, in our own words, of VideoChat2's instruction-tuning script `tasks/train_it.py` and the parts of
`utils/config.py`, `utils/config_utils.py`, `tasks/shared_utils.py` and `dataset/it_dataset_mistral.py` it runs
(OpenGVLab/Ask-Anything, commit 4dd8210b030374bb0c510a57dfbe916f70d3ef71; README.md in the folder above traces
each behaviour). Run from the folder above with it on PYTHONPATH: `python tasks/train_it.py CONFIG.py [key value]`."""

from __future__ import annotations

import argparse
import ast
import copy
import json
import runpy
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from videochat2 import VideoChat2_it_mistral, process_qa  # noqa: F401 (model_cls is looked up by name)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def setup_main() -> dict[str, Any]:
    """`Config.get_config`: argparse `config_file` and `opts`; the config is the file's top-level names, then each
    `key value` pair of `opts` (dotted keys nest), refused when the file does not define the key."""
    parser = argparse.ArgumentParser()
    parser.add_argument("config_file")
    parser.add_argument("opts", nargs="*")
    args = parser.parse_args()
    config = {k: v for k, v in runpy.run_path(args.config_file).items() if isinstance(v, (dict, list, str, int, float))}
    assert len(args.opts) % 2 == 0, f"length of opts must be even. Got: {args.opts}"
    for key, value in zip(args.opts[::2], args.opts[1::2]):
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            if part not in node:
                raise ValueError(f"The key {part} not exist in the config. Full key:{key}")
            if depth < len(parts) - 1:
                node = node[part]
            else:
                node[part] = _literal(value)
    config["distributed"] = False  # init_distributed_mode without RANK / WORLD_SIZE
    Path(config["output_dir"]).mkdir(parents=True, exist_ok=True)
    return config


class VideoQADataset(Dataset):
    """`ITVidTrainDataset_mistral`: an annotation list of `{"video", "QA"}` entries, each item
    `(frames [T, C, H, W], conversation, instruction, index)`. Stand-in: the frames are seeded noise, not decoded."""

    media_type = "video"

    def __init__(self, annotation: str, num_frames: int, system: str) -> None:
        self.anno = json.loads(Path(annotation).read_text())
        self.num_frames, self.system = num_frames, system

    def __len__(self) -> int:
        return len(self.anno)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, str, int]:
        frames = torch.randn(self.num_frames, 3, 8, 8, generator=torch.Generator().manual_seed(index))
        conversation, instruction = process_qa(copy.deepcopy(self.anno[index]["QA"]), self.system)
        return frames, conversation, instruction, index


def setup_model(config: dict[str, Any], model_cls: type, find_unused_parameters: bool = False) -> tuple:
    """`tasks/shared_utils.py::setup_model`: build the model, (DDP: not here), optimizer, scheduler, scaler, and
    resume from `output_dir/ckpt_latest.pth` under `auto_resume` (epoch + 1, `global_step`)."""
    config = copy.deepcopy(config)
    model = model_cls(config=config["model"])
    model_without_ddp = model
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config["optimizer"]["lr"], weight_decay=0.0
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=config["fp16"])
    start_epoch, global_step = 0, 0
    latest = Path(config["output_dir"]) / "ckpt_latest.pth"
    if config.get("auto_resume", False) and latest.is_file():
        checkpoint = torch.load(
            latest, map_location="cpu", weights_only=False
        )  # torch 1.13 (the pin) had no such check
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch, global_step = checkpoint["epoch"] + 1, checkpoint["global_step"]
        model_without_ddp.load_state_dict(checkpoint["model"], strict=False)
    return model, model_without_ddp, optimizer, scheduler, scaler, start_epoch, global_step


def train(model, train_loaders, optimizer, epoch, global_step, device, scheduler, scaler, config) -> int:
    """The loop: batches `(media_type, (image, text, instruction, index))`, the index discarded; the loss is the sum
    of the model's loss dict; one optimizer step per batch. Each step's loss goes to `output_dir/log.jsonl` (a
    stand-in for its MetricLogger / wandb)."""
    model.train()
    log = Path(config["output_dir"]) / "log.jsonl"
    batches = ((loader.dataset.media_type, batch) for loader in train_loaders for batch in loader)  # MetaLoader
    for media_type, (image, text, instruction, _) in batches:
        image = image.to(device)
        loss_dict = model(image, text, instruction)
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        if config["optimizer"]["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config["optimizer"]["max_grad_norm"])
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        with log.open("a") as handle:
            handle.write(json.dumps({"step": global_step, f"{media_type}-loss": loss.item()}) + "\n")
        global_step += 1
    return global_step


def main(config: dict[str, Any]) -> None:
    torch.manual_seed(config["seed"])
    dataset = VideoQADataset(config["train_file"], config["num_frames"], config["system"])
    loader = DataLoader(dataset, batch_size=config["batch_size"], shuffle=False)
    model_cls = eval(config["model"]["model_cls"])
    model, model_without_ddp, optimizer, scheduler, scaler, start_epoch, global_step = setup_model(
        config, model_cls=model_cls, find_unused_parameters=True
    )
    for epoch in range(start_epoch, config["epochs"]):
        global_step = train(model, [loader], optimizer, epoch, global_step, "cpu", scheduler, scaler, config)
        trainable = {k for k, v in model_without_ddp.named_parameters() if v.requires_grad}
        state = {k: v for k, v in model_without_ddp.state_dict().items() if k in trainable}
        checkpoint = {
            "model": state,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "config": config,
            "epoch": epoch,
            "global_step": global_step,
        }
        torch.save(checkpoint, Path(config["output_dir"]) / "ckpt_latest.pth")


if __name__ == "__main__":
    cfg = setup_main()
    main(cfg)
