"""The commands a user runs: config-file runs (`fit`, `evaluate`, `cv`), predictions, the
HTML run report and the generated config reference."""
