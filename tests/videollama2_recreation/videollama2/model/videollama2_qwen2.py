from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

from .videollama2_arch import videollama2_classes

Videollama2Qwen2Config, _, Videollama2Qwen2ForCausalLM = videollama2_classes(
    "Qwen2", Qwen2Config, Qwen2Model, Qwen2ForCausalLM, sets_labels=False
)
