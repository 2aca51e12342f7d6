"""The lmms-eval adapter through the real lmms-eval (0.7.3): lmms-eval's own registry resolves `--model regate` from
our entry point, and `generate_until` on lmms-eval `Instance`s answers as our runner does on the same inputs."""

from __future__ import annotations

import pytest
from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model
from regate_plugin.eval import Prompt, Request
from regate_plugin.eval.frames import VisualSource, sample_official
from regate_plugin.eval.lmms_eval_adapter import RegateLMM
from regate_plugin.eval.runners import HFRunner

from .eval_fixtures import write_tiny_hf_llava, write_video
from .image_fixtures import colour
from .tokenizers_fixture import write_bpe_chat_tokenizer


def test_lmms_eval_resolves_the_entry_point_and_generates_like_our_runner(tmp_path):
    assert get_model("regate") is RegateLMM
    model_dir = write_tiny_hf_llava(tmp_path / "model", write_bpe_chat_tokenizer(tmp_path / "tok", "chatml"))
    model = get_model("regate").create_from_arg_string(f"pretrained={model_dir},batch_size=2,num_frames=3")
    video = write_video(tmp_path / "clip.mp4", list(range(0, 200, 10)))
    docs = [
        {"image": colour(30), "q": "Is there a dog?"},
        {"image": colour(90), "q": "What colour?"},
        {"video": str(video), "q": "What happens?"},
        {"q": "No picture here."},
    ]
    model.task_dict = {"toy": {"test": docs}}

    def doc_to_visual(doc):
        return [doc["image"]] if "image" in doc else [doc["video"]] if "video" in doc else []

    contexts = [
        "<image>\nIs there a dog?\nAnswer yes or no.",
        "What colour?",
        "<image>\nWhat happens?",
        "No picture here.",
    ]
    gen_kwargs = [
        {"max_new_tokens": 5, "until": ["\n\n"]},
        {"max_new_tokens": 3},
        {"max_new_tokens": 4, "until": "xyz"},
        {},
    ]
    requests = [
        Instance(
            "generate_until", (c, g, doc_to_visual, i, "toy", "test"), 0, {"task": "toy", "doc_id": i, "repeats": 1}
        )
        for i, (c, g) in enumerate(zip(contexts, gen_kwargs))
    ]
    outputs = model.generate_until(requests)

    runner = HFRunner.from_pretrained(model_dir)
    frames = tuple(sample_official(VisualSource(video), 3, None))
    expected = runner.generate(
        [
            Request((colour(30),), Prompt("Is there a dog?\nAnswer yes or no.", max_new_tokens=5, stop=("\n\n",))),
            Request((colour(90),), Prompt("What colour?", max_new_tokens=3)),
            Request(frames, Prompt("What happens?", max_new_tokens=4, stop=("xyz",)), video=True),
            Request((), Prompt("No picture here.", max_new_tokens=128)),
        ]
    )
    assert outputs == expected and len(outputs) == 4
    with pytest.raises(NotImplementedError, match="generate_until tasks"):
        model.loglikelihood(requests)
