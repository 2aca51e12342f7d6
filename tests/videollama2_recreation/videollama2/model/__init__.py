from .videollama2_mistral import Videollama2MistralConfig, Videollama2MistralForCausalLM
from .videollama2_qwen2 import Videollama2Qwen2Config, Videollama2Qwen2ForCausalLM

VLLMs = {
    "videollama2": Videollama2MistralForCausalLM,
    "videollama2_mistral": Videollama2MistralForCausalLM,
    "videollama2_qwen2": Videollama2Qwen2ForCausalLM,
}
VLLMConfigs = {
    "videollama2": Videollama2MistralConfig,
    "videollama2_mistral": Videollama2MistralConfig,
    "videollama2_qwen2": Videollama2Qwen2Config,
}
