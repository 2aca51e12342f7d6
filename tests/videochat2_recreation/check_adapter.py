"""The adapter on the re-created VideoChat2_it_mistral in VideoChat2's pinned stack (transformers 4.40, peft 0.4.0;
run with the VideoLLaMA2 env's python), in process: keep ratio 1 against the model's own forward, and a sparse
step against the decoder run on the kept rows at their original positions (Mistral on 4.40 slices its RoPE table
to the sequence length, so gapped positions need the adapter's rotary hook). Prints one JSON line.

    python check_adapter.py WORKDIR
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import peft  # noqa: E402
import transformers  # noqa: E402

import regate_plugin as rg  # noqa: E402
from tests.llava_data import write_tiny_reference  # noqa: E402
from tests.tokenizers_fixture import write_sentencepiece_llama  # noqa: E402
from tests.videochat2_recreation import fixtures  # noqa: E402

work = Path(sys.argv[1])
write_sentencepiece_llama(work / "tok")
base = write_tiny_reference(work / "mistral", work / "tok", arch="mistral")
model = fixtures.tiny_student(base)
images, prompts, instructions = fixtures.batch(4)
expected = model(images, prompts, instructions)["loss"]
expected.backward()
expected_grads = fixtures.grads(model)
model.zero_grad(set_to_none=True)

reference = fixtures.reference_cache(model, prompts, 4, work / "cache")
cfg = rg.ReGATEConfig(keep_ratio=1.0, warmup_steps=0, dense_steps=0)
rg.enable_token_elision(model, rg.build_token_elision("regate", cfg, reference=reference))
loss = model(images, prompts, instructions)["loss"]
loss.backward()
grads = fixtures.grads(model)
assert grads.keys() == expected_grads.keys()
grad_error = max((grads[n] - expected_grads[n]).abs().max().item() for n in grads)

rg.enable_token_elision(model, rg.build_token_elision("regate", cfg.replace(keep_ratio=0.5), reference=reference))
seen: dict = {}
model.mistral_model.register_forward_pre_hook(lambda m, a, kw: seen.update(inputs=kw), with_kwargs=True)
model.mistral_model.register_forward_hook(lambda m, a, out: seen.update(report=out.token_elision))
sparse = model(images, prompts, instructions)["loss"]
brute_force = fixtures.brute_force_loss(model, seen["inputs"], seen["report"]["kept_mask"])
print(
    json.dumps(
        {
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "loss": loss.item(),
            "expected_loss": expected.item(),
            "grad_error": grad_error,
            "sparse_loss": sparse.item(),
            "brute_force_loss": brute_force,
            "kept": seen["report"]["kept"],
            "candidates": seen["report"]["candidates"],
        }
    )
)
