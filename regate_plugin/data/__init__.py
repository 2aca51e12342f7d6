"""Training data: the LLaVA conversation format and the upstream templates that tokenize it."""

from .conversations import Conversation, DataError, iter_conversations, parse_sample
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
    "VIDEO_TOKEN_INDEX",
    "Conversation",
    "ConversationTemplate",
    "DataError",
    "TokenizedSample",
    "expand_placeholders",
    "get_template",
    "iter_conversations",
    "parse_sample",
]
