"""DVC stage `masks`: The masks stage: one binary person mask per frame, paired with its frame by id."""
from charseg.masks import main
from charseg.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
