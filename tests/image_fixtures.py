"""Image-benchmark fixtures we generate in each official data format (docs/EVAL.md), with PIL images."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image


def colour(level: int) -> Image.Image:
    return Image.new("RGB", (32, 24), (level % 256, (3 * level) % 256, (7 * level) % 256))


def write_image(path: Path, level: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour(level).save(path)
    return path


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_pope(root: Path, per_category: int = 4) -> Path:
    """coco/coco_pope_<category>.json label lines (POPE's own format) and COCO-named images."""
    for c, category in enumerate(("adversarial", "popular", "random")):
        records = []
        for i in range(per_category):
            image = f"COCO_val2014_{c * 100 + i:012d}.jpg"
            write_image(root / "val2014" / image, 10 * i + c)
            records.append(
                {
                    "question_id": i + 1,
                    "image": image,
                    "text": f"Is there a thing{i} in the image?",
                    "label": "yes" if (i + c) % 2 == 0 else "no",
                }
            )
        _jsonl(root / "coco" / f"coco_pope_{category}.json", records)
    return root


def write_mme(root: Path) -> Path:
    """Three subtasks: two laid out side by side (existence, code_reasoning), one with images/ and
    questions_answers_YN/ (artwork); two images each, one yes and one no question per image."""
    for subtask, split in (("existence", False), ("artwork", True), ("code_reasoning", False)):
        for i in range(2):
            image_dir = root / subtask / ("images" if split else "")
            text_dir = root / subtask / ("questions_answers_YN" if split else "")
            write_image(image_dir / f"{i:04d}.{'jpg' if i == 0 else 'png'}", 40 * i + len(subtask))
            text_dir.mkdir(parents=True, exist_ok=True)
            (text_dir / f"{i:04d}.txt").write_text(
                f"Is there a {subtask} {i} in this image? Please answer yes or no.\tYes\n"
                f"Is there a cat {i} in this image? Please answer yes or no.\tNo\n"
            )
    return root


def write_scienceqa(root: Path) -> Path:
    """problems.json, pid_splits.json and images/test/<pid>/image.png: 4 test problems with an image (one with an
    empty hint, one with 5 choices), 2 without, and a train problem."""
    problems = {}
    for n, pid in enumerate(["11", "12", "13", "14", "15", "16", "99"]):
        image = "image.png" if n < 4 or pid == "99" else None
        problems[pid] = {
            "question": f"Which one is thing {n}?",
            "choices": [f"choice {k}" for k in range(5 if n == 1 else 3)],
            "answer": n % 3,
            "hint": "" if n == 2 else f"Hint number {n}.",
            "image": image,
            "split": "train" if pid == "99" else "test",
        }
        if image and pid != "99":
            write_image(root / "images" / "test" / pid / "image.png", 30 * n)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"test": ["11", "12", "13", "14", "15", "16"], "train": ["99"]}))
    return root


def write_seed(root: Path) -> Path:
    """SEED-Bench.json (4 image questions over two dimensions, 2 video ones) and SEED-Bench-image/."""
    questions = []
    for i in range(6):
        data_type = "image" if i < 4 else "video"
        data_id = f"{i}.jpg" if data_type == "image" else f"v{i}.mp4"
        if data_type == "image":
            write_image(root / "SEED-Bench-image" / data_id, 20 * i)
        questions.append(
            {
                "question_id": str(100 + i),
                "question": f"What is shown {i}?",
                "choice_a": f"a{i}",
                "choice_b": f"b{i}",
                "choice_c": f"c{i}",
                "choice_d": f"d{i}",
                "answer": "ABCD"[i % 4],
                "data_id": data_id,
                "data_type": data_type,
                "question_type_id": 1 + i % 2 if i < 4 else 10,
            }
        )
    data = {
        "questions": questions,
        "question_type": {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10},
    }
    (root / "SEED-Bench.json").write_text(json.dumps(data))
    return root


TEN_ANSWERS = (
    ["two"] * 4 + ["2"] * 2 + ["a dog"] * 3 + ["dogs"],
    ["unanswerable"] * 7 + ["blue"] * 3,
    ["yes"] * 10,
    ["red, white"] * 2 + ["Red and white"] * 2 + ["the flag"] * 6,
)


def write_vizwiz(root: Path) -> Path:
    records = []
    for i, answers in enumerate(TEN_ANSWERS):
        image = f"VizWiz_val_{i:08d}.jpg"
        write_image(root / "val" / image, 15 * i)
        records.append(
            {
                "image": image,
                "question": f"What is this {i}?",
                "answerable": int(i != 1),
                "answer_type": ["number", "unanswerable", "yes/no", "other"][i],
                "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers],
            }
        )
    (root / "val.json").write_text(json.dumps(records))
    return root


def write_textvqa(root: Path) -> Path:
    """TextVQA_0.5.1_val.json (two questions share an image), the Rosetta OCR file (one image has no tokens)."""
    data, ocr = [], []
    for i, answers in enumerate(TEN_ANSWERS):
        image_id = f"img{min(i, 2):04d}"
        data.append(
            {"question_id": 34602 + i, "image_id": image_id, "question": f"what does sign {i} say?", "answers": answers}
        )
        if i <= 2:
            write_image(root / "train_images" / f"{image_id}.jpg", 25 * i)
    ocr = [
        {"image_id": "img0000", "ocr_tokens": ["STOP", "sign"]},
        {"image_id": "img0002", "ocr_tokens": ["2", "dogs"]},
        {"image_id": "img0001", "ocr_tokens": []},
    ]
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    (root / "TextVQA_Rosetta_OCR_v0.2_val.json").write_text(json.dumps({"data": ocr}))
    return root


def write_gqa(root: Path) -> Path:
    questions = {}
    for i, (answer, structural) in enumerate(
        [("yes", "verify"), ("no", "logical"), ("red", "query"), ("left", "choose")]
    ):
        write_image(root / "images" / f"n{i}.jpg", 35 * i)
        questions[f"20{i}"] = {
            "imageId": f"n{i}",
            "question": f"Is it thing {i}?",
            "answer": answer,
            "types": {"structural": structural, "semantic": "attr", "detailed": "x"},
        }
    (root / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    return root


def _png_base64(level: int) -> str:
    buffer = io.BytesIO()
    colour(level).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_mmbench(root: Path, name: str = "mmbench_dev_20230712.tsv") -> Path:
    """Two base questions with all their circular rotations (index + k * 1e6), one with a hint and 4 options,
    one without a hint and 3 options (D left empty)."""
    rows = []
    for base, (hint, options, answer) in enumerate(
        [("A hint.", ["cat", "dog", "bird", "fish"], 1), ("", ["up", "down", "left"], 2)]
    ):
        for k in range(len(options)):
            rotated = options[k:] + options[:k]
            letters = {letter: rotated[j] if j < len(rotated) else "" for j, letter in enumerate("ABCD")}
            rows.append(
                {
                    "index": base + k * 1_000_000,
                    "question": f"What is it {base}?",
                    "hint": hint,
                    **letters,
                    "answer": "ABCD"[rotated.index(options[answer])],
                    "category": ["count", "scene"][base],
                    "l2-category": "perception",
                    "image": _png_base64(50 * base),
                    "source": "gen",
                    "comment": "",
                    "split": "dev",
                }
            )
    root.mkdir(parents=True, exist_ok=True)
    with (root / name).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return root


WRITERS = {
    "pope": write_pope,
    "mme": write_mme,
    "scienceqa": write_scienceqa,
    "seed": write_seed,
    "vizwiz": write_vizwiz,
    "textvqa": write_textvqa,
    "gqa": write_gqa,
    "mmbench": write_mmbench,
}
