"""Speed, memory and quality benchmarks: `python -m benchmarks.run [--quick] [--only NAME]` (or `slimstep bench`)."""
