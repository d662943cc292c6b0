"""Generated bad-input corpus for the reliability tests (see `corpus.py`)."""
