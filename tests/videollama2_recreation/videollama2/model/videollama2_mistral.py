from transformers import MistralConfig, MistralForCausalLM, MistralModel

from .videollama2_arch import videollama2_classes

Videollama2MistralConfig, _, Videollama2MistralForCausalLM = videollama2_classes(
    "Mistral", MistralConfig, MistralModel, MistralForCausalLM, sets_labels=True
)
