"""Ray job: only the evaluate stage of the config (it reads the previous stage's output folder)."""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("evaluate"))
