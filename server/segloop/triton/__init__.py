"""Triton Inference Server integration: the python-backend models of
``model_repository/`` (``models.py``) and ``segloop triton serve`` (``server.py``).
The client side is the ``triton`` runtime (``segloop.runtimes.triton``)."""
