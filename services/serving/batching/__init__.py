"""Merging concurrent requests of one model version into one runtime call, and what a call costs."""
