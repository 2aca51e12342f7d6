"""On PYTHONPATH of a test's training ranks: with REGATE_RANK_STATE_DIR set, each rank writes the elision state it
holds at the end of training to `rank{N}.pt` there (only observes; the checkpoint keeps rank 0's alone)."""

import os

if os.environ.get("REGATE_RANK_STATE_DIR") and os.environ.get("LOCAL_RANK") is not None:
    from pathlib import Path

    import torch

    from regate_plugin.training.callback import TokenElisionCallback

    _on_train_end = TokenElisionCallback.on_train_end

    def on_train_end(self, args, state, control, **kwargs):
        out = Path(os.environ["REGATE_RANK_STATE_DIR"]) / f"rank{os.environ['RANK']}.pt"
        torch.save(self.elision.state_dict(), out)
        return _on_train_end(self, args, state, control, **kwargs)

    TokenElisionCallback.on_train_end = on_train_end
