"""The data plane and what it stands on: loaded models and their follower, routing, leases, metrics."""
