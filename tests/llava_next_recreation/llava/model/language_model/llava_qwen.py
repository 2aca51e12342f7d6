"""Upstream llava/model/language_model/llava_qwen.py: `LlavaQwenForCausalLM.forward` merges, then runs Qwen2."""

from transformers import Qwen2ForCausalLM

from llava.model.llava_arch import LlavaMetaForCausalLM


class LlavaQwenForCausalLM(Qwen2ForCausalLM, LlavaMetaForCausalLM):
    def get_model(self):
        return self.model

    def get_vision_tower(self):
        return getattr(self.model, "vision_tower", None)  # the tower builder is not re-created: text-only runs

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        images=None,
        image_sizes=None,
        return_dict=None,
        modalities=["image"],  # noqa: B006 (upstream signature)
        **kwargs,
    ):
        if inputs_embeds is None:
            (input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels) = (
                self.prepare_inputs_labels_for_multimodal(
                    input_ids, position_ids, attention_mask, past_key_values, labels, images, modalities, image_sizes
                )
            )
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
