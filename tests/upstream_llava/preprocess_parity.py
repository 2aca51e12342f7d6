"""Run inside the upstream-LLaVA env (llava-torch 1.2.2.post1, transformers 4.37.2): what the real
`LazySupervisedDataset` + `DataCollatorForSupervisedDataset` give for each sample, beside our template's output
computed in this same env. Prints one JSON object.

    python preprocess_parity.py TOKENIZER_DIR DATA_JSON IMAGE_FOLDER VERSION MAX_LENGTH
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    tokenizer_dir, data_path, image_folder, version, max_length = sys.argv[1:6]
    import transformers
    from llava import conversation as conversation_lib
    from llava.train.train import DataArguments, DataCollatorForSupervisedDataset, LazySupervisedDataset

    from regate_plugin.data import get_template, iter_conversations

    # As llava/train/train.py sets things up for --version v1 / plain.
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        tokenizer_dir, model_max_length=int(max_length), padding_side="right", use_fast=False
    )
    tokenizer.pad_token = tokenizer.unk_token
    conversation_lib.default_conversation = conversation_lib.conv_templates[version]
    data_args = DataArguments(data_path=data_path, lazy_preprocess=True, is_multimodal=True, image_folder=image_folder)
    data_args.image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
    )
    data_args.mm_use_im_start_end = False
    data_args.image_aspect_ratio = "pad"
    dataset = LazySupervisedDataset(data_path=data_path, tokenizer=tokenizer, data_args=data_args)
    collator = DataCollatorForSupervisedDataset(tokenizer=tokenizer)

    template = get_template(version)
    upstream, ours, warnings = [], [], []
    for index, sample in enumerate(iter_conversations(data_path)):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            batch = collator([dataset[index]])
        warnings.append("tokenization mismatch" in printed.getvalue())
        upstream.append({"input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist()})
        encoded = template.encode(sample, tokenizer, int(max_length))
        ours.append({"input_ids": encoded.input_ids[: int(max_length)], "labels": encoded.labels[: int(max_length)]})
    print(
        json.dumps(
            {
                "transformers": transformers.__version__,
                "upstream": upstream,
                "ours": ours,
                "mismatch_warnings": warnings,
            }
        )
    )


if __name__ == "__main__":
    main()
