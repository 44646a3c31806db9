"""After training: the one prediction path, evaluation, export and error review."""
