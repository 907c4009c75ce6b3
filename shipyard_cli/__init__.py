"""The ``shipyard`` command line: the local stack, jobs, models, data and the demo."""
