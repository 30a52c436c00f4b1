"""DVC stage `frames`: Extract frames from the character videos, sampled by timestamp."""
from charseg.frames import main
from charseg.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
