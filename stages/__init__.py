"""charseg pipeline stages: one module per DVC stage, shared code in `charseg`."""
