"""DVC stage `eda`: Look at the extracted frames before labelling them: balance, sizes, samples and bad frames."""
from charseg.eda import main
from charseg.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
