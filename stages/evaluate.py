"""DVC stage `evaluate`: Compare the trained models of params.yaml `models:` on the validation frames: `python -m stages.evaluate`."""
from charseg.evaluate import main
from charseg.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
