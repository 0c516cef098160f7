"""What ``python -m dispatcher`` shows: the demo, the live dashboard, and ``top``."""
