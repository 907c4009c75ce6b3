"""Hyperparameter sweeps: an Optuna study whose trials are ordinary training jobs.

``schemas`` (what a sweep asks for and how the API shows it), ``tables`` (the sweep and which trial
number is which job), ``space`` (a trial's values applied to the job spec), ``study`` (Optuna's study in
the platform database), ``trials`` (what a trial's job does differently: report, prune, defer
registering), ``driver`` (ask, create jobs, tell, register the best), ``plot`` (the objective over
trials as SVG). docs/sweeps.md says how it fits together.
"""
