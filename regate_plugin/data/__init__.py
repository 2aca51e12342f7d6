"""Training data: the LLaVA conversation format and the upstream templates that tokenize it."""

from .conversations import Conversation, DataError, iter_conversations, parse_sample
from .hf_dataset import V1_CHAT_TEMPLATE, HFVisionCollator, LlavaHFDataset, encode_for_hf
from .templates import (
    IMAGE_TOKEN_INDEX,
    PLACEHOLDER_IDS,
    TEMPLATES,
    VIDEO_TOKEN_INDEX,
    ConversationTemplate,
    TokenizedSample,
    expand_placeholders,
    get_template,
)

__all__ = [
    "IMAGE_TOKEN_INDEX",
    "PLACEHOLDER_IDS",
    "TEMPLATES",
    "V1_CHAT_TEMPLATE",
    "VIDEO_TOKEN_INDEX",
    "Conversation",
    "ConversationTemplate",
    "DataError",
    "HFVisionCollator",
    "LlavaHFDataset",
    "TokenizedSample",
    "encode_for_hf",
    "expand_placeholders",
    "get_template",
    "iter_conversations",
    "parse_sample",
]
