NUM_FRAMES = 8
MAX_FRAMES = 32
IGNORE_INDEX = -100
MODAL_INDEX_MAP = {"<image>": -200, "<video>": -201, "<audio>": -202}
