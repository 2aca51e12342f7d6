"""The adapter on the re-created Videollama2MistralForCausalLM, in process (upstream env):
1. keep_ratio 1: loss and gradients equal the upstream forward's own;
2. keep_ratio 0.5: the decoder receives each kept token's original position (upstream's forward would drop
   position ids, and HF would number the compact sequence 0..Lc-1) and a mask with exactly the kept tokens.

    python check_adapter.py BASE CLIP DATA MEDIA CACHE   -> prints one JSON line
"""

import json
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parents[1]))

import regate_plugin as rg  # noqa: E402

base, clip, data, media, cache = sys.argv[1:6]
upstream = runpy.run_path(str(ROOT / "videollama2/train.py"), run_name="videollama2_train")
upstream["set_seed"](42)
model = upstream["VLLMs"]["videollama2_mistral"].from_pretrained(base)
model_args = SimpleNamespace(
    vision_tower=clip,
    mm_vision_select_layer=-2,
    mm_vision_select_feature="patch",
    mm_projector_type="mlp2x_gelu",
    pretrain_mm_mlp_adapter=None,
)
model.get_model().initialize_vision_modules(model_args)
model.config.num_frames = 2
tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(base, model_max_length=256, padding_side="right")
tokenizer.pad_token = tokenizer.unk_token
tower = model.get_vision_tower()
data_args = SimpleNamespace(
    data_path=[data],
    data_folder=media,
    is_multimodal=True,
    num_frames=2,
    image_aspect_ratio="pad",
    image_processor=tower.image_processor,
    video_processor=tower.image_processor,
    image_size=tower.image_size,
    is_pretraining=False,
)
module = upstream["make_supervised_data_module"](tokenizer, data_args)
batch = module["data_collator"]([module["train_dataset"][i] for i in range(6)])
model.train()

expected = model(**batch)
expected.loss.backward()
expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
model.zero_grad(set_to_none=True)

cfg = rg.ReGATEConfig(keep_ratio=1.0, warmup_steps=0, dense_steps=0)
rg.enable_token_elision(model, rg.build_token_elision("regate", cfg, reference=cache, tokenizer=tokenizer))
out = model(**batch)
out.loss.backward()
grad_error = max(
    (p.grad - expected_grads[n]).abs().max().item() for n, p in model.named_parameters() if n in expected_grads
)

seen = {}
model.get_model().register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
rg.enable_token_elision(model, rg.build_token_elision("regate", cfg.replace(keep_ratio=0.5), reference=cache))
sparse = model(**batch)
kept = sparse.token_elision["kept_mask"]
mask = seen["attention_mask"].bool()
positions_ok = all(
    torch.equal(seen["position_ids"][row][mask[row]], kept[row].nonzero().squeeze(1)) for row in range(kept.shape[0])
)
print(
    json.dumps(
        {
            "loss": out.loss.item(),
            "expected_loss": expected.loss.item(),
            "grad_error": grad_error,
            "labels_kept": torch.equal(out.labels, expected.labels),
            "kept": sparse.token_elision["kept"],
            "candidates": sparse.token_elision["candidates"],
            "compact_length": int(mask.shape[1]),
            "merged_length": int(kept.shape[1]),
            "positions_ok": positions_ok,
            "mask_ok": torch.equal(mask.sum(1), kept.sum(1)),
        }
    )
)
