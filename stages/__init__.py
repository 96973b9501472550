"""One thin module per DVC stage: params → library → outputs. Run one with `python -m stages NAME [ARG]`."""
