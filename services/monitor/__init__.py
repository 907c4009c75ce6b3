"""Monitor: drift of logged predictions against the data a production model was trained on."""
