"""Re-creation of the parts of LLaVA-VL/LLaVA-NeXT (b42941c) the plugin depends on; see ../README.md."""
