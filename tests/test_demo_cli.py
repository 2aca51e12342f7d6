import subprocess
import sys

from regate_plugin.core import ReferenceLossCache
from regate_plugin.demo import COLOURS, QUESTIONS, plot_curves, run_demo


def test_shortened_demo_runs_all_three_modes(tmp_path):
    results = run_demo(tmp_path, steps=12, batch_size=4, eval_every=5)
    assert [r.mode for r in results] == ["none", "regate", "random"]
    none, regate, random = results
    # Same batches, fewer answer tokens under elision, and both elided modes spend the same budget.
    assert regate.answer_tokens == random.answer_tokens < none.answer_tokens
    # Content-addressed: identical token sequences share one entry (6 colours x 3 questions at most).
    cached = len(ReferenceLossCache(tmp_path / "reference_cache"))
    assert cached > 1 and cached <= len(COLOURS) * len(QUESTIONS)
    # Learning curves: every mode starts from the same model and is evaluated at steps 5, 10 and 12.
    for r in results:
        assert len(r.curve) == 4 and r.curve[0] == none.curve[0] and r.curve[-1] == (r.answer_tokens, r.accuracy)
        assert [t for t, _ in r.curve] == sorted(t for t, _ in r.curve)
    assert plot_curves(results, tmp_path / "curves.png").stat().st_size > 0


def test_cli_help_lists_demo():
    out = subprocess.run([sys.executable, "-m", "regate_plugin.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout
