"""The image benchmarks; each registers itself in `regate_plugin.eval.image.BENCHMARKS`, which imports this
package when first read."""

from . import gqa, mmbench, mme, pope, scienceqa, seed, textvqa, vizwiz  # noqa: F401
