"""On PYTHONPATH of a test's ranks (only observes; the checkpoint keeps rank 0's state alone):

- with REGATE_RANK_STATE_DIR set, each training rank writes the elision state it holds at the end of training to
  `rank{N}.pt` there;
- with REGATE_RANK_EXIT_DIR set, each rank writes `rank{N}.exit` there as its interpreter exits: `open` when the
  default process group is still up then (a gloo group left open can abort the rank in its teardown), else `closed`.
"""

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

if os.environ.get("REGATE_RANK_EXIT_DIR") and os.environ.get("RANK") is not None:
    import atexit
    from pathlib import Path

    def _record_exit() -> None:
        import torch.distributed as dist

        still_open = dist.is_available() and dist.is_initialized()
        out = Path(os.environ["REGATE_RANK_EXIT_DIR"]) / f"rank{os.environ['RANK']}.exit"
        out.write_text("open" if still_open else "closed")

    atexit.register(_record_exit)
