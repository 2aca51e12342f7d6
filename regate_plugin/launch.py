"""`python -m regate_plugin.launch {llava,videollama2} <upstream train.py arguments> --token_elision regate ...`"""

from .training.launchers import main

if __name__ == "__main__":
    main()
