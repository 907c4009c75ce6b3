"""Serving: answers predictions with the `production` version of every registered model."""
