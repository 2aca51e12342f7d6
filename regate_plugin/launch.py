"""`python -m regate_plugin.launch [--local_rank=N] {llava,videollama2,videochat2} <upstream train script arguments>
--token_elision regate ...` (the deepspeed launcher puts `--local_rank=N` before the codebase)."""

from .training.launchers import main

if __name__ == "__main__":
    main()
