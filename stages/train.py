"""DVC stage `train`: Train one model of params.yaml `models:` on the split: `python -m stages.train <name>` (stage train@<name>)."""
from charseg.train import main
from charseg.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
