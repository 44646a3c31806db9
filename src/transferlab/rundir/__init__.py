"""The run directory: its files read and written safely, its lock, and the report and plots made from it."""
