"""DVC stage `split`: Split frames into train and validation so that no validation frame has a near-twin in train."""
from charseg.split import main
from charseg.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
