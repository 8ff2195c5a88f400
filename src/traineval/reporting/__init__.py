"""Plots and reports built from results and run directories (matplotlib, imported lazily)."""
