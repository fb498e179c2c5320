"""`python -m pipeline …` is `pgolf …`; it is also the torchrun entry:

    torchrun --standalone --nproc_per_node=8 -m pipeline run sidecar48 --data DIR
"""

from pipeline.cli import main

if __name__ == "__main__":
    main()
