"""The LLaVA-NeXT re-creation (tests/llava_next_recreation, see its README) against the plugin: `preprocess_qwen`
equals the `qwen_1_5` template, and the llava launcher leaves `--attn_implementation` where LLaVA-NeXT reads it."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from regate_plugin.data import get_template, parse_sample

from .llava_data import conversation_samples, write_json
from .llava_next import RECREATION, llava_next_on_path
from .tokenizers_fixture import write_bpe_chat_tokenizer


@pytest.fixture(scope="module")
def next_train():
    """The re-creation's `llava.train.train`."""
    with llava_next_on_path():
        from llava.train import train

        yield train


def _upstream(train, raw, tokenizer):
    """What LLaVA-NeXT's dataset does with one sample: preprocess_multimodal when it has an image, preprocess_qwen."""
    has_image = "image" in raw
    sources = train.preprocess_multimodal(
        [json.loads(json.dumps(raw["conversations"]))], SimpleNamespace(is_multimodal=has_image)
    )
    out = train.preprocess_qwen(sources, tokenizer, has_image=has_image)
    return out["input_ids"][0].tolist(), out["labels"][0].tolist()


def _chat_turns(raw):
    """The sample with every turn after the first as {"role", "content"} (upstream reads the first by "from")."""
    first, *rest = raw["conversations"]
    return {**raw, "conversations": [first] + [{"role": t["from"], "content": t["value"]} for t in rest]}


def _with_noise_marker(raw):
    """The sample with the marker upstream deletes from image samples (and keeps in text-only ones) in its turns."""
    turns = [{**t, "value": t["value"] + " QA_GT_caption_based_noisy"} for t in raw["conversations"]]
    return {**raw, "conversations": turns}


def test_qwen_template_equals_preprocess_qwen(next_train, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(write_bpe_chat_tokenizer(tmp_path / "chatml", "chatml"))
    template = get_template("qwen_1_5")
    samples = conversation_samples(24, seed=7)
    assert any("image" in s for s in samples) and any("image" not in s for s in samples)
    for n, raw in enumerate(samples):
        variants = [raw, _with_noise_marker(raw)] + ([] if "image" in raw else [_chat_turns(raw)])
        for variant in variants:
            encoded = template.encode(parse_sample(variant, n, "mem"), tokenizer)
            assert (encoded.input_ids, encoded.labels) == _upstream(next_train, variant, tokenizer), n


def test_upstream_image_samples_need_from_value_turns(next_train, tmp_path):
    """Recorded upstream limit: preprocess_multimodal reads every turn's "value", so an image sample with
    {"role", "content"} turns fails upstream (the plugin's reader accepts it)."""
    raw = {
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nhi"}, {"role": "gpt", "content": "x"}],
    }
    with pytest.raises(KeyError, match="value"):
        _upstream(next_train, raw, None)


def test_image_tags_and_left_padding_as_upstream(next_train):
    """Upstream train.py: under `mm_use_im_start_end` each `<image>` is wrapped in `<im_start>`/`<im_end>` (the
    plugin's tokenizer check refuses such a run: the two tokens are added to the tokenizer), and the collator pads on
    the tokenizer's side, flipping for left padding."""
    turns = [{"from": "human", "value": "what? <image>"}, {"from": "gpt", "value": "a cat"}]
    (out,) = next_train.preprocess_multimodal([turns], SimpleNamespace(is_multimodal=True, mm_use_im_start_end=True))
    assert out[0]["value"] == "<im_start><image><im_end>\nwhat?"
    tokenizer = SimpleNamespace(model_max_length=8, pad_token_id=0, padding_side="left")
    batch = next_train.DataCollatorForSupervisedDataset(tokenizer)(
        [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
         {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}]
    )  # fmt: skip
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [False, False, True]]


def _tiny_qwen2(directory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    write_bpe_chat_tokenizer(directory, "chatml")
    config = Qwen2Config(
        vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def launch_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("next_launch")
    data = write_json(root / "data.json", [s for s in conversation_samples(12, seed=3) if "image" not in s])
    return _tiny_qwen2(root / "model"), data, root


def _launch(setup, out, *extra):
    model, data, root = setup
    env = {**os.environ, "PYTHONPATH": f"{RECREATION}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = ["--model_name_or_path", str(model), "--data_path", str(data), "--output_dir", str(root / out)]
    argv += ["--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu", "true"]
    argv += ["--version", "qwen_1_5"]
    return subprocess.run(
        [sys.executable, "-m", "regate_plugin.launch", "llava", *argv, *extra],
        capture_output=True, text=True, timeout=300, env=env, cwd=root,
    )  # fmt: skip


def test_llava_launcher_keeps_attn_implementation_for_llava_next(launch_setup):
    """LLaVA-NeXT's train() builds the model with TrainingArguments.attn_implementation (default
    flash_attention_2): the flag must reach it, and without it the default is what upstream asks for."""
    done = _launch(launch_setup, "eager", "--attn_implementation", "eager")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((launch_setup[2] / "eager" / "trainer_state.json").read_text())["global_step"] == 1
    default = _launch(launch_setup, "default")
    assert default.returncode != 0 and "flash" in default.stderr.lower(), default.stderr[-3000:]
