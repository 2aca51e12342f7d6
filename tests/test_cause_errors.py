"""Errors that name their cause (docs/RELIABILITY.md): an upstream --version without a plugin template, a mistyped
checkpoint path, an upstream LLaVA checkpoint given to the HF runner, a processor without a chat template."""

from __future__ import annotations

import json

from .test_launch_llava import _llava

TEMPLATE_OF_VERSIONS = r"""
import json, sys
from llava import conversation
from regate_plugin.core.errors import UserError
from regate_plugin.training.launchers import llava_template
found = {}
for version in sys.argv[1:]:
    conversation.default_conversation = conversation.conv_templates[version]
    try:
        found[version] = llava_template(None)
    except UserError as err:
        found[version] = "error: " + str(err)
print(json.dumps(found))
"""


def test_an_upstream_version_without_a_plugin_template_is_named_with_those_that_have_one(tmp_path):
    """Upstream llava-torch's own conversation templates: v1 and plain map to the plugin's; llama_2 and
    llava_v1 (another system prompt) have none, which said nothing (the pre-flight then only found every sample
    missing from the cache)."""
    script = tmp_path / "template_of_versions.py"
    script.write_text(TEMPLATE_OF_VERSIONS)
    found = json.loads(_llava(str(script), "v1", "vicuna_v1", "plain", "llama_2", "llava_v1").stdout)
    assert {v: found[v] for v in ("v1", "vicuna_v1", "plain")} == {"v1": "v1", "vicuna_v1": "v1", "plain": "plain"}
    for version in ("llama_2", "llava_v1"):
        message = found[version]
        assert message.startswith(f"error: --version {version} ") and "\n" not in message
        assert "it has one for: v1 (v1), vicuna_v1 (v1), plain (plain), v0_plain (plain)" in message
