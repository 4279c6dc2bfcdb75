"""Target device profiles and memory planning."""
