"""difusi-mini: the tiny default model difusi trains itself (procedural data, training, evaluation)."""
