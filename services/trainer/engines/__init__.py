"""The trainer's engines: PyTorch (and Transformers, DDP), Keras, export, tracking, model card.

Nothing here knows about HTTP or Celery; :mod:`services.trainer.worker.runner` wires a job to them.
"""
