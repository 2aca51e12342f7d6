"""Templates reproduce the upstream preprocessing token for token.

LLaVA `v1` / `plain`: compared with the real `llava.train.train` (llava-torch 1.2.2.post1 on transformers 4.37.2,
in the upstream-LLaVA env), through its own dataset and collator. VideoLLaMA2 / LLaVA-OneVision: compared with
`apply_chat_template` and an independent scan of the rendered chat.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoTokenizer

from regate_plugin.core.compaction import IGNORE_INDEX
from regate_plugin.data import DataError, get_template, iter_conversations, parse_sample
from regate_plugin.data.templates import IMAGE_TOKEN_INDEX, QWEN_NEWLINE_ID, VIDEO_TOKEN_INDEX

from .llava_data import caption_samples, conversation_samples, write_json
from .tokenizers_fixture import write_bpe_chat_tokenizer, write_sentencepiece_llama

REPO = Path(__file__).resolve().parents[1]
LLAVA_PYTHON = REPO / ".venv-llava" / "bin" / "python"
VIDEOLLAMA2_PYTHON = REPO / ".venv-videollama2" / "bin" / "python"  # scripts/setup_videollama2_env.sh


@pytest.fixture(scope="module")
def llama_tokenizer_dir(tmp_path_factory) -> Path:
    return write_sentencepiece_llama(tmp_path_factory.mktemp("llama_tok"))


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (30 + i % 4, 28), (i * 9 % 255, 90, 40)).save(folder / f"{i:04d}.jpg")
    return folder


def _upstream_llava(tokenizer_dir: Path, data: Path, images: Path, version: str, max_length: int) -> dict:
    assert LLAVA_PYTHON.exists(), f"{LLAVA_PYTHON} is missing: run `make setup` (scripts/setup_llava_env.sh)"
    script = REPO / "tests" / "upstream_llava" / "preprocess_parity.py"
    done = subprocess.run(
        [str(LLAVA_PYTHON), str(script), str(tokenizer_dir), str(data), str(images), version, str(max_length)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_v1_matches_real_llava_preprocess(tmp_path, llama_tokenizer_dir):
    samples = conversation_samples(40, seed=1, long_every=4)
    # An answer holding the separator itself: upstream's round split breaks, it warns and masks the whole sample.
    samples.append(
        {
            "id": "sep",
            "image": "0000.jpg",
            "conversations": [{"from": "human", "value": "<image>\nsay it"}, {"from": "gpt", "value": "red </s> blue"}],
        }
    )
    data = write_json(tmp_path / "train.json", samples)
    result = _upstream_llava(llama_tokenizer_dir, data, _images(tmp_path / "img", 41), "v1", 120)
    assert result["transformers"] == "4.37.2"
    upstream, ours = result["upstream"], result["ours"]
    assert len(upstream) == len(samples)
    for n, (want, got) in enumerate(zip(upstream, ours)):
        assert got == want, f"sample {samples[n]['id']}"
    # The tokenizer was made to tokenize the template cleanly; only the planted sample trips the check.
    assert [s["id"] for s, w in zip(samples, result["mismatch_warnings"]) if w] == ["sep"]
    assert all(label == IGNORE_INDEX for label in ours[-1]["labels"])
    assert sum(len(u["input_ids"]) == 120 for u in upstream) >= 3, "some samples must hit the collator's truncation"
    assert any(IMAGE_TOKEN_INDEX in u["input_ids"] for u in upstream) and any(
        IMAGE_TOKEN_INDEX not in u["input_ids"] for u in upstream
    )
    # Note: transformers 5 has no slow Llama tokenizer, and its tokenizer splits chunks around <image> differently
    # from the slow one upstream trains with (use_fast=False), so a LLaVA cache is made in the upstream env
    # (test_precompute_in_upstream_env_matches_upstream_keys).


def test_plain_matches_real_llava_preprocess(tmp_path, llama_tokenizer_dir):
    data = write_json(tmp_path / "pretrain.json", caption_samples(20, seed=2))
    result = _upstream_llava(llama_tokenizer_dir, data, _images(tmp_path / "img", 20), "plain", 64)
    assert result["ours"] == result["upstream"]
    for row in result["upstream"]:
        assert row["input_ids"][1] == IMAGE_TOKEN_INDEX and row["labels"][:2] == [IGNORE_INDEX] * 2


def _turns(sample: dict) -> list[tuple[str, str]]:
    return [(t["from"], t["value"]) for t in sample["conversations"]]


@pytest.mark.parametrize("style", ["mistral", "chatml"])
def test_videollama2_follows_the_chat_template(tmp_path, style):
    tokenizer = AutoTokenizer.from_pretrained(write_bpe_chat_tokenizer(tmp_path / style, style))
    template = get_template("videollama2")
    end = "</s>" if style == "mistral" else "<|im_end|>\n"
    for raw in conversation_samples(30, seed=3, modality="video"):
        sample = parse_sample(raw, 0, "mem")
        encoded = template.encode(sample, tokenizer)
        turns = _turns(raw)
        if turns[0][0] != "human":
            turns = turns[1:]
        if sample.modality:  # preprocess_multimodal: the tag moves to the front of its turn
            turns = [(r, "<video>\n" + t.replace("<video>", "").strip() if "<video>" in t else t) for r, t in turns]
        messages = [{"role": "user" if r == "human" else "assistant", "content": t} for r, t in turns]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        pieces = rendered.split("<video>")
        expected_ids = []
        for n, piece in enumerate(pieces):
            expected_ids += ([VIDEO_TOKEN_INDEX] if n else []) + tokenizer(piece, add_special_tokens=False).input_ids
        assert encoded.input_ids == expected_ids
        if not sample.modality:
            assert encoded.input_ids == list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
        # Supervised runs, decoded, are exactly the answers with the template's end-of-turn marker.
        runs, current = [], []
        for token, label in zip(encoded.input_ids, encoded.labels):
            if label != IGNORE_INDEX:
                assert label == token
                current.append(token)
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        answers = [t for r, t in turns if r == "gpt"]
        assert [tokenizer.decode(run) for run in runs] == [a + end for a in answers]


def _scan_chatml(ids: list[int], tokenizer) -> list[int]:
    """Independent label rule for LLaVA-NeXT `preprocess_qwen`: assistant turns (whole, with their header) are
    supervised, plus every <|im_start|>, <|im_end|> and id 198 anywhere."""
    start, stop = tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    labels, role = [], None
    for n, token in enumerate(ids):
        if token == start:
            end = n + 1
            while "\n" not in tokenizer.decode(ids[n + 1 : end]):
                end += 1
            role = tokenizer.decode(ids[n + 1 : end]).split("\n")[0]
        keep = role == "assistant" or token in (start, stop, QWEN_NEWLINE_ID)
        labels.append(token if keep else IGNORE_INDEX)
    return labels


def test_llava_onevision_qwen_template(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(write_bpe_chat_tokenizer(tmp_path / "chatml", "chatml"))
    template = get_template("qwen_1_5")
    for raw in conversation_samples(20, seed=4):
        sample = parse_sample(raw, 0, "mem")
        encoded = template.encode(sample, tokenizer)
        turns = _turns(raw)
        if turns[0][0] != "human":
            turns = turns[1:]
        text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        for role, value in turns:
            if sample.modality and value.count("<image>") == 1 and not value.startswith("<image>"):
                value = "<image>\n" + value.replace("<image>", "").strip()
            text += f"<|im_start|>{'user' if role == 'human' else 'assistant'}\n{value}<|im_end|>\n"
        pieces = text.split("<image>") if sample.modality else [text]
        expected = []
        for n, piece in enumerate(pieces):
            expected += ([IMAGE_TOKEN_INDEX] if n else []) + tokenizer(piece, add_special_tokens=False).input_ids
        assert encoded.input_ids == expected
        text_ids = [t if t != IMAGE_TOKEN_INDEX else -1 for t in encoded.input_ids]
        assert encoded.labels == [
            IGNORE_INDEX if t == -1 else x for t, x in zip(text_ids, _scan_chatml(text_ids, tokenizer))
        ]


def test_template_errors_name_the_sample(tmp_path, llama_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_tokenizer_dir)
    bad = parse_sample(
        {
            "id": "x1",
            "image": "a.jpg",
            "conversations": [{"from": "human", "value": "<image> hi"}, {"from": "human", "value": "again"}],
        },
        0,
        "train.json:7",
    )
    with pytest.raises(DataError, match=r"train.json:7 \(sample id 'x1'\): turn 1 is from 'human'"):
        get_template("v1").encode(bad, tokenizer)
    three = parse_sample(
        {
            "id": "x2",
            "image": "a.jpg",
            "conversations": [
                {"from": "human", "value": "<image>"},
                {"from": "gpt", "value": "a"},
                {"from": "gpt", "value": "b"},
            ],
        },
        0,
        "t.json:2",
    )
    with pytest.raises(DataError, match="x2.*two turns"):
        get_template("plain").encode(three, tokenizer)
    with pytest.raises(DataError, match="unknown template 'vicuna'.*known"):
        get_template("vicuna")


def test_conversation_files_report_file_line_and_id(tmp_path):
    good = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    path = write_json(tmp_path / "d.json", [good, {"id": "b", "conversations": [{"from": "bot", "value": "?"}]}, good])
    with pytest.raises(DataError, match=r"d.json:\d+ \(sample id 'b'\): turn 0"):
        list(iter_conversations(path))
    bad: list[str] = []
    assert [s.sample_id for s in iter_conversations(path, skip_bad=True, bad=bad)] == ["a", "a"]
    assert len(bad) == 1 and "'b'" in bad[0]
    # The reported line is where the sample starts in the file.
    line = int(bad[0].split("d.json:")[1].split(" ")[0])
    assert '"id": "b"' in path.read_text().splitlines()[line]  # the line after the opening brace

    lines = tmp_path / "d.jsonl"
    lines.write_text(
        json.dumps(good) + "\n{not json\n" + json.dumps({"id": "c", "video": "v.mp4", "conversations": []}) + "\n"
    )
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON line"):
        list(iter_conversations(lines))
    bad = []
    assert [s.sample_id for s in iter_conversations(lines, skip_bad=True, bad=bad)] == ["a"]
    assert "d.jsonl:2" in bad[0] and "d.jsonl:3 (sample id 'c')" in bad[1]
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a", "conversations": [}]')
    with pytest.raises(DataError, match=r"broken.json:1: invalid JSON in sample 0"):
        list(iter_conversations(broken, skip_bad=True))


def test_role_content_turns_read_as_the_from_value_ones(tmp_path):
    """LLaVA-NeXT's preprocess_qwen takes `conv["role"], conv["content"]` and maps human/gpt to user/assistant."""
    llava = {"id": "a", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\nhi"}]}
    llava["conversations"].append({"from": "gpt", "value": "yo"})
    chat = {
        **llava,
        "conversations": [{"role": "user", "content": "<image>\nhi"}, {"role": "assistant", "content": "yo"}],
    }
    mixed = {**llava, "conversations": [llava["conversations"][0], {"role": "gpt", "content": "yo"}]}
    path = write_json(tmp_path / "d.jsonl", [llava, chat, mixed], jsonl=True)
    parsed = list(iter_conversations(path))
    assert parsed[0].turns == parsed[1].turns == parsed[2].turns == [("human", "<image>\nhi"), ("gpt", "yo")]
    bad = write_json(tmp_path / "b.json", [{"id": "z", "conversations": [{"role": "robot", "content": "?"}]}])
    with pytest.raises(DataError, match=r"sample id 'z'\): turn 0 .*'role'"):
        list(iter_conversations(bad))
