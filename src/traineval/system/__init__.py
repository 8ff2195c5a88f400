"""The floor every wing stands on: atomic files, seeds, CPU threads, processes and ranks,
the torch version check, and text read from or written for strangers."""
