"""pgolf: a staged, size-checked, legally scored pipeline for the OpenAI Parameter Golf challenge.

Run `pgolf --help`, or see README.md. The package is import-safe: nothing touches CUDA,
environment variables or the network at import time.
"""

__version__ = "0.1.0"
