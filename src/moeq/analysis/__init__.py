"""Plots and statistics about plans and weights."""
