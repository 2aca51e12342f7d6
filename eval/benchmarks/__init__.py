"""The image benchmarks; importing this package registers each one in `regate_plugin.eval.image.BENCHMARKS`."""

from . import gqa, mmbench, mme, pope, scienceqa, seed, textvqa, vizwiz  # noqa: F401
